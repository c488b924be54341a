"""``tinygpt export hf CKPT --out DIR``: a Hugging Face model directory that needs no custom code.

    DIR/config.json, model.safetensors     LlamaForCausalLM (llama preset) or GPT2LMHeadModel (gpt2),
                                           written by the transformers model's own ``save_pretrained``
    DIR/generation_config.json             BOS/EOS/PAD ids, stop at EOS or <|end|>, the chat's sampling defaults
    DIR/tokenizer.json, tokenizer_config.json, chat_template.jinja
                                           ``PreTrainedTokenizerFast(...).save_pretrained``: special tokens,
                                           the one chat template (tinygpt.tokenizer.CHAT_TEMPLATE)
    DIR/base/, DIR/adapter/                only for a LoRA checkpoint: its base as a model directory and
                                           its adapter in peft's format for that base

so that::

    model = AutoModelForCausalLM.from_pretrained(DIR); tok = AutoTokenizer.from_pretrained(DIR)
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR / "base"), DIR / "adapter")

compute what tinygpt computes (tests/test_export_hf.py: logits, greedy tokens, token ids, chat ids).

Special-token strings typed inside text. tinygpt encodes ``"<|end|>"`` typed by a user as plain
bytes, so nobody can forge a turn boundary. transformers can do the same in two ways, and only one
of them keeps its chat template working: ``apply_chat_template(..., sanitize_control_tokens=True)``
encodes the control tokens found in messages as text and the template's own as tokens, giving
exactly ``render_chat``'s ids. ``split_special_tokens=True`` in ``tokenizer_config.json`` would also
split the template's own ``<|user|>``, ``<|end|>``... (apply_chat_template tokenizes the rendered
string with it), so every chat rendered by transformers, TRL or lm-eval would be wrong. The export
therefore writes ``split_special_tokens: false`` explicitly; load with
``AutoTokenizer.from_pretrained(DIR, split_special_tokens=True)`` to encode raw text exactly as
``Tokenizer.encode`` does.

LoRA. tinygpt's adapters sit on the fused ``attn.qkv`` and ``mlp.fc`` ([gate; up]) projections, which
no Hugging Face model has. A fused adapter ``B A`` splits exactly into adapters with the same ``A``
and the rows of ``B`` (q/k/v, gate/up). The LoRA run also trained the embedding rows of the chat
tokens in place (tinygpt.lora), which a LoRA adapter cannot hold: ``base/`` is the init checkpoint
with those rows, so ``base`` + ``adapter`` equals the merged model in ``DIR``.

It knows nothing about training; it reads a checkpoint and writes a directory.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinygpt import lora
from tinygpt.checkpoint import CheckpointError, load_meta, load_model, load_model_and_tokenizer, resolve_checkpoint
from tinygpt.config import opt
from tinygpt.model import GPT, hf_config_dict, to_hf_state_dict
from tinygpt.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# tinygpt chat's sampling defaults (tinygpt.chat.ChatConfig), so `generate(do_sample=True)` behaves alike
CHAT_SAMPLING = dict(do_sample=True, temperature=0.7, top_p=0.9)


@dataclass
class ExportHFConfig:
    checkpoint: str = opt("", "checkpoint directory, or a run directory (its latest checkpoint)", required=True)
    out: str = opt("", "output directory: a Hugging Face model directory (must not exist unless --overwrite)",
                   required=True)
    dtype: str = opt("float32", "dtype of the saved weights: float32 (exact), bfloat16 or float16")
    overwrite: bool = opt(False, "replace an existing output directory")


# --- building the transformers objects ------------------------------------------------------------


def hf_tokenizer(tokenizer: Tokenizer, model_max_length: int):
    """The tokenizer as a ``transformers.PreTrainedTokenizerFast`` with tinygpt's special tokens and chat template."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    pad, bos, eos, *chat = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad, extra_special_tokens=chat,
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,  # decode(encode(s)) == s
        split_special_tokens=False,  # explicit: True would break apply_chat_template (module docstring)
        model_max_length=model_max_length, padding_side="left")  # left: batched generation


