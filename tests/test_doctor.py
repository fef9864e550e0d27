"""`mlx-hermes doctor`: every check runs here, a broken fast path is caught, and the
Mac-only parts read recorded `sysctl` output."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlx_hermes import cpu, doctor
from mlx_hermes.chip import Chip
from mlx_hermes.cli import main


def test_the_report_has_every_check_and_no_paths(hf_checkpoint):
    # A float32 model: --model compares it here against the CPU in float32. In bf16 a random
    # tiny model's router can meet a near-tie, and one flipped expert moves the logits O(1):
    # on the H200 the bf16 tiny-hermes model did (0.52; the same with the fast paths off).
    tiny_model = hf_checkpoint
    result = CliRunner().invoke(main, ["doctor", "--model", str(tiny_model), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"mlx_hermes", "device", "ok", "checks"} and report["ok"]
    for check in report["checks"]:
        assert set(check) == {"group", "name", "status", "figure", "data"}
        assert check["status"] in ("ok", "warn", "FAIL")
    groups = {c["group"] for c in report["checks"]}
    assert groups == {"environment", "numerics", "speed", "fit"}
    names = [c["name"] for c in report["checks"]]
    assert "tiny float32, portable" in names and "tiny 4-bit, portable" in names
    assert "--model, first 2 layers" in names and "--model" in names
    numerics = [c for c in report["checks"] if c["group"] == "numerics"]
    assert all(c["data"]["max_rel_diff"] <= c["data"]["tolerance"] for c in numerics)
    assert str(Path.home()) not in result.stdout and str(tiny_model) not in result.stdout


def test_the_table_says_ok_per_line(tiny_model):
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "  ok   tiny float32, portable: max rel. logit difference" in result.stdout
    assert result.stdout.strip().endswith("all checks passed")


def test_a_broken_fast_path_fails_with_a_non_zero_exit(monkeypatch):
    if mx.default_device() != mx.cpu or len(cpu.streams()) < 2:
        pytest.skip("the CPU fast path is installed on a CPU device of two or more cores")
    real = cpu.StreamedExperts.sorted_mlp
    # a test double of the CPU experts, installed at load by specialize as the real one is
    monkeypatch.setattr(cpu.StreamedExperts, "sorted_mlp", lambda self, x, i: real(self, x, i) + 1)
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("  FAIL")]
    assert failed and all("cpu_streams" in line for line in failed)
    assert "some checks FAILED" in result.stdout


def test_the_mac_working_set_and_wired_limit_from_recorded_sysctl():
    chip = Chip("Apple M3 Max", 64 * 2**30, 40, 400.0)
    raised = doctor.environment(chip, 48 * 10**9, run=lambda cmd: "57344\n")
    line = next(c for c in raised if c.name == "gpu working set")
    assert "48.0 GB of 69 GB" in line.figure and "raised to 57344" in line.figure
    assert line.data["wired_limit_mb"] == 57344
    default = doctor.environment(chip, 48 * 10**9, run=lambda cmd: "0\n")
    line = next(c for c in default if c.name == "gpu working set")
    assert "macOS default" in line.figure and line.data["wired_limit_mb"] == 0
    assert doctor.wired_limit_mb(run=lambda cmd: "not a number") is None


def test_fit_says_what_to_do_when_nothing_fits():
    small = Chip("Apple M1", 16 * 2**30, 8, 68.0)
    checks = doctor.fit(small, 10.9e9)
    assert [c.name for c in checks] == [
        "uniform 8-bit g64", "uniform 6-bit g64", "uniform 5-bit g64", "mixed 4-bit g64",
        "uniform 4-bit g64", "fit-32gb (experts 3-bit g128)", "fit-24gb (experts 2-bit g128)"]
    assert all(c.status == "warn" and "sysctl" in c.figure for c in checks)
    big = doctor.fit(Chip("Apple M2 Ultra", 192 * 2**30, 76, 800.0), 150e9)
    assert all(c.status == "ok" and "fits with" in c.figure for c in big)
