"""Checkpoint directories: written atomically, read with clear errors, resumed exactly.

A checkpoint is a directory any stage can read::

    model.safetensors   the weights (tied embeddings stored once)
    config.json         the model config (tinygpt.model.ModelConfig)
    tokenizer.json      the tokenizer the model was trained with
    tinygpt.json        stage, step, metrics, provenance (package version, time)
    trainer_state.pt    optional, for --resume: optimizer, step, data position, every RNG state

A run directory keeps them as ``checkpoints/step_00000100/`` plus a ``checkpoints/latest``
pointer. A checkpoint is written into a temporary directory, every file fsynced, then renamed
into place, and only then does ``latest`` move (itself written to a temporary file and renamed).
A kill at any moment therefore leaves the previous checkpoint loadable. Every ``torch.load``
uses ``weights_only=True``: a checkpoint cannot run code.

This module knows the model and its config; it knows nothing about stages, data or losses.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from tinygpt import __version__
from tinygpt.model import GPT, ModelConfig
from tinygpt.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
META = "tinygpt.json"
TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"


FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}  # safetensors dtype names a checkpoint's tensors may have

class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or corrupt; the message names the file."""


# --- paths -----------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, a run/stage directory, or its ``checkpoints/`` folder."""
    path = Path(path)
    if (path / WEIGHTS).exists() or (path / META).exists():
        return path
    for pointer in (path / "checkpoints" / LATEST, path / LATEST):
        if pointer.exists():
            name = pointer.read_text().strip()
            target = pointer.parent / name
            if not target.is_dir() and not _recover_swap(target):
                raise CheckpointError(f"{pointer}: points to {name!r}, which does not exist")
            return target
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    raise CheckpointError(f"{path}: not a checkpoint (no {WEIGHTS}, no checkpoints/{LATEST})")


def _recover_swap(target: Path) -> bool:
    """Put back the complete checkpoint a kill left mid-swap, if there is one.

    Re-saving the step ``latest`` names (a stop at a save step, ``--resume`` of a finished run) moves
    the old directory aside (``.step_N.old-PID``) and then moves the new one in: a kill between the
    two renames leaves ``latest`` naming nothing. The old copy was published, so it is complete.
    """
    aside = sorted(target.parent.glob(f".{target.name}.old-*"))
    if not aside:
        return False
    aside[-1].rename(target)
    _fsync_dir(target.parent)
    print(f"warning: {target} was missing after an interrupted save; restored it from {aside[-1].name}")
    return True


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (PPO records its reference's, and checks it on resume)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``run_dir/checkpoints/latest`` points to, or None if there is none yet."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    return resolve_checkpoint(run_dir)


# --- RNG state ----------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step can touch, as tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- writing --------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module  # DDP
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # torch.compile
        else:
            return model


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, model_config: ModelConfig,
                    tokenizer_json: str | None, meta: dict[str, Any],
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory at ``path`` atomically (temp dir, fsync, rename).

    Refuses (CheckpointError) to write weights that hold NaN or inf. An existing directory at
    ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    model = _unwrap(model)
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise CheckpointError(f"refusing to write {path}: parameter {name} holds NaN/inf")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    st_save_model(model, str(tmp / WEIGHTS))
    (tmp / CONFIG).write_text(json.dumps(model_config.to_dict(), indent=2) + "\n")
    if tokenizer_json is not None:
        (tmp / TOKENIZER).write_text(tokenizer_json)
    full_meta = {"tinygpt_version": __version__, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **meta}
    (tmp / META).write_text(json.dumps(full_meta, indent=2, default=str) + "\n")
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE)
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)

    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    _fsync_dir(path.parent)
    return path


