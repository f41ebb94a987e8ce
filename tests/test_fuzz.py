"""Fuzzing every input a user writes: placement strings, study files, search spaces, storage URLs, recipe
overrides and command-line numbers. Each either works or is a user error (``AlternasError`` in the library; one
line and exit 2 on the command line); nothing else may escape."""

import math
import os
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alternas.errors import AlternasError
from alternas.placement import Placement
from alternas.search.spaces import space_from_dict
from alternas.search.storage import open_storage
from alternas.search.study import StudyConfig, study_from_dict
from alternas.train import Recipe, get_recipe
from tests.helpers import run_cli, small_study

EXAMPLES = int(os.environ.get("ALTERNAS_FUZZ_EXAMPLES", 150))  # raise it for a longer hunt
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CLI_FUZZ = settings(max_examples=EXAMPLES // 4, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=8)
placement_text = st.one_of(st.text(alphabet="CMcm, X1", max_size=20), st.text(max_size=20))


def _user_error_or_value(call):
    try:
        return call()
    except AlternasError:
        return None


@FUZZ
@given(text=placement_text)
def test_placement_strings(text: str) -> None:
    placement = _user_error_or_value(lambda: Placement.parse(text))
    if placement is not None:
        assert Placement.parse(str(placement)) == placement  # the canonical form parses to itself


def _known_keys() -> dict[str, list[str]]:
    from dataclasses import fields

    from alternas.data.datasets import DataConfig
    from alternas.diagnostics.run import DiagnosticsConfig
    from alternas.search.study import BuildupConfig, OptunaConfig

    sections = {"data": DataConfig, "diagnostics": DiagnosticsConfig, "buildup": BuildupConfig,
                "optuna": OptunaConfig, "recipe": Recipe}
    return {name: [f.name for f in fields(cls)] for name, cls in sections.items()}


KNOWN = _known_keys()
TOP_LEVEL = ["name", "base", "window_size", "seeds", "device", "output"]


@st.composite
def study_mappings(draw) -> dict:
    """Mostly-valid studies with a few keys set to arbitrary values (and sometimes unknown keys or sections)."""
    raw = small_study(Path("/nonexistent"))
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from([*KNOWN, "top"]))
        if section == "top":
            raw[draw(st.sampled_from([*TOP_LEVEL, "bogus"]))] = draw(values)
        elif draw(st.integers(0, 9)) == 0:
            raw[section] = draw(values)  # a whole section of the wrong shape
        else:
            body = raw.get(section) if isinstance(raw.get(section), dict) else {}
            body = {**body, draw(st.sampled_from([*KNOWN[section], "bogus"])): draw(values)}
            if section == "recipe":
                body.setdefault("name", "fast")
            raw[section] = body
    return raw


@FUZZ
@given(raw=study_mappings())
def test_study_files(raw: dict) -> None:
    config = _user_error_or_value(lambda: study_from_dict(raw, "fuzz.yaml"))
    if config is not None:
        assert isinstance(config, StudyConfig)
        assert study_from_dict(config.to_dict(), "round trip") == config  # a valid study round-trips


@FUZZ
@given(stages=values, base=st.one_of(st.sampled_from(["tiny", "resnet50", "tiny@heads_mult=2"]), values),
       msa=values)
def test_search_spaces(stages, base, msa) -> None:
    raw = {"base": base, "stages": stages, "msa": msa}
    space = _user_error_or_value(lambda: space_from_dict(raw, "fuzz-space.yaml"))
    if space is not None:
        assert space.stages


@FUZZ
@given(key=st.sampled_from([*KNOWN["recipe"], "bogus"]), value=st.one_of(st.text(max_size=10), values))
def test_recipe_overrides(key: str, value) -> None:
    recipe = _user_error_or_value(lambda: get_recipe("fast", {key: value}))
    if recipe is not None:
        assert isinstance(recipe, Recipe) and recipe.lr > 0 and math.isfinite(recipe.lr)


@FUZZ
@given(url=st.one_of(st.text(max_size=30),
                     st.builds(lambda scheme, rest: f"{scheme}://{rest}",
                               st.sampled_from(["redis", "http", "file", "journal", "mysql", "oracle", "mssql"]),
                               st.text(alphabet=string.ascii_letters + string.digits + ":@/.", max_size=20))))
