"""The wire contract, torch-free and imported by both sides.

The generated stubs (v1, torchserve), plain request and result types, domain errors,
proto <-> plain conversion and the worker protocol.
"""
