"""config.py + cli.py: dataclass -> flags, TOML presets under flags, clear errors."""

import dataclasses
import json
import subprocess
import sys

import pytest

from tinygpt.cli import COMMANDS, build_parser
from tinygpt.config import from_dict, opt, resolve, save_config


@dataclasses.dataclass
class Toy:
    name: str = opt("a", "a name")
    steps: int = opt(3, "how many")
    lr: float = opt(0.1, "rate")
    flag: bool = opt(False, "a switch")
    size: int | None = opt(None, "optional")
    words: list[str] = opt(["x"], "a list")


def test_from_dict_converts_and_rejects_unknown():
    cfg = from_dict(Toy, {"steps": "7", "lr": "1e-3", "flag": "yes", "size": "none", "words": ["a, b", "c"]})
    assert (cfg.steps, cfg.lr, cfg.flag, cfg.size, cfg.words) == (7, 1e-3, True, None, ["a, b", "c"])
    with pytest.raises(ValueError, match="unknown field"):
        from_dict(Toy, {"stepz": 1})
    with pytest.raises(ValueError, match="steps: expected int"):
        from_dict(Toy, {"steps": "many"})


def test_toml_preset_then_flags(tmp_path):
    import argparse

    from tinygpt.config import add_dataclass_args

    preset = tmp_path / "p.toml"
    preset.write_text('[toy]\nsteps = 10\nname = "preset"\n')
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_dataclass_args(parser, Toy)
    args = parser.parse_args(["--config", str(preset), "--name", "flag", "--flag", "--words", "Once, upon", "a"])
    cfg = resolve(Toy, args, section="toy")
    assert (cfg.steps, cfg.name, cfg.flag) == (10, "flag", True)
    assert cfg.words == ["Once, upon", "a"]  # list items are never split on commas
    save_config(cfg, tmp_path / "resolved.json")
    saved = json.loads((tmp_path / "resolved.json").read_text())
    assert saved["steps"] == 10 and saved["config_class"] == "Toy" and "tinygpt_version" in saved


def test_pretrain_help_lists_every_field():
    from tinygpt.stages.pretrain import PretrainConfig

    parser, cls = build_parser(("pretrain",))
    text = parser.format_help()
    for f in dataclasses.fields(PretrainConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "peak learning rate" in text


@pytest.mark.parametrize("words", list(COMMANDS))
def test_every_command_help_renders(words):
    parser, _ = build_parser(words)
    assert "--config" in parser.format_help()


def test_cli_unknown_command_and_top_help():
    out = subprocess.run([sys.executable, "-m", "tinygpt.cli", "frobnicate"], capture_output=True, text=True)
    assert out.returncode != 0 and "unknown command" in out.stderr
    out = subprocess.run([sys.executable, "-m", "tinygpt.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for words in COMMANDS:
        assert " ".join(words) in out.stdout
