"""Builds TorchServe model archives (``.mar``) from model directories.

    python -m xaiserve.model_store.archive --model-dir var/models/demo \\
        --out var/model-archives --batch-size 8 --max-batch-delay-ms 50

An archive holds the model directory's ``config.yaml``, model code and weights, its
``model.onnx`` (exported and checked against torch first when the directory has none, see
:func:`xaiserve.runtime.forward.onnx_export.export_model_dir`; a model that fails export has none
and serves on torch), the handler (:mod:`xaiserve.worker.torchserve_handler`)
and a ``model-config.yaml`` with the per-model TorchServe settings (batch size, maximum
batch delay, response timeout, workers, job queue size), the engine limits the worker
enforces (``xaiserve.limits``) and how it runs forward-only batches
(``xaiserve.forward``: torch device, backend, ONNX Runtime threads and providers, memory
budget, incremental occlusion). The archive is named after the model (``demo.mar``) and
carries its version from ``config.yaml``. ``torch-model-archiver`` does the packing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xaiserve.api.errors import ModelLoadError
from xaiserve.engine.limits import EngineLimits
from xaiserve.runtime.calibration import CALIBRATION_FILES
from xaiserve.runtime.forward.config import BACKENDS, CONCURRENCY, ForwardConfig, device_spec
from xaiserve.runtime.forward.onnx_export import ONNX_FILE, export_model_dir
from xaiserve.runtime.gad_store import index_files, read_index
from xaiserve.runtime.model import read_config

logger = logging.getLogger(__name__)

HANDLER_MODULE = "xaiserve.worker.torchserve_handler"
#: Optional files of a model directory that go into the archive when present (the
#: calibration of ``xaiserve calibrate``; GAD support models come from ``gad/index.json``).
OPTIONAL_FILES = ("model.onnx", "model.onnx.json", *CALIBRATION_FILES)
DEFAULT_OUT = "var/model-archives"


@dataclass(frozen=True)
class ArchiveSettings:
    """Per-model TorchServe settings, written to the archive's model-config.yaml.

    batch_size: requests TorchServe hands to one handler call at most; the handler runs
        them at once, their device work packed into shared calls by the engine.
    max_batch_delay_ms: how long TorchServe waits to fill a batch. 1 (the default): a
        request at low load waits 1 ms for company, and under load a batch is what queued
        while the worker answered the previous one (docs/torchserve.md, "Batching"). 0 is
        refused for batches of more than one: TorchServe 0.12 reads it as its default of
        100 ms.
    response_timeout_s: a worker that takes longer for one batch is restarted.
    min_workers, max_workers: worker processes of the model.
    job_queue_size: requests that may wait for a worker; more are refused by TorchServe.
    limits: per-request limits the engine enforces in the worker.
    forward: how the worker runs forward-only batches.
    concurrency: ``batched`` or ``serial`` (see ``--concurrency`` of the server); "" leaves
        it to the worker's ``XAISERVE_CONCURRENCY`` (``batched`` when unset).
    """

    batch_size: int = 16
    max_batch_delay_ms: int = 1
    response_timeout_s: int = 120
    min_workers: int = 1
    max_workers: int = 1
    job_queue_size: int = 100
    limits: EngineLimits = field(default_factory=EngineLimits)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    concurrency: str = ""

    def __post_init__(self) -> None:
        if self.concurrency not in ("", *CONCURRENCY):
            raise ValueError(f"concurrency must be one of {CONCURRENCY}, got {self.concurrency!r}")
        for name in ("batch_size", "response_timeout_s", "min_workers", "max_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_batch_delay_ms < 0:
            raise ValueError(f"max_batch_delay_ms must be >= 0, got {self.max_batch_delay_ms}")
        if self.max_batch_delay_ms == 0 and self.batch_size > 1:
            raise ValueError(
                "max_batch_delay_ms 0 with batch_size > 1: TorchServe 0.12 reads 0 as its "
                "default delay of 100 ms; give 1 for the shortest wait"
            )
        if self.job_queue_size < 1:
            raise ValueError(f"job_queue_size must be >= 1, got {self.job_queue_size}")
        if self.max_workers < self.min_workers:
            raise ValueError("max_workers must be >= min_workers")

    def model_config(self) -> dict[str, Any]:
        """The contents of model-config.yaml (TorchServe's keys, then the xaiserve section)."""
        section: dict[str, Any] = {
            "limits": dataclasses.asdict(self.limits),
            "forward": self._forward_section(),
        }
        if self.concurrency:
            section["concurrency"] = self.concurrency
        return {
            "minWorkers": self.min_workers,
            "maxWorkers": self.max_workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay_ms,
            "responseTimeout": self.response_timeout_s,
            "jobQueueSize": self.job_queue_size,
            "xaiserve": section,
        }

    def _forward_section(self) -> dict[str, Any]:
        """``xaiserve.forward``: the keys the worker reads (see the handler's
        ``forward_config``)."""
        forward = self.forward
        return {
            "backend": forward.backend,
            "device": forward.device,
            "onnx_threads": forward.onnx_threads,
            "onnx_providers": list(forward.onnx_providers),
            "memory_mb": forward.memory_mb,
            "max_batch": forward.max_batch,
            "call_batch": forward.call_batch,
            "incremental_occlusion": forward.incremental_occlusion,
        }


def handler_file() -> Path:
    """The handler's source file, located without importing it (it imports TorchServe)."""
    spec = importlib.util.find_spec(HANDLER_MODULE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"cannot locate {HANDLER_MODULE}")
    return Path(spec.origin)


def _model_files(model_dir: Path) -> list[str]:
    """Paths, relative to ``model_dir``, of the files that go into the archive."""
    config = read_config(model_dir / "config.yaml")
    files = ["config.yaml", config.model_file, config.weights]
    files += [name for name in OPTIONAL_FILES if (model_dir / name).is_file()]
    files += _python_files(model_dir)  # what the model file may import from next to it
    gad_index = read_index(model_dir)
    files += index_files(gad_index) if gad_index is not None else []
    root = model_dir.resolve()
    for name in files:
        path = (model_dir / name).resolve()
        if root not in path.parents or not path.is_file():
            raise ModelLoadError(f"{model_dir}: {name!r} is not a file inside the directory")
    return list(dict.fromkeys(files))


def _python_files(model_dir: Path) -> list[str]:
    """The ``.py`` files of ``model_dir`` and its subfolders (not hidden ones), relative to
    it, sorted: the helper modules and packages its model file may import."""
    return sorted(
        path.relative_to(model_dir).as_posix()
        for path in model_dir.rglob("*.py")
        if not any(part.startswith(".") for part in path.relative_to(model_dir).parts)
    )


def build_archive(model_dir: Path, out: Path, settings: ArchiveSettings | None = None) -> Path:
    """Packs ``model_dir`` into ``out/<name>.mar`` (replacing an older one); returns its path.

    Raises:
        ModelLoadError: the directory is not a model directory.
        RuntimeError: torch-model-archiver failed (its output is in the message).
    """
    settings = settings or ArchiveSettings()
    model_dir = Path(model_dir)
    config = read_config(model_dir / "config.yaml")
    files = _model_files(model_dir)
    if ONNX_FILE not in files:  # the directory is checked first: export loads the model
        export_model_dir(model_dir)
        files = _model_files(model_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="xaiserve-archive-") as tmp:
        stage = Path(tmp) / "files"
        for name in files:  # keep the directory's layout (model code may sit in a subfolder)
            target = stage / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(model_dir / name, target)
        model_config = Path(tmp) / "model-config.yaml"
        model_config.write_text(yaml.safe_dump(settings.model_config(), sort_keys=False))
        command = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            config.name,
            "--version",
            config.version,
            "--handler",
            str(handler_file()),
            "--extra-files",
            str(stage),  # the folder's contents, subfolders (gad/) kept as they are
            "--config-file",
            str(model_config),
            "--export-path",
            str(out),
            "--force",
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"torch-model-archiver failed for {model_dir}:\n{done.stdout}{done.stderr}"
            )
    archive = out / f"{config.name}.mar"
    logger.info("archived %s version %s into %s", config.name, config.version, archive)
    return archive


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m xaiserve.model_store.archive``."""
    defaults = ArchiveSettings()
    parser = argparse.ArgumentParser(
        prog="python -m xaiserve.model_store.archive",
        description="Build TorchServe model archives (.mar) from xaiserve model directories.",
    )
    parser.add_argument(
        "--model-dir",
        action="append",
        required=True,
        type=Path,
        help="a model directory (config.yaml, model code, weights); repeat for several",
    )
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="the model store")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-batch-delay-ms", type=int, default=defaults.max_batch_delay_ms)
    parser.add_argument("--response-timeout-s", type=int, default=defaults.response_timeout_s)
    parser.add_argument("--min-workers", type=int, default=defaults.min_workers)
    parser.add_argument("--max-workers", type=int, default=defaults.max_workers)
    parser.add_argument("--job-queue-size", type=int, default=defaults.job_queue_size)
    parser.add_argument(
        "--concurrency",
        choices=CONCURRENCY,
        default=defaults.concurrency,
        help="batched: the work of a worker's requests in flight shares device calls; serial: "
        "one request at a time (as before issue 22); unset: the worker's XAISERVE_CONCURRENCY",
    )
    for spec in dataclasses.fields(EngineLimits):
        parser.add_argument(
            "--" + spec.name.replace("_", "-"),
            type=int,
            default=getattr(defaults.limits, spec.name),
            help="engine limit enforced in the worker",
        )
    forward = defaults.forward
    parser.add_argument(
        "--forward-backend",
        choices=BACKENDS,
        default=forward.backend,
        help="default backend of the worker's forward-only batches",
    )
    parser.add_argument(
        "--device",
        type=device_spec,
        default=forward.device,
        help="torch device of the worker's model: auto (the GPU TorchServe gives the worker "
        "where torch sees GPUs, else the CPU), cpu, cuda or cuda:N",
    )
    parser.add_argument(
        "--onnx-threads",
        type=int,
        default=forward.onnx_threads,
        help="intra-op threads per ONNX Runtime session; 0: the CPUs the worker may use",
    )
    parser.add_argument(
        "--onnx-providers",
        default=",".join(forward.onnx_providers),
        help="ONNX Runtime execution providers, comma-separated",
    )
    parser.add_argument(
        "--forward-memory-mb",
        type=int,
        default=forward.memory_mb,
        help="memory budget of one forward-only batch in MiB",
    )
    parser.add_argument(
        "--forward-max-batch",
        type=int,
        default=forward.max_batch,
        help="images per forward-only batch, at most, however many the memory budget allows",
    )
    parser.add_argument(
        "--forward-call-batch",
        type=int,
        default=forward.call_batch,
        help="images per forward-only backend call, at most; 0: measured "
        "at load on ONNX Runtime (the fastest batch)",
    )
    parser.add_argument(
        "--incremental-occlusion",
        action=argparse.BooleanOptionalAction,
        default=forward.incremental_occlusion,
        help="occlusion recomputes only what each window changes",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Builds one archive per ``--model-dir``; prints their paths."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        limits = EngineLimits(
            **{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(EngineLimits)}
        )
        settings = ArchiveSettings(
            batch_size=args.batch_size,
            max_batch_delay_ms=args.max_batch_delay_ms,
            response_timeout_s=args.response_timeout_s,
            min_workers=args.min_workers,
            max_workers=args.max_workers,
            job_queue_size=args.job_queue_size,
            concurrency=args.concurrency,
            limits=limits,
            forward=ForwardConfig(
                backend=args.forward_backend,
                device=args.device,
                onnx_threads=args.onnx_threads,
                onnx_providers=tuple(
                    p.strip() for p in args.onnx_providers.split(",") if p.strip()
                ),
                memory_mb=args.forward_memory_mb,
                max_batch=args.forward_max_batch,
                call_batch=args.forward_call_batch,
                incremental_occlusion=args.incremental_occlusion,
            ),
        )
        for model_dir in args.model_dir:
            print(build_archive(model_dir, args.out, settings))
    except (ValueError, ModelLoadError, RuntimeError) as error:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
