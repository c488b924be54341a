"""One decoder-only Transformer in two flavours, its KV cache, and its mapping onto Hugging Face names.

``arch="gpt2"``: learned positions, LayerNorm, GELU (tanh), biases (GPT-2, Radford et al. 2019).
``arch="llama"``: rotary positions (RoPE), RMSNorm, SwiGLU, no biases, grouped KV heads (Touvron et al. 2023).
Both are pre-LN, use causal ``F.scaled_dot_product_attention``, GPT-2 init (normal 0.02, residual output
projections scaled by 1/sqrt(2 * n_layer)), optionally tied embeddings, and an optional scalar head
(reward / value). Left-padded batches are handled through ``attention_mask`` (1 = real, 0 = pad).

This module imports only torch and the standard library. It knows nothing about tokens, text,
losses, optimizers or checkpoints on disk.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

ARCHS = ("gpt2", "llama")


MAX_PARAMS = 20_000_000_000  # a config past this is a typo or a corrupt file, not a model to allocate


@dataclass
class ModelConfig:
    vocab_size: int = 4096          # tokens in the vocabulary
    block_size: int = 256           # context length (largest position)
    n_layer: int = 4                # Transformer blocks
    n_head: int = 4                 # query heads
    n_kv_head: int | None = None    # grouped K/V heads (llama); None = n_head
    d_model: int = 256              # residual stream width
    d_ff: int | None = None         # MLP hidden; None: 4*d_model (gpt2), ~8/3*d_model up to a multiple of 32 (llama)
    arch: str = "gpt2"              # "gpt2" | "llama" (see the module docstring)
    dropout: float = 0.0            # on attention weights and residual branches (training only)
    tie_embeddings: bool = True     # lm_head shares the token embedding matrix
    rope_theta: float = 10000.0     # RoPE base (llama)
    norm_eps: float = 1e-5          # LayerNorm / RMSNorm epsilon
    scalar_head: bool = False       # adds scalar_head = Linear(d_model, 1) for reward / value models

    def __post_init__(self) -> None:
        for name, low, high in (("vocab_size", 1, 1 << 24), ("block_size", 1, 1 << 20), ("n_layer", 1, 1024),
                                ("n_head", 1, 4096), ("d_model", 1, 1 << 16)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"ModelConfig.{name} must be an integer in [{low}, {high}], got {value!r}")
        for name in ("n_kv_head", "d_ff"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1 << 20):
                raise ValueError(f"ModelConfig.{name} must be None or a positive integer, got {value!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"ModelConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.arch == "gpt2" and self.kv_heads != self.n_head:
            raise ValueError("grouped KV heads (n_kv_head != n_head) need arch='llama'")
        if (self.d_model // self.n_head) % 2 and self.arch == "llama":
            raise ValueError(f"RoPE needs an even head size, got {self.d_model // self.n_head}")
        per_layer = 4 * self.d_model ** 2 + 3 * self.d_model * self.ff_hidden
        approx_params = self.vocab_size * self.d_model + self.n_layer * per_layer
        if approx_params > MAX_PARAMS:
            raise ValueError(f"ModelConfig describes about {approx_params / 1e9:.0f}B parameters "
                             f"({approx_params * 4 / 2**30:,.0f} GiB in float32), past tinygpt's {MAX_PARAMS / 1e9:.0f}B")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ff_hidden(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.arch == "gpt2":
            return 4 * self.d_model
        return 32 * math.ceil(int(8 * self.d_model / 3) / 32)  # llama2.c's rule, multiple_of = 32

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


# Named sizes. Counts are for vocab 4096, tied embeddings, gpt2 / llama arch (tests/test_model.py checks them).
# The top three mirror llama2.c's TinyStories ladder, whose names count a 32000-token vocabulary.
SIZES: dict[str, dict] = {
    "260k": dict(d_model=64, n_layer=5, n_head=8, n_kv_head=4, arch="llama"),  # llama: 0.51M (llama2.c's 260K has vocab 512)
    "0.5m": dict(d_model=64, n_layer=4, n_head=4),     # gpt2: 0.48M | llama: 0.48M
    "1m": dict(d_model=96, n_layer=6, n_head=6),       # gpt2: 1.09M | llama: 1.06M
    "3.5m": dict(d_model=192, n_layer=6, n_head=6),    # gpt2: 3.51M | llama: 3.44M
    "4m": dict(d_model=256, n_layer=4, n_head=4),      # gpt2: 4.27M | llama: 4.26M (the ModelConfig default, CPU demo)
    "15m": dict(d_model=288, n_layer=6, n_head=6),     # gpt2: 7.25M | llama: 7.16M (llama2.c 15M)
    "42m": dict(d_model=512, n_layer=8, n_head=8),     # gpt2: 27.4M | llama: 27.4M (llama2.c 42M)
    "110m": dict(d_model=768, n_layer=12, n_head=12),  # gpt2: 88.4M | llama: 88.1M (llama2.c 110M)
}


def model_config(size: str, **overrides) -> ModelConfig:
    """A named size (see ``SIZES``) with field overrides, e.g. ``model_config("15m", arch="llama")``."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; valid sizes: {', '.join(SIZES)}")
    return ModelConfig(**{**SIZES[size], **overrides})


