"""The watermark measured on a trained checkpoint: detection against length, its cost to quality, and
what the world's noise edits do to it (issue 17; Kirchenbauer et al. 2023).

    python benchmarks/watermark_detection.py --checkpoint runs/demo/pretrain --world runs/demo/world/pretrain.jsonl \\
        --out records/2026-12-04-watermark

1. Samples ``--n`` stories from BOS at temperature 1 (top-p 1, the paper's multinomial sampling),
   once unwatermarked and once per (gamma, delta) in ``--settings``. Sampling runs past EOS (the model
   starts the next story) for ``--max-new-tokens``, so that windows of 200 tokens exist; quality is
   scored on the first story of each sample (cut at its EOS).
2. Detection goes through text, as a detector sees it: decode (special tokens dropped), re-encode,
   take the first T tokens, score T-1 bigrams (repeated ones once). Negatives: the unwatermarked
   samples, and windows of the world's own stories (``--world``, non-overlapping, tokenized the same
   way) at the same T. Two rules, both with a false-positive rate <= 1e-3 by construction: the exact
   binomial p <= 1e-3, and the paper's z >= 4; the table gives the TPR and the *measured* FPR of each.
3. Quality per setting: the oracle's grammar and (internal) consistency of the first story, the green
   share, and the perplexity of the sampled tokens under the same model without the watermark.
4. Robustness: the watermarked samples edited with the world's noise (``tinygpt.world.tasks``: each
   word misspelled with probability p, neighbours swapped with p/2), then detected again; the share
   of tokens changed is measured (difflib on the token ids), not assumed.

Writes ``results.json`` and ``tables.md`` under ``--out``; prints the tables.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from tinygpt.checkpoint import load_model, load_tokenizer, resolve_checkpoint
from tinygpt.generate import SamplingConfig, generate
from tinygpt.watermark import WatermarkDetector, watermark_processor
from tinygpt.world.oracle import consistency_score, grammar_score
from tinygpt.world.tasks import _perturb_words  # the world's noise edits (word swaps, misspellings)

LENGTHS = (10, 25, 50, 100, 200)
ALPHA = 1e-3


def sample(model, tok, n: int, max_new: int, seed: int, proc=None, batch: int = 64) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, n, batch):
        k = min(batch, n - start)
        cfg = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=max_new)
        out += generate(model, [[tok.bos_id]] * k, cfg, row_seeds=[seed + start + i for i in range(k)],
                        logits_processors=[proc] if proc else [])
    return out


def plain_nll(model, tok, rows: list[list[int]]) -> list[float]:
    """Mean negative log-likelihood per sampled token under the unwatermarked model (first story only)."""
    out = []
    for ids in rows:
        x = torch.tensor([[tok.bos_id] + ids])
        with torch.inference_mode():
            logp = model(x)[0, :-1].float().log_softmax(-1)  # (T, V)
        out.append(-float(logp.gather(1, torch.tensor(ids)[:, None]).mean()))
    return out


def first_story(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos)] if eos in ids else ids


def windows_of(ids: list[int], T: int) -> list[int] | None:
    return ids[:T] if len(ids) >= T else None


def calibrated(neg_z: list[float], pos_z: list[float]) -> tuple[float, float]:
    """The threshold that flags at most ALPHA of the negatives (flag iff z > it), and the TPR there."""
    allowed = math.floor(ALPHA * len(neg_z))
    thr = sorted(neg_z, reverse=True)[allowed] if neg_z else float("inf")
    return thr, sum(z > thr for z in pos_z) / max(len(pos_z), 1)


def rates(det, texts_ids: list[list[int]], T: int) -> tuple[int, int, int, list[float]]:
    """(n texts with >= T tokens, flagged by binomial p <= ALPHA, flagged by z >= 4, z values)."""
    n = bin_hits = z_hits = 0
    zs = []
    for ids in texts_ids:
        w = windows_of(ids, T)
        if w is None:
            continue
        r = det.score_ids(w)
        n += 1
        bin_hits += r["binomial_p_value"] <= ALPHA
        z_hits += r["z"] >= 4.0
        zs.append(r["z"])
    return n, bin_hits, z_hits, zs


def plot_detection(rows: list[dict], path: Path) -> None:
    """TPR at the calibrated threshold (measured FPR <= 1e-3) against T, one line per (gamma, delta)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for g, d in sorted({(r["gamma"], r["delta"]) for r in rows}):
        pts = sorted((r["T"], r["tpr_calibrated"]) for r in rows if (r["gamma"], r["delta"]) == (g, d))
        ax.plot(*zip(*pts), marker="o", linestyle="-" if g == 0.25 else "--", label=f"gamma {g}, delta {d:g}")
    ax.set_xscale("log")
    ax.set_xticks(LENGTHS, [str(t) for t in LENGTHS])
    ax.set_xlabel("tokens T")
    ax.set_ylabel("true-positive rate at measured FPR <= 1e-3")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a trained checkpoint (e.g. runs/demo/pretrain)")
    ap.add_argument("--world", required=True, help="the world's stories JSONL ({'text': ...}): negatives")
    ap.add_argument("--out", required=True, help="directory for results.json and tables.md")
    ap.add_argument("--n", type=int, default=96, help="samples per setting")
    ap.add_argument("--max-new-tokens", type=int, default=215, help="tokens per sample (past EOS)")
    ap.add_argument("--settings", default="0.25:1,0.25:2,0.25:4,0.5:1,0.5:2,0.5:4", help="gamma:delta,...")
    ap.add_argument("--noise", default="0.1,0.2,0.3", help="world noise levels for the robustness table")
    ap.add_argument("--world-windows", type=int, default=3000, help="most world-text windows per T")
    ap.add_argument("--key", default="tinygpt-issue-17")
    ap.add_argument("--keys", type=int, default=10, help="keys tried for the world-text FPR's spread over keys")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a 1M-parameter model decodes no faster on two threads, and the host is shared
    t0 = time.time()
    ckpt = resolve_checkpoint(args.checkpoint)
    model, mcfg = load_model(ckpt, device="cpu")
    model.eval()
    tok = load_tokenizer(ckpt)
    V = mcfg.vocab_size
    settings = [(float(g), float(d)) for g, d in (s.split(":") for s in args.settings.split(","))]
    gammas = sorted({g for g, _ in settings})
    retok = lambda ids: tok.encode(tok.decode(ids, skip_special=True))  # what a detector sees  # noqa: E731

    # --- samples ---
    plain = sample(model, tok, args.n, args.max_new_tokens, args.seed)
    marked = {s: sample(model, tok, args.n, args.max_new_tokens, args.seed,
                        watermark_processor(args.key, s[0], s[1], vocab_size=V)) for s in settings}
    print(f"sampled {args.n} x {1 + len(settings)} settings in {time.time() - t0:.0f} s")

    # --- negatives: world text, tokenized as a detector would, in non-overlapping windows ---
    world_ids: list[int] = []
    for line in Path(args.world).read_text().splitlines():
        world_ids += tok.encode(json.loads(line)["text"])
        if len(world_ids) > max(LENGTHS) * args.world_windows:
            break
    world = {T: [world_ids[i:i + T] for i in range(0, len(world_ids) - T, T)][:args.world_windows] for T in LENGTHS}

    # --- detection against T ---
    detection = []
    plain_text_ids = [retok(ids) for ids in plain]
    for g in gammas:
        det = WatermarkDetector(args.key, g, vocab_size=V)
        for T in LENGTHS:
            nw, fw_bin, fw_z, zs_world = rates(det, world[T], T)
            ns, fs_bin, fs_z, zs_plain = rates(det, plain_text_ids, T)
            for (sg, sd), rows in marked.items():
                if sg != g:
                    continue
                n, tp_bin, tp_z, zs = rates(det, [retok(ids) for ids in rows], T)
                thr, tpr_cal = calibrated(zs_world + zs_plain, zs)
                detection.append({"gamma": g, "delta": sd, "T": T, "n_pos": n, "tpr_binomial": tp_bin / max(n, 1),
                                  "tpr_z4": tp_z / max(n, 1), "z_calibrated": thr, "tpr_calibrated": tpr_cal,
                                  "median_z": statistics.median(zs) if zs else None,
                                  "n_neg_world": nw, "n_neg_samples": ns,
                                  "fpr_binomial": (fw_bin + fs_bin) / max(nw + ns, 1),
                                  "fpr_z4": (fw_z + fs_z) / max(nw + ns, 1),
                                  "median_z_unmarked": statistics.median(zs_plain) if zs_plain else None})

    # --- one key against many: the world's text repeats its bigrams, so a fixed key's FPR varies ---
    key_fpr = []
    for g in gammas:
        for T in (50, 200):
            fprs = []
            for k in range(args.keys):
                det = WatermarkDetector(f"{args.key}-{k}", g, vocab_size=V)
                nw, fw_bin, _, zs_w = rates(det, world[T], T)
                fprs.append(fw_bin / max(nw, 1))
            key_fpr.append({"gamma": g, "T": T, "n_windows": nw, "keys": args.keys, "fpr_median": statistics.median(fprs),
                            "fpr_max": max(fprs), "fpr_mean": statistics.fmean(fprs)})

    # --- quality ---
    quality = []
    for name, rows, (g, d) in [("none", plain, (None, 0.0))] + [(f"{g}/{d}", r, (g, d)) for (g, d), r in marked.items()]:
        stories = [first_story(ids, tok.eos_id) for ids in rows]
        texts = [tok.decode(s, skip_special=True).strip() for s in stories]
        nll = plain_nll(model, tok, [s for s in stories if s])
        green = None
        if g is not None:
            det = WatermarkDetector(args.key, g, vocab_size=V)
            green = statistics.fmean(det.score_ids([tok.bos_id] + s)["green_fraction"] for s in stories if s)
        quality.append({"gamma": g, "delta": d, "n": len(texts),
                        "grammar": statistics.fmean(grammar_score(t) for t in texts),
                        "consistency": statistics.fmean(consistency_score(t, None) for t in texts),
                        "ppl_unwatermarked_model": math.exp(statistics.fmean(nll)),
                        "median_story_tokens": statistics.median(len(s) for s in stories),
                        "green_share": green})

    # --- robustness to the world's noise ---
    robust = []
    rng = random.Random(args.seed)
    for (g, d), rows in marked.items():
        if d < 2:
            continue
        det = WatermarkDetector(args.key, g, vocab_size=V)
        for p in [0.0] + [float(x) for x in args.noise.split(",")]:
            edited, changed = [], []
            for ids in rows:
                text = tok.decode(ids, skip_special=True)
                new = tok.encode(_perturb_words(text, rng, p)) if p > 0 else tok.encode(text)
                orig = tok.encode(text)
                sm = difflib.SequenceMatcher(a=orig, b=new, autojunk=False)
                changed.append(1 - sum(b.size for b in sm.get_matching_blocks()) / max(len(orig), 1))
                edited.append(new)
            row = {"gamma": g, "delta": d, "noise": p, "tokens_changed": statistics.fmean(changed)}
            for T in (50, 100, 200):
                n, tp_bin, tp_z, zs = rates(det, edited, T)
                row[f"tpr_binomial_T{T}"] = tp_bin / max(n, 1)
                row[f"median_z_T{T}"] = statistics.median(zs) if zs else None
                row[f"n_T{T}"] = n
            robust.append(row)

    # --- tables ---
    lines = ["## Detection against length (through text; FPR measured on world-text windows + unwatermarked samples)",
             "", "| gamma | delta | T | n | TPR (binomial p <= 1e-3) | FPR measured | TPR (z >= 4) | FPR measured | "
             "TPR (z > z*) | z* (measured FPR <= 1e-3) | median z | median z unwatermarked | negatives (world + samples) |",
             "|" + "---|" * 13]
    for r in detection:
        lines.append(f"| {r['gamma']} | {r['delta']} | {r['T']} | {r['n_pos']} | {r['tpr_binomial']:.3f} | "
                     f"{r['fpr_binomial']:.4f} | {r['tpr_z4']:.3f} | {r['fpr_z4']:.4f} | {r['tpr_calibrated']:.3f} | "
                     f"{r['z_calibrated']:.2f} | {r['median_z']:.2f} | "
                     f"{r['median_z_unmarked']:.2f} | {r['n_neg_world']} + {r['n_neg_samples']} |")
    lines += ["", "## Cost to quality (first story of each sample; perplexity under the unwatermarked model)", "",
              "| gamma | delta | n | grammar | consistency | perplexity | green share | median story tokens |",
              "|" + "---|" * 8]
    for r in quality:
        gs = "-" if r["green_share"] is None else f"{r['green_share']:.3f}"
        lines.append(f"| {r['gamma'] or '-'} | {r['delta']} | {r['n']} | {r['grammar']:.3f} | {r['consistency']:.3f} | "
                     f"{r['ppl_unwatermarked_model']:.3f} | {gs} | {r['median_story_tokens']} |")
    lines += ["", "## After the world's noise edits (binomial p <= 1e-3)", "",
              "| gamma | delta | word noise p | tokens changed | TPR T=50 | TPR T=100 | TPR T=200 (n) | median z T=200 |",
              "|" + "---|" * 8]
    for r in robust:
        mz = "-" if r["median_z_T200"] is None else f"{r['median_z_T200']:.2f}"
        lines.append(f"| {r['gamma']} | {r['delta']} | {r['noise']} | {r['tokens_changed']:.3f} | "
                     f"{r['tpr_binomial_T50']:.3f} | {r['tpr_binomial_T100']:.3f} | "
                     f"{r['tpr_binomial_T200']:.3f} ({r['n_T200']}) | {mz} |")
    lines += ["", "## World text under many keys (binomial p <= 1e-3; its nominal FPR is <= 1e-3 for every key)", "",
              "| gamma | T | windows | keys | FPR median | FPR mean | FPR max |", "|" + "---|" * 7]
    for r in key_fpr:
        lines.append(f"| {r['gamma']} | {r['T']} | {r['n_windows']} | {r['keys']} | {r['fpr_median']:.4f} | "
                     f"{r['fpr_mean']:.4f} | {r['fpr_max']:.4f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({
        "checkpoint": str(ckpt), "args": vars(args), "host": platform.processor() or platform.machine(),
        "torch": torch.__version__, "seconds": round(time.time() - t0, 1), "detection": detection,
        "quality": quality, "robustness": robust,
        "world_fpr_over_keys": key_fpr}, indent=1))
    plot_detection(detection, out / "detection.png")
    print(f"wrote {out}/tables.md, results.json and detection.png in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
