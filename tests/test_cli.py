"""The `mlx-hermes` command group."""

from __future__ import annotations

import os
import subprocess
import sys

from click.testing import CliRunner

import mlx_hermes
from mlx_hermes.cli import main

from .conftest import ROOT


def test_version_and_help():
    runner = CliRunner()
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and mlx_hermes.__version__ in result.output
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_runs_from_a_source_checkout_without_install(tmp_path):
    # As on the GPU machine: PYTHONPATH=<checkout>, `python -m mlx_hermes`.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "mlx_hermes", "--version"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert mlx_hermes.__version__ in done.stdout
