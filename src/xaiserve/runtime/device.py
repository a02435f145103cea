"""Where a model runs (its torch device) and how many threads torch gets.

A device setting (``--device``, a model's ``config.yaml`` ``device:``, the TorchServe
archive's ``xaiserve.forward.device``) is checked for its form without torch
(``forward.config.device_spec``) and resolved here, where torch says which GPUs there are.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping

import torch

from xaiserve.runtime.cpus import torch_threads, usable_cpus
from xaiserve.runtime.forward.config import AUTO, device_spec

log = logging.getLogger(__name__)

CPU = torch.device("cpu")


def resolve_device(spec: str, gpu_id: int | None = None) -> torch.device:
    """The torch device of a device setting.

    ``auto``: ``cuda:<gpu_id>`` (``cuda:0`` without one) when ``torch.cuda.is_available()``,
    else the CPU. ``cpu``: the CPU. ``cuda``: ``cuda:<gpu_id>`` (``cuda:0``); ``cuda:N``:
    that GPU. gpu_id: the GPU TorchServe gave the worker, or None.

    Raises:
        ValueError: a setting of another form, a GPU where torch sees none (a CPU build of
            torch, no driver, no GPU visible), or an index past the GPUs torch sees; the
            message says which.
    """
    spec = device_spec(spec)
    if spec == "cpu":
        return CPU
    available = torch.cuda.is_available()
    if spec == AUTO and not available:
        return CPU
    if not available:
        raise ValueError(
            f"{spec!r}: torch sees no GPU (torch.cuda.is_available() is false: a CPU build of "
            f"torch {torch.__version__}, no driver, or no GPU visible); use auto or cpu"
        )
    index = int(spec.partition(":")[2]) if ":" in spec else (gpu_id or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(
            f"{spec!r}: torch sees {count} GPU{'s' if count != 1 else ''} "
            f"(cuda:0 to cuda:{count - 1}), not cuda:{index}"
        )
    return torch.device("cuda", index)


def onnx_device_id(configured: int | None, device: torch.device) -> int:
    """The GPU of ONNX Runtime's GPU providers: ``configured`` when set, else the index of
    the model's torch GPU (0 for a model on the CPU)."""
    if configured is not None:
        return configured
    return (device.index or 0) if device.type == "cuda" else 0


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (the CPU when it has none)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return CPU


def configure_torch_threads(requested: int = 0, environ: Mapping[str, str] | None = None) -> int:
    """Sets torch's intra-op threads at the start of a server or worker; returns them.

    requested > 0: that many. 0: the CPUs this process may use (``cpus.usable_cpus``),
    unless ``OMP_NUM_THREADS`` is set, which torch then follows.
    """
    environ = os.environ if environ is None else environ
    threads = torch_threads(requested, environ)
    if threads is not None:
        torch.set_num_threads(threads)
    log.info(
        "torch threads %d (%s; usable CPUs %d)",
        torch.get_num_threads(),
        "set" if requested else "OMP_NUM_THREADS" if threads is None else "the usable CPUs",
        usable_cpus(),
    )
    return torch.get_num_threads()
