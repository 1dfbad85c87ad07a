"""Settings as dataclasses: ``--set KEY=VALUE`` parsing, type coercion, YAML round trip.

Trainer configs and protocol settings are dataclasses whose fields carry their documented
defaults (``field(metadata={"help": ...})``). One vocabulary, one parser: an unknown key or a
value of the wrong type is a :class:`~dcbench.errors.UsageError` naming the key and the fix.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dcbench.errors import UsageError

T = TypeVar("T")


#: words YAML 1.1 would turn into booleans; bool settings still accept them (see _coerce)
_YAML11_WORDS = {"on", "off", "yes", "no", "y", "n"}


def _number_or_text(value: Any) -> Any:
    """YAML 1.1 reads '1e-3' as text; a research tool means a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_assignments(pairs: Iterable[str]) -> dict[str, Any]:
    """``["lr=0.1", "taps=[conv1,conv2]"]`` -> ``{"lr": 0.1, "taps": ["conv1", "conv2"]}`` (YAML values)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"bad --set '{pair}': use KEY=VALUE, e.g. --set lr=0.01")
        if raw.strip().lower() in _YAML11_WORDS:
            out[key] = raw.strip()  # keep on/off/yes/no as words: choices like bn_recalibrate=off
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[key] = _number_or_text(value)
    return out


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _expected(hint: Any) -> str:
    """What a value of the annotated type ``hint`` must be, as error messages say it."""
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a YAML value to the field's annotated type, or raise UsageError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, arg)
            except UsageError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        # e.g. int | Literal["auto"]: "expected an integer or one of auto"
        forms = " or ".join(_expected(arg) for arg in args if arg is not type(None))
        raise UsageError(f"bad value {value!r} for {name}: expected {forms}") from None
    if origin is typing.Literal:
        if value not in args:
            raise UsageError(f"bad value {value!r} for {name}: choose one of {', '.join(map(str, args))}")
        return value
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [v.strip() for v in str(value).split(",") if v.strip()]
        if origin is tuple and args and Ellipsis not in args:  # tuple[float, float]: exactly that many
            return _fixed_tuple(name, value, items, args)
        inner = args[0] if args else Any
        converted = [_coerce(name, v, inner) if inner is not Any and inner is not Ellipsis else v for v in items]
        return tuple(converted) if origin is tuple else converted
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"bad value {value!r} for {name}: expected true or false")
    if hint in (int, float):
        if isinstance(value, bool):
            raise UsageError(f"bad value {value!r} for {name}: expected {_expected(hint)}")
        try:
            number = hint(value)
        except (TypeError, ValueError):
            raise UsageError(f"bad value {value!r} for {name}: expected {_expected(hint)}") from None
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise UsageError(f"bad value {value!r} for {name}: expected an integer")
        return number
    if hint is str:
        if isinstance(value, (dict, list)):
            raise UsageError(f"bad value {value!r} for {name}: expected text")
        return str(value)
    return value


def _fixed_tuple(name: str, value: Any, items: list | tuple, args: tuple) -> tuple:
    """A ``tuple[A, B]`` setting: exactly ``len(args)`` items, each of its own type (a wrong
    count or item is a UsageError with an example, not an unpacking error where it is read)."""
    plural = {int: "integers", float: "numbers", bool: "true/false values"}
    same = len(set(args)) == 1 and args[0] in plural
    what = f"{len(args)} {plural[args[0]]}" if same else f"{len(args)} values ({', '.join(map(_expected, args))})"
    example = "[" + ",".join({int: "1", float: "0.5", bool: "true"}.get(a, "x") for a in args) + "]"
    problem = UsageError(f"bad value {value!r} for {name}: expected {what}, e.g. --set {name}={example}")
    if len(items) != len(args):
        raise problem
    try:
        return tuple(_coerce(name, v, a) for v, a in zip(items, args))
    except UsageError:
        raise problem from None


def apply_settings(base: T, overrides: Mapping[str, Any], owner: str | None = None) -> T:
    """A copy of dataclass ``base`` with ``overrides`` applied and type-checked."""
    types_ = _field_types(type(base))
    unknown = sorted(set(overrides) - set(types_))
    if unknown:
        where = f" for {owner}" if owner else ""
        raise UsageError(f"unknown setting '{unknown[0]}'{where}; known: {', '.join(sorted(types_))}")
    values = {k: _coerce(k, v, types_[k]) for k, v in overrides.items()}
    updated = dataclasses.replace(base, **values)
    check = getattr(updated, "validate", None)
    if callable(check):
        check()
    return updated


def to_plain(obj: Any) -> Any:
    """Dataclass -> JSON/YAML-safe dict (tuples become lists, paths strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def ordered_fields(cls: type, last: Iterable[type] = ()) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` in declaration order, except that the fields of the classes
    in ``last`` that ``cls`` derives from come after the others (each group keeps its order, a
    redeclared field counts as the base's): a protocol's own settings first, the shared ones
    (seed, batch_size, workers, taps, ...) after."""
    common = {f.name for base in last if issubclass(cls, base) for f in dataclasses.fields(base)}
    own = [f for f in dataclasses.fields(cls) if f.name not in common]
    return own + [f for f in dataclasses.fields(cls) if f.name in common]


def describe_fields(cls: type, last: Iterable[type] = ()) -> list[tuple[str, str, Any, str]]:
    """``(name, type, default, help)`` for each field of a settings dataclass, in the order of
    :func:`ordered_fields` (declaration order unless ``last`` names base classes)."""
    rows = []
    hints = _field_types(cls)
    for f in ordered_fields(cls, last):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        type_name = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        rows.append((f.name, type_name, to_plain(default), f.metadata.get("help", "")))
    return rows


def load_yaml_settings(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of settings (``--config FILE``)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not a UTF-8 text file; give a YAML file of KEY: VALUE lines") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of KEY: VALUE")
    return data
