"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) on tinygpt's GPT, through Hugging Face `peft`.

LoRA freezes the base weights W and learns a low-rank update: the layer computes
``W x + (alpha / r) * B A x`` with A (r, d_in), B (d_out, r), B initialised to zero so training
starts from the base model exactly. This module owns:

  * :func:`wrap`: a GPT -> ``peft.PeftModel`` with adapters on every attention and MLP projection
    (``attn.qkv``, ``attn.proj``, ``mlp.fc``, ``mlp.proj``; norms stay frozen, and so do the
    embeddings, except the rows of ``train_token_ids``: the chat tokens a base model pretrained on
    plain text has never seen. Their rows are trained in place, in the embedding the lm_head is tied
    to, so training and the merged model compute the same thing; they are saved beside the adapter
    as ``adapter/token_rows.safetensors``);
  * :func:`merged_copy` / :func:`merge`: ``merge_and_unload`` into a plain GPT (W + (alpha / r) B A);
  * :func:`save_adapter` / :func:`load_adapter`: adapters in peft's own format
    (``adapter/adapter_config.json`` + ``adapter/adapter_model.safetensors``) inside a checkpoint;
  * :func:`load_adapter_model`: a LoRA checkpoint's base (its ``init`` checkpoint) + its adapter.

A LoRA checkpoint is a plain checkpoint first: ``model.safetensors`` holds the *merged* weights, so
every later stage, ``tinygpt chat`` and the exporters load it with ``checkpoint.load_model`` like
any other, and nobody silently gets the bare base. ``adapter/`` holds the low-rank update relative
to the checkpoint named in ``tinygpt.json["init"]`` (also written into peft's
``adapter_config.json`` as ``base_model_name_or_path``): resuming rebuilds base + adapter exactly.

It knows nothing about data, losses or training loops.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from safetensors.torch import load_file

from tinygpt.checkpoint import CheckpointError, load_meta, load_model, resolve_checkpoint
from tinygpt.model import GPT

if TYPE_CHECKING:
    from peft import PeftModel

# peft (and the transformers it imports, ~3 s) is imported only where LoRA is used, so full
# fine-tuning and chatting with a plain checkpoint start fast.

# The nn.Linear names inside tinygpt.model.Block: Attention.qkv / .proj, MLP.fc / .proj.
# peft matches a name against the end of each module path, so "proj" covers attn.proj and mlp.proj.
TARGET_MODULES = ("qkv", "proj", "fc")
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKEN_ROWS = "token_rows.safetensors"  # {"ids": (k,), "rows": (k, d_model)}: trained embedding rows


def wrap(model: GPT, *, r: int, alpha: float, dropout: float = 0.0,
         target_modules: tuple[str, ...] = TARGET_MODULES, train_token_ids: Sequence[int] = ()) -> PeftModel:
    """Freeze ``model`` and add rank-``r`` adapters to its projections (in place; returns the wrapper).

    ``train_token_ids``: embedding rows that train too (every other row keeps a zero gradient).
    The adapters' A matrices are drawn from torch's global RNG, so seed before calling."""
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    if alpha <= 0:
        raise ValueError(f"lora_alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout}")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none")
    wrapped = get_peft_model(model, config)
    if train_token_ids:
        _train_token_rows(inner_model(wrapped), train_token_ids)
    return wrapped


def _train_token_rows(gpt: GPT, token_ids: Sequence[int]) -> None:
    """Let the embedding rows of ``token_ids`` train: the whole tensor requires grad, a hook zeroes the
    gradient of every other row, and the tensor is marked for no weight decay (a zero gradient with
    decay would still shrink the frozen rows)."""
    ids = sorted({int(i) for i in token_ids})
    weight = gpt.tok_emb.weight
    if ids[0] < 0 or ids[-1] >= weight.shape[0]:
        raise ValueError(f"train_token_ids must be in [0, {weight.shape[0]}), got {ids}")
    keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    keep[ids] = 1.0
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * keep)
    weight.no_weight_decay = True  # read by optim.param_groups
    gpt.lora_token_ids = ids


def _save_token_rows(model: PeftModel, directory: Path) -> None:
    ids = getattr(inner_model(model), "lora_token_ids", None)
    if ids:
        from safetensors.torch import save_file

        rows = inner_model(model).tok_emb.weight.detach()[ids].contiguous().cpu()
        save_file({"ids": torch.tensor(ids, dtype=torch.int64), "rows": rows}, str(directory / TOKEN_ROWS))


