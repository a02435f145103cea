"""Counted forward passes: the budget, torch and ONNX Runtime backends, ONNX export, and incremental occlusion (incremental/)."""
