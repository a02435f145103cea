"""The demo model directory in each served format, written from its trained weights.

``class_safetensors``: the class + weights as ``weights.safetensors``; ``torchscript``:
``torch.jit.save(torch.jit.script(net))``; ``export``: ``torch.export.save`` with a dynamic
batch; ``export_batch1``: exported for a fixed batch of 1; ``onnx``: ``torch.onnx.export``
with a dynamic batch (the TorchScript-based exporter), no torch code beside it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from xaiserve.runtime.model import load_model_dir

FORMAT_DIRS = ("class_safetensors", "torchscript", "export", "export_batch1", "onnx")


def write_format(demo: Path, out: Path, kind: str) -> Path:
    """Writes the demo model of ``demo`` as ``kind`` (one of FORMAT_DIRS) into ``out``."""
    served = load_model_dir(demo)
    net = served.module.net
    raw = yaml.safe_load((demo / "config.yaml").read_text())
    out.mkdir(parents=True, exist_ok=True)
    x = torch.rand(1, *served.config.input_shape)
    if kind == "class_safetensors":
        shutil.copy(demo / raw["model"]["file"], out / raw["model"]["file"])
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out / "w.safetensors")
        raw["weights"] = "w.safetensors"
    else:
        del raw["model"]
        raw.pop("weights", None)
        if kind == "torchscript":
            torch.jit.save(torch.jit.script(net), out / "model.pt")
        elif kind == "export":
            batch = {"x": {0: torch.export.Dim("batch", max=1024)}}
            program = torch.export.export(net, (torch.cat([x, x]),), dynamic_shapes=batch)
            torch.export.save(program, out / "model.pt2")
        elif kind == "onnx":
            torch.onnx.export(
                net,
                (x,),
                str(out / "model.onnx"),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                dynamo=False,
            )
        else:
            torch.export.save(torch.export.export(net, (x,)), out / "model.pt2")
    (out / "config.yaml").write_text(yaml.safe_dump(raw))
    return out
