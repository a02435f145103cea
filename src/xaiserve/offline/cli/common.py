"""What the offline commands share: image sources (the demo data set's splits, a folder),
loading the engine over a model store, and argument parsers."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from xaiserve.api.errors import ModelLoadError
from xaiserve.api.types import EncodedImage
from xaiserve.engine.engine import Engine
from xaiserve.engine.limits import EngineLimits
from xaiserve.engine.preprocess import decode_image
from xaiserve.methods.registry import METHODS
from xaiserve.offline.evaluate import EvalImage
from xaiserve.runtime.model import ModelConfig, ServedModel

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def demo_images(n: int, offset: int = 0) -> Iterator[EvalImage]:
    """Held-out images of the demo data set, with labels and object masks."""
    from xaiserve.model_store.synthetic import TEST_SEED, make_sample

    for i in range(offset, offset + n):
        sample = make_sample(TEST_SEED, i)
        yield EvalImage(f"demo-{i}", sample.image, sample.label, sample.mask)


def folder_images(
    root: Path, cfg: ModelConfig, limits: EngineLimits, n: int
) -> Iterator[EvalImage]:
    """Images under ``root`` (sorted); a parent folder named like a label gives the label."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for path in files[:n]:
        x = decode_image(EncodedImage(path.read_bytes()), cfg, limits)[0].numpy()
        label = cfg.labels.index(path.parent.name) if path.parent.name in cfg.labels else None
        yield EvalImage(str(path.relative_to(root)), x, label)


def load_engine(model_store: Path, model: str, limits: EngineLimits) -> Engine:
    """The engine over ``model_store``; the demo model is built there first if missing."""
    if model == "demo" and not (model_store / "demo" / "config.yaml").exists():
        from xaiserve.model_store.build_demo import ensure_demo_model

        ensure_demo_model(model_store / "demo", progress=True)
    return Engine.from_model_store(model_store, limits)


def load_served(model_store: Path, model: str, limits: EngineLimits) -> tuple[Engine, ServedModel]:
    """The engine (``load_engine``) and its model ``model``; ModelLoadError when the store
    does not hold it."""
    engine = load_engine(model_store, model, limits)
    served = engine.models.get(model)
    if served is None:
        raise ModelLoadError(f"model {model!r} not in {model_store}")
    return engine, served


def demo_train_images(n: int) -> Iterator[EvalImage]:
    """The first ``n`` images of the demo model's training split, with labels."""
    from xaiserve.model_store.synthetic import TRAIN_SEED, make_sample

    for i in range(n):
        sample = make_sample(TRAIN_SEED, i)
        yield EvalImage(f"train-{i}", sample.image, sample.label, sample.mask)


def training_images(
    data: str, cfg: ModelConfig, limits: EngineLimits, n: int
) -> Iterator[EvalImage]:
    """``demo``: the training split (the data set the model learned from); else a folder."""
    return demo_train_images(n) if data == "demo" else folder_images(Path(data), cfg, limits, n)


def method_names(text: str) -> list[str]:
    if text == "all":
        return [n for n, cls in METHODS.items() if not cls.composite]
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    return names


def floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: steady on shared machines)",
    )


def add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo", help="model name in the store (default demo)")
    parser.add_argument(
        "--model-store",
        type=Path,
        default=Path("var/models"),
        help="directory of model directories (default var/models)",
    )
