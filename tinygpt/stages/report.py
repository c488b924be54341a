"""``tinygpt report RUN_DIR``: redraw a run's report from what its stages and `tinygpt evaluate` wrote.

    tinygpt report runs/demo                 # runs/demo/report.md and report.html
    tinygpt report runs/demo --out /tmp/r    # elsewhere

The pipeline ends with the same call. It loads no model and generates nothing (the answers and
attention maps are in ``eval.json``, written by `tinygpt evaluate`), so it takes seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinygpt.config import opt
from tinygpt.eval.report import build_report, discover_stages


@dataclass
class ReportConfig:
    run_dir: str = opt("", "a pipeline run directory (with pretrain/, sft/, ..., eval/eval.json)", required=True)
    eval_dir: str = opt("", "the directory `tinygpt evaluate` wrote (default: RUN_DIR/eval)")
    out: str = opt("", "where report.md, report.html and figures/ go (default: RUN_DIR)")


def main(cfg: ReportConfig) -> dict[str, Any]:
    if not cfg.run_dir:
        raise ValueError("RUN_DIR is required: a directory written by `tinygpt pipeline`")
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    eval_dir = Path(cfg.eval_dir) if cfg.eval_dir else run_dir / "eval"
    eval_json = eval_dir / "eval.json"
    if not eval_json.is_file():
        raise FileNotFoundError(f"{eval_json} not found: run `tinygpt evaluate --out {eval_dir} ...` first")
    try:
        eval_result = json.loads(eval_json.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{eval_json}: not valid JSON ({e})") from None
    paths = build_report(run_dir, stages=discover_stages(run_dir), eval_result=eval_result, eval_dir=eval_dir,
                         out_dir=Path(cfg.out) if cfg.out else run_dir)
    print(f"report: {paths['md']} and {paths['html']}")
    return {k: str(v) for k, v in paths.items()}
