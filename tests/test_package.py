"""Packaging: the console script, the version, and the dinovmf.kernels / dinovmf.configs mapping."""
import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys

import dinovmf
from dinovmf import cli

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_installed_version_is_the_package_version():
    """The installed distribution (what pip reports, built by setup.py from dinovmf/__init__.py) and the
    imported package agree: a stale install would show here."""
    assert re.fullmatch(r"\d+\.\d+\.\d+", dinovmf.__version__)
    assert importlib.metadata.version("dinovmf") == dinovmf.__version__


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


def test_prepare_tests_fail_instead_of_skipping_when_ci_requires_ffcv(tmp_path):
    """With DINOVMF_REQUIRE_FFCV=1 (.ci/run) a broken FFCV fails the FFCV tests; without it they skip."""
    fake = tmp_path / "ffcv"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('simulated broken FFCV')\n")
    cmd = [sys.executable, "-m", "pytest", str(REPO / "tests" / "test_data_prepare.py"), "-q",
           "-p", "no:cacheprovider"]
    env = {k: v for k, v in os.environ.items() if k != "DINOVMF_REQUIRE_FFCV"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    skipped = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert skipped.returncode == 5 or "skipped" in skipped.stdout, skipped.stdout[-2000:]
    required = subprocess.run(cmd, env={**env, "DINOVMF_REQUIRE_FFCV": "1"}, capture_output=True, text=True,
                              cwd=tmp_path)
    assert required.returncode not in (0, 5), required.stdout[-2000:]
    assert "DINOVMF_REQUIRE_FFCV=1 but FFCV does not import" in required.stdout
