"""Configs as data: YAML files -> typed dataclasses, with `key=value` overrides and precise errors."""
from __future__ import annotations

import dataclasses
import difflib
import types

from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is unknown, missing or of the wrong type; the message names the key and the file."""


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping; `base: other.yaml` (relative to this file) is merged underneath it."""
    path = Path(path)
    if path.resolve() in _chain:  # a `base:` cycle: name every file of it
        raise ConfigError(f"{_chain[-1]}: base: cycle {' -> '.join(map(str, (*_chain, path.resolve())))}")
    if not path.is_file():
        raise ConfigError(f"{_chain[-1]}: base: {path} not found" if _chain else f"config file not found: {path}")
    with path.open() as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base = {base!r} must be a file name (relative to {path.parent})")
        data = merge(read_yaml(path.parent / base, (*_chain, path.resolve())), data)
    return data


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values of `update` win, nested mappings are merged."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["objective.C=4", "optim.lr=1e-4"]` -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. objective.C=3)")
        value = yaml.safe_load(raw) if raw else ""
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, checking every key and type; errors name `prefix.key` and `source`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f" (did you mean {_join(prefix, close[0])!r}?)" if close else ""
        raise ConfigError(f"{source}: unknown key {_join(prefix, key)!r}{hint}; "
                          f"known keys of {cls.__name__}: {', '.join(fields)}")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], source, _join(prefix, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {_join(prefix, name)!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # __post_init__ validation
        if isinstance(err, ConfigError):
            raise ConfigError(f"{source}: {prefix + ': ' if prefix else ''}{err}") from None
        raise ConfigError(f"{source}: {prefix or cls.__name__}: {err}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict/list tree (for saving next to checkpoints and logs)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_config(cls: type[T], path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """YAML file + `key=value` overrides -> validated `cls` instance."""
    data = merge(read_yaml(path), parse_overrides(overrides))
    source = str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    return from_dict(cls, data, source)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        present = [option for option in options if option is not type(None)]
        if len(present) == 1:  # `X | None`: X's own error names the key at fault
            return _coerce(present[0], value, source, key)
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, source, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{source}: {key} = {value!r} is not a {' or '.join(_type_name(o) for o in options)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{source}: {key} = {value!r} must be one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} = {value!r} must be a list")
        args = get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(inner, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} = {value!r} must be a mapping")
        args = get_args(tp)
        inner = args[1] if args else Any
        return {k: _coerce(inner, v, source, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} = {value!r} must be a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} = {value!r} must be an integer")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ConfigError(f"{source}: {key} = {value!r} must be a {tp.__name__}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{source}: {key} = {value!r} must be a {tp.__name__}")
    return value


__all__ = ["ConfigError", "read_yaml", "merge", "parse_overrides", "from_dict", "to_dict", "load_config"]
