"""Counted forward passes.

The budget, torch and ONNX Runtime backends, ONNX export, and incremental occlusion
(incremental/).
"""
