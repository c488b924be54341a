"""Imports point one way: world/tokenizer -> data -> model -> losses/optim -> checkpoint -> generate/training -> eval ->
stages -> pipeline/chat/cli. A lower layer never imports a higher one, and a stage never imports another stage."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tinygpt"

LAYERS = [  # (layer, module prefixes); a module may import only from its own layer or below
    (0, ["tinygpt", "tinygpt.config", "tinygpt.runtime", "tinygpt.runlog", "tinygpt.world", "tinygpt.tokenizer"]),
    (1, ["tinygpt.data"]),
    (2, ["tinygpt.model"]),
    (3, ["tinygpt.losses", "tinygpt.optim"]),
    (4, ["tinygpt.checkpoint", "tinygpt.lora"]),
    (5, ["tinygpt.generate", "tinygpt.reward_model", "tinygpt.training", "tinygpt.rollout", "tinygpt.watermark"]),
    (6, ["tinygpt.eval"]),
    (7, ["tinygpt.stages"]),
    (8, ["tinygpt.pipeline", "tinygpt.scaling", "tinygpt.chat", "tinygpt.serve", "tinygpt.export", "tinygpt.cli",
         "tinygpt.__main__"]),
]


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for layer, prefixes in LAYERS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = layer, len(p)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n == "tinygpt" or n.startswith("tinygpt.")}


def _real(name: str) -> str:
    """'tinygpt.stages.pretrain.main' -> the longest prefix that is a module file or package."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = PKG.parent.joinpath(*parts[:i])
        if cand.with_suffix(".py").exists() or (cand / "__init__.py").exists():
            return ".".join(parts[:i])
    return name


FILES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_one_way(path):
    me = module_name(path)
    mine = layer_of(me)
    for name in sorted({_real(n) for n in imported(path)}):
        assert layer_of(name) <= mine, f"{me} (layer {mine}) imports {name} (layer {layer_of(name)})"
        if me.startswith("tinygpt.stages.") and name.startswith("tinygpt.stages."):
            assert name in (me, "tinygpt.stages"), f"stage {me} imports another stage {name}"


def test_model_imports_only_torch():
    tree = ast.parse((PKG / "model.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots <= {"torch", "math", "dataclasses", "__future__", "typing"}, roots
