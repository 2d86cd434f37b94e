"""Frozen-dataclass configs loaded from TOML: the one loader every job, the pipeline and the trainer use.

Each component owns one dataclass and reads only its own TOML section. The loader checks the file
against the dataclass's type hints before the dataclass sees it, so a typo or a wrong type is an error
that names the key (``[buckets] unknown key(s) 'framez'``, ``shards.crf: expected int, got str '18'``)
instead of a silent default or a crash deep inside a run:

- unknown keys raise, listing the known ones;
- ``int``, ``float``, ``str`` and ``bool`` must have that TOML type (an int is accepted for a float;
  a bool is never taken for a number);
- ``tuple[X, ...]`` takes a list of X; ``tuple[X, Y]`` takes a list of exactly two, each checked;
- ``X | None`` takes X (TOML has no null, so None only ever comes from the default);
- ``Literal[...]`` takes one of the listed values; nested dataclasses take a table.

Range checks (``crf`` in 0..51, ...) stay in each dataclass's ``__post_init__``.
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_SCALARS = (bool, int, float, str)


class ConfigError(ValueError):
    """A config file or section does not match its dataclass."""


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against ``hint`` (and converted: list -> tuple, int -> float); raises naming ``where``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table for {hint.__name__}, got {type(value).__name__} {value!r}")
        return from_dict(hint, value, where=where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for option in inner:
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(err)
        if len(inner) == 1:
            raise errors[0]
        raise ConfigError(
            f"{where}: expected one of {' | '.join(_type_name(a) for a in inner)}, got {type(value).__name__} {value!r}"
        )
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if not args:  # bare ``tuple``: any items
            return tuple(value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} items, got {len(value)}: {list(value)!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        if not args:
            return dict(value)
        return {_coerce(k, args[0], f"{where} key"): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint in _SCALARS:
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        # bool is an int subclass in Python; in a config ``true`` for a count is a mistake.
        if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, where: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise naming the key."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}]: expected a table, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"[{where}] unknown key(s) {', '.join(map(repr, unknown))}; expected one of {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def load_toml(path: str | Path) -> dict[str, Any]:
    """The parsed file; a missing file or a TOML syntax error is a ``ConfigError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with path.open("rb") as fh:
        try:
            return tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path}: not valid TOML: {err}") from err


def load_section(cls: type[T], path: str | Path | None, section: str) -> T:
    """Load one section of a TOML file into ``cls``; a missing file or section gives the defaults."""
    if path is None:
        return cls()
    data = load_toml(path)
    return from_dict(cls, data.get(section, {}), where=section)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
