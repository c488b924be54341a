"""Where and how a stage runs: device and dtype choice, autocast, seeding, torch.distributed.

``--device auto`` picks cuda, then mps, then cpu. ``--dtype auto`` picks bfloat16 autocast where it
is faster: CUDA with bf16, and CPUs with AMX tiles. On AVX-512 CPUs without AMX (this project's
2-core dev machine has avx512_bf16 but no AMX) bf16 autocast measured 1.8x *slower* than float32
for the demo model (9.2k vs 16.9k tokens/s, benchmarks/train_throughput.py), so auto means float32
there. Master weights and the optimizer always stay float32.

Distributed runs are launched by ``torchrun``, which sets RANK / WORLD_SIZE / LOCAL_RANK; the
process group uses NCCL on CUDA and gloo on CPU. Without those variables everything is a no-op.

Knows nothing about models, data or stages.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", local)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def cpu_has_amx() -> bool:
    """True on CPUs with AMX tiles for bf16 (Sapphire Rapids and later), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast compute dtype: float32 means no autocast."""
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_amx() else torch.float32
        return torch.float32
    if name not in table:
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return table[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast on the device, or a no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed memory instead of returning each large block to the OS.

    A training step allocates several (B, T, V) tensors of ~67 MB; by default glibc mmaps and
    unmaps each one, so every step pays page faults on fresh memory (15-25% of a step measured
    here). Linux/glibc only; elsewhere a no-op returning False.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group if launched by torchrun; return (info, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return DistInfo(), resolve_device(device_name)
    info = DistInfo(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a copy; the tensor itself when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any of them (e.g. a Ctrl-C seen by one rank).

    The tensor is built on ``device``, the rank's own: NCCL refuses a CPU tensor, and gloo (the tests'
    backend) accepts either, so a tensor built without ``device=`` passes every CPU test and fails
    only on GPUs. Every collective of a stage therefore takes its device from the stage's run.
    """
    value = torch.tensor(float(flag), device=device)
    return bool(all_reduce_sum(value).item() > 0)


def average_gradients(module: torch.nn.Module) -> None:
    """Replace every parameter's gradient by its mean over ranks: what DDP does, by hand.

    For stages whose models are not run through ``DistributedDataParallel.forward`` (PPO samples
    with the policy, then trains two models per minibatch). The gradients travel as one flat
    buffer; a parameter without a gradient on this rank counts as zeros, so every rank sends the
    same layout. A no-op when not distributed.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        mean = flat[offset:offset + n].view_as(p)
        if p.grad is None:
            p.grad = mean.clone()
        else:
            p.grad.copy_(mean)
        offset += n


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class TrainingDiverged(RuntimeError):
    """A loss or gradient norm went NaN/inf; no checkpoint was written for that step."""


class GracefulStop:
    """Context manager for training loops: the first Ctrl-C / SIGTERM sets ``.stop`` so the loop
    finishes its current step, saves and returns; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.stop = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): keep the defaults
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
