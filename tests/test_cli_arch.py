import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from tests.helpers import run_cli as run


def test_arch_table_reports_params_and_flops() -> None:
    res = run("arch", "CCC,CCCM,CCCCCM,CMCM", "--base", "resnet50", "--num-classes", "100", "--image-size", "32")
    assert res.returncode == 0, res.stderr
    assert "params: 33,012,840" in res.stdout
    assert "c4.4" in res.stdout and "msa" in res.stdout


def test_arch_json() -> None:
    res = run("arch", "cc, cm, cm, cm", "--base", "resnet18", "--num-classes", "10", "--image-size", "32", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["placement"] == "CC,CM,CM,CM" and data["base"] == "resnet18"
    assert isinstance(data["params"], int) and data["flops"] > 0
    assert [b["kind"] for b in data["blocks"]].count("msa") == 3


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["CC,CX,CM,CM", "--base", "resnet18"], "unknown block letter 'X' at character 5"),
        (["CC,MC,CM,CM", "--base", "resnet18"], "stage 2 starts with M"),
        (["CC,CM,CM", "--base", "resnet18"], "has 3 stage(s) but the base has 4"),
        (["CC,CM,CM,CM", "--base", "nope"], "unknown base 'nope'"),
        (["CC,CM,CM,CM", "--base", "resnet18", "--image-size", "32", "--window-size", "3"], "not tiled by 3x3"),
        (["CC,CM,CM,CM", "--image-size", "zero"], "Invalid value for '--image-size'"),
    ],
)
def test_arch_errors_are_one_line_exit_2(args: list[str], fragment: str) -> None:
    res = run("arch", *args)
    assert res.returncode == 2
    assert fragment in res.stderr
    assert "Traceback" not in res.stderr


def test_installed_console_script_errors_are_one_line_exit_2() -> None:
    """The other CLI tests run the entry point in-process; this one runs the installed `alternas` script."""
    script = Path(sys.executable).with_name("alternas")
    res = subprocess.run([str(script), "arch", "CC,CX,CM,CM", "--base", "resnet18"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip() == ("alternas: error: placement 'CC,CX,CM,CM': unknown block letter 'X' at character 5"
                                  " (stage 2); use C for a Conv block, M for an MSA block and ',' between stages")


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


def test_every_command_and_every_visible_option_says_what_it_does() -> None:
    """`alternas X --help` is the first documentation a user reads: no option without a help text."""
    from alternas.cli import main

    commands = dict(_commands(main))
    assert {"buildup", "optuna", "train", "table", "bench", "export"} <= set(commands)
    silent = [f"{name} {'/'.join(param.opts)}" for name, command in commands.items() for param in command.params
              if isinstance(param, click.Option) and not param.hidden and not (param.help or "").strip()]
    undocumented = [name for name, command in commands.items() if not (command.help or "").strip()]
    assert not silent and not undocumented, (silent, undocumented)


def test_a_command_line_search_on_a_built_in_probe_defaults_to_the_cpu_sized_base_and_recipe() -> None:
    from alternas.search.study import study_for_command

    for data in ("shapes", "textures", "cued-shapes"):
        config = study_for_command(None, {"data.name": data})
        assert (config.base, config.recipe.name) == ("tiny", "fast"), data
    config = study_for_command(None, {"data.name": "cifar100"})
    assert (config.base, config.recipe.name) == ("resnet50", "paper")
    assert study_for_command(None, {"data.name": "torch/CIFAR100"}).name == config.name  # one study, either spelling