def hf_model(model: GPT, tokenizer: Tokenizer):
    """A ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` holding ``model``'s weights (strictly loaded), with its
    generation config."""
    import transformers

    cfg = model.cfg
    if cfg.scalar_head:
        raise ValueError("this checkpoint has a scalar head (a reward or value model); `export hf` writes causal "
                         "language models only: export the policy (sft, ppo, dpo) instead")
    special = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    kwargs = {**hf_config_dict(cfg), **special}
    if cfg.arch == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    else:
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs))
    state = to_hf_state_dict(model)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")  # transformers ties it to the embedding itself
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight") and not k.endswith("attn.bias")]
    if missing or unexpected:  # a mapping bug, never the user's input: say exactly what differs
        raise RuntimeError(f"weight mapping onto {type(hf).__name__} is incomplete: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    hf.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_id, eos_token_id=[tokenizer.eos_id, tokenizer.end_id], pad_token_id=tokenizer.pad_id,
        **CHAT_SAMPLING)
    return hf.eval()


# --- LoRA: tinygpt's fused adapters -> Hugging Face module names ------------------------------------

# tinygpt module -> [(HF module, rows of B it takes)], per arch; ``None`` = all rows
def _lora_targets(model: GPT) -> dict[str, list[tuple[str, slice | None]]]:
    cfg = model.cfg
    if cfg.arch == "gpt2":  # GPT-2 keeps q/k/v fused (c_attn) and has no gate: names change, shapes do not
        return {"attn.qkv": [("attn.c_attn", None)], "attn.proj": [("attn.c_proj", None)],
                "mlp.fc": [("mlp.c_fc", None)], "mlp.proj": [("mlp.c_proj", None)]}
    q, kv, h = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ff_hidden
    return {"attn.qkv": [("self_attn.q_proj", slice(0, q)), ("self_attn.k_proj", slice(q, q + kv)),
                         ("self_attn.v_proj", slice(q + kv, q + 2 * kv))],
            "attn.proj": [("self_attn.o_proj", None)],
            "mlp.fc": [("mlp.gate_proj", slice(0, h)), ("mlp.up_proj", slice(h, 2 * h))],
            "mlp.proj": [("mlp.down_proj", None)]}


