"""Typed, validated configuration objects saved as JSON beside what they produced.

Each concern (model, simulator, training, and the options of restoring and scoring) has one
frozen dataclass deriving from ``Config``: the one options style of the package.
Fields are declared with ``param`` so that their documentation and valid range live next to
the default; validation runs on construction, and ``from_dict`` rejects unknown keys, so a
typo in a config file fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Self

from fusecare.errors import ConfigError


def param(
    default: Any,
    *,
    doc: str,
    ge: float | None = None,
    le: float | None = None,
    gt: float | None = None,
    choices: tuple[Any, ...] | None = None,
) -> Any:
    """Declare a config field with its documentation and its valid range.

    For ``tuple[float, float]`` fields (a range to sample from) the bounds apply to both ends
    and the first end must not exceed the second.
    """
    metadata = {"doc": doc, "ge": ge, "le": le, "gt": gt, "choices": choices}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed; use a tuple")
    return dataclasses.field(default=default, metadata=metadata)


def _is_number_tuple(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple


def _literal_choices(hint: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` hint; None for any other hint."""
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None


def _matches(hint: Any, value: Any) -> bool:
    """Whether ``value`` belongs to ``hint``, one member of a union: which of ``float |
    Literal["target"]`` a value is decides how it is checked."""
    choices = _literal_choices(hint)
    if choices is not None:
        return value in choices
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint) or (issubclass(hint, Config) and isinstance(value, typing.Mapping))
    return True


def _check_scalar(name: str, value: Any, hint: Any) -> Any:
    """Coerce a JSON value to ``hint`` where lossless, else raise ``ConfigError``."""
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config field {name!r} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config field {name!r} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config field {name!r} must be a number, got {value!r}")
        if not math.isfinite(value):  # JSON's NaN/Infinity pass every range test otherwise
            raise ConfigError(f"config field {name!r} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config field {name!r} must be a string, got {value!r}")
        return value
    return value


def _check_bounds(name: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"config field {name!r} must be one of {meta['choices']}, got {value!r}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if meta.get("ge") is not None and value < meta["ge"]:
        raise ConfigError(f"config field {name!r} must be >= {meta['ge']}, got {value!r}")
    if meta.get("le") is not None and value > meta["le"]:
        raise ConfigError(f"config field {name!r} must be <= {meta['le']}, got {value!r}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise ConfigError(f"config field {name!r} must be > {meta['gt']}, got {value!r}")


@typing.dataclass_transform(kw_only_default=True, frozen_default=True, field_specifiers=(param,))
@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Base class: validates every field on construction and round-trips through JSON.

    Subclasses become frozen, keyword-only dataclasses by themselves (no decorator needed).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(frozen=True, kw_only=True)(cls)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            hint = hints[field.name]
            value = getattr(self, field.name)
            meta = field.metadata
            if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
                args = [a for a in typing.get_args(hint) if a is not type(None)]
                if value is None:
                    continue
                hint = next((a for a in args if _matches(a, value)), args[0])
            if isinstance(hint, type) and issubclass(hint, Config):
                if isinstance(value, typing.Mapping):
                    try:
                        value = hint.from_dict(value)
                    except ConfigError as exc:
                        raise ConfigError(f"{field.name}: {exc}") from None
                elif not isinstance(value, hint):
                    raise ConfigError(f"config field {field.name!r} must be a {hint.__name__} object")
            elif _is_number_tuple(hint):
                item_hints = typing.get_args(hint)
                if not isinstance(value, (tuple, list)) or (
                    Ellipsis not in item_hints and len(value) != len(item_hints)
                ):
                    raise ConfigError(
                        f"config field {field.name!r} must be a list of "
                        f"{len(item_hints)} values, got {value!r}"
                    )
                item_hint = item_hints[0]
                value = tuple(_check_scalar(field.name, v, item_hint) for v in value)
                for v in value:
                    _check_bounds(field.name, v, meta)
                if len(value) == 2 and item_hint in (int, float) and value[0] > value[1]:
                    raise ConfigError(
                        f"config field {field.name!r} is a range [low, high] with low > high: "
                        f"{list(value)}"
                    )
            else:
                choices = _literal_choices(hint)
                if choices is not None and value not in choices:
                    raise ConfigError(f"config field {field.name!r} must be one of {list(choices)}, got {value!r}")
                value = _check_scalar(field.name, value, hint)
                _check_bounds(field.name, value, meta)
            object.__setattr__(self, field.name, value)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; override in subclasses (raise ``ConfigError``)."""

    @classmethod
    def from_dict(cls, data: typing.Mapping[str, Any]) -> Self:
        """Build from a mapping; unknown keys are an error that names them."""
        if not isinstance(data, typing.Mapping):
            raise ConfigError(f"{cls.__name__} expects a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} key(s) {unknown}; valid keys are {sorted(known)}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if isinstance(value, Config):
                return value.to_dict()
            return list(value) if isinstance(value, tuple) else value
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(cls, path: str | Path) -> Self:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    @classmethod
    def describe(cls, prefix: str = "", _listed: dict[type, str] | None = None) -> str:
        """One line per field: name, default, range and documentation (for --help texts). The
        fields of a nested config follow its line, named ``field.subfield``; a nested type met
        again (``simulator`` and ``validation_simulator``) points at its first listing."""
        listed = {} if _listed is None else _listed
        hints = typing.get_type_hints(cls)
        lines = []
        for f in dataclasses.fields(cls):
            m = f.metadata
            bounds = ", ".join(
                f"{k} {m[k]}" for k in ("ge", "gt", "le") if m.get(k) is not None
            )
            if m.get("choices") is not None:
                bounds = f"one of {list(m['choices'])}"
            nested = _nested_config(hints[f.name])
            default = f"a {nested.__name__}" if nested is not None and f.default is not None else repr(f.default)
            lines.append(
                f"{prefix}{f.name} (default {default}{'; ' + bounds if bounds else ''}): {m.get('doc', '')}"
            )
            if nested is None:
                continue
            if nested in listed:
                lines.append(f"{prefix}{f.name}.* : the fields of {listed[nested]}.* ({nested.__name__})")
            else:
                listed[nested] = f"{prefix}{f.name}"
                lines.append(nested.describe(prefix=f"{prefix}{f.name}.", _listed=listed))
        return "\n".join(lines)


def _nested_config(hint: Any) -> type[Config] | None:
    """The ``Config`` subclass a field holds (``X`` or ``X | None``), else None."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return next((a for a in args if isinstance(a, type) and issubclass(a, Config)), None)


def strict_json(value: Any) -> Any:
    """``value`` with non-finite floats as None, so that it can be written as strict JSON."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value
