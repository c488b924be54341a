"""Every tensor a stage hands to a collective is built on the rank's device.

NCCL (GPUs) refuses a CPU tensor in ``all_reduce``; gloo (CPU, every test here) accepts any, so a
tensor built without ``device=`` passes every CPU test and fails at the first collective on GPUs:
pretraining's stop check did, until the training skeleton. No CPU run can tell the two apart, so
this test reads the code: a tensor made by ``torch.tensor/zeros/ones/full/empty`` (directly, or
through a local name in the same function) and passed to ``runtime.all_reduce_*``, a ``reduce``
callable, ``global_mean`` or ``torch.distributed`` must say ``device=`` (``runtime.any_rank`` takes
the device as an argument). It runs on every module of the package, and on pretraining's old stop
check, which it must flag.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tinygpt"
CREATORS = {"tensor", "zeros", "ones", "full", "empty", "arange", "as_tensor"}
COLLECTIVES = {"all_reduce_mean", "all_reduce_sum", "all_reduce", "all_gather", "broadcast", "reduce", "global_mean"}


def _creation_without_device(node: ast.AST) -> bool:
    """``torch.zeros(...)`` (or ``zeros``) called without ``device=``."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name not in CREATORS:
        return False
    if isinstance(f, ast.Attribute) and not (isinstance(f.value, ast.Name) and f.value.id == "torch"):
        return False
    return not any(k.arg == "device" for k in node.keywords)


def _callee(node: ast.Call) -> str | None:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def offences(source: str, filename: str = "<code>") -> list[str]:
    """``file:line`` of every collective whose tensor argument was built without a device."""
    found = []
    tree = ast.parse(source)
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module))]:
        made_here: dict[str, ast.Call] = {}
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and _creation_without_device(node.value):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        made_here[target.id] = node.value
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and _callee(node) in COLLECTIVES and node.args:
                arg = node.args[0]
                if _creation_without_device(arg) or (isinstance(arg, ast.Name) and arg.id in made_here):
                    found.append(f"{filename}:{node.lineno}")
    return sorted(set(found))


def test_the_checker_finds_the_bug_it_is_for():
    """Pretraining's stop check before the training skeleton: caught. The fixed line: not."""
    old = ("def loop(stop, device):\n"
           "    stop_now = torch.tensor(float(stop.stop))\n"
           "    if runtime.all_reduce_mean(stop_now).item() > 0:\n"
           "        return True\n")
    assert offences(old) == ["<code>:3"]
    assert offences("def f(x):\n    return runtime.all_reduce_sum(torch.zeros(3))\n") == ["<code>:2"]
    fixed = old.replace("float(stop.stop))", "float(stop.stop), device=device)")
    assert offences(fixed) == []
    assert offences("def f(t, device):\n    return reduce(torch.tensor(1.0, device=device) + t)\n") == []


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_collective_tensors_are_built_on_the_rank_device(path):
    assert offences(path.read_text(), str(path.relative_to(PKG))) == []
