"""A model store with one good model directory and one of each kind that fails to load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from .tiny_models import tiny_served, write_tiny_model_dir

#: The good directory's model name.
GOOD = "tiny"


def _edit_config(directory: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    config = yaml.safe_load((directory / "config.yaml").read_text())
    edit(config)
    (directory / "config.yaml").write_text(yaml.safe_dump(config))


def _tiny(root: Path, name: str, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """The tiny model in ``root/name``, served as ``name``, its config then edited."""
    directory = write_tiny_model_dir(root / name)

    def rename(config: dict[str, Any]) -> None:
        config["name"] = name
        if edit is not None:
            edit(config)

    _edit_config(directory, rename)
    return directory


def _bad_yaml(root: Path) -> None:
    directory = _tiny(root, "bad-yaml")
    (directory / "config.yaml").write_text("name: bad-yaml\nlabels: [a, b\n")


def _missing_weights(root: Path) -> None:
    (_tiny(root, "no-weights") / "weights.pt").unlink()


def _raising_class(root: Path, name: str, where: str) -> None:
    directory = _tiny(root, name)
    code = (directory / "model.py").read_text()
    marker = "def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
    if where == "init":
        code += (
            "\n\nclass Raising(TinyNet):\n    def __init__(self):\n"
            "        raise ValueError('no GPU found')\n"
        )
    else:
        code = code.replace(marker, marker + "        raise RuntimeError('shape trouble')\n")
    (directory / "model.py").write_text(code)
    if where == "init":
        _edit_config(directory, lambda c: c["model"].update({"class": "Raising"}))


def _missing_field(root: Path) -> None:
    _tiny(root, "no-channels", lambda c: c["input"].pop("channels"))


def _invalid_field(root: Path) -> None:
    _tiny(root, "bad-channels", lambda c: c["input"].update({"channels": "three"}))


def _wrong_labels(root: Path) -> None:
    _tiny(root, "four-labels", lambda c: c.update({"labels": ["a", "b", "c", "d"]}))


def _pickled_module(root: Path) -> None:
    directory = _tiny(root, "pickled")
    torch.save(tiny_served().module.net, directory / "weights.pt")


def _torchscript(root: Path) -> None:
    directory = _tiny(root, "scripted")
    traced = torch.jit.trace(tiny_served().module.net, torch.zeros(1, 3, 16, 16))
    torch.jit.save(traced, directory / "weights.pt")


#: Model name -> (writer, a fragment of the reason it is refused with).
BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    "bad-yaml": (_bad_yaml, "config.yaml: while parsing"),
    "no-weights": (_missing_weights, "weights.pt: weights file not found"),
    "raises-init": (
        lambda root: _raising_class(root, "raises-init", "init"),
        "constructing Raising failed: ValueError: no GPU found",
    ),
    "raises-forward": (
        lambda root: _raising_class(root, "raises-forward", "forward"),
        "a forward pass of a 1 x 3 x 16 x 16 image failed: RuntimeError: shape trouble",
    ),
    "no-channels": (_missing_field, "missing key 'channels'"),
    "bad-channels": (_invalid_field, "'input.channels' must hold int values"),
    "four-labels": (_wrong_labels, "gave (1, 3), not logits (1, 4), one per label"),
    "pickled": (
        _pickled_module,
        "holds a pickled object (support.tiny_models.TinyNet), not a state dict",
    ),
    "scripted": (
        _torchscript,
        "a TorchScript archive, not a state dict; serve it as TorchScript (config.yaml "
        "'format: torchscript', 'weights: weights.pt', no 'model')",
    ),
}

#: The advice a refused weights file carries.
WEIGHTS_ADVICE = (
    "save the weights with torch.save(model.state_dict(), 'weights.pt') (or "
    "safetensors.torch.save_file) and give the class in model.py (config.yaml model.class)"
)


def write_store(root: Path, good: bool = True) -> Path:
    """``root`` holding the good tiny model (unless ``good`` is False) and every BROKEN
    directory, each under its model name."""
    root.mkdir(parents=True, exist_ok=True)
    if good:
        write_tiny_model_dir(root / GOOD)
    for writer, _ in BROKEN.values():
        writer(root)
    return root
