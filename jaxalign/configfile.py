"""YAML config files -> the frozen config dataclasses (`config.py` and each recipe's): dotted
`key=value` overrides, a YAML scalar coerced to its field's declared type, and every bad key,
value or missing section a ConfigError naming the key."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, Literal, Mapping

from jaxalign.errors import ConfigError


def from_dict(cls, data: Mapping[str, Any] | None, where: str = ""):
    """Builds a (nested) config dataclass from a dict; an unknown key is an error naming it."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {where + unknown[0]!r}"
                          f" (known under {where or 'top level'}: {', '.join(sorted(fields))})")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        sub = _dataclass_type(cls, name)
        if sub is not None and isinstance(value, Mapping):
            value = from_dict(sub, value, f"{where}{name}.")
        elif sub is not None and hints.get(name) is sub:
            raise ConfigError(f"{where}{name}: expected a section of keys, got "
                              f"{'null' if value is None else repr(value)}")
        else:
            value = _coerce(hints.get(name), value, where + name)
        if name == "out_dir" and isinstance(value, str):   # `out_dir: ~/runs/x` is the home's
            value = os.path.expanduser(value)
        kwargs[name] = value
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required key {where + missing[0]!r}"
                          + (f" (also missing: {', '.join(where + m for m in missing[1:])})"
                             if missing[1:] else "")
                          + "; `jaxalign config` lists every key")
    return cls(**kwargs)


def _coerce(hint, value, key: str):
    """A YAML scalar -> the field's declared type, or a ConfigError naming the key.

    YAML 1.1 (PyYAML) reads `1e-4` (no dot) as a string: numeric fields accept any string
    that parses as a number. bool is never taken for a number. Lists become tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        if hint in (int, float, bool, str) or origin in (tuple, Literal):
            raise ConfigError(f"{key}: null is not allowed here")
        return None
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _coerce(options[0], value, key) if len(options) == 1 else value
    if isinstance(value, list):
        value = tuple(value)
    if origin is tuple and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = (value,)  # a single item written without brackets: `lora.targets: q_proj`
    if origin is tuple and isinstance(value, tuple) and len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is float or hint is int:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        if hint is float:
            return float(number)
        if float(number) != int(number):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is str and not isinstance(value, str):
        # YAML reads `wandb_project: 2024` as a number; a list or mapping is a mistake.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _dataclass_type(cls, name: str):
    hint = typing.get_type_hints(cls).get(name)
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b.c=value` overrides, values parsed as YAML (3, true, [a, b]; from_dict turns a
    string such as 1e-4 into the number its field declares)."""
    import yaml
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = data
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node.get(p) or {}, Mapping):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is "
                                  f"{node[p]!r}, not a section of keys")
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_yaml(path: str, overrides: list[str] = (), cls=None):
    """Reads a YAML config file, applies dotted overrides, builds `cls` (dict if None)."""
    import yaml
    from pathlib import Path
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:   # the latter: not UTF-8 text
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level")
    data = apply_overrides(data, list(overrides))
    return data if cls is None else from_dict(cls, data)
