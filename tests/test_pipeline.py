"""The whole pipeline on the tiny recipe: every stage runs in order, a rerun skips what is complete."""

import json
from pathlib import Path

import pytest

from tinygpt.config import load_toml
from tinygpt.pipeline import RECIPES, STAGE_NAMES, PipelineConfig, load_recipe, main

ROOT = Path(__file__).resolve().parents[1]


def test_configs_dir_points_at_the_packaged_recipes():
    for name in ("demo.toml", "tiny.toml", "gpu.toml"):
        assert load_toml(ROOT / "configs" / name) == load_toml(RECIPES / name)


def test_recipe_tables_are_checked(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[pretrian]\nmax_steps = 3\n")
    with pytest.raises(ValueError, match="pretrian"):
        load_recipe(str(bad))
    assert set(load_recipe("")) <= set(STAGE_NAMES) | {"pipeline"}


@pytest.mark.parametrize("name", ["demo.toml", "tiny.toml", "gpu.toml"])
def test_every_recipe_table_builds_its_stage_config(name, tmp_path):
    from tinygpt.pipeline import STAGES, stage_config

    recipe = load_recipe(str(RECIPES / name))
    cfg = PipelineConfig(config=str(RECIPES / name), out=str(tmp_path))
    for stage in STAGES:  # unknown or mistyped fields raise here, before any stage runs
        stage_config(stage, tmp_path, cfg, recipe)


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_and_rerun_skips(tmp_path, capsys):
    cfg = PipelineConfig(config=str(RECIPES / "tiny.toml"), out=str(tmp_path / "run"), device="cpu",
                         dtype="float32", progress=False)
    summary = main(cfg)
    out = tmp_path / "run"
    for stage in ("world", "tokenizer", "data", "pretrain", "sft", "rank", "reward", "ppo", "ppo_ptx", "dpo", "eval"):
        assert (out / stage / "stage_done.json").exists(), stage
    assert (out / "report.md").exists() and (out / "report.html").exists()
    evaluated = json.loads((out / "eval" / "eval.json").read_text())
    assert {"base", "sft", "ppo", "ppo_ptx", "dpo"} <= set(json.dumps(evaluated).split('"')), "every stage evaluated"
    assert summary["peak_rss_gib"] > 0
    capsys.readouterr()
    main(cfg)  # everything is complete: each stage is skipped
    printed = capsys.readouterr().out
    assert printed.count("skip:") >= 11
