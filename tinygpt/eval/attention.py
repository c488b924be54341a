"""Attention maps: the softmax weights of every head on one text, recomputed beside the model.

``model.py`` calls ``F.scaled_dot_product_attention``, which returns no weights, and this module
leaves it untouched. Instead a forward pre-hook on each block's ``Attention`` records its input
``x`` (the normed residual stream, (1, T, C)) and the rotary tables it was given; afterwards the
queries and keys are recomputed from the layer's own ``qkv`` projection, rotated with model.py's
``apply_rope`` (llama), grouped K/V heads repeated as the model repeats them, and

    weights = softmax(q k^T / sqrt(head_dim) + causal mask)      (H, T, T) per layer

Applied to the values, these weights give back the model's own attention output (the input of
``attn.proj``) to float precision; tests/test_attention.py checks it for both architectures.

Interesting heads are picked by three rules, each over the query rows t >= 1 of one text:

* **previous token**: the largest mean weight on position t - 1;
* **repeated token**: the largest mean weight on earlier positions holding the same token as the
  query (a name seen before: "Sam ... Sam"), over queries whose token did occur earlier;
* **most focused**: the lowest mean normalised entropy H(row) / log(t + 1) (0 = all weight on one
  position, 1 = uniform over the visible prefix).

It knows the model's modules; nothing about checkpoints, stages or the report around it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from tinygpt.model import GPT, apply_rope
from tinygpt.tokenizer import Tokenizer


def _as_ids(ids: Sequence[int] | Tensor, block_size: int) -> Tensor:
    """One sequence as a (1, T) long tensor; refuses batches, empty input and texts beyond the context."""
    t = torch.as_tensor(ids, dtype=torch.long)
    if t.dim() == 2:
        if t.size(0) != 1:
            raise ValueError(f"attention maps are for one sequence; got a batch of {t.size(0)}")
        t = t[0]
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"expected a non-empty sequence of token ids, got shape {tuple(t.shape)}")
    if t.numel() > block_size:
        raise ValueError(f"{t.numel()} tokens do not fit the model's context of {block_size}")
    return t[None]  # (1, T)


@torch.no_grad()
def recompute_attention(model: GPT, ids: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
    """(weights (L, H, T, T), values (L, H, T, hd)) of every layer on one sequence, in float32.

    ``weights[l, h] @ values[l, h]`` is head h's output in layer l, as the model computes it.
    """
    idx = _as_ids(ids, model.cfg.block_size)
    device = next(model.parameters()).device
    inputs: list[tuple[Tensor, tuple[Tensor, Tensor] | None]] = []

    def record(module, args):  # Attention.forward(x, rope, mask, cache, layer)
        x, rope = args[0], args[1]
        inputs.append((x.detach(), rope))

    handles = [block.attn.register_forward_pre_hook(record) for block in model.blocks]
    was_training = model.training
    model.eval()  # no dropout on the weights we want to read
    try:
        model(idx.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    T = idx.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T), key <= query
    weights, values = [], []
    for block, (x, rope) in zip(model.blocks, inputs):
        attn = block.attn
        qkv = attn.qkv(x).float().view(1, T, attn.n_head + 2 * attn.n_kv_head, attn.head_dim).transpose(1, 2)
        q, k, v = qkv.split([attn.n_head, attn.n_kv_head, attn.n_kv_head], dim=1)  # (1, nh | nkv, T, hd)
        if rope is not None:
            cos, sin = rope[0].float(), rope[1].float()
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if attn.n_kv_head != attn.n_head:
            k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)  # (1, nh, T, hd)
            v = v.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(attn.head_dim)  # (1, nh, T, T)
        scores = scores.masked_fill(~causal, float("-inf"))
        weights.append(F.softmax(scores, dim=-1)[0])  # (nh, T, T)
        values.append(v[0])                            # (nh, T, hd)
    return torch.stack(weights).cpu(), torch.stack(values).cpu()  # (L, nh, T, T), (L, nh, T, hd)


def attention_maps(model: GPT, ids: Sequence[int] | Tensor) -> Tensor:
    """Attention weights of every layer and head on one sequence: (L, H, T, T), rows sum to 1."""
    return recompute_attention(model, ids)[0]


# --- choosing heads -------------------------------------------------------------------------------

def head_scores(maps: Tensor, ids: Sequence[int] | Tensor) -> dict[str, Tensor]:
    """Per head (L, H): mean weight on the previous token, on earlier copies of the query's token
    (NaN when no token repeats), and mean normalised entropy; all over query rows t >= 1."""
    if maps.dim() != 4 or maps.size(-1) != maps.size(-2):
        raise ValueError(f"maps must be (L, H, T, T), got {tuple(maps.shape)}")
    ids_t = torch.as_tensor(ids, dtype=torch.long).flatten()
    T = maps.size(-1)
    if ids_t.numel() != T:
        raise ValueError(f"{ids_t.numel()} token ids for maps over {T} positions")
    if T < 2:
        raise ValueError("heads cannot be compared on a single token")
    rows = torch.arange(1, T)
    previous = maps[:, :, rows, rows - 1].mean(-1)  # (L, H)

    same = ids_t[:, None] == ids_t[None, :]                        # (T, T)
    earlier_copy = same & torch.ones(T, T, dtype=torch.bool).tril(-1)  # key < query, same token
    repeated_rows = earlier_copy.any(-1)                           # (T,)
    if repeated_rows.any():
        mass = (maps * earlier_copy).sum(-1)                       # (L, H, T)
        repeated = mass[:, :, repeated_rows].mean(-1)              # (L, H)
    else:
        repeated = torch.full(maps.shape[:2], float("nan"))

    p = maps[:, :, 1:, :].clamp_min(1e-12)                             # (L, H, T-1, T)
    entropy = -(maps[:, :, 1:, :] * p.log()).sum(-1)                   # (L, H, T-1)
    entropy = entropy / torch.arange(2, T + 1, dtype=maps.dtype).log()  # / log(visible positions)
    return {"previous_token": previous, "repeated_token": repeated, "entropy": entropy.mean(-1)}


RULES = {
    "previous_token": "largest mean weight on the previous token",
    "repeated_token": "largest mean weight on earlier copies of the query's token (e.g. a name seen before)",
    "most_focused": "lowest mean normalised entropy of its rows (1 = uniform over the prefix)",
}


def interesting_heads(maps: Tensor, ids: Sequence[int] | Tensor) -> list[dict]:
    """One head per rule in ``RULES`` (a head may win several): dicts {rule, layer, head, score, why}."""
    scores = head_scores(maps, ids)
    picks = []
    for rule, values, best in (("previous_token", scores["previous_token"], torch.argmax),
                               ("repeated_token", scores["repeated_token"], torch.argmax),
                               ("most_focused", scores["entropy"], torch.argmin)):
        if torch.isnan(values).all():
            continue  # no token repeats in this text
        flat = int(best(values.nan_to_num(nan=float("-inf") if best is torch.argmax else float("inf"))))
        layer, head = divmod(flat, values.size(1))
        picks.append({"rule": rule, "layer": layer, "head": head, "score": float(values[layer, head]),
                      "why": RULES[rule]})
    return picks


# --- drawing --------------------------------------------------------------------------------------

def token_labels(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """A short readable label per token: its text with a leading space shown as '_', specials by name."""
    labels = []
    for i in ids:
        text = tokenizer.decode([int(i)])
        labels.append(text.replace(" ", "_").replace("\n", "\\n") or f"<{int(i)}>")
    return labels


def plot_attention(maps: Tensor, tokens: Sequence[str], layer_heads: Sequence[tuple[int, int]],
                   out_png: str | Path, *, titles: Sequence[str] | None = None) -> Path:
    """Heatmaps of the chosen (layer, head) maps, rows = queries, columns = keys, labelled by token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not layer_heads:
        raise ValueError("plot_attention: no (layer, head) to draw")
    L, H, T, _ = maps.shape
    if len(tokens) != T:
        raise ValueError(f"{len(tokens)} token labels for maps over {T} positions")
    for layer, head in layer_heads:
        if not (0 <= layer < L and 0 <= head < H):
            raise ValueError(f"(layer {layer}, head {head}) is outside the maps' {L} layers x {H} heads")
    if titles is not None and len(titles) != len(layer_heads):
        raise ValueError(f"{len(titles)} titles for {len(layer_heads)} heads")
    n = len(layer_heads)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    side = max(4.0, 0.16 * T + 1.5)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows), squeeze=False)
    font = max(4, min(9, int(300 / max(T, 1))))
    for i, (layer, head) in enumerate(layer_heads):
        ax = axes[i // cols][i % cols]
        ax.imshow(maps[layer, head].float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(T), labels=list(tokens), rotation=90, fontsize=font)
        ax.set_yticks(range(T), labels=list(tokens), fontsize=font)
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query")
        ax.set_title(titles[i] if titles else f"layer {layer}, head {head}", fontsize=9)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def attention_summary(model: GPT, tokenizer: Tokenizer, text: str, max_tokens: int, out_png: str | Path) -> dict:
    """The base model reading the first ``max_tokens`` tokens of ``text``: the heads picked by rule, drawn
    into ``out_png``. Returns ``{"text", "tokens", "picks", "figure"}`` (JSON-able: `tinygpt evaluate`
    stores it in eval.json and the report renders it)."""
    ids = tokenizer.encode(text, add_bos=True)[:min(max_tokens, model.cfg.block_size)]
    maps = attention_maps(model, ids)  # (L, H, T, T)
    picks = interesting_heads(maps, ids)
    chosen: list[tuple[int, int]] = []
    titles: list[str] = []
    for p in picks:
        if (p["layer"], p["head"]) not in chosen:
            chosen.append((p["layer"], p["head"]))
            titles.append(f"layer {p['layer']}, head {p['head']}: {p['rule'].replace('_', ' ')} ({p['score']:.2f})")
    png = plot_attention(maps, token_labels(tokenizer, ids), chosen, out_png, titles=titles)
    return {"text": tokenizer.decode(ids, skip_special=True), "tokens": len(ids), "picks": picks,
            "figure": str(png)}
