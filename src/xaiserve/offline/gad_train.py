"""Training GAD support regression models (seed 002, sections 4.1 and 4.2).

For a class pair (A, B) and a distance alpha, the targets are the original model's logits
(pre-softmax) over the images of A and B, with the logit of B lowered by alpha on the
images of A and the logit of A lowered by alpha on the images of B: the classes are pushed
apart while every other relation between samples is kept. A copy of the network,
initialized with the original weights, is fitted to these targets as a regression: linear
output (the logits themselves), mean squared error over all logits, Adam at the seed's
learning rate 4e-5 for the seed's 10 epochs by default.

BatchNorm layers keep the original statistics (the copy trains in eval mode): the support
model should stay an approximation of the original on the same inputs, not adapt to the
pair's subset. alpha = 0 leaves the targets equal to the original outputs, so the original
model is its own support model: nothing is trained or stored for it.

Deterministic: torch's global RNG is seeded in a forked RNG state, deterministic algorithms
and one intra-op thread are used during training (restored afterwards), and batches are
drawn from a seeded generator.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xaiserve.runtime.artifacts import file_sha256
from xaiserve.runtime.forward.counted import batches
from xaiserve.runtime.gad_store import FORMAT, GAD_DIR, read_index, support_file_name, write_index
from xaiserve.runtime.model import ServedModel
from xaiserve.runtime.pixel_space import PixelSpaceModel

Progress = Callable[[int, str], Callable[[int], None]]
"""progress(total_steps, description) -> update(steps): a progress bar factory."""


def _no_progress(_total: int, _description: str) -> Callable[[int], None]:
    return lambda _steps: None


@dataclass(frozen=True)
class GadTrainSettings:
    """The regression's settings (defaults: the seed's section 6)."""

    epochs: int = 10
    learning_rate: float = 4e-5
    batch_size: int = 32
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.threads < 1:
            raise ValueError("epochs, batch_size and threads must be >= 1")
        if not self.learning_rate > 0:
            raise ValueError("learning_rate must be > 0")


def distanced_targets(
    logits: torch.Tensor, labels: torch.Tensor, pair: tuple[int, int], alpha: float
) -> torch.Tensor:
    """Seed section 4.1: logits N x K, labels N (each in the pair) -> targets N x K.

    Images of class A get logit B - alpha, images of class B get logit A - alpha."""
    a, b = pair
    targets = logits.clone()
    targets[labels == a, b] -= alpha
    targets[labels == b, a] -= alpha
    return targets


@torch.no_grad()
def original_logits(module: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The model's logits for x N x C x *spatial, in batches: N x K."""
    return torch.cat([module(x[part]) for part in batches(x.shape[0], batch_size)])


def fit_support_model(
    original: PixelSpaceModel,
    x: torch.Tensor,
    targets: torch.Tensor,
    settings: GadTrainSettings,
    update: Callable[[int], None] = lambda _steps: None,
) -> tuple[PixelSpaceModel, float]:
    """Seed section 4.2: a copy of ``original`` (pixel-space module) fitted to ``targets``
    (N x K) on x (N x C x *spatial) by MSE with Adam. Returns the copy and the mean squared
    error of its last epoch."""
    model = copy.deepcopy(original).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    loss_fn = nn.MSELoss()
    generator = torch.Generator().manual_seed(settings.seed)
    last = float("nan")
    for _ in range(settings.epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        total = 0.0
        for part in batches(x.shape[0], settings.batch_size):
            idx = order[part]
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = loss_fn(model(x[idx]), targets[idx])
                loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            update(1)
        last = total / x.shape[0]
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), last


def train_pair(
    served: ServedModel,
    x: torch.Tensor,
    labels: torch.Tensor,
    pair: tuple[int, int],
    alphas: Sequence[float],
    settings: GadTrainSettings | None = None,
    progress: Progress = _no_progress,
) -> dict[str, Any]:
    """Trains the support models of ``pair`` for every alpha > 0 and stores them in the
    model directory (``gad/``), replacing an earlier entry for the same pair.

    x: N x C x *spatial pixel-space images, labels: N, all in the pair. Returns the pair's
    index entry (classes, labels, alphas, files, settings, final MSE, seconds).
    """
    settings = settings or GadTrainSettings()
    a, b = pair
    n_classes = len(served.config.labels)
    if a == b or not (0 <= a < n_classes and 0 <= b < n_classes):
        raise ValueError(f"a pair of two different classes in 0..{n_classes - 1} is needed")
    if not ((labels == a) | (labels == b)).all():
        raise ValueError("every training image must belong to one of the pair's classes")
    if not ((labels == a).any() and (labels == b).any()):
        raise ValueError("both classes of the pair need training images")
    if any(alpha < 0 for alpha in alphas) or not any(alpha > 0 for alpha in alphas):
        raise ValueError("alphas must be >= 0 with at least one > 0")
    start = time.perf_counter()
    directory = served.directory / GAD_DIR
    directory.mkdir(parents=True, exist_ok=True)
    alphas = sorted({float(alpha) for alpha in alphas})
    trained = [alpha for alpha in alphas if alpha > 0]
    steps = settings.epochs * -(-x.shape[0] // settings.batch_size) * len(trained)
    update = progress(steps, f"gad {served.config.labels[a]},{served.config.labels[b]}")
    files, mse = [], []
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(settings.threads)
    try:
        logits = original_logits(served.module, x, settings.batch_size)
        for alpha in alphas:
            if alpha == 0:
                files.append("")
                mse.append(0.0)
                continue
            targets = distanced_targets(logits, labels, pair, alpha)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(settings.seed)
                model, last = fit_support_model(served.module, x, targets, settings, update)
            name = support_file_name(pair, alpha)
            state = {k: v.contiguous() for k, v in model.net.state_dict().items()}
            torch.save(state, directory / name)
            files.append(name)
            mse.append(last)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    entry = {
        "classes": [a, b],
        "labels": [served.config.labels[a], served.config.labels[b]],
        "alphas": alphas,
        "files": files,
        "final_mse": mse,
        "images": int(x.shape[0]),
        "settings": asdict(settings),
        "seconds": round(time.perf_counter() - start, 3),
    }
    _record(served, entry)
    return entry


def _record(served: ServedModel, entry: dict[str, Any]) -> Path:
    """Adds (or replaces) ``entry`` in gad/index.json; drops entries of other weights."""
    sha = file_sha256(served.directory / served.config.weights)
    index = read_index(served.directory)
    if index is None or index.get("weights_sha256") != sha:
        index = {"format": FORMAT, "weights_sha256": sha, "pairs": []}
    same = [p for p in index["pairs"] if sorted(p.get("classes", ())) == sorted(entry["classes"])]
    for old in same:  # files the new entry no longer lists
        for name in set(old.get("files", ())) - set(entry["files"]) - {""}:
            (served.directory / GAD_DIR / name).unlink(missing_ok=True)
    index["pairs"] = [*(p for p in index["pairs"] if p not in same), entry]
    return write_index(served.directory, index)
