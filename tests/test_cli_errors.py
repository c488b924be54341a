"""What a user sees when a command is run wrong: one line, the right exit code, never a traceback.

Usage errors (a required flag left out) are argparse's: exit 2, the flag named. Errors of the input
(a file that is not there) are one line ``tinygpt CMD: error: ...``: exit 1.
"""

import subprocess
import sys

import pytest

from tinygpt.cli import COMMANDS, run

NOWHERE = "/nonexistent/tinygpt-test"
# command -> (a complete command line whose input files do not exist, the required flags it names)
CASES = {
    ("tokenizer", "train"): (["--inputs", f"{NOWHERE}/a.jsonl", "--out", f"{NOWHERE}/tok"], ["--inputs"]),
    ("prepare",): (["--inputs", f"{NOWHERE}/a.jsonl", "--tokenizer", f"{NOWHERE}/tok", "--out", f"{NOWHERE}/d"],
                   ["--inputs"]),
    ("pretrain",): (["--data", NOWHERE, "--out", f"{NOWHERE}/pt"], ["--data"]),
    ("sample",): ([NOWHERE], ["CHECKPOINT"]),
    ("sft",): (["--init", NOWHERE, "--data", f"{NOWHERE}/c.jsonl", "--out", f"{NOWHERE}/sft"], ["--init", "--data"]),
    ("rank",): (["--policy", NOWHERE, "--prompts", f"{NOWHERE}/p.jsonl", "--out", f"{NOWHERE}/r"],
                ["--policy", "--prompts"]),
    ("reward",): (["--init", NOWHERE, "--rankings", f"{NOWHERE}/r.jsonl", "--out", f"{NOWHERE}/rm"],
                  ["--init", "--rankings"]),
    ("dpo",): (["--init", NOWHERE, "--pairs", f"{NOWHERE}/p.jsonl", "--out", f"{NOWHERE}/dpo"], ["--init", "--pairs"]),
    ("ppo",): (["--policy", NOWHERE, "--reward", NOWHERE, "--prompts", f"{NOWHERE}/p.jsonl", "--out", f"{NOWHERE}/ppo"],
               ["--policy", "--reward", "--prompts"]),
    ("evaluate",): (["--checkpoints", NOWHERE, "--world", NOWHERE, "--out", f"{NOWHERE}/eval"],
                    ["--checkpoints", "--world"]),
    ("report",): ([NOWHERE], ["RUN_DIR"]),
    ("chat",): ([NOWHERE], ["CHECKPOINT"]),
    ("serve",): ([NOWHERE], ["CHECKPOINT"]),
    ("watermark", "detect"): ([NOWHERE, "--key", "k", "--text", "some text"], ["CHECKPOINT", "--key"]),
    ("memorisation",): (["--checkpoints", NOWHERE, "--data", NOWHERE], ["--checkpoints", "--data"]),
    ("scaling",): (["--data", NOWHERE, "--out", f"{NOWHERE}/scaling"], ["--data"]),
    ("export", "hf"): ([NOWHERE, "--out", "/tmp/tinygpt-never-written-hf"], ["CHECKPOINT", "--out"]),
    ("export", "gguf"): ([NOWHERE, "--out", "/tmp/tinygpt-never-written.gguf"], ["CHECKPOINT", "--out"]),
    ("export", "lm-eval"): (["--world", NOWHERE, "--out", "/tmp/tinygpt-never-written-lmeval"], ["--world", "--out"]),
    ("export", "data"): (["--world", NOWHERE, "--out", "/tmp/tinygpt-never-written-data"], ["--world", "--out"]),
}


@pytest.fixture(autouse=True)
def nothing_is_written_for_a_failed_command():
    """A command that fails on its inputs leaves no partial output behind."""
    yield
    from pathlib import Path

    leftovers = sorted(str(p) for p in Path(NOWHERE).rglob("*")) if Path(NOWHERE).exists() else []
    if Path(NOWHERE).exists():
        import shutil

        shutil.rmtree(Path(NOWHERE).parent if Path(NOWHERE).parent.name == "nonexistent" else NOWHERE)
    assert not leftovers, leftovers


def _exit(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        run(argv)
    code = info.value.code
    err = capsys.readouterr().err + (code if isinstance(code, str) else "")
    return (1 if isinstance(code, str) else code), err


def test_every_command_with_required_inputs_is_covered():
    required = {words for words in COMMANDS if words not in {("world", "make"), ("pipeline",)}}
    assert required <= set(CASES), sorted(required - set(CASES))


@pytest.mark.parametrize("words", list(CASES), ids=" ".join)
def test_a_missing_required_flag_is_a_usage_error(words, capsys):
    code, err = _exit(list(words), capsys)
    assert code == 2
    assert "Traceback" not in err and f"tinygpt {' '.join(words)}: error:" in err
    for flag in CASES[words][1]:
        assert flag in err.splitlines()[-1]
    assert "required" in err.splitlines()[-1]


@pytest.mark.parametrize("words", list(CASES), ids=" ".join)
def test_a_missing_input_file_is_one_line_and_exit_1(words, capsys):
    code, err = _exit(list(words) + CASES[words][0], capsys)
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0].startswith(f"tinygpt {' '.join(words)}: error: ") and NOWHERE in lines[0]
    assert lines[1:] == ["(add --debug for the traceback)"]


def test_the_real_process_prints_one_line_and_debug_shows_the_traceback():
    argv = [sys.executable, "-m", "tinygpt.cli", "sft", "--init", NOWHERE, "--data", NOWHERE]
    out = subprocess.run(argv, capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback (most recent call last)" not in out.stderr
    assert "checkpoint not found" in out.stderr
    out = subprocess.run(argv + ["--debug"], capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback (most recent call last)" in out.stderr


def test_abbreviations_are_refused_and_booleans_take_no(capsys):
    code, err = _exit(["pretrain", "--data", NOWHERE, "--max-step", "3"], capsys)
    assert code == 2 and "--max-step" in err
    from tinygpt.cli import build_parser
    from tinygpt.config import resolve

    parser, cls = build_parser(("pretrain",))
    assert resolve(cls, parser.parse_args(["--data", "x", "--no-progress"]), "pretrain").progress is False
    assert resolve(cls, parser.parse_args(["--data", "x", "--progress", "false"]), "pretrain").progress is False


def test_a_run_is_not_trained_over_without_resume_or_overwrite(tmp_path):
    from tinygpt.checkpoint import save_training_checkpoint
    from tinygpt.model import GPT, ModelConfig
    from tinygpt.stages.sft import SFTConfig, main

    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, d_model=16)
    save_training_checkpoint(tmp_path, 5, model=GPT(cfg), model_config=cfg, tokenizer_json=None, meta={"step": 5},
                             trainer_state={"step": 5})
    with pytest.raises(ValueError, match="already holds a sft run.*--resume.*--overwrite"):
        main(SFTConfig(init="x", data="y", out=str(tmp_path)))
    with pytest.raises(ValueError, match="contradict"):
        main(SFTConfig(init="x", data="y", out=str(tmp_path), resume=True, overwrite=True))


def test_pipeline_names_its_stages(capsys, tmp_path):
    from tinygpt.pipeline import STAGE_NAMES, PipelineConfig, main
    from tinygpt.cli import build_parser

    help_text = " ".join(build_parser(("pipeline",))[0].format_help().split())
    assert all(name in help_text for name in STAGE_NAMES)
    with pytest.raises(ValueError, match="unknown stage.*'sftt'.*stages are world tokenizer"):
        main(PipelineConfig(out=str(tmp_path / "run"), stages=["sftt"]))
    assert not (tmp_path / "run").exists()
