"""Stage configs: dataclass fields with help text, TOML presets, and the CLI built from them.

Every stage module defines one dataclass (``PretrainConfig``, ``SFTConfig``, ...) whose fields
are declared with :func:`opt`, so each field carries its default and a one-line help. This module
turns such a dataclass into an ``argparse`` parser (``--field-name VALUE``), merges a TOML preset
(``--config FILE``) under the flags, and writes the resolved config into the run directory.

It knows nothing about any particular stage: no stage is imported here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def opt(default: Any, help: str, *, required: bool = False, **kwargs: Any) -> Any:
    """A dataclass field with a default and a help string (shown by ``--help``).

    ``required``: the command cannot run without it (an empty default stands for "not given"); ``--help``
    says so, and the CLI refuses to start without it (:func:`missing_required`). The dataclass itself
    keeps the empty default, so a TOML preset or a pipeline can fill the field in.
    """
    metadata = {"help": help, "required": required}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def missing_required(cfg: Any) -> list[str]:
    """The names of ``cfg``'s required fields that are still empty."""
    return [f.name for f in dataclasses.fields(cfg) if f.metadata.get("required") and getattr(cfg, f.name) in ("", [], None)]


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Strip ``Optional``: return (inner type, allows_none)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _convert(tp: Any, raw: Any, name: str) -> Any:
    base, nullable = _base_type(tp)
    if raw is None:
        return None
    if isinstance(raw, str) and nullable and raw.lower() in ("none", "null", ""):
        return None
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        (inner,) = typing.get_args(base)[:1] or (str,)
        items = raw if isinstance(raw, (list, tuple)) else [raw]
        if inner is not str:  # numbers may also come comma-separated: --pass-k 1,5 == --pass-k 1 5
            items = [part for x in items for part in (str(x).split(",") if isinstance(x, str) else [x]) if part != ""]
        return [_convert(inner, x, name) for x in items]
    if base is bool:
        if isinstance(raw, bool):
            return raw
        s = str(raw).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected true/false, got {raw!r}")
    if base in (int, float, str):
        try:
            return base(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected {base.__name__}, got {raw!r}") from None
    if base is Path:
        return Path(raw)
    return raw


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build ``cls`` from a plain dict, converting types and rejecting unknown keys."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {k: _convert(hints[k], v, f"{source}: {k}") for k, v in values.items()}
    return cls(**kwargs)


def load_toml(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """Read a TOML preset; with ``section``, return only that table (missing: empty)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from None
    if section is not None:
        data = data.get(section, {})
    return data


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = ()) -> None:
    """Add one ``--field-name`` option per dataclass field (``positional`` ones as arguments)."""
    hints = _hints(cls)
    fields = dataclasses.fields(cls)
    declared = list(vars(cls).get("__annotations__", {}))  # the stage's own fields, in the order it declares them
    own = sorted((f for f in fields if f.name in declared), key=lambda f: declared.index(f.name))
    shared = [f for f in fields if f.name not in declared]
    group: Any = parser
    for f in own + shared:
        if shared and f is shared[0]:  # the fields a stage inherits (training.RunConfig's ...) follow its own
            group = parser.add_argument_group("options every trainer shares (tinygpt/training.py)")
        helptext = f.metadata.get("help", "").replace("%", "%%")  # argparse expands %-formats in help
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        base, _ = _base_type(hints[f.name])
        metavar = getattr(base, "__name__", "VALUE").upper()
        shown = "required" if f.metadata.get("required") else f"default: {_show(default)}"
        if f.name in positional:
            group.add_argument(f.name, help=f"{helptext} ({shown})" if f.metadata.get("required") else helptext,
                               metavar=f.name.upper(), nargs="?" if default is not None else None,
                               default=argparse.SUPPRESS)
            continue
        flag = "--" + f.name.replace("_", "-")
        if typing.get_origin(base) in (list, tuple):
            group.add_argument(flag, dest=f.name, nargs="+", default=argparse.SUPPRESS, metavar="VALUE",
                               help=f"{helptext}; one or more, space-separated ({shown})")
        elif base is bool:
            no_flag = "--no-" + f.name.replace("_", "-")
            group.add_argument(flag, dest=f.name, nargs="?", const="true", default=argparse.SUPPRESS,
                               metavar="BOOL", help=f"{helptext} ({shown}; {no_flag} = false)")
            group.add_argument(no_flag, dest=f.name, action="store_const", const="false", default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS)
        else:
            group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=metavar,
                               help=f"{helptext} ({shown})")


def _show(default: Any) -> str:
    if isinstance(default, (list, tuple)):
        default = ",".join(map(str, default)) or "none"
    return str(default).replace("%", "%%")


def resolve(cls: type[T], args: argparse.Namespace, section: str | None = None) -> T:
    """Defaults < TOML preset (``args.config``) < command-line flags.

    The preset's ``[section]`` table is used if it has one; otherwise its top level, unless
    ``cls`` has a ``config`` field of its own (a multi-stage recipe, whose other tables belong
    to other stages).
    """
    values: dict[str, Any] = {}
    cfg_path = getattr(args, "config", None)
    names = {f.name for f in dataclasses.fields(cls)}
    if cfg_path:
        data = load_toml(cfg_path)
        if section is not None and section in data:
            values.update(data[section])
        elif "config" not in names:
            values.update(data)
    values.update({k: v for k, v in vars(args).items() if k in names})
    return from_dict(cls, values, source=str(cfg_path or "command line"))


def to_jsonable(cfg: Any) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if dataclasses.is_dataclass(v):
            return to_jsonable(v)
        return v

    return {f.name: conv(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (plus the package version) as JSON."""
    from tinygpt import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"tinygpt_version": __version__, "config_class": type(cfg).__name__, **to_jsonable(cfg)}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
