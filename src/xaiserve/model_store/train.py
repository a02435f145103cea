"""Deterministic CPU training of the demo CNN on the synthetic shape data set.

The model is trained on normalized inputs ``(x - mean) / std`` with per-channel mean and
std of the training images (rounded to ``_STATS_DECIMALS`` decimals, so the numbers
written to config.yaml are exactly the ones used in training). Training is deterministic:
torch's global RNG is seeded inside a forked RNG state, deterministic algorithms are on
and the thread count is fixed for the duration (both restored afterwards), and batches are
shuffled and augmented from a seeded generator. Same code and machine, same weights, bit for
bit; other CPUs may round differently.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from xaiserve.model_store import synthetic
from xaiserve.model_store.nets import DemoCNN

logger = logging.getLogger(__name__)

N_TRAIN = 6000
N_TEST = 1000
DEFAULT_EPOCHS = 4
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
WARMUP_FRACTION = 0.15
TORCH_SEED = 0
TRAIN_THREADS = 1
"""Intra-op threads while training. One thread makes the run independent of the core count
and immune to OpenMP stalls on a shared, oversubscribed machine, where more threads ran
slower than one (docs/performance.md)."""
WEIGHTS_FILE = "weights.pt"
_STATS_DECIMALS = 4

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class TrainReport:
    """What a training run did and how well the model does on the held-out set.

    ``train_seconds`` is the wall-clock time of the whole run (data generation, fitting
    and evaluation); ``mean``/``std`` are the per-channel normalization the model expects.
    """

    test_accuracy: float
    train_seconds: float
    epochs: int
    n_train: int
    n_test: int
    mean: Triple
    std: Triple
    train_seed: int = synthetic.TRAIN_SEED
    test_seed: int = synthetic.TEST_SEED


def channel_stats(images: np.ndarray) -> tuple[Triple, Triple]:
    """Per-channel mean and std of images N x 3 x H x W, rounded to ``_STATS_DECIMALS``."""
    channels = [images[:, c] for c in range(3)]  # one at a time keeps temporaries small
    m0, m1, m2 = (round(float(ch.mean(dtype=np.float64)), _STATS_DECIMALS) for ch in channels)
    s0, s1, s2 = (round(float(ch.std(dtype=np.float64)), _STATS_DECIMALS) for ch in channels)
    return (m0, m1, m2), (s0, s1, s2)


def normalize(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(images - mean) / std per channel; images N x 3 x H x W float32 -> a new tensor."""
    x = torch.tensor(images, dtype=torch.float32)
    return _normalize_(x, mean, std)


def _normalize_(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Normalize x N x C x H x W in place and return it."""
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    return x.div_(torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random per-sample horizontal and vertical flips of a batch N x C x H x W.

    Every class is closed under flips, so labels are unchanged.
    """
    n = x.shape[0]
    flip_h = torch.rand(n, generator=generator) < 0.5
    flip_v = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip_h.view(n, 1, 1, 1), x.flip(3), x)
    return torch.where(flip_v.view(n, 1, 1, 1), x.flip(2), x)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> float:
    """Accuracy of ``model`` (put in eval mode) on normalized x N x 3 x H x W, labels N."""
    model.eval()
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start : start + batch_size])
        correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / max(x.shape[0], 1)


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, progress: bool) -> None:
    """AdamW with a one-cycle schedule over ``epochs`` passes of x N x 3 x H x W, y N.

    The model is moved to channels-last memory format, which is faster on CPU; the
    arithmetic is the same up to summation order.
    """
    generator = torch.Generator().manual_seed(TORCH_SEED)
    steps_per_epoch = math.ceil(x.shape[0] / BATCH_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=LEARNING_RATE,
        total_steps=epochs * steps_per_epoch,
        pct_start=WARMUP_FRACTION,
    )
    loss_fn = nn.CrossEntropyLoss()
    # Module.to takes memory_format at run time; torch's overloads leave it out
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    total_steps = epochs * steps_per_epoch
    with tqdm(total=total_steps, desc="train demo", unit="batch", disable=not progress) as bar:
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(x.shape[0], generator=generator)
            total_loss, correct = 0.0, 0
            for start in range(0, x.shape[0], BATCH_SIZE):
                idx = order[start : start + BATCH_SIZE]
                xb = _augment(x[idx], generator).contiguous(memory_format=torch.channels_last)
                yb = y[idx]
                optimizer.zero_grad(set_to_none=True)
                logits = model(xb)
                loss = loss_fn(logits, yb)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_value = loss.item()
                total_loss += loss_value * len(idx)
                correct += int((logits.argmax(1) == yb).sum())
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_value:.3f}")
            logger.info(
                "epoch %d/%d: train loss %.4f, train accuracy %.4f",
                epoch + 1,
                epochs,
                total_loss / x.shape[0],
                correct / x.shape[0],
            )


def train_demo(
    out_dir: Path,
    *,
    epochs: int | None = None,
    progress: bool = True,
    n_train: int = N_TRAIN,
    n_test: int = N_TEST,
) -> TrainReport:
    """Train DemoCNN deterministically and save its state dict to ``out_dir/weights.pt``.

    Args:
        out_dir: existing or new directory; only ``weights.pt`` is written there.
        epochs: passes over the training set; ``DEFAULT_EPOCHS`` when None.
        progress: show a tqdm progress bar.
        n_train: training images, drawn with ``synthetic.TRAIN_SEED``.
        n_test: held-out images, drawn with ``synthetic.TEST_SEED``.

    Returns:
        The TrainReport, with the held-out accuracy and the normalization used.
    """
    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    if epochs < 1 or n_train < 1 or n_test < 1:
        raise ValueError(
            f"epochs, n_train and n_test must be positive, got {epochs}, {n_train}, {n_test}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    train_images, _, train_labels = synthetic.make_dataset(n_train, synthetic.TRAIN_SEED)
    test_images, _, test_labels = synthetic.make_dataset(n_test, synthetic.TEST_SEED)
    mean, std = channel_stats(train_images)
    # The arrays are ours: normalize them in place (the training set is 300 MB).
    x_train = _normalize_(torch.from_numpy(train_images), mean, std)
    x_test = _normalize_(torch.from_numpy(test_images), mean, std)
    y_train, y_test = torch.from_numpy(train_labels), torch.from_numpy(test_labels)
    logger.info(
        "generated %d training and %d held-out images in %.1f s",
        n_train,
        n_test,
        time.perf_counter() - started,
    )

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(TRAIN_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TORCH_SEED)
            model = DemoCNN(num_classes=len(synthetic.LABELS))
            _fit(model, x_train, y_train, epochs, progress)
        accuracy = evaluate(model, x_test, y_test)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)

    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    torch.save(state, out_dir / WEIGHTS_FILE)
    seconds = time.perf_counter() - started
    logger.info("held-out accuracy %.4f after %d epochs, %.1f s", accuracy, epochs, seconds)
    return TrainReport(
        test_accuracy=accuracy,
        train_seconds=seconds,
        epochs=epochs,
        n_train=n_train,
        n_test=n_test,
        mean=mean,
        std=std,
    )
