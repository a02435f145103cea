"""GAD on the trained demo model (seed 002): support models for circle/square, then RC and
RS over held-out images. The GAD map never adds an important pixel to the original map, so
its region lies inside the original's (RC <= 1)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.model_store.synthetic import TEST_SEED, TRAIN_SEED, make_sample
from xaiserve.offline.evaluate import EvalImage
from xaiserve.offline.evaluate_gad import complexity_table, region_rows, sensitivity_table
from xaiserve.offline.gad_train import GadTrainSettings, train_pair
from xaiserve.runtime.model import load_model_dir


@pytest.fixture(scope="module")
def gad_demo(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    store = tmp_path_factory.mktemp("store")
    shutil.copytree(demo_model_dir, store / "demo")
    served = load_model_dir(store / "demo")
    samples = [make_sample(TRAIN_SEED, i) for i in range(192) if i % 4 in (0, 1)]
    x = torch.from_numpy(np.stack([s.image for s in samples]))
    labels = torch.tensor([s.label for s in samples])
    # a short run: one epoch, a larger step than the seed's 4e-5 so the models move
    train_pair(served, x, labels, (0, 1), [0, 4, 8], GadTrainSettings(epochs=1, learning_rate=1e-3))
    return Engine.from_model_store(store, EngineLimits())


def test_gad_regions_on_the_demo_model(gad_demo: Engine) -> None:
    held_out = [
        EvalImage(f"demo-{i}", s.image, s.label)
        for i, s in ((i, make_sample(TEST_SEED, i)) for i in range(12) if i % 4 < 2)
    ]
    rows = region_rows(gad_demo, "demo", held_out, ("saliency", "input_x_gradient"))
    assert len(rows) == 6 * 2 * 2  # images x explained classes x methods
    assert all(r.subset for r in rows), "GAD adds no important pixel"
    assert all(0 < r.kept_pixels <= r.important_pixels for r in rows)
    assert all(0 < r.rc <= 1 + 1e-9 for r in rows)
    assert any(r.rc < 1 for r in rows)
    for row in complexity_table(rows):
        print(
            f"RC {row['explained']} {row['method']}: GAD smaller {row['gad_smaller']}, "
            f"orig {row['orig']}, mean {row['rc_mean']:.3f}"
        )
    for row in sensitivity_table(rows):
        print(
            f"RS x100 {row['explained']} {row['method']}: sup {row['rs_sup_x100']:.3f}, "
            f"GAD {row['rs_gad_x100']:.3f}"
        )
        assert math.isfinite(row["rs_gad_x100"])
