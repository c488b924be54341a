"""Predictable scaling (GPT-4 technical report, section 3; Kaplan et al. 2020): train a ladder of small
models, fit L(C) = a C^b + c to their final validation losses against training compute C, predict
the loss of a run 10-30x past the largest, train that run, and report the error.

    tinygpt scaling --data runs/demo/data --out runs/scaling

Compute is C = D x (6N + 12 L d T) FLOPs (``GPT.flops_per_token``: PaLM appendix B) for D training
tokens. The ladder grows width and tokens together (D = ``tokens_per_param`` x N), so each rung is a
bigger model trained for longer, as a compute-efficient frontier would be.

:func:`fit_power_law` is a pure function (a grid over the floor c, closed-form least squares of
log(L - c) on log C for each), tested on points drawn from a known law. The ladder calls
``tinygpt.stages.pretrain.main``, so this module sits above the stages, with the pipeline.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tinygpt.config import opt

# --- the fit: pure -----------------------------------------------------------------------------


def power_law(C: np.ndarray | float, a: float, b: float, c: float) -> np.ndarray | float:
    """L(C) = a C^b + c."""
    return a * np.power(C, b) + c


def fit_power_law(C: Sequence[float], L: Sequence[float], *, grid: int = 4000) -> dict[str, float]:
    """Least-squares fit of L = a C^b + c (a > 0, b < 0, 0 <= c < min L) to three or more points.

    For each floor c on a grid over [0, min L), log(L - c) = log a + b log C is a straight line whose
    least-squares a, b are closed-form; the c whose curve has the smallest squared error in L wins.
    Returns ``{"a", "b", "c", "rmse"}``."""
    C, L = np.asarray(C, dtype=np.float64), np.asarray(L, dtype=np.float64)
    if C.shape != L.shape or C.ndim != 1 or len(C) < 3:
        raise ValueError(f"fit_power_law needs three or more (C, L) points, got {C.shape} and {L.shape}")
    if (C <= 0).any() or (L <= 0).any():
        raise ValueError("compute and loss must be positive")
    x = np.log(C)
    best: dict[str, float] | None = None
    for c in np.linspace(0.0, L.min(), grid, endpoint=False):
        y = np.log(L - c)
        b, log_a = np.polyfit(x, y, 1)
        if b >= 0:
            continue
        err = float(np.mean((power_law(C, math.exp(log_a), b, c) - L) ** 2))
        if best is None or err < best["mse"]:
            best = {"a": math.exp(log_a), "b": float(b), "c": float(c), "mse": err}
    if best is None:
        raise ValueError("the loss does not fall with compute: no power law with b < 0 fits")
    return {"a": best["a"], "b": best["b"], "c": best["c"], "rmse": math.sqrt(best["mse"])}


# --- the ladder --------------------------------------------------------------------------------


@dataclass
class ScalingConfig:
    data: str = opt("", "shard directory from `tinygpt prepare` (train.bin, val.bin)", required=True)
    out: str = opt("runs/scaling", "one pretrain run per rung under OUT/, and OUT/scaling.json, OUT/scaling.png")
    widths: list[int] = opt([8, 12, 16, 20, 24], "d_model of each ladder rung (n_layer and n_head fixed)")
    target_width: int = opt(64, "d_model of the held-out run whose loss is predicted (15x the compute of d24)")
    n_layer: int = opt(2, "layers in every model")
    n_head: int = opt(2, "heads in every model")
    arch: str = opt("llama", "gpt2 or llama")
    tokens_per_param: float = opt(2.0, "training tokens D = this x N (matmul parameters): size and tokens grow together")
    block_size: int = opt(64, "context length")
    batch_size: int = opt(16, "sequences per step")
    lr: float = opt(3e-3, "peak learning rate (cosine to lr / 10)")
    eval_batches: int = opt(40, "validation batches for each run's final loss (the same windows for every run)")
    seed: int = opt(1337, "seed of every run")
    device: str = opt("auto", "auto, cpu, cuda or mps")


def _rung(cfg: ScalingConfig, width: int, vocab_size: int) -> dict[str, Any]:
    """Model shape, parameters, steps and compute of one run (no training)."""
    from tinygpt.model import GPT, ModelConfig

    mcfg = ModelConfig(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       d_model=width, arch=cfg.arch)
    model = GPT(mcfg)
    fpt = model.flops_per_token()
    n_matmul = model.num_params(non_embedding=True) + vocab_size * width
    tokens = cfg.tokens_per_param * n_matmul
    steps = max(1, round(tokens / (cfg.batch_size * cfg.block_size)))
    tokens = steps * cfg.batch_size * cfg.block_size
    return {"width": width, "params": model.num_params(), "matmul_params": n_matmul, "steps": steps,
            "tokens": tokens, "flops": float(fpt) * tokens}


def _train(cfg: ScalingConfig, rung: dict[str, Any]) -> float:
    from tinygpt.stages import pretrain

    steps = rung["steps"]
    pcfg = pretrain.PretrainConfig(
        data=cfg.data, out=str(Path(cfg.out) / f"d{rung['width']}"), arch=cfg.arch, block_size=cfg.block_size,
        n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=rung["width"], batch_size=cfg.batch_size, max_steps=steps,
        lr=cfg.lr, min_lr=cfg.lr / 10, warmup_steps=max(1, steps // 20), eval_every=steps,
        eval_batches=cfg.eval_batches, save_every=steps, seed=cfg.seed, device=cfg.device, progress=False)
    result = pretrain.main(pcfg)
    if "val_loss" not in result:
        raise RuntimeError(f"pretrain of width {rung['width']} reported no validation loss: {result}")
    return float(result["val_loss"])


def main(cfg: ScalingConfig) -> dict[str, Any]:
    if not cfg.data:
        raise ValueError("--data is required: a shard directory from `tinygpt prepare`")
    if len(cfg.widths) < 3:
        raise ValueError("the fit has three unknowns: give at least three --widths")
    if cfg.target_width <= max(cfg.widths):
        raise ValueError(f"--target-width {cfg.target_width} must be past the ladder's largest width {max(cfg.widths)}")
    vocab = json.loads((Path(cfg.data) / "meta.json").read_text())["vocab_size"]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ladder = [_rung(cfg, w, vocab) for w in sorted(cfg.widths)]
    target = _rung(cfg, cfg.target_width, vocab)
    ratio = target["flops"] / ladder[-1]["flops"]
    print(f"scaling: {len(ladder)} rungs, {ladder[0]['flops']:.2e} .. {ladder[-1]['flops']:.2e} FLOPs; "
          f"target {target['flops']:.2e} FLOPs = {ratio:.1f}x the largest rung")
    t0 = time.time()
    for r in ladder:
        start = time.time()
        r["val_loss"] = _train(cfg, r)
        r["seconds"] = round(time.time() - start, 1)
        print(f"  d{r['width']}: {r['params']:,} params, {r['tokens']:,} tokens, {r['flops']:.2e} FLOPs -> "
              f"val loss {r['val_loss']:.4f} ({r['seconds']} s)")
    fit = fit_power_law([r["flops"] for r in ladder], [r["val_loss"] for r in ladder])
    predicted = float(power_law(target["flops"], fit["a"], fit["b"], fit["c"]))
    print(f"fit: L(C) = {fit['a']:.4g} C^{fit['b']:.4f} + {fit['c']:.4f} (rmse {fit['rmse']:.4f}); "
          f"predicted val loss at {target['flops']:.2e} FLOPs: {predicted:.4f}")
    start = time.time()
    target["val_loss"] = _train(cfg, target)
    target["seconds"] = round(time.time() - start, 1)
    error = (predicted - target["val_loss"]) / target["val_loss"]
    print(f"  target d{target['width']}: val loss {target['val_loss']:.4f} ({target['seconds']} s); "
          f"prediction off by {100 * error:+.2f}%")
    result = {"config": asdict(cfg), "ladder": ladder, "target": target, "compute_ratio": ratio, "fit": fit,
              "predicted_val_loss": predicted, "relative_error": error, "seconds": round(time.time() - t0, 1)}
    (out / "scaling.json").write_text(json.dumps(result, indent=1))
    _plot(result, out / "scaling.png")
    return result


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fit, ladder, target = result["fit"], result["ladder"], result["target"]
    C = np.array([r["flops"] for r in ladder])
    grid = np.geomspace(C.min() / 1.5, target["flops"] * 1.5, 100)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(grid, power_law(grid, fit["a"], fit["b"], fit["c"]), "--", color="gray",
            label=f"fit: {fit['a']:.3g} C^{fit['b']:.3f} + {fit['c']:.3f}")
    ax.scatter(C, [r["val_loss"] for r in ladder], color="C0", label="ladder (fitted)", zorder=3)
    ax.scatter([target["flops"]], [result["predicted_val_loss"]], marker="x", color="C3", s=60,
               label="predicted", zorder=3)
    ax.scatter([target["flops"]], [target["val_loss"]], color="C3", label="trained", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"predicted {result['compute_ratio']:.0f}x past the ladder: error {100 * result['relative_error']:+.1f}%")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
