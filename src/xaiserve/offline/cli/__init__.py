"""Offline commands of the ``xaiserve`` command-line tool that run the engine in-process
(no server; command-line code, so it prints and shows progress bars), one module each:
``xaiserve evaluate`` scores methods by APEM over a data set (seed 004's tables);
``xaiserve calibrate`` measures the S-CAM calibration (seed 003) and ``xaiserve gad-train``
trains GAD support models (seed 002), both stored in the model directory. :mod:`.common`
holds the data sources and arguments they share.

    xaiserve evaluate --model demo --data demo --n 500 --out var/eval
    xaiserve evaluate --model mynet --data images/ --methods saliency,grad_cam
    xaiserve calibrate --model demo --data demo --n 2000
    xaiserve gad-train --model demo --classes circle,square --alphas 0,2,4,6,8
"""
