"""README's commands and Python example run as written, on the tiny model."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from .conftest import ROOT

README = (ROOT / "README.md").read_text()
SETUP_STEPS = ("python3 -m venv", ". .venv/bin/activate", "pip install")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_run_command_works_on_the_tiny_model(tmp_path):
    run_line = blocks("bash")[0].strip()
    assert "make_tiny_model.py" in run_line
    # The test environment is already installed: run what follows the set-up.
    steps = [s for s in run_line.split(" && ") if not s.startswith(SETUP_STEPS)]
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    for _ in range(2):  # and again in the same folder
        done = subprocess.run(" && ".join(steps), shell=True, cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() and "generation:" in done.stderr

    # The Python example, against the model that command wrote.
    example = blocks("python")[0]
    done = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reply, stats = done.stdout.strip().splitlines()[-2:]
    assert "decode_tps" in stats and "decode_tps" not in reply  # stats on a line of their own
    assert sorted(p.name for p in tmp_path.iterdir()) == ["examples", "tiny-hermes"]


def test_readme_test_command_is_what_ci_runs():
    test_line = blocks("bash")[1].strip()
    assert test_line in (ROOT / ".ci" / "run").read_text()
