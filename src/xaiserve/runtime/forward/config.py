"""Configuration of forward-only batches (torch-free, so the server parses it cheaply).

See :mod:`.backends` for how it is used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

TORCH = "torch"
ONNXRUNTIME = "onnxruntime"
BACKENDS = (TORCH, ONNXRUNTIME)
FALLBACK = "torch_fallback"
"""The label (and timing ``forward.torch_fallback``) of torch running a request that asked
for ONNX Runtime where it is unavailable."""
DEFAULT_TOLERANCE = 1e-4
BATCHED = "batched"
SERIAL = "serial"
CONCURRENCY = (BATCHED, SERIAL)
"""How requests on one model run: ``batched`` (their device work shares calls) or
``serial`` (one request at a time per model, the behaviour before issue 22, kept for the
side-by-side benchmark); server flag ``--concurrency``, a TorchServe archive's
``xaiserve.concurrency``, env ``XAISERVE_CONCURRENCY``."""
_MIB = 1024 * 1024
AUTO = "auto"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
DEVICE_FORMS = "auto, cpu, cuda or cuda:N (N: a GPU index)"


def device_spec(text: str) -> str:
    """``text`` as a device setting (lower case, no spaces): ``auto``, ``cpu``, ``cuda``
    or ``cuda:N``. Whether the GPU is there is checked where torch is
    (``runtime.device.resolve_device``).

    Raises:
        ValueError: any other text.
    """
    spec = str(text).strip().lower()
    if not _DEVICE_RE.match(spec):
        raise ValueError(f"must be {DEVICE_FORMS}, got {text!r}")
    return spec


class SessionOptions(TypedDict, total=False):
    """Keyword arguments of ``onnx_export.new_session`` (each has a default there)."""

    providers: Sequence[str]
    threads: int
    device_id: int


@dataclass(frozen=True)
class ForwardConfig:
    """Where models run and how forward-only batches run (server flags ``--device``,
    ``--forward-backend``, ``--onnx-threads``, ``--onnx-providers``, ``--onnx-device-id``,
    ``--forward-memory-mb``, ``--forward-max-batch``, ``--forward-call-batch``; env
    ``XAISERVE_*``).

    device: the torch device of the models whose config.yaml names none: ``auto`` (the
        GPU when torch sees one, else the CPU; in a TorchServe worker the GPU TorchServe
        gave it), ``cpu``, ``cuda`` (the first GPU, or the worker's) or ``cuda:N``.

    backend: the default of models whose ONNX forward passed its check: "onnxruntime", or
        "torch" (ONNX Runtime then only for requests that ask for it).
    onnx_threads: intra-op threads of each ONNX Runtime session; 0: the CPUs this process
        may use (``runtime.cpus.usable_cpus``: affinity and cgroup quota), not
        onnxruntime's default of one per core of the host.
    onnx_providers: execution providers in order of preference; those the installed
        onnxruntime lacks are skipped. The default takes CUDA where onnxruntime-gpu and a
        GPU are there (the GPU image on GPU nodes) and the CPU everywhere else.
    onnx_device_id: the GPU of GPU providers (CUDA, TensorRT, ROCm); None (the default):
        the model's torch GPU (``cuda:N`` -> N; 0 for a model on the CPU; in a TorchServe
        worker the GPU TorchServe gave it), so torch and ONNX Runtime share one GPU.
    memory_mb: the memory budget of one forward-only batch: bytes per image x batch <= it
        (bytes per image: the input and every activation, ``forward.image_bytes``). Gradient
        batches keep about that much per image for their backward pass, so they follow it
        too (at most ``EngineLimits.max_batch`` images).
    max_batch: images per forward-only batch, at most, however many the memory budget
        allows: a small model would otherwise get batches of tens of thousands of images,
        which buy no throughput (calls past a few hundred images of a small model leave
        the CPU's caches) and hold the whole budget for every request.
    call_batch: images per backend call, at most; 0: on ONNX Runtime the batch size with
        the best throughput, measured when the model loads (``forward.fastest_batch``,
        about a second), on torch the memory budget's batch.
    onnx_tolerance: the largest |torch - onnxruntime| logit difference the check accepts.
    export_on_load: export a model without ``model.onnx`` when it is loaded (in memory).
    incremental_occlusion: occlusion recomputes only the region of the early layers a
        window changes (see :mod:`.incremental.plan`), on the request's backend, where the
        model's graph allows it; off: every occluded image is a full forward pass.
    """

    backend: str = ONNXRUNTIME
    device: str = AUTO
    onnx_threads: int = 0
    onnx_providers: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")
    onnx_device_id: int | None = None
    memory_mb: int = 1024
    max_batch: int = 256
    call_batch: int = 0
    onnx_tolerance: float = DEFAULT_TOLERANCE
    export_on_load: bool = True
    incremental_occlusion: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.onnx_threads < 0:
            raise ValueError(f"onnx_threads must be >= 0, got {self.onnx_threads}")
        try:
            object.__setattr__(self, "device", device_spec(self.device))  # "CUDA:1" -> "cuda:1"
        except ValueError as err:
            raise ValueError(f"device {err}") from None
        if self.onnx_device_id is not None and self.onnx_device_id < 0:
            raise ValueError(f"onnx_device_id must be >= 0, got {self.onnx_device_id}")
        if not self.onnx_providers:
            raise ValueError("onnx_providers must name at least one provider")
        if self.memory_mb < 1:
            raise ValueError(f"memory_mb must be >= 1, got {self.memory_mb}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.call_batch < 0:
            raise ValueError(f"call_batch must be >= 0, got {self.call_batch}")
        if not isinstance(self.incremental_occlusion, bool):
            raise ValueError(
                f"incremental_occlusion must be true or false, got {self.incremental_occlusion!r}"
            )
        if not self.onnx_tolerance > 0:
            raise ValueError(f"onnx_tolerance must be > 0, got {self.onnx_tolerance}")

    @property
    def session_options(self) -> SessionOptions:
        """Keyword arguments of ``onnx_export.new_session``: providers, threads, GPU (0
        while ``onnx_device_id`` is None; ``backends.prepare_forwards`` sets it per model)."""
        return {
            "providers": self.onnx_providers,
            "threads": self.onnx_threads,
            "device_id": self.onnx_device_id or 0,
        }

    @property
    def memory_budget(self) -> int:
        """The memory budget in bytes."""
        return self.memory_mb * _MIB
