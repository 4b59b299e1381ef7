"""The `dcm` command line: help everywhere, dry runs, one-line errors, and import hygiene."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.cli import COMMANDS, main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_one_clear_error(capsys):
    assert main(["distil"]) == 2
    assert "unknown command 'distil'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    # in-process: the stage modules share one import of torch/ray instead of eight
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert f"dcm {name}" in out or "usage" in out
    # every stage takes a config; sweep's lives in its own subcommands, and tiny-model writes
    # a model folder from its two flags
    assert "--config" in out or name in ("sweep", "tiny-model")


def test_dry_run_prints_resolved_config():
    proc = _run("distill", "--preset", "wan2.1-t2v-1.3b", "--set", "method.split=30", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "split: 30" in proc.stdout and "backbone: wan" in proc.stdout


def test_bad_override_exits_2_with_one_line():
    proc = _run("distill", "--set", "method.splt=3", "--dry-run")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: unknown config key 'method.splt'")


def test_import_dcm_loads_no_ray_mlflow_or_deepspeed():
    code = (
        "import sys, dcm, dcm.config\n"
        "import importlib, pkgutil\n"
        "for m in pkgutil.walk_packages(dcm.__path__, 'dcm.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'deepspeed')]\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
