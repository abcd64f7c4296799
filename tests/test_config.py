"""The validated config base: ranges, types, unknown keys, JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fusecare.config import Config, param
from fusecare.errors import ConfigError


class Example(Config):
    count: int = param(2, doc="a count", ge=1, le=5)
    rate: float = param(0.5, doc="a rate", gt=0.0)
    name: str = param("a", doc="a choice", choices=("a", "b"))
    span: tuple[float, float] = param((1.0, 2.0), doc="a range", ge=0.0)
    flag: bool = param(False, doc="a flag")


def test_defaults_are_valid_and_round_trip_through_json(tmp_path):
    path = tmp_path / "c.json"
    Example(count=3, span=(0.5, 0.7)).save(path)
    assert json.loads(path.read_text())["span"] == [0.5, 0.7]
    assert Example.load(path) == Example(count=3, span=(0.5, 0.7))


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"count": 0}, "'count' must be >= 1"),
        ({"count": 6}, "'count' must be <= 5"),
        ({"count": 2.5}, "'count' must be an integer"),
        ({"count": True}, "'count' must be an integer"),
        ({"rate": 0.0}, "'rate' must be > 0.0"),
        ({"rate": "fast"}, "'rate' must be a number"),
        ({"name": "c"}, "'name' must be one of"),
        ({"span": (2.0, 1.0)}, "low > high"),
        ({"span": (-1.0, 1.0)}, "'span' must be >= 0.0"),
        ({"span": (1.0,)}, "'span' must be a list of 2"),
        ({"flag": 1}, "'flag' must be true or false"),
    ],
)
def test_invalid_values_name_the_field(changes, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        Example(**changes)


def test_unknown_keys_are_rejected_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown Example key\(s\) \['cuont'\]"):
        Example.from_dict({"cuont": 3})
    path = tmp_path / "bad.json"
    path.write_text('{"count": 9}')
    with pytest.raises(ConfigError, match="bad.json.*'count' must be <= 5"):
        Example.load(path)


def test_configs_are_frozen_and_integers_coerce_to_float():
    config = Example(rate=1)
    assert isinstance(config.rate, float)
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'count'"):
        config.count = 4  # type: ignore[misc]


def test_describe_lists_every_field_with_its_range():
    text = Example.describe()
    assert "count (default 2; ge 1, le 5): a count" in text
    assert "name (default 'a'; one of ['a', 'b'])" in text


class Outer(Config):
    inner: Example = param(Example(), doc="a nested config")
    seed: int = param(0, doc="a seed", ge=0)


class Twice(Config):
    first: Example = param(Example(), doc="one")
    second: Example | None = param(None, doc="another")


def test_describe_lists_nested_fields_once_with_their_ranges():
    text = Outer.describe()
    assert "inner (default a Example): a nested config" in text
    assert "inner.count (default 2; ge 1, le 5): a count" in text
    assert "seed (default 0; ge 0): a seed" in text
    twice = Twice.describe()
    assert "first.count (default 2; ge 1, le 5)" in twice and "second.count" not in twice
    assert "second (default None): another" in twice and "second.* : the fields of first.*" in twice


def test_nested_configs_validate_and_round_trip(tmp_path):
    path = tmp_path / "outer.json"
    Outer(inner=Example(count=4)).save(path)
    assert json.loads(path.read_text())["inner"]["count"] == 4
    assert Outer.load(path).inner == Example(count=4)
    with pytest.raises(ConfigError, match="inner: config field 'count' must be <= 5"):
        Outer.from_dict({"inner": {"count": 9}})
    with pytest.raises(ConfigError, match=r"inner: unknown Example key\(s\) \['nope'\]"):
        Outer.from_dict({"inner": {"nope": 1}})
