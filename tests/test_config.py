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
        ({"flag": "maybe"}, "flag must be true or false"),
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


@dataclass
class Choices:
    reference: Literal["auto", "yes", "no"] = "auto"
    switch: Literal["on", "off"] = "on"
    word: str = "x"
    flag: bool = False


@pytest.mark.parametrize("word", ["no", "yes", "on", "off", "y", "n", "No", "OFF"])
def test_yaml_11_boolean_words_stay_strings(tmp_path, word):
    """Issue 18 item 11: YAML 1.1 read `no` as False, so `--set model.reference=no` was rejected."""
    assert apply_overrides(Choices(), [f"word={word}"]).word == word
    path = tmp_path / "c.yaml"
    path.write_text(f"word: {word}\nflag: {word}\n")
    cfg = load_yaml(Choices, path)
    assert cfg.word == word and cfg.flag is (word.lower() in ("yes", "on", "y"))
    assert apply_overrides(Choices(), [f"flag={word}"]).flag is (word.lower() in ("yes", "on", "y"))


def test_boolean_words_as_choices_round_trip(tmp_path):
    cfg = apply_overrides(Choices(), ["reference=no", "switch=off"])
    assert (cfg.reference, cfg.switch) == ("no", "off")
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(Choices, tmp_path / "c.yaml") == cfg
    assert apply_overrides(Choices(), ["reference=yes", "switch=on"]).reference == "yes"
    assert apply_overrides(Choices(), ["flag=true"]).flag is True and apply_overrides(Choices(), ["flag=False"]).flag is False


def test_non_utf8_yaml_names_the_file(tmp_path):
    """Issue 18 item 9: a non-UTF-8 config gave a UnicodeDecodeError traceback that did not name the file."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not a UTF-8 text file"):
        load_yaml(Outer, path)


def _documented_set_examples() -> list[tuple[str, ...]]:
    """Every ``--set key=value`` the README and docs show, and every backticked ``section.field=value``
    whose section is a latentx config section (verl's own hydra overrides in docs/verl.md are not).
    Examples on one line go together (``eval.n=8``, ``eval.ks=1,8``); ``a=x|y`` gives one group per value."""
    import dataclasses
    import re
    from pathlib import Path

    from latentx.trainer import TrainConfig

    sections = {f.name for f in dataclasses.fields(TrainConfig)} | {"study"}
    root = Path(__file__).resolve().parents[1]
    files = [root / "README.md", *sorted((root / "docs").rglob("*.md")), *sorted((root / "configs").glob("*.yaml"))]
    groups: set[tuple[str, ...]] = set()
    for path in files:
        for line in path.read_text().splitlines():
            found = re.findall(r"--set[ =]([A-Za-z_][\w.]*=[^\s`'\"\]\)]+)", line)
            found += [e for e in re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+=[^`\s]+)`", line) if e.split(".")[0] in sections]
            found = [e for e in found if not e.endswith("=...") and not e.startswith("section.field=")]
            plain = [e for e in found if "|" not in e]
            alternatives = [e for e in found if "|" in e]
            if plain:
                groups.add(tuple(plain))
            for example in alternatives:
                key, values = example.split("=", 1)
                groups.update((*plain, f"{key}={value}") for value in values.split("|"))
    return sorted(groups)


def test_documented_set_examples_are_accepted():
    from latentx.config import merge_overrides
    from latentx.study import load_study_config
    from latentx.trainer import TrainConfig

    groups = _documented_set_examples()
    flat = {example for group in groups for example in group}
    assert {"model.reference=no", "relax.alpha=0.2", "steps=5"} <= flat, groups
    for group in groups:
        if any(example.startswith("study.") for example in group):
            load_study_config(None, list(group))
        else:
            from_dict(TrainConfig, merge_overrides({}, list(group)))
