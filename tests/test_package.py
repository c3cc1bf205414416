"""Packaging: the console script, the version, and the dinovmf.kernels / dinovmf.configs mapping."""
import pathlib
import re
import subprocess
import sys

import dinovmf
from dinovmf import cli

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_version_matches_setup():
    assert re.fullmatch(r"\d+\.\d+\.\d+", dinovmf.__version__)


def test_console_script_help_and_version():
    exe = pathlib.Path(sys.executable).with_name("dinovmf")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"dinovmf {dinovmf.__version__}"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "usage: dinovmf" in out.stdout


def test_every_command_registers():
    """A command module that fails to import would silently drop out of --help; catch that here."""
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert set(subparsers.choices) == set(cli.COMMANDS)


def test_kernels_installed_under_dinovmf():
    import dinovmf.configs
    import dinovmf.kernels
    assert pathlib.Path(dinovmf.kernels.__file__).parent == REPO / "kernels"
    assert pathlib.Path(dinovmf.configs.__file__).parent == REPO / "configs"


def test_no_top_level_kernels_import():
    """PyPI has an unrelated `kernels` package: our code must never import that name."""
    offenders = []
    for path in REPO.glob("**/*.py"):
        if ".venv" in path.parts or "build" in path.parts:
            continue
        for line in path.read_text().splitlines():
            if re.match(r"\s*(from|import)\s+kernels\b", line):
                offenders.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert not offenders, offenders


def test_overrides_may_follow_options():
    args = cli.parse_args(["train", "--config", "demo", "steps=1", "--out", "runs/x", "optim.lr=2e-3"])
    assert args.overrides == ["steps=1", "optim.lr=2e-3"] and args.out == "runs/x"


def test_stray_option_is_still_an_error(capsys):
    import pytest
    with pytest.raises(SystemExit):
        cli.parse_args(["train", "--config", "demo", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
