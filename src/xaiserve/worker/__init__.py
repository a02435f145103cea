"""The TorchServe handler that hosts the engine in a TorchServe worker.

The only package that imports TorchServe.
"""
