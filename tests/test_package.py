"""What the installed package ships: study templates and search spaces found from any folder (the wheel itself is
built, installed into a fresh virtual environment and used by ``.ci/package-check.sh``)."""

import pytest

from alternas.errors import ConfigError
from alternas.search.spaces import default_space_path, load_space
from alternas.search.study import find_study_file, load_study, study_templates


def test_study_templates_are_found_by_name_or_by_the_readmes_path_from_any_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no studies/ here
    assert {"quickstart", "cifar100-resnet50"} <= set(study_templates())
    shipped = study_templates()["quickstart"]
    assert find_study_file("quickstart") == find_study_file("studies/quickstart.yaml") == shipped
    assert load_study("studies/quickstart.yaml").name == "quickstart"
    with pytest.raises(ConfigError, match="shipped template: .*quickstart"):
        find_study_file("studies/quickstrat.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        find_study_file("elsewhere/quickstart.yaml")  # a path that names another folder is not a template


def test_a_local_copy_of_a_study_or_space_wins_over_the_shipped_one(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    shipped = default_space_path("tiny")
    assert load_space(shipped).base == "tiny"
    (tmp_path / "search_spaces").mkdir()
    (tmp_path / "search_spaces" / "tiny.yaml").write_text(shipped.read_text())
    assert default_space_path("tiny@heads_mult=2").resolve() == (tmp_path / "search_spaces" / "tiny.yaml").resolve()
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "quickstart.yaml").write_text("name: mine\nbase: tiny\n")
    assert load_study("studies/quickstart.yaml").name == "mine"
    with pytest.raises(ConfigError, match="no search space for base 'resnet34' \\(shipped: resnet18, resnet50, tiny"):
        default_space_path("resnet34")


def test_every_package_of_the_source_tree_is_in_the_wheel() -> None:
    """pyproject lists the packages by hand (the data folders are mapped in): a new sub-package left out of that
    list would be missing from the wheel, and only its command would fail, far from here."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "alternas").rglob("__init__.py")}
    assert found and found <= listed, sorted(found - listed)
