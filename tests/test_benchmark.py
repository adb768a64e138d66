"""tools/benchmark.py: builds each variant as a real Trainer, times it, and reports consistent figures."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_compare_reports_every_variant():
    cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--cfg",
           os.path.join(ROOT, "configs", "cifar100", "kd", "resnet32x4_resnet8x4.yaml"), "--synthetic",
           "--random-teacher", "--steps", "1", "--warmup", "1", "--rounds", "1", "--json",
           "--compare", "SOLVER.TRAINER vanilla", "SOLVER.TRAINER dot", "--",
           "SOLVER.BATCH_SIZE", "8", "DISTILLER.TEACHER", "resnet8x4", "DISTILLER.STUDENT", "resnet8"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    first, dot = out["results"]
    assert (first["variant"], dot["variant"]) == ("SOLVER.TRAINER vanilla", "SOLVER.TRAINER dot")
    assert first["ratio_to_first"] == 1.0 and first["batch_size"] == 8
    for r in out["results"]:
        assert r["images_per_s"] == pytest.approx(r["batch_size"] / (r["ms_per_step"] / 1e3))
        assert r["images_per_s_with_data"] > 0
    assert dot["ratio_to_first"] == pytest.approx(dot["ms_per_step"] / first["ms_per_step"])


def test_missing_dataset_without_synthetic_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--cfg",
                           os.path.join(ROOT, "configs", "cifar100", "kd", "resnet32x4_resnet8x4.yaml"),
                           "DATASET.ROOT", str(tmp_path), "DATASET.DOWNLOAD", "False"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
