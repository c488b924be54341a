"""``tinygpt export gguf CKPT --out FILE.gguf --type f32|f16|q8_0``: one file stock llama.cpp runs.

Written with the ``gguf`` package's ``GGUFWriter`` (the writer llama.cpp's own converters use):

  * architecture ``llama`` (llama preset) or ``gpt2`` (gpt2 preset), with the hyperparameters llama.cpp
    reads (context length, widths, heads and KV heads, norm epsilon, RoPE base and dimensions);
  * the tensors under llama.cpp's names. llama.cpp's ``llama`` graph rotates adjacent pairs of each
    head (RoPE "normal" mode) where tinygpt and Hugging Face rotate its two halves, so the rows of
    the query and key projections are permuted within each head to match (:func:`rope_pairs`);
    GPT-2's fused qkv keeps tinygpt's [q; k; v] layout, which is llama.cpp's;
  * the tokenizer: model ``gpt2`` (byte-level BPE) with pre-tokenizer ``gpt-2`` (the GPT-2 split
    regex, the one tinygpt's ``ByteLevel(use_regex=True)`` applies), every token string, the merges
    in order, the special tokens as CONTROL tokens, BOS/EOS/PAD and ``<|end|>`` as end of turn, BOS
    added in front of a prompt as ``tinygpt sample`` does;
  * the chat template (tinygpt.tokenizer.CHAT_TEMPLATE without the ``{% generation %}`` markers, an
    extension of transformers that other Jinja engines do not parse; the text it renders is the same).

Types: ``f32`` keeps every weight exact; ``f16`` stores matrices in half precision; ``q8_0`` stores
matrices in llama.cpp's 8-bit blocks of 32 (``gguf.quants``). Norms and biases stay f32, as in
llama.cpp's converters, and a matrix whose rows are not a multiple of 32 stays f16 under q8_0.

GPT-2 in llama.cpp: its positions are a learned table of ``block_size`` rows, and llama.cpp rounds
the context it allocates up to a multiple of 256 and lets generation run past the trained context
(it only warns), so a gpt2 model with ``block_size`` < 256 that generates past ``block_size`` makes
llama.cpp abort on the position lookup (GGML_ASSERT in get_rows). The export says so; keep
prompt + reply within ``block_size`` there, or use the llama preset (RoPE), which has no table.

llama.cpp tokenizes a typed ``"<|end|>"`` as text unless asked to parse special tokens, as tinygpt
does (tests/test_export_gguf.py checks token ids, logits and greedy continuations in llama-cpp-python).

It knows nothing about training; it reads a checkpoint and writes a file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinygpt.checkpoint import load_model_and_tokenizer, resolve_checkpoint
from tinygpt.config import opt
from tinygpt.model import GPT
from tinygpt.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer

TYPES = ("f32", "f16", "q8_0")
GGUF_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
Q8_BLOCK = 32  # values per q8_0 block: a row must be a whole number of blocks


@dataclass
class ExportGGUFConfig:
    checkpoint: str = opt("", "checkpoint directory, or a run directory (its latest checkpoint)", required=True)
    out: str = opt("", "output file, e.g. runs/demo/ppo.gguf (must not exist unless --overwrite)", required=True)
    type: str = opt("f32", "weight type: f32 (exact), f16 (half the size) or q8_0 (llama.cpp 8-bit blocks, a quarter)")
    overwrite: bool = opt(False, "replace an existing output file")


def rope_pairs(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Permute the rows of a query/key projection (n_head * hd, d) from rotate-half RoPE order
    (dims i and i + hd/2 rotate together) to llama.cpp's adjacent pairs (dims 2i and 2i+1): within
    each head, new row 2i + half is old row half * hd/2 + i."""
    rows, cols = weight.shape
    hd = rows // n_head
    return weight.reshape(n_head, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's tensor names (fp32, PyTorch (out, in) layout = ggml's)."""
    cfg, sd = model.cfg, {k: v.detach().float() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["tok_emb.weight"], "output_norm.weight": sd["final_norm.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]  # tied: llama.cpp reuses token_embd when output is absent
    q_size, kv_size = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    for i in range(cfg.n_layer):
        p, g = f"blocks.{i}.", f"blk.{i}."
        if cfg.arch == "llama":
            q, k, v = sd[p + "attn.qkv.weight"].split([q_size, kv_size, kv_size])
            gate, up = sd[p + "mlp.fc.weight"].chunk(2)
            out.update({g + "attn_norm.weight": sd[p + "attn_norm.weight"],
                        g + "attn_q.weight": rope_pairs(q, cfg.n_head), g + "attn_k.weight": rope_pairs(k, cfg.kv_heads),
                        g + "attn_v.weight": v, g + "attn_output.weight": sd[p + "attn.proj.weight"],
                        g + "ffn_norm.weight": sd[p + "mlp_norm.weight"], g + "ffn_gate.weight": gate,
                        g + "ffn_up.weight": up, g + "ffn_down.weight": sd[p + "mlp.proj.weight"]})
        else:
            for ours, theirs in (("attn_norm", "attn_norm"), ("attn.qkv", "attn_qkv"), ("attn.proj", "attn_output"),
                                 ("mlp_norm", "ffn_norm"), ("mlp.fc", "ffn_up"), ("mlp.proj", "ffn_down")):
                out[g + theirs + ".weight"] = sd[p + ours + ".weight"]
                out[g + theirs + ".bias"] = sd[p + ours + ".bias"]
    if cfg.arch == "gpt2":
        out["position_embd.weight"] = sd["pos_emb.weight"]
        out["output_norm.bias"] = sd["final_norm.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def _vocab(tokenizer: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(token strings by id, token types, merges "a b" in rank order) from the tokenizer's JSON."""
    import gguf

    data = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
    if sorted(by_id) != list(range(tokenizer.vocab_size)):
        raise ValueError(f"tokenizer ids are not 0..{tokenizer.vocab_size - 1} without gaps; GGUF needs a dense vocabulary")
    tokens = [by_id[i] for i in range(tokenizer.vocab_size)]
    types = [int(gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL) for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, types, merges


def _weight_array(name: str, tensor: torch.Tensor, kind: str):
    """(numpy data, raw ggml type or None) for one tensor: 1-D tensors stay f32."""
    import gguf

    data = tensor.numpy().astype(np.float32)
    if data.ndim == 1 or kind == "f32":
        return data, None
    if kind == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def export_gguf(checkpoint: str | Path, out: str | Path, *, kind: str = "f32", overwrite: bool = False) -> dict[str, Any]:
    """Write ``checkpoint`` as the GGUF file ``out`` (a temporary name, then renamed). Returns a summary."""
    import gguf

    if kind not in TYPES:
        raise ValueError(f"--type must be one of {', '.join(TYPES)}, got {kind!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    ckpt = resolve_checkpoint(checkpoint)
    model, cfg, tokenizer = load_model_and_tokenizer(ckpt)
    if cfg.scalar_head:
        raise ValueError("this checkpoint has a scalar head (a reward or value model); GGUF holds causal language "
                         "models for llama.cpp: export the policy (sft, ppo, dpo) instead")

    arch = cfg.arch  # llama.cpp's architecture names are tinygpt's: "llama", "gpt2"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(f"tinygpt {ckpt.parent.parent.name if ckpt.parent.name == 'checkpoints' else ckpt.name}")
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.ff_hidden)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.head_dim)
    else:
        writer.add_layer_norm_eps(cfg.norm_eps)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types, merges = _vocab(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_eot_token_id(tokenizer.end_id)  # a chat turn ends at <|end|>
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(GGUF_CHAT_TEMPLATE)

    counts: dict[str, int] = {}
    for name, tensor in gguf_tensors(model).items():
        data, raw = _weight_array(name, tensor, kind)
        writer.add_tensor(name, data, raw_dtype=raw)
        label = raw.name if raw is not None else str(data.dtype)
        counts[label] = counts.get(label, 0) + 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"checkpoint": str(ckpt), "out": str(out), "architecture": arch, "type": kind,
            "bytes": out.stat().st_size, "tensor_types": counts, "parameters": model.num_params(),
            "block_size": cfg.block_size}


def main(cfg: ExportGGUFConfig) -> dict[str, Any]:
    if not cfg.checkpoint or not cfg.out:
        raise ValueError("give a checkpoint and --out: tinygpt export gguf runs/demo/ppo --out runs/demo/ppo.gguf")
    summary = export_gguf(cfg.checkpoint, cfg.out, kind=cfg.type, overwrite=cfg.overwrite)
    types = ", ".join(f"{n} {t}" for t, n in summary["tensor_types"].items())
    print(f"wrote {cfg.out}: {summary['architecture']}, {cfg.type}, {summary['bytes'] / 1e6:.2f} MB ({types} tensors)")
    if summary["architecture"] == "gpt2" and summary["block_size"] % 256:
        print(f"  note: gpt2 positions are a table of {summary['block_size']} rows; llama.cpp rounds its context up to "
              f"a multiple of 256 and aborts if generation runs past {summary['block_size']} tokens (see tinygpt.export.gguf)")
    print(f"  run it: llama-cli -m {cfg.out}   or   python -c \"import llama_cpp; llama_cpp.Llama('{cfg.out}')\"")
    return summary
