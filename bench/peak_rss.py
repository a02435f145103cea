"""Peak resident memory of loading a model and explaining one image, each in a fresh process.

    python bench/peak_rss.py                      # tiny (3 x 16 x 16) and resnet18 (3 x 224 x 224)
    python bench/peak_rss.py --models tiny --forward-memory-mb 256
    python bench/peak_rss.py --models resnet18 --width 8 --methods grad_cam,integrated_gradients

For each model a child process imports the engine, writes a model directory (config.yaml,
model.py, weights.pt, random weights) to a temporary folder, loads it with
``Engine.from_model_store`` (the server's load path: ONNX export, check and batch probe
included), then runs one Explain with occlusion, RISE, Grad-CAM and Integrated Gradients
(``--methods``; ``--width``: the ResNet's base width, 64 as in ResNet-18).
It prints, in MiB: the peak RSS after the imports, after loading and after the Explain
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the process's high-water mark, which
only grows), the RSS kept after the Explain (``/proc/self/statm``), and the forward batch
sizes the load chose.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MODELS = ("tiny", "resnet18")
METHODS = ("occlusion", "rise", "grad_cam", "integrated_gradients")

TINY_SOURCE = """import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1, stride=2), nn.ReLU(),
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))
"""

# The ResNet test network's own source (tests/support/resnets.py), then the class served.
RESNET_SOURCE = (
    (Path(__file__).resolve().parents[1] / "tests/support/resnets.py").read_text()
    + """

class ResNet18(ResNet):
    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__(BasicBlock, (2, 2, 2, 2), num_classes, width)
"""
)


def child(
    name: str, methods: list[str], width: int, memory_mb: int | None, max_batch: int | None
) -> dict[str, object]:
    """Loads and explains in this process; returns the figures (module docstring)."""
    import dataclasses
    import os
    import resource
    import tempfile
    from pathlib import Path

    import torch
    import yaml

    from xaiserve.api.types import ExplainRequest, MethodRequest, RawTensor
    from xaiserve.engine.engine import Engine
    from xaiserve.engine.limits import EngineLimits
    from xaiserve.runtime.forward.config import ForwardConfig

    def peak_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    after_imports = peak_mib()
    torch.manual_seed(0)
    if name == "tiny":
        shape, labels, cls, source, kwargs = (
            (3, 16, 16),
            ["a", "b", "c"],
            "TinyNet",
            TINY_SOURCE,
            {},
        )
        cam = "features.4"
    else:
        shape, labels, cls, source = (
            (3, 224, 224),
            [str(i) for i in range(10)],
            "ResNet18",
            RESNET_SOURCE,
        )
        kwargs, cam = {"num_classes": 10, "width": width}, "layer4"
    root = Path(tempfile.mkdtemp(prefix="peak-rss-"))
    directory = root / name
    directory.mkdir()
    (directory / "model.py").write_text(source)
    namespace: dict[str, object] = {}
    exec(compile(source, "model.py", "exec"), namespace)
    torch.save(namespace[cls](**kwargs).state_dict(), directory / "weights.pt")
    config = {
        "name": name,
        "version": "1",
        "model": {"file": "model.py", "class": cls, "kwargs": kwargs},
        "weights": "weights.pt",
        "input": {"channels": shape[0], "height": shape[1], "width": shape[2]},
        "normalize": {"mean": [0.5] * 3, "std": [0.25] * 3},
        "labels": labels,
        "cam_layer": cam,
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config))

    forward = ForwardConfig()
    if memory_mb is not None:
        forward = dataclasses.replace(forward, memory_mb=memory_mb)
    if max_batch is not None:
        forward = dataclasses.replace(forward, max_batch=max_batch)
    engine = Engine.from_model_store(root, EngineLimits(), forward)
    after_load = peak_mib()
    forwards = engine.forwards[name]
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    request = ExplainRequest(
        model=name,
        image=RawTensor(tuple(shape), x.numpy().tobytes()),
        methods=tuple(MethodRequest(m, field=f"methods[{i}]") for i, m in enumerate(methods)),
    )
    result = engine.explain(request)
    return {
        "model": name,
        "input_shape": list(shape),
        "width": width if name != "tiny" else None,
        "methods": methods,
        "bytes_per_image": forwards.bytes_per_image,
        "batch_size": forwards.batch_size,
        "call_batches": forwards.call_batches,
        "forward_passes": sum(e.forward_passes for e in result.explanations),
        "peak_mib_after_imports": round(after_imports, 1),
        "peak_mib_after_load": round(after_load, 1),
        "peak_mib_after_explain": round(peak_mib(), 1),
        "rss_mib_after_explain": round(rss_mib(), 1),
    }


def measure(
    name: str,
    methods: tuple[str, ...] = METHODS,
    width: int = 64,
    memory_mb: int | None = None,
    max_batch: int | None = None,
) -> dict:
    """Runs :func:`child` for ``name`` in a fresh interpreter; returns its figures."""
    command = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--methods",
        ",".join(methods),
        "--width",
        str(width),
    ]
    if memory_mb is not None:
        command += ["--forward-memory-mb", str(memory_mb)]
    if max_batch is not None:
        command += ["--forward-max-batch", str(max_batch)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: the child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--forward-memory-mb", type=int, default=None)
    parser.add_argument("--forward-max-batch", type=int, default=None)
    parser.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        methods = args.methods.split(",")
        print(
            json.dumps(
                child(
                    args.child, methods, args.width, args.forward_memory_mb, args.forward_max_batch
                )
            )
        )
        return
    for name in args.models.split(","):
        figures = measure(
            name,
            tuple(args.methods.split(",")),
            args.width,
            args.forward_memory_mb,
            args.forward_max_batch,
        )
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
