"""Peak resident memory of loading a model and explaining one image with the default forward
settings (1 GiB memory budget, batches of at most 256 images), each in a fresh process
(``bench/peak_rss.py``, which reads ``resource.getrusage(RUSAGE_SELF).ru_maxrss``).

Bounds: the imports and the ONNX export take about 400 MiB before any batch runs. The tiny
3 x 16 x 16 model's batch is the count cap (256 images of about 31 KiB), so it adds little
to that: 800 MiB is twice what it measures and half of what it peaked at when its batch came
from the memory budget alone (41,923 images). The 224 x 224 model (ResNet-18 shape, base
width 8, about 6 MiB of activations per image) fills the budget (175 images): its bound is
the imports, the export and the 1 GiB budget, 1,500 MiB; it measures about 1,200 MiB.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "bench" / "peak_rss.py"
MIB = 1024 * 1024
BUDGET_MIB = 1024  # ForwardConfig().memory_mb


def peak(*args: str) -> dict:
    """The figures ``bench/peak_rss.py`` prints for one model, measured in a fresh process."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_tiny_model_stays_far_below_the_memory_budget() -> None:
    figures = peak("--models", "tiny")
    assert figures["batch_size"] == 256  # the count cap, not 1 GiB / 31 KiB
    assert figures["forward_passes"] > 256  # the methods ran batches of the cap
    assert figures["peak_mib_after_explain"] < 800, figures


def test_a_224_model_stays_within_the_memory_budget() -> None:
    figures = peak(
        "--models", "resnet18", "--width", "8", "--methods", "grad_cam,integrated_gradients"
    )
    # the budget, not the cap, decides this model's batch
    assert figures["batch_size"] < 256
    assert figures["batch_size"] * figures["bytes_per_image"] <= BUDGET_MIB * MIB
    assert figures["peak_mib_after_explain"] < 1500, figures
    # the batch probe's arena is given back after the load
    assert figures["rss_mib_after_explain"] < figures["peak_mib_after_load"] - 300, figures
