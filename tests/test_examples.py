"""examples/ use only the public API; each runs to completion (as a user would run it) and prints what
it promises. They double as smoke tests of the public API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# (script, arguments, text its output must contain): quickstart with a few steps, not its default 3000
CASES = {
    "quickstart.py": (["20"], "trained to step 20"),
    "oracle_sampling.py": ([], "sliced Wasserstein"),
    "conditional_editing.py": ([], "mean p(class 0 | x)"),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs_and_prints_its_result(script, tmp_path):
    args, expected = CASES[script]
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent / "src")}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=tmp_path,  # examples write runs/ under the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout
    assert "Traceback" not in done.stderr


def test_every_example_is_run_by_this_file():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)
