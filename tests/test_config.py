from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from latentx.config import ConfigError, apply_overrides, from_dict, load_yaml, save_yaml, to_dict


@dataclass
class Inner:
    alpha: float = 0.1
    mode: Literal["paper", "code"] = "paper"
    threshold: Optional[float] = None

    def __post_init__(self):
        if self.alpha < 0:
            raise ValueError(f"inner.alpha must be >= 0, got {self.alpha}")


@dataclass
class Outer:
    steps: int = 10
    name: str = "run"
    flag: bool = False
    ks: tuple[int, ...] = (1, 4)
    inner: Inner = field(default_factory=Inner)


def test_round_trip_yaml(tmp_path):
    cfg = Outer(steps=3, inner=Inner(alpha=0.5, mode="code"))
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(Outer, tmp_path / "c.yaml") == cfg


def test_overrides_are_typed():
    assert apply_overrides(Outer(), ["inner.alpha=5e-4"]).inner.alpha == 5e-4
    cfg = apply_overrides(Outer(), ["inner.alpha=2", "steps=7", "ks=1,2,8", "flag=true", "inner.threshold=null"])
    assert cfg.inner.alpha == 2.0 and isinstance(cfg.inner.alpha, float)
    assert cfg.steps == 7 and cfg.ks == (1, 2, 8) and cfg.flag is True and cfg.inner.threshold is None


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"stepz": 1}, "unknown config key 'stepz'"),
        ({"inner": {"alpah": 1}}, "unknown config key 'inner.alpah'"),
        ({"steps": "many"}, "steps must be an integer"),
        ({"steps": 1.5}, "steps must be an integer"),
        ({"flag": "yes"}, "flag must be true or false"),
        ({"inner": {"mode": "other"}}, "inner.mode must be one of"),
        ({"inner": {"alpha": -1}}, "inner.alpha must be >= 0"),
        ({"inner": 3}, "inner must be a mapping"),
    ],
)
def test_bad_values_name_the_field(data, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("'", "'")):
        from_dict(Outer, data)


def test_malformed_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(Outer, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(Outer, listy)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(Outer, tmp_path / "missing.yaml")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_overrides(Outer(), ["inner.alpha"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides(Outer(), ["steps.x=1"])


def test_to_dict_is_plain():
    assert to_dict(Outer()) == {
        "steps": 10, "name": "run", "flag": False, "ks": [1, 4],
        "inner": {"alpha": 0.1, "mode": "paper", "threshold": None},
    }