def convert_lora_state(model: GPT, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tinygpt adapter tensors (peft names on tinygpt's GPT) -> the same adapters under the HF model's names.

    A fused projection W = [W_q; W_k; W_v] with update (alpha/r) B A becomes one adapter per part,
    each with the same A and its block of rows of B: (alpha/r) B[rows] A is exactly the update of W[rows]."""
    targets = _lora_targets(model)
    layers_prefix = "transformer.h" if model.cfg.arch == "gpt2" else "model.layers"
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        head, sep, tail = key.partition(".lora_")  # base_model.model.blocks.{i}.{module} / A.weight
        parts = head.split(".")
        if not sep or parts[:3] != ["base_model", "model", "blocks"] or ".".join(parts[4:]) not in targets:
            raise ValueError(f"adapter tensor {key!r}: not on one of tinygpt's projections {sorted(targets)}")
        layer, module, which = parts[3], ".".join(parts[4:]), tail.split(".")[0]
        for hf_module, rows in targets[module]:
            piece = tensor if (which == "A" or rows is None) else tensor[rows]
            out[f"base_model.model.{layers_prefix}.{layer}.{hf_module}.lora_{tail}"] = piece.contiguous().clone()
    return out


def _lora_export(ckpt: Path, base_dir: Path, adapter_dir: Path, final_base: Path, tokenizer: Tokenizer) -> dict:
    """Write the LoRA checkpoint's base (with its trained token rows) and the converted adapter."""
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    init = load_meta(ckpt).get("init")
    if not init:
        raise CheckpointError(f"{ckpt / 'tinygpt.json'}: a LoRA checkpoint without 'init' (the base its adapter applies to)")
    try:
        base, _ = load_model(init)
    except CheckpointError as e:
        raise CheckpointError(f"{ckpt}: the adapter's base checkpoint {init} cannot be loaded ({e}); export without "
                              "the adapter by copying model.safetensors (the merged model) to a plain checkpoint") from None
    adapter_src = ckpt / lora.ADAPTER_DIR
    saved_cfg = json.loads((adapter_src / "adapter_config.json").read_text())
    rows_file = adapter_src / lora.TOKEN_ROWS
    token_ids: list[int] = []
    if rows_file.is_file():  # the chat-token rows the run trained in place (tinygpt.lora)
        rows = load_file(str(rows_file))
        token_ids = rows["ids"].tolist()
        with torch.no_grad():
            base.tok_emb.weight[rows["ids"]] = rows["rows"].to(base.tok_emb.weight.dtype)
    hf_base = hf_model(base.eval(), tokenizer)
    hf_base.save_pretrained(base_dir)
    hf_tokenizer(tokenizer, base.cfg.block_size).save_pretrained(base_dir)

    targets = sorted({m.split(".")[-1] for pieces in _lora_targets(base).values() for m, _ in pieces})
    config = LoraConfig(r=saved_cfg["r"], lora_alpha=saved_cfg["lora_alpha"],
                        lora_dropout=saved_cfg.get("lora_dropout", 0.0), target_modules=targets, bias="none",
                        fan_in_fan_out=base.cfg.arch == "gpt2",  # GPT-2's Conv1D stores W transposed
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf_base, config)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)  # exists now (peft reads its config)
    converted = convert_lora_state(base, load_file(str(adapter_src / lora.ADAPTER_WEIGHTS)))
    expected = set(get_peft_model_state_dict(peft_model))
    if expected != set(converted):
        raise RuntimeError(f"converted adapter does not fit {type(hf_base).__name__}: missing "
                           f"{sorted(expected - set(converted))[:5]}, unexpected {sorted(set(converted) - expected)[:5]}")
    set_peft_model_state_dict(peft_model, converted)
    peft_model.save_pretrained(adapter_dir)
    assert isinstance(peft_model, PeftModel)
    saved = adapter_dir / "adapter_config.json"  # point at where base/ will be once the export is renamed
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "base_model_name_or_path": str(final_base)}, indent=2))
    return {"lora_r": saved_cfg["r"], "lora_alpha": saved_cfg["lora_alpha"], "lora_targets": targets,
            "token_rows_in_base": token_ids}


# --- the command ---------------------------------------------------------------------------------


def export_hf(checkpoint: str | Path, out: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> dict[str, Any]:
    """Write ``checkpoint`` as a Hugging Face model directory ``out`` (atomically: a temporary name, then
    renamed). Returns a summary (architecture, files, LoRA details)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    ckpt = resolve_checkpoint(checkpoint)
    model, cfg, tokenizer = load_model_and_tokenizer(ckpt)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        hf = hf_model(model.eval(), tokenizer).to(DTYPES[dtype])
        hf.save_pretrained(tmp)
        hf_tokenizer(tokenizer, cfg.block_size).save_pretrained(tmp)
        summary: dict[str, Any] = {"checkpoint": str(ckpt), "out": str(out), "architecture": type(hf).__name__,
                                   "dtype": dtype, "parameters": model.num_params()}
        if lora.has_adapter(ckpt):
            summary.update(_lora_export(ckpt, tmp / "base", tmp / "adapter", out.resolve() / "base", tokenizer))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["files"] = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return summary


def main(cfg: ExportHFConfig) -> dict[str, Any]:
    if not cfg.checkpoint or not cfg.out:
        raise ValueError("give a checkpoint and --out: tinygpt export hf runs/demo/ppo --out runs/demo/hf")
    summary = export_hf(cfg.checkpoint, cfg.out, dtype=cfg.dtype, overwrite=cfg.overwrite)
    print(f"wrote {summary['architecture']} ({summary['parameters'] / 1e6:.2f}M parameters, {cfg.dtype}) to {cfg.out}")
    if "lora_r" in summary:
        print(f"  LoRA r={summary['lora_r']}: {cfg.out}/adapter on {cfg.out}/base "
              f"(targets {', '.join(summary['lora_targets'])})")
    print(f"  load it: AutoModelForCausalLM.from_pretrained({cfg.out!r}), AutoTokenizer.from_pretrained({cfg.out!r})")
    return summary