def test_storage_urls(tmp_path, url: str) -> None:
    config = study_from_dict(small_study(tmp_path))
    if url.startswith(("sqlite", "postgresql")) or not url.strip():
        return  # real databases (or the default journal): covered by the storage tests
    storage = _user_error_or_value(lambda: open_storage(config.output_dir, url))
    assert storage is None  # nothing but the known databases and the journal file is accepted


# The range each command-line number must fall in (the study below has a pool of 3 seeds), by an oracle written
# apart from the code: (type, low, high, low open, high open).
NUMBER_RANGES = {
    "--min-gain": (float, 0, 100, False, False), "--confidence": (float, 0.5, 1, True, True),
    "--screen-at": (float, 0, 1, True, True), "--budget-hours": (float, 0, 1e5, True, False),
    "--min-seeds": (int, 1, 3, False, False), "--max-seeds": (int, 1, 3, False, False),
    "--patience": (int, 0, 1000, False, False), "--max-candidates": (int, 1, 100_000, False, False),
    "--epochs": (int, 1, 100_000, False, False), "--subset": (float, 0, math.inf, True, True),
}


def _number_is_valid(option: str, text: str) -> bool:
    kind, low, high, low_open, high_open = NUMBER_RANGES[option]
    try:
        value = kind(text)
    except ValueError:
        return False
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low) or \
            (high_open and value == high):
        return False
    return option != "--subset" or value <= 1 or value == int(value)  # a fraction or a whole number of images


@CLI_FUZZ
@given(number=st.one_of(st.text(alphabet=st.characters(exclude_characters="\x00"), max_size=8),
                        st.integers(-5, 10**9).map(str), st.floats().map(str),
                        st.sampled_from(["inf", "-inf", "nan", "1e9", "0", "1", "3", "100", "1e5", "0.5"])),
       option=st.sampled_from(sorted(NUMBER_RANGES)))
def test_command_line_numbers(tmp_path, number: str, option: str) -> None:
    """Any number on the command line: a valid one is taken (the command then stops on the study's data, which never
    exists, so nothing trains), any other is refused with one line naming the setting; exit 2 either way."""
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump(small_study(tmp_path, seeds=[0, 1, 2],
                                                data={"name": "imagefolder:/nonexistent"})))
    res = run_cli("buildup", "--study", str(study), "--quiet", f"{option}={number}")
    assert res.returncode == 2, res.stderr + res.stdout
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    reached_the_data = "/nonexistent" in res.stderr
    assert reached_the_data == _number_is_valid(option, number), (option, number, res.stderr)
    if not reached_the_data:
        key = option.lstrip("-").replace("-", "_")
        assert option in res.stderr or key in res.stderr, res.stderr


@CLI_FUZZ
@given(placement=placement_text, image_size=st.integers(-4, 80), window=st.integers(-2, 9))
def test_arch_command(placement: str, image_size: int, window: int) -> None:
    res = run_cli("arch", placement, "--base", "tiny", "--image-size", str(image_size), "--window-size", str(window),
                  "--json")
    assert res.returncode in (0, 2), res.stderr
    assert "Traceback" not in res.stderr
    if res.returncode == 2:
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.parametrize("text", ["", ",,,", "C" * 10_000, "M,M,M,M", "C,C,C,C\n", "ＣＣ,ＣＭ"])
def test_placement_edge_cases(text: str) -> None:
    _user_error_or_value(lambda: Placement.parse(text))


@pytest.mark.parametrize(("section", "key", "value"), [
    ("recipe", "lr", math.inf), ("recipe", "lr", "inf"), ("recipe", "lr", math.nan), ("recipe", "epochs", 1e9),
    ("buildup", "min_gain", math.inf), ("buildup", "budget_hours", math.inf), ("buildup", "min_gain", 1e3),
    ("data", "subset", math.inf), ("diagnostics", "noise_images", 1e12), ("optuna", "trials", 10**9),
    ("data", "image_size", 10**9), ("", "window_size", 10**6), ("", "seeds", [10**20]),
])
def test_every_number_of_a_study_has_a_finite_range(tmp_path, section: str, key: str, value) -> None:
    """inf, nan and absurd sizes in a study file are one-line errors naming the key, never a run or a traceback."""
    with pytest.raises(AlternasError, match=key):
        study_from_dict(small_study(tmp_path, **({section: {key: value}} if section else {key: value})))
