"""Typed dataclass configs: load from YAML, override from the command line, validate by field name.

Every config in latentx is a plain ``@dataclass`` whose ``__post_init__`` validates its own values.
This module adds the three things a run needs on top of that, with no magic:

- :func:`from_dict` builds a (nested) dataclass from a mapping, rejecting unknown keys and values of
  the wrong type with a one-line :class:`ConfigError` that names the dotted field (``relax.alpha``);
- :func:`apply_overrides` applies ``section.field=value`` strings (values parsed as YAML scalars);
- :func:`to_dict` / :func:`save_yaml` / :func:`load_yaml` round-trip a config through YAML.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from latentx.crashpoints import crash_point

T = TypeVar("T")


class ConfigError(ValueError):
    """A malformed config: the message names the offending field."""


class _Yaml12BoolLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but only ``true`` / ``false`` are booleans (the YAML 1.2 rule).

    YAML 1.1 also reads ``yes / no / on / off / y / n`` as booleans, which turned the documented
    ``--set model.reference=no`` into ``False``.  Here those words stay the strings they were written as;
    boolean fields accept them back (see :func:`_coerce`).
    """


_Yaml12BoolLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12BoolLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_BOOL_WORDS = {"true": True, "yes": True, "y": True, "on": True, "false": False, "no": False, "n": False, "off": False}


def parse_yaml(text: str) -> Any:
    """Parse YAML text with the YAML 1.2 boolean rule (``no`` / ``off`` / ``yes`` / ``on`` stay strings)."""
    return yaml.load(text, Loader=_Yaml12BoolLoader)  # noqa: S506 - a SafeLoader subclass


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, field: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where it is lossless (int -> float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, field)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{field}: {value!r} is not a valid {' | '.join(_type_name(o) for o in options)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{field} must be one of {', '.join(map(repr, choices))}; got {value!r}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{field} must be a mapping of fields, got {value!r}")
        return from_dict(tp, value, prefix=field)
    if origin in (list, tuple):
        if isinstance(value, str) and "," in value:
            value = [parse_yaml(v.strip()) for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{field} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:  # yes / no / on / off
            return _BOOL_WORDS[value.strip().lower()]
        raise ConfigError(f"{field} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{field} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{field} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{field} must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{field} must be a {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise :class:`ConfigError`."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key '{where}{unknown[0]}' (known keys of {prefix or 'the config'}: "
            f"{', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        dotted = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        msg = str(err)
        if prefix and not msg.startswith(prefix):
            msg = f"{prefix}: {msg}"
        raise ConfigError(msg) from None


def to_dict(cfg: Any, unset: bool = True) -> dict[str, Any]:
    """A plain, YAML-safe dict of a (nested) dataclass config (tuples become lists).

    ``unset=False`` leaves out the fields a config filled itself from a preset or a ``None`` default
    (its ``_unset_fields``, see :func:`latentx.objectives.base.fill_unset`), so that rebuilding from the dict
    resolves them again (a changed preset then applies)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            skip = () if unset else getattr(value, "_unset_fields", ())
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init and f.name not in skip}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"relax.alpha=0.2"`` -> ``(["relax", "alpha"], 0.2)``; the value is parsed as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty field name")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def merge_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` strings to a nested dict (a copy is returned)."""
    import copy

    merged = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return merged


def apply_overrides(cfg: T, overrides: typing.Iterable[str]) -> T:
    """A new config equal to ``cfg`` with ``section.field=value`` overrides applied and re-validated."""
    return from_dict(type(cfg), merge_overrides(to_dict(cfg, unset=False), overrides))


def load_yaml_data(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level mapping of a YAML config file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = read_yaml_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_yaml(cls: type[T], path: str | os.PathLike, overrides: typing.Iterable[str] = ()) -> T:
    """Load ``cls`` from a YAML file (then apply overrides); errors name the file and the field."""
    path = Path(path)
    data = load_yaml_data(path)
    try:
        return from_dict(cls, merge_overrides(data, overrides))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def parse_int_list(text: str, option: str, expected: str = "comma-separated integers") -> list[int]:
    """A command-line list of integers, ``"1,2,4"`` -> ``[1, 2, 4]``; one that does not parse, or is empty,
    is a :class:`ConfigError` naming ``option`` (and what was ``expected``)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{option} must be {expected}, got {text!r}") from None
    if not values:
        raise ConfigError(f"{option} must list at least one integer")
    return values


def read_yaml_file(path: str | os.PathLike) -> Any:
    """The parsed contents of a YAML file (YAML 1.2 booleans); unreadable, non-UTF-8 or malformed files
    raise a one-line :class:`ConfigError` naming the file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        return parse_yaml(text) or {}
    except yaml.YAMLError as err:
        one_line = " ".join(str(err).split())
        raise ConfigError(f"{path}: not valid YAML ({one_line})") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        crash_point("atomic_write:temporary_written", path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_yaml(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