class KVCache:
    """Preallocated keys and values for every layer: (n_layer, B, n_kv_head, max_len, head_dim) each."""

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 device=None, dtype=None):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._k_layers, self._v_layers = self.k.unbind(0), self.v.unbind(0)  # per-layer views, made once
        self.max_len = max_len
        self.length = 0  # positions filled (the same for every layer once a forward pass ends)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, n_kv_head, T, hd) after the cached positions; return all keys/values so far."""
        k_all, v_all, T = self._k_layers[layer], self._v_layers[layer], k.size(2)
        k_all.narrow(2, self.length, T).copy_(k)
        v_all.narrow(2, self.length, T).copy_(v)
        end = self.length + T
        return k_all.narrow(2, 0, end), v_all.narrow(2, 0, end)  # (B, n_kv_head, end, hd)

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        bias = cfg.arch == "gpt2"
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=bias)
        self.proj.is_residual_out = True
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None,
                cache: KVCache | None, layer: int) -> Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)  # (B, nh | nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)                                # (B, nkv, past+T, hd)
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)   # (B, nh, past+T, hd)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and q.size(2) == k.size(2) and T > 1)  # (B, nh, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))               # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.arch == "llama"
        hidden, bias = cfg.ff_hidden, cfg.arch == "gpt2"
        # llama: fc holds [gate; up] stacked, so one matmul computes both halves of SwiGLU
        self.fc = nn.Linear(cfg.d_model, (2 if self.gated else 1) * hidden, bias=bias)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=bias)
        self.proj.is_residual_out = True

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # (B, T, hidden) or (B, T, 2 * hidden)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.proj(h)  # (B, T, C)


