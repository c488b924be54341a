"""`tinygpt pipeline`: the whole recipe, stage after stage, in one run directory.

    tinygpt pipeline --config configs/demo.toml --out runs/demo      # what `make demo` runs

    world -> tokenizer -> prepare -> pretrain -> sft (+ sft_lora) -> rank -> reward
          -> ppo -> ppo_ptx -> dpo -> evaluate -> report

Each stage writes its own sub-directory (``runs/demo/sft``, ...). The recipe is a TOML file with
a ``[pipeline]`` table (this module's fields) and one table per stage holding that stage's
options (``[pretrain] max_steps = 600``); ``[sft_lora]`` extends ``[sft]`` and ``[ppo_ptx]`` extends
``[ppo]`` (``Stage.inherits``: their own keys win). The paths that connect the stages (``--init``,
``--data``, ...) are filled in here and always win. Without ``--config`` the built-in recipe
``tinygpt/recipes/demo.toml`` (also ``configs/demo.toml``) is used.

A stage that finished writes ``stage_done.json``; a rerun skips it. A training stage that was
interrupted resumes from its last checkpoint. So a killed pipeline is restarted with the same
command. This module is the only one that calls several stages; stages never call each other.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tinygpt.checkpoint import latest_checkpoint
from tinygpt.config import from_dict, load_toml, opt, save_config

RECIPES = Path(__file__).resolve().parent / "recipes"
DONE = "stage_done.json"


@dataclass
class PipelineConfig:
    config: str = opt("", "TOML recipe: [pipeline] plus one table per stage ('' = the built-in demo recipe)")
    out: str = opt("runs/demo", "run directory; one sub-directory per stage")
    seed: int = opt(0, "seed for the world, the split, and every stage")
    device: str = opt("auto", "auto, cpu, cuda or mps (every stage)")
    dtype: str = opt("auto", "autocast dtype for every training stage: auto, float32 or bfloat16")
    stages: list[str] = opt([], "run only these stages (their inputs must exist); empty = all. Stages: world "
                                "tokenizer prepare pretrain sft sft_lora rank reward ppo ppo_ptx dpo evaluate report")
    skip: list[str] = opt([], "stages to leave out (e.g. sft_lora dpo)")
    progress: bool = opt(True, "progress bars inside the stages")
    report_prompts: list[str] = opt(["What is 3 plus 4?", "Reverse these words: cat dog sun",
                                     "Write a short story about a cat named Tom."],
                                    "instructions every stage answers side by side in the report")


@dataclass(frozen=True)
class Stage:
    name: str
    module: str              # tinygpt.stages.X with a config class and main(cfg)
    config_class: str
    wiring: Callable[[Path, "PipelineConfig"], dict[str, Any]]   # the paths connecting it to earlier stages
    trains: bool = True      # has checkpoints and --resume
    expected_s: float = 10   # seconds in the reference run (records/): weights the overall ETA
    subdir: str = ""         # its directory under the run ("" = its name)
    inherits: str = ""       # a stage whose recipe table this one's extends (its own keys win)

    @property
    def dir(self) -> str:
        return self.subdir or self.name


def _w(out: Path, *parts: str) -> str:
    return str(out.joinpath(*parts))


def _common(out: Path, cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    return {"out": _w(out, stage), "seed": cfg.seed, "device": cfg.device, "dtype": cfg.dtype,
            "progress": cfg.progress}


STAGES: list[Stage] = [
    Stage("world", "tinygpt.stages.world", "WorldConfig", trains=False, expected_s=16,
          wiring=lambda o, c: {"out": _w(o, "world"), "seed": c.seed, "progress": c.progress}),
    Stage("tokenizer", "tinygpt.stages.tokenizer", "TokenizerConfig", trains=False, expected_s=4,
          wiring=lambda o, c: {"inputs": [_w(o, "world", "pretrain.jsonl")], "out": _w(o, "tokenizer"),
                               "progress": c.progress}),
    Stage("prepare", "tinygpt.stages.prepare", "PrepareConfig", trains=False, expected_s=7, subdir="data",
          wiring=lambda o, c: {"inputs": [_w(o, "world", "pretrain.jsonl")], "tokenizer": _w(o, "tokenizer"),
                               "out": _w(o, "data"), "seed": c.seed, "progress": c.progress}),
    Stage("pretrain", "tinygpt.stages.pretrain", "PretrainConfig", expected_s=400,
          wiring=lambda o, c: {**_common(o, c, "pretrain"), "data": _w(o, "data")}),
    Stage("sft", "tinygpt.stages.sft", "SFTConfig", expected_s=79,
          wiring=lambda o, c: {**_common(o, c, "sft"), "init": _w(o, "pretrain"),
                               "data": _w(o, "world", "sft_train.jsonl"), "eval_data": _w(o, "world", "sft_test.jsonl"),
                               "task_eval": _w(o, "world", "sft_test.jsonl")}),
    Stage("sft_lora", "tinygpt.stages.sft", "SFTConfig", expected_s=33, inherits="sft",
          wiring=lambda o, c: {**_common(o, c, "sft_lora"), "init": _w(o, "pretrain"),
                               "data": _w(o, "world", "sft_train.jsonl"), "eval_data": _w(o, "world", "sft_test.jsonl"),
                               "task_eval": _w(o, "world", "sft_test.jsonl")}),
    Stage("rank", "tinygpt.stages.rank", "RankConfig", trains=False, expected_s=34,
          wiring=lambda o, c: {"out": _w(o, "rank"), "seed": c.seed, "device": c.device, "progress": c.progress,
                               "policy": _w(o, "sft"), "prompts": _w(o, "world", "rl_prompts.jsonl")}),
    Stage("reward", "tinygpt.stages.reward", "RewardConfig", expected_s=47,
          wiring=lambda o, c: {**_common(o, c, "reward"), "init": _w(o, "sft"),
                               "rankings": _w(o, "rank", "rankings.jsonl"),
                               "val_rankings": _w(o, "rank", "rankings_val.jsonl"),
                               "demonstrations": _w(o, "world", "sft_train.jsonl")}),
    Stage("ppo", "tinygpt.stages.ppo", "PPOConfig", expected_s=50,
          wiring=lambda o, c: {**_common(o, c, "ppo"), "policy": _w(o, "sft"), "reward": _w(o, "reward"),
                               "prompts": _w(o, "world", "rl_prompts.jsonl"), "ptx_coef": 0.0}),
    Stage("ppo_ptx", "tinygpt.stages.ppo", "PPOConfig", expected_s=68, inherits="ppo",
          wiring=lambda o, c: {**_common(o, c, "ppo_ptx"), "policy": _w(o, "sft"), "reward": _w(o, "reward"),
                               "prompts": _w(o, "world", "rl_prompts.jsonl"), "ptx_data": _w(o, "data")}),
    Stage("dpo", "tinygpt.stages.dpo", "DPOConfig", expected_s=36,
          wiring=lambda o, c: {**_common(o, c, "dpo"), "init": _w(o, "sft"),
                               "pairs": _w(o, "rank", "pairs.jsonl"), "val_pairs": _w(o, "rank", "pairs_val.jsonl")}),
    Stage("evaluate", "tinygpt.stages.evaluate", "EvaluateConfig", trains=False, expected_s=102, subdir="eval",
          wiring=lambda o, c: {"out": _w(o, "eval"), "seed": c.seed, "device": c.device, "dtype": c.dtype,
                               "progress": c.progress, "world": _w(o, "world"), "data": _w(o, "data"),
                               "checkpoints": [f"{name}={_w(o, d)}" for name, d in _EVALUATED
                                               if latest_checkpoint(o / d) is not None],
                               "baseline": _w(o, "sft") if latest_checkpoint(o / "sft") else "",
                               "reward": _w(o, "reward") if latest_checkpoint(o / "reward") else "",
                               "prompts": c.report_prompts}),
]
_EVALUATED = [("base", "pretrain"), ("sft", "sft"), ("sft_lora", "sft_lora"), ("ppo", "ppo"),
              ("ppo_ptx", "ppo_ptx"), ("dpo", "dpo")]
STAGE_NAMES = [s.name for s in STAGES] + ["report"]


def load_recipe(path: str) -> dict[str, dict[str, Any]]:
    """The recipe's tables; unknown table names are an error (a typo would silently do nothing)."""
    recipe = load_toml(path or RECIPES / "demo.toml")
    unknown = sorted(set(recipe) - set(STAGE_NAMES) - {"pipeline"})
    if unknown:
        raise ValueError(f"{path or 'built-in recipe'}: unknown table(s) {unknown}; stages are {STAGE_NAMES}")
    return recipe


