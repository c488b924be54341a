"""Run metrics on disk: ``metrics.jsonl`` (one JSON object per line) and PNG curves beside it.

Every line is flushed as it is written, so a crash loses nothing already logged. On resume the
file is cut back to the resumed step, so the curve never holds the same step twice.
Knows nothing about models or stages: dicts in, files out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable


class MetricsWriter:
    """Append-only JSONL records with a ``step`` (``metrics.jsonl``, or ``name``: PPO's ``samples.jsonl``).

    ``resume_step=None`` starts the file afresh; a step keeps the records of steps <= it (and drops a
    torn line), so a resumed run appends after exactly what it resumed from. ``enabled=False`` (ranks
    other than 0) writes nothing.
    """

    def __init__(self, run_dir: str | Path, *, resume_step: int | None = None, enabled: bool = True,
                 name: str = "metrics.jsonl"):
        self.path = Path(run_dir) / name
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self.enabled:
            self._f.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (or samples.jsonl); a torn last line (a crash mid-write) is ignored."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_curves(records: Iterable[dict[str, Any]], keys: list[str], out_png: str | Path,
                title: str = "", x: str = "step") -> Path | None:
    """Plot each key against ``x`` (records lacking a key are skipped); None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for key in keys:
        pts = [(r[x], r[key]) for r in records if r.get(key) is not None and x in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=key, marker="o" if len(pts) < 30 else None, markersize=3)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel(x)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
