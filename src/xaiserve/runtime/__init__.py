"""What every method, APEM and the engine run on.

The served model (configuration, loading, calibration, GAD support models) and its counted
forward passes (forward/).
"""