def stage_config(stage: Stage, out: Path, cfg: PipelineConfig, recipe: dict[str, dict[str, Any]]) -> Any:
    cls = getattr(importlib.import_module(stage.module), stage.config_class)
    inherited = recipe.get(stage.inherits, {}) if stage.inherits else {}
    values = {**inherited, **recipe.get(stage.name, {}), **stage.wiring(out, cfg)}
    return from_dict(cls, values, source=f"{cfg.config or 'built-in recipe'} [{stage.name}]")


def _with_pipeline_table(cfg: PipelineConfig, table: dict[str, Any]) -> PipelineConfig:
    """Apply the recipe's [pipeline] table to fields still at their defaults (flags and
    explicit arguments win over the recipe)."""
    defaults = PipelineConfig()
    values = {k: v for k, v in table.items() if getattr(cfg, k, None) == getattr(defaults, k, None)}
    if not values:
        return cfg
    merged = {**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}, **values}
    return from_dict(PipelineConfig, merged, source=f"{cfg.config} [pipeline]")


def _peak_rss_gib() -> float:
    """Peak resident memory of this process and its finished children (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 2**20


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def main(cfg: PipelineConfig) -> dict[str, Any]:
    unknown = sorted((set(cfg.stages) | set(cfg.skip)) - set(STAGE_NAMES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {' '.join(STAGE_NAMES)}")
    recipe = load_recipe(cfg.config)
    cfg = _with_pipeline_table(cfg, recipe.get("pipeline", {}))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "pipeline_config.json")
    wanted = [s for s in STAGES if (not cfg.stages or s.name in cfg.stages) and s.name not in cfg.skip]
    if any(s.name == "sft_lora" for s in wanted) and importlib.util.find_spec("peft") is None:
        print("note: peft is not installed, so the LoRA SFT stage is skipped (pip install 'tinygpt[lora]')")
        wanted = [s for s in wanted if s.name != "sft_lora"]
    do_report = (not cfg.stages or "report" in cfg.stages) and "report" not in cfg.skip

    t0 = time.perf_counter()
    total_expected = sum(s.expected_s for s in wanted) or 1.0
    done_expected = 0.0
    timings: dict[str, float] = {}
    n = len(wanted) + int(do_report)
    for i, stage in enumerate(wanted, 1):
        elapsed = time.perf_counter() - t0
        eta = ""
        if done_expected > 0:  # scale the reference run's stage times by this machine's speed so far
            eta = f", ETA {_fmt((total_expected - done_expected) * elapsed / done_expected)}"
        print(f"\n=== [{i}/{n}] {stage.name}  (elapsed {_fmt(elapsed)}{eta}) ===", flush=True)
        stage_dir = out / stage.dir
        marker = stage_dir / DONE
        if marker.exists():
            print(f"skip: {stage_dir} is complete ({marker.name})")
            done_expected += stage.expected_s
            continue
        stage_cfg = stage_config(stage, out, cfg, recipe)
        if stage.trains and latest_checkpoint(stage_dir) is not None:
            stage_cfg.resume = True
            print(f"resuming {stage.name} from {latest_checkpoint(stage_dir)}")
        started = time.perf_counter()
        result = importlib.import_module(stage.module).main(stage_cfg) or {}
        if isinstance(result, dict) and result.get("interrupted"):
            print(f"\npipeline interrupted during {stage.name}: rerun the same command to resume")
            return {"interrupted": True, "stage": stage.name}
        timings[stage.name] = round(time.perf_counter() - started, 1)
        stage_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"seconds": timings[stage.name], "result": _jsonable(result)}, indent=2) + "\n")
        done_expected += stage.expected_s

    report = None
    if do_report:
        print(f"\n=== [{n}/{n}] report  (elapsed {_fmt(time.perf_counter() - t0)}) ===", flush=True)
        report = _report(out, cfg)
    total = time.perf_counter() - t0
    summary = {"seconds": round(total, 1), "stage_seconds": timings, "peak_rss_gib": round(_peak_rss_gib(), 2),
               "report": report}
    (out / "pipeline_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\npipeline finished in {_fmt(total)}, peak memory {summary['peak_rss_gib']:.2f} GiB"
          + (f": see {report['md']} and {report['html']}" if report else ""))
    return summary


def _report(out: Path, cfg: PipelineConfig) -> dict[str, str] | None:
    eval_json = out / "eval" / "eval.json"
    if not eval_json.exists():
        print("no evaluation results (evaluate did not run): no report")
        return None
    from tinygpt.eval.report import build_report, discover_stages

    paths = build_report(out, stages=discover_stages(out), eval_result=json.loads(eval_json.read_text()),
                         eval_dir=out / "eval", out_dir=out)
    return {k: str(v) for k, v in paths.items()}


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        if isinstance(value, dict):
            return {str(k): _jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_jsonable(v) for v in value]
        return str(value)