def _load_token_rows(model: PeftModel, adapter_dir: Path) -> None:
    """Put the saved embedding rows back; refuse a model that trains rows the checkpoint lacks."""
    path = adapter_dir / TOKEN_ROWS
    expected = getattr(inner_model(model), "lora_token_ids", None)
    if not path.is_file():
        if expected:
            raise CheckpointError(f"missing file: {path} (this run trains the embedding rows {expected})")
        return
    saved = load_file(str(path))
    ids = saved["ids"].tolist()
    if expected is not None and ids != expected:
        raise CheckpointError(f"{path}: embedding rows {ids}, but this run trains {expected}")
    weight = inner_model(model).tok_emb.weight
    with torch.no_grad():
        weight[ids] = saved["rows"].to(weight.device, weight.dtype)


def inner_model(model: torch.nn.Module) -> GPT:
    """The GPT under a PeftModel (its Linear layers carry the adapters, so its forward uses them),
    or the model itself."""
    peft = sys.modules.get("peft")  # a PeftModel exists only if peft was imported
    return model.get_base_model() if peft is not None and isinstance(model, peft.PeftModel) else model


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors, under peft's saved names."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def base_model_copy(model: PeftModel) -> GPT:
    """A plain GPT holding a copy of the frozen base weights (adapters left out, not merged)."""
    wrapped = model.get_base_model()
    state = {}
    for name, tensor in wrapped.state_dict().items():
        if "lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    plain = GPT(wrapped.cfg)
    plain.load_state_dict(state, strict=True)
    return plain.to(next(wrapped.parameters()).device)


def merged_copy(model: PeftModel) -> GPT:
    """A plain GPT with the adapters folded in, leaving ``model`` (still training) untouched."""
    was_training = model.training
    merged = merge(copy.deepcopy(model))
    model.train(was_training)
    return merged


def merge(model: PeftModel) -> GPT:
    """Fold the adapters into the base weights and return the plain GPT (the wrapper is consumed)."""
    merged = model.merge_and_unload()
    if not isinstance(merged, GPT):
        raise TypeError(f"merge_and_unload returned {type(merged).__name__}, expected tinygpt.model.GPT")
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def save_adapter(model: PeftModel, checkpoint_dir: str | Path, base: str | Path) -> Path:
    """Write ``checkpoint_dir/adapter`` with peft's ``save_pretrained`` (into a temporary name, then
    renamed); ``base`` (the checkpoint the adapter applies to) goes into its ``base_model_name_or_path``."""
    target = Path(checkpoint_dir) / ADAPTER_DIR
    tmp = target.with_name(f".{ADAPTER_DIR}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    for config in model.peft_config.values():
        config.base_model_name_or_path = str(base)
    model.save_pretrained(str(tmp), safe_serialization=True)
    _save_token_rows(model, tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def has_adapter(checkpoint: str | Path) -> bool:
    return (resolve_checkpoint(checkpoint) / ADAPTER_DIR / ADAPTER_WEIGHTS).is_file()


def load_adapter(model: PeftModel, checkpoint: str | Path, *, device: str | torch.device = "cpu") -> None:
    """Load the adapter weights saved by :func:`save_adapter` into a wrapper built with the same rank."""
    weights = resolve_checkpoint(checkpoint) / ADAPTER_DIR / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"missing file: {weights} (a LoRA checkpoint keeps its adapter there)")
    from peft import set_peft_model_state_dict

    state = load_file(str(weights), device=str(device))
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise CheckpointError(f"{weights}: adapter tensors this model has no place for: {unexpected[:5]}")
    expected = set(adapter_state(model))
    if expected != set(state):
        raise CheckpointError(f"{weights}: adapter does not match the model (missing {sorted(expected - set(state))[:5]})")
    _load_token_rows(model, weights.parent)


def load_adapter_model(checkpoint: str | Path, *, device: str | torch.device = "cpu",
                       is_trainable: bool = False) -> PeftModel:
    """A LoRA checkpoint as base + adapter (peft's ``PeftModel.from_pretrained``): the base is the
    checkpoint it was trained from (``tinygpt.json["init"]``), which must still exist."""
    ckpt = resolve_checkpoint(checkpoint)
    adapter = ckpt / ADAPTER_DIR
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{ckpt}: no {ADAPTER_DIR}/{ADAPTER_WEIGHTS}; not a LoRA checkpoint")
    init = load_meta(ckpt).get("init")
    if not init:
        raise CheckpointError(f"{ckpt / 'tinygpt.json'}: no 'init' naming the base this adapter applies to")
    from peft import PeftModel

    try:
        base, _ = load_model(init, device=device)
    except CheckpointError as e:
        raise CheckpointError(f"{ckpt}: the adapter's base checkpoint {init} cannot be loaded ({e}); "
                              f"{ckpt / 'model.safetensors'} still holds the merged model") from None
    model = PeftModel.from_pretrained(base, str(adapter), is_trainable=is_trainable).to(device)
    _load_token_rows(model, adapter)  # the trained chat-token rows, if the run had them
    return model
