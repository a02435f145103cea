"""Offline tools over the engine: evaluate, calibrate, gad-train, tables and plots.

The only package that imports matplotlib and scipy.
"""
