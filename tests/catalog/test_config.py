"""catalog.config: TOML into frozen dataclasses; unknown keys, wrong types and wrong-length lists name the key."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from catalog.config import ConfigError, from_dict, load_section, load_toml


@dataclass(frozen=True, kw_only=True)
class Inner:
    size: int = 1
    mode: Literal["a", "b"] = "a"


@dataclass(frozen=True, kw_only=True)
class Outer:
    name: str = "x"
    rate: float = 1.0
    flag: bool = False
    limit: float | None = None
    betas: tuple[float, float] = (0.9, 0.99)
    frames: tuple[int, ...] = (1, 17)
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ValueError(f"outer.rate: expected >= 0, got {self.rate}")


def test_values_are_checked_and_converted():
    cfg = from_dict(Outer, {"name": "y", "rate": 2, "flag": True, "limit": 3, "betas": [0.5, 1],
                            "frames": [1, 9], "inner": {"size": 4, "mode": "b"}}, where="outer")
    assert cfg == Outer(name="y", rate=2.0, flag=True, limit=3.0, betas=(0.5, 1.0), frames=(1, 9),
                        inner=Inner(size=4, mode="b"))
    assert isinstance(cfg.rate, float) and isinstance(cfg.betas, tuple)
    assert from_dict(Outer, {}, where="outer") == Outer()


@pytest.mark.parametrize(("data", "message"), [
    ({"nmae": "y"}, "[outer] unknown key(s) 'nmae'; expected one of"),
    ({"inner": {"sise": 2}}, "[outer.inner] unknown key(s) 'sise'"),
    ({"name": 3}, "outer.name: expected str, got int 3"),
    ({"rate": "fast"}, "outer.rate: expected float, got str 'fast'"),
    ({"rate": True}, "outer.rate: expected float, got bool True"),
    ({"flag": 1}, "outer.flag: expected bool, got int 1"),
    ({"limit": "none"}, "outer.limit: expected float, got str 'none'"),
    ({"betas": [0.9]}, "outer.betas: expected a list of 2 items, got 1"),
    ({"betas": [0.9, 0.99, 0.999]}, "outer.betas: expected a list of 2 items, got 3"),
    ({"betas": [0.9, "x"]}, "outer.betas[1]: expected float, got str 'x'"),
    ({"betas": 0.9}, "outer.betas: expected a list, got float"),
    ({"frames": [1, "17"]}, "outer.frames[1]: expected int, got str '17'"),
    ({"inner": {"size": 1.5}}, "outer.inner.size: expected int, got float 1.5"),
    ({"inner": {"mode": "c"}}, "outer.inner.mode: expected one of ['a', 'b'], got 'c'"),
    ({"inner": 3}, "outer.inner: expected a table for Inner, got int 3"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, data, where="outer")
    assert message in str(err.value)


def test_range_checks_stay_with_the_dataclass():
    with pytest.raises(ValueError, match="outer.rate: expected >= 0"):
        from_dict(Outer, {"rate": -1.0}, where="outer")


def test_files_and_sections(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[outer]\nname = "z"\nbetas = [0.1, 0.2]\n')
    assert load_section(Outer, path, "outer") == Outer(name="z", betas=(0.1, 0.2))
    assert load_section(Outer, path, "absent") == Outer()
    assert load_section(Outer, None, "outer") == Outer()
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
    path.write_text("[outer\nname = 1\n")
    with pytest.raises(ConfigError, match="c.toml: not valid TOML"):
        load_toml(path)
