"""The documentation builds as CI builds it (`mkdocs build --strict`: no broken link, no page left out of the nav,
no missing snippet) and documents every command; README stays a landing page."""

import os
import re
import subprocess
import sys
from pathlib import Path

import click

from alternas.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_build_strictly_and_document_every_command_and_option(tmp_path) -> None:
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    cli_page = (site / "reference" / "cli" / "index.html").read_text()
    documented = set(re.findall(r'<h3 id="([\w-]+)"', cli_page))
    assert documented == set(main.commands), documented ^ set(main.commands)
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert param.opts[0] in cli_page, f"{name} {param.opts[0]} is not on the CLI reference page"
    api_page = (site / "reference" / "api" / "index.html").read_text()
    for name in ("build_model", "Placement", "run_buildup", "compare_paired", "export_to_timm", "study_claims"):
        assert re.search(rf'id="alternas\.[\w.]*\b{name}"', api_page), f"{name} is not on the API reference page"
    home = (site / "index.html").read_text()
    assert "build-up rule" in home and "quickstart-report.png" in home  # README's intro, included, and the picture
    assert (site / "images" / "quickstart-report.png").stat().st_size > 10_000
    architecture = (site / "concepts" / "architecture" / "index.html").read_text()
    for module in re.findall(r"^\| `(alternas/[\w/.]+)`", (ROOT / "README.md").read_text(), flags=re.M):
        assert module in architecture, module


def test_readme_is_a_landing_page_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "alternas buildup --study studies/quickstart.yaml" in readme and "python -m pytest -q" in readme
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"
