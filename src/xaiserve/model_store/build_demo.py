"""Build the demo model directory: train DemoCNN and write model.py, weights and config.

Usage: ``python -m xaiserve.model_store.build_demo --out DIR [--force]``.

The directory holds

- ``model.py``: a verbatim copy of ``xaiserve/model_store/nets.py``;
- ``weights.pt``: the state dict, loadable with ``torch.load(path, weights_only=True)``;
- ``config.yaml``: name, version, model class and kwargs, input size, normalization,
  labels and the Grad-CAM layer;
- ``training.json``: the TrainReport (accuracy, time, sizes, normalization, data seeds);
- ``model.onnx`` and ``model.onnx.json``: the pixel-space forward exported to ONNX (dynamic
  batch) and its check against torch on random, constant and held-out images
  (:func:`xaiserve.runtime.forward.onnx_export.export_model_dir`; on failure no ``model.onnx``,
  the reason in the json, and the model serves on torch).

Everything is written into a temporary sibling directory that is renamed into place at the
end, so a half-written model directory is never seen.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.contrib.logging import logging_redirect_tqdm

from xaiserve.model_store import nets, synthetic
from xaiserve.model_store.train import N_TEST, N_TRAIN, WEIGHTS_FILE, TrainReport, train_demo
from xaiserve.runtime.forward.onnx_export import ONNX_FILE, REPORT_FILE, export_model_dir

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.py"
TRAINING_FILE = "training.json"
MODEL_FILES = (CONFIG_FILE, MODEL_FILE, WEIGHTS_FILE, TRAINING_FILE)


def demo_config(report: TrainReport) -> dict[str, Any]:
    """The config.yaml content of the demo model trained as described by ``report``."""
    return {
        "name": "demo",
        "version": "1",
        "model": {
            "file": MODEL_FILE,
            "class": nets.DemoCNN.__name__,
            "kwargs": {"num_classes": len(synthetic.LABELS)},
        },
        "weights": WEIGHTS_FILE,
        "input": {"channels": 3, "height": synthetic.IMAGE_SIZE, "width": synthetic.IMAGE_SIZE},
        "normalize": {"mean": list(report.mean), "std": list(report.std)},
        "labels": list(synthetic.LABELS),
        "cam_layer": nets.DEMO_CAM_LAYER,
    }


def is_complete(out_dir: Path) -> bool:
    """True when ``out_dir`` holds every file of a model directory."""
    return all((Path(out_dir) / name).is_file() for name in MODEL_FILES)


def _write_files(target: Path, report: TrainReport) -> None:
    """Write model.py, config.yaml and training.json next to the weights in ``target``."""
    shutil.copyfile(nets.__file__, target / MODEL_FILE)
    with open(target / CONFIG_FILE, "w", encoding="utf-8") as f:
        yaml.safe_dump(demo_config(report), f, sort_keys=False, default_flow_style=None)
    with open(target / TRAINING_FILE, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(report), f, indent=2)
        f.write("\n")


ONNX_CHECK_IMAGES = 16
"""Held-out images (``synthetic.TEST_SEED``) the ONNX export is checked on."""
EXPORT_FILES = (ONNX_FILE, REPORT_FILE)
"""Written by the export next to MODEL_FILES (model.onnx only when export and check pass)."""


def _export_forward(model_dir: Path) -> None:
    """Writes model.onnx (checked against torch) into ``model_dir``; failures are logged."""
    images, _, _ = synthetic.make_dataset(ONNX_CHECK_IMAGES, synthetic.TEST_SEED)
    export_model_dir(model_dir, real_inputs=torch.from_numpy(images))


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``, replacing an existing ``out_dir``."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, trash / out_dir.name)
    os.replace(staging, out_dir)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.<name>.lock`` beside ``out_dir`` (one builder at a time).

    Test sessions and servers started together then train once: the others wait and
    find the finished directory.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(out_dir: Path, *, progress: bool, epochs: int | None, n_train: int, n_test: int) -> None:
    """Train into a staging directory and rename it to ``out_dir`` (replacing it)."""
    # Staged one level deeper than the model directories, so that a model store scan
    # (``root/*/config.yaml``) never sees the half-written copy.
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.build-", dir=out_dir.parent))
    try:
        staging = scratch / out_dir.name
        staging.mkdir()
        logger.info("training the demo model into %s", out_dir)
        report = train_demo(
            staging, epochs=epochs, progress=progress, n_train=n_train, n_test=n_test
        )
        _write_files(staging, report)
        _export_forward(staging)
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info(
        "demo model written to %s: held-out accuracy %.4f, %.1f s",
        out_dir,
        report.test_accuracy,
        report.train_seconds,
    )


def build_demo(
    out_dir: Path,
    *,
    force: bool = False,
    progress: bool = True,
    epochs: int | None = None,
    n_train: int = N_TRAIN,
    n_test: int = N_TEST,
) -> Path:
    """Train the demo model and write its directory ``out_dir``; returns ``out_dir``.

    Does nothing when ``out_dir/config.yaml`` exists, unless ``force``. ``epochs``,
    ``n_train`` and ``n_test`` are passed to ``train_demo`` (small values for tests).
    """
    out_dir = Path(out_dir)
    with _build_lock(out_dir):
        if (out_dir / CONFIG_FILE).exists() and not force:
            logger.info("demo model exists at %s; not rebuilding (use --force)", out_dir)
        else:
            _build(out_dir, progress=progress, epochs=epochs, n_train=n_train, n_test=n_test)
    return out_dir


def ensure_demo_model(out_dir: Path, progress: bool = False) -> Path:
    """Return ``out_dir``, building the demo model there first if it is missing or incomplete."""
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return out_dir
    with _build_lock(out_dir):
        if not is_complete(out_dir):  # another process may have built it while we waited
            _build(out_dir, progress=progress, epochs=None, n_train=N_TRAIN, n_test=N_TEST)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: parse arguments and build the demo model directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if DIR/config.yaml exists"
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default: the tuned value)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        build_demo(args.out, force=args.force, progress=True, epochs=args.epochs)


if __name__ == "__main__":
    main()