def step_path(run_dir: str | Path, step: int) -> Path:
    """Where a run keeps the checkpoint of ``step``: ``run_dir/checkpoints/step_XXXXXXXX``."""
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def publish_checkpoint(run_dir: str | Path, path: str | Path, *, keep_last: int = 2) -> Path:
    """Point ``run_dir/checkpoints/latest`` at the complete checkpoint ``path``; prune older ones.

    Call it only once everything belonging to the checkpoint (e.g. a LoRA adapter) is written.
    """
    ckpt_root, path = Path(run_dir) / "checkpoints", Path(path)
    _write_text_atomic(ckpt_root / LATEST, path.name + "\n")
    # what a kill mid-save left: temporary and set-aside directories (one writer per run, so none is live)
    for stale in [*ckpt_root.glob(".step_*.tmp-*"), *ckpt_root.glob(".step_*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last > 0:
        steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
        for old in steps[:-keep_last]:
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    return path


def save_training_checkpoint(run_dir: str | Path, step: int, *, keep_last: int = 2, **kwargs: Any) -> Path:
    """Save ``run_dir/checkpoints/step_XXXXXXXX``, move ``latest`` to it, prune older ones."""
    path = save_checkpoint(step_path(run_dir, step), **kwargs)
    return publish_checkpoint(run_dir, path, keep_last=keep_last)


# --- reading --------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e})") from None


def load_config(path: str | Path) -> ModelConfig:
    ckpt = resolve_checkpoint(path)
    try:
        return ModelConfig.from_dict(_read_json(ckpt / CONFIG))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt / CONFIG}: invalid model config ({e})") from None


def load_meta(path: str | Path) -> dict[str, Any]:
    ckpt = resolve_checkpoint(path)
    return _read_json(ckpt / META) if (ckpt / META).exists() else {}


def load_tokenizer_json(path: str | Path) -> str:
    ckpt = resolve_checkpoint(path)
    f = ckpt / TOKENIZER
    if not f.exists():
        raise CheckpointError(f"missing file: {f}")
    try:
        text = f.read_text(encoding="utf-8")
        if not isinstance(json.loads(text), dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{f}: corrupt tokenizer file ({e})") from None
    return text


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The checkpoint's tokenizer, parsed once; a file `tokenizers` cannot read is named in the error."""
    ckpt = resolve_checkpoint(path)
    try:
        return Tokenizer.from_str(load_tokenizer_json(ckpt))
    except ValueError as e:
        raise CheckpointError(f"{ckpt / TOKENIZER}: corrupt tokenizer file ({e})") from None


def load_model(path: str | Path, *, device: str | torch.device = "cpu",
               config_overrides: dict[str, Any] | None = None) -> tuple[GPT, ModelConfig]:
    """Build the model from ``config.json`` and load ``model.safetensors`` (strict).

    ``config_overrides`` (e.g. ``{"scalar_head": True}``) builds a model with extra parts that
    the checkpoint lacks; those keep their fresh initialisation.
    """
    ckpt = resolve_checkpoint(path)
    saved_cfg = load_config(ckpt)
    cfg = ModelConfig.from_dict({**saved_cfg.to_dict(), **(config_overrides or {})})
    model = GPT(cfg)
    weights = ckpt / WEIGHTS
    _check_weights_file(weights, model, ckpt / CONFIG)
    try:
        missing, unexpected = st_load_model(model, str(weights), strict=False, device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{weights}: unreadable or truncated ({e})") from None
    _check_finite(model, weights)
    # A scalar head asked for on top of a checkpoint without one starts fresh; nothing else may.
    new_head = cfg.scalar_head and not saved_cfg.scalar_head
    allowed_missing = {k for k in missing if new_head and k.startswith("scalar_head.")}
    bad_missing = [k for k in missing if k not in allowed_missing]
    if bad_missing or unexpected:
        raise CheckpointError(f"{weights}: does not match {ckpt / CONFIG} "
                              f"(missing {bad_missing[:5]}, unexpected {list(unexpected)[:5]})")
    return model.to(device), cfg


def load_model_and_tokenizer(path: str | Path, *, device: str | torch.device = "cpu",
                             config_overrides: dict[str, Any] | None = None) -> tuple[GPT, ModelConfig, Tokenizer]:
    """:func:`load_model` and :func:`load_tokenizer` of one checkpoint; a tokenizer whose vocabulary is not
    the model's is an error naming the checkpoint."""
    model, cfg = load_model(path, device=device, config_overrides=config_overrides)
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens, model {cfg.vocab_size}")
    return model, cfg, tokenizer


def load_weights(model: torch.nn.Module, path: str | Path, *, device: str | torch.device = "cpu") -> None:
    """Load a checkpoint's weights into an existing model of the same config (strict)."""
    ckpt = resolve_checkpoint(path)
    weights = ckpt / WEIGHTS
    _check_weights_file(weights, _unwrap(model), ckpt / CONFIG)
    try:
        st_load_model(_unwrap(model), str(weights), strict=True, device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{weights}: unreadable, truncated or of another shape ({e})") from None
    _check_finite(_unwrap(model), weights)


def _check_weights_file(weights: Path, model: torch.nn.Module, config: Path) -> None:
    """Before loading: the file exists, its header parses, every tensor is floating point and has the shape
    the model built from ``config`` expects (so a wrong config.json is named, not a "truncated" file)."""
    if not weights.exists():
        raise CheckpointError(f"missing file: {weights}")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{weights}: unreadable or truncated ({e})") from None
    for name, (dtype, shape) in header.items():
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{weights}: tensor {name} is {dtype}, not floating point: not a tinygpt checkpoint")
        if name in expected and expected[name] != shape:
            raise CheckpointError(f"{weights}: tensor {name} has shape {list(shape)}, but {config} describes a model "
                                  f"whose {name} is {list(expected[name])}: the config and the weights do not match")


def _check_finite(model: torch.nn.Module, weights: Path) -> None:
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise CheckpointError(f"{weights}: tensor {name} holds NaN or inf (a diverged or corrupt checkpoint)")


def resume_training(run_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                    device: str | torch.device = "cpu", world_size: int = 1, verbose: bool = True,
                    load_fn: Any = None) -> dict[str, Any]:
    """Restore a training run from ``run_dir``'s latest checkpoint: weights (through ``load_fn(model,
    ckpt)`` if given, e.g. a LoRA adapter), optimizer, every RNG. Returns the trainer state; its
    ``"step"`` is the step to continue from. An explicit resume never silently starts fresh: no
    checkpoint is an error.
    """
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"--resume: no checkpoint in {Path(run_dir) / 'checkpoints'}; "
                              "run without --resume to start fresh")
    state = load_trainer_state(ckpt)
    if load_fn is not None:
        load_fn(model, ckpt)
    else:
        load_weights(model, ckpt, device=device)
    optimizer.load_state_dict(state["optimizer"])
    restore_rng_state(state["rng"])
    if state.get("world_size", 1) != world_size and verbose:
        print(f"warning: resuming a {state.get('world_size', 1)}-rank run on {world_size} ranks; "
              "the data order changes from here on")
    return state


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """The resume state, loaded with ``weights_only=True``; errors name the file."""
    ckpt = resolve_checkpoint(path)
    f = ckpt / TRAINER_STATE
    if not f.exists():
        raise CheckpointError(f"missing file: {f} (this checkpoint cannot be resumed)")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle opcode, ...: all mean a corrupt file
        raise CheckpointError(f"{f}: unreadable or truncated ({type(e).__name__}: {e})") from None