def _norm(cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.arch == "gpt2" else nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = _norm(cfg), Attention(cfg)
        self.mlp_norm, self.mlp = _norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, cache, layer):
        x = x + self.drop(self.attn(self.attn_norm(x), rope, mask, cache, layer))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (max_len, head_dim) in the rotate-half layout used by Hugging Face Llama."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)  # (hd/2,)
    angles = torch.arange(max_len).float()[:, None] * inv_freq[None, :]                             # (L, hd/2)
    angles = torch.cat([angles, angles], dim=-1)                                                     # (L, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, h, T, hd); cos/sin (B or 1, 1, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.arch == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.final_norm = _norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.scalar_head = nn.Linear(cfg.d_model, 1) if cfg.scalar_head else None
        if cfg.arch == "llama":
            cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hd)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if getattr(module, "is_residual_out", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, *, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                cache: KVCache | None = None, return_hidden: bool = False) -> Tensor:
        """idx (B, T) -> logits (B, T, V), or final-norm hidden states (B, T, C) with ``return_hidden``.

        ``attention_mask`` (B, past + T), 1 = real, 0 = pad, covers the cached positions too. Without
        ``position_ids``, positions count real tokens only (so left padding does not shift them).
        With ``cache``, the new keys/values are appended and attention sees every cached position.
        """
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must be (B, past + T) = {(B, past + T)}, got {tuple(attention_mask.shape)}")
        if cache is not None and past + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {past} cached + {T} new overflow it")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
            else:
                position_ids = torch.arange(past, past + T, device=idx.device)[None]            # (1, T)
        if past + T > self.cfg.block_size and int(position_ids.max()) >= self.cfg.block_size:
            raise ValueError(f"position {int(position_ids.max())} is beyond block_size={self.cfg.block_size}")

        x = self.tok_emb(idx)  # (B, T, C)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)  # (B or 1, T, C) broadcast
        else:
            rope = self.rope_cos[position_ids][:, None], self.rope_sin[position_ids][:, None]  # (B or 1, 1, T, hd)
        x = self.drop(x)
        mask = self._attention_mask(attention_mask, past, T, idx.device)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, mask, cache, layer)
        if cache is not None:
            cache.length = past + T
        x = self.final_norm(x)  # (B, T, C)
        return x if return_hidden else self.lm_head(x)  # (B, T, V)

    @staticmethod
    def _attention_mask(attention_mask: Tensor | None, past: int, T: int, device) -> Tensor | None:
        """None when SDPA can do it alone (plain causal, or one new token); else bool (B or 1, 1, T, past+T)."""
        if T == 1:  # one new token may see every real position: only the padding needs masking
            return None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, past+1)
        if attention_mask is None and past == 0:
            return None
        q_pos = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(past + T, device=device)[None, :]        # (1, past+T)
        allowed = k_pos <= q_pos                                       # (T, past+T) causal
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, T, past+T)
            allowed = allowed | (k_pos == q_pos)  # a pad query sees itself: no empty row, no NaN to leak
        return allowed if allowed.dim() == 4 else allowed[None, None]

    def scalar(self, hidden: Tensor) -> Tensor:
        """Final-norm hidden states (B, T, C) -> one scalar per position (B, T) through scalar_head."""
        if self.scalar_head is None:
            raise RuntimeError("this model has no scalar head; build it with ModelConfig(scalar_head=True)")
        return self.scalar_head(hidden).squeeze(-1)

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        ref = self.tok_emb.weight
        dtype = dtype or (torch.get_autocast_dtype(ref.device.type) if torch.is_autocast_enabled(ref.device.type) else ref.dtype)
        return KVCache(self.cfg.n_layer, batch_size, self.cfg.kv_heads, max_len, self.cfg.head_dim,
                       device=device or ref.device, dtype=dtype)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied matrix counts once); ``non_embedding`` drops token/position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, 6N + 12*L*H*Q*T (PaLM, Chowdhery et al. 2022, appendix B).

        N counts the parameters that take part in matmuls: non-embedding ones plus the output head.
        """
        cfg, T = self.cfg, seq_len or self.cfg.block_size
        n_matmul = self.num_params(non_embedding=True) + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T


# --- Hugging Face mapping (GPT2LMHeadModel / LlamaForCausalLM); export.py writes these to disk ---

def hf_config_dict(cfg: ModelConfig) -> dict:
    """Keyword arguments for transformers' GPT2Config / LlamaConfig describing the same network."""
    if cfg.arch == "gpt2":
        return dict(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                    n_head=cfg.n_head, n_inner=cfg.ff_hidden, activation_function="gelu_new",
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps,
                    tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None)
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ff_hidden,
                num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
                head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, hidden_act="silu",
                attention_bias=False, mlp_bias=False, tie_word_embeddings=cfg.tie_embeddings,
                bos_token_id=None, eos_token_id=None)  # special ids come from the tokenizer (export.py)


def to_hf_state_dict(model: GPT) -> dict[str, Tensor]:
    """The model's weights under Hugging Face names (GPT-2's Conv1D weights are stored transposed)."""
    cfg, sd, out = model.cfg, model.state_dict(), {}
    q_size, kv_size = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    if cfg.arch == "gpt2":
        out["transformer.wte.weight"] = sd["tok_emb.weight"]
        out["transformer.wpe.weight"] = sd["pos_emb.weight"]
        names = {"attn_norm": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
                 "mlp_norm": "ln_2", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
        for i in range(cfg.n_layer):
            for ours, theirs in names.items():
                w, b = sd[f"blocks.{i}.{ours}.weight"], sd[f"blocks.{i}.{ours}.bias"]
                out[f"transformer.h.{i}.{theirs}.weight"] = w if "norm" in ours else w.t().contiguous()
                out[f"transformer.h.{i}.{theirs}.bias"] = b
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["final_norm.weight"], sd["final_norm.bias"]
    else:
        out["model.embed_tokens.weight"] = sd["tok_emb.weight"]
        for i in range(cfg.n_layer):
            p, hp = f"blocks.{i}.", f"model.layers.{i}."
            q, k, v = sd[p + "attn.qkv.weight"].split([q_size, kv_size, kv_size])
            gate, up = sd[p + "mlp.fc.weight"].chunk(2)
            out.update({hp + "self_attn.q_proj.weight": q, hp + "self_attn.k_proj.weight": k,
                        hp + "self_attn.v_proj.weight": v, hp + "self_attn.o_proj.weight": sd[p + "attn.proj.weight"],
                        hp + "mlp.gate_proj.weight": gate, hp + "mlp.up_proj.weight": up,
                        hp + "mlp.down_proj.weight": sd[p + "mlp.proj.weight"],
                        hp + "input_layernorm.weight": sd[p + "attn_norm.weight"],
                        hp + "post_attention_layernorm.weight": sd[p + "mlp_norm.weight"]})
        out["model.norm.weight"] = sd["final_norm.weight"]
    out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}
