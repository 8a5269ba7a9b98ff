"""The README's Python example runs as written (in a fresh process, in an empty directory)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Using it"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no ```python block under '## Using it'"
    return match.group(1)


def test_the_readme_example_runs(tmp_path):
    code = readme_example()
    assert "calibration_batches =" in code and "loss_fn =" in code  # shown, not left to guess
    script = tmp_path / "example.py"
    # fewer timed calls than the defaults: this checks that it runs, not how fast
    script.write_text(code.replace("sparsert.benchmark(dense_model, fast, (x,))",
                                   "sparsert.benchmark(dense_model, fast, (x,), repeats=3, layer_repeats=2)"))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "layers sparse" in r.stdout  # the plan was printed
    assert (tmp_path / "model.sparsert").is_file() and (tmp_path / "model.pt2").is_file()
