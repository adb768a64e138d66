"""tools/dot_toy.py, the DOT appendix A.2 experiment: DOT ends closer to the teacher's 0.7 than SGD (the appendix's
claim), and both end at the fixed points derived by hand in the tool's docstring."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dot_ends_closer_to_the_teacher_than_sgd(tmp_path):
    out = tmp_path / "toy.png"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "dot_toy.py"), "--out", str(out), "--json"],
                          capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(result["dot"] - 0.7) < abs(result["sgd"] - 0.7)
    # SGD minimises 0.5 CE + 0.5 KL: p = 0.5 + 0.5 * 0.7. DOT weighs KD by (1 - 0.9 + 0.075) / (1 - 0.9 - 0.075)
    # = 7: p = (0.5 + 3.5 * 0.7) / 4.
    assert result["sgd"] == pytest.approx(0.85, abs=1e-4)
    assert result["dot"] == pytest.approx(0.7375, abs=1e-4)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
