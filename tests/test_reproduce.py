"""tools/reproduce.py: every cell of the DOT CIFAR-100 tables plans to an existing config, a missing config fails
naming the cell, --collect aggregates summary.json files (hand-computed means and sample std), --emit-script
writes valid bash with one torchrun line per run."""

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import types

import pytest

from mdistiller.config import load_config
from mdistiller.engine.launch import run_name
from mdistiller.reproduce.plan import plan_table, tag_suffix
from mdistiller.reproduce.table import load_cells
from mdistiller.utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "reproduce.py")


sys.path.insert(0, os.path.join(ROOT, "tools"))
import reproduce as tool  # noqa: E402


def reproduce(*args):
    """In process (a subprocess per call costs a torch import); errors as tools/reproduce.py prints them."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = tool.main(list(args)) or 0
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            code = e.exit_code
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.mark.parametrize("table,cells,runs", [
    ("dot-3a", 27, 26), ("dot-3b", 18, 17), ("dot-3c", 16, 16), ("dot-1", 9, 9), ("dot-2", 9, 9), ("dot-6", 14, 14),
    ("dot-7", 12, 12), ("dot-4", 6, 6), ("dot-5", 6, 6), ("kdpp-1", 66, 64), ("kdpp-2", 18, 18), ("kdpp-b3", 12, 12),
    ("proxy-fmnist", 8, 8)])
def test_dry_run_lists_every_cell(table, cells, runs):
    # A teacher row shared by several students is one run (dot-3a's resnet32x4, dot-3b's ResNet18, ...). Cells
    # of methods the framework does not implement (OFD, RKD, PKT, FitNet, SRRL) are not counted.
    r = reproduce("--table", table, "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if not line.startswith("#")]
    assert len(lines) == runs
    assert f"# {runs} runs for {cells} cells" in r.stdout
    for line in lines:
        assert os.path.isfile(os.path.join(ROOT, line.split()[0]))


def test_sweep_notes_become_overrides():
    r = reproduce("--table", "dot-1", "--dry-run")
    assert "configs/cifar100/dot/kd_resnet32x4_resnet8x4.yaml  overrides: SOLVER.DOT.DELTA -0.05  seed: 0" in r.stdout
    r = reproduce("--table", "dot-2", "--dry-run", "--seeds", "2")
    assert "configs/cifar100/kd/resnet32x4_resnet8x4.yaml  overrides: SOLVER.MOMENTUM 0.975  seed: 1" in r.stdout
    assert len([x for x in r.stdout.splitlines() if not x.startswith("#")]) == 18


def test_task_weight_sweep_and_config_values():
    # DOT tables 4/5: "alpha(task weight)=a" is CE weight a and KD weight 1 - a (DOT eq. 1). A sweep point equal
    # to the config's own value is the config's run (no overrides, no extra tag), so it is not trained twice.
    out = reproduce("--table", "dot-4", "--dry-run").stdout
    assert "configs/cifar100/kd/resnet32x4_resnet8x4.yaml  overrides: KD.LOSS.CE_WEIGHT 0.25 KD.LOSS.KD_WEIGHT 0.75" \
        in out
    assert "configs/cifar100/kd/resnet32x4_resnet8x4.yaml  overrides: -  seed: 0" in out  # alpha 0.1 is the config
    assert "KD.LOSS.CE_WEIGHT 0.1 " not in out
    out = reproduce("--table", "dot-1", "--dry-run").stdout
    assert "SOLVER.DOT.DELTA 0.075" not in out and "kd_resnet32x4_resnet8x4.yaml  overrides: -  seed: 0" in out


def test_seeds_note_caps_a_cell_and_runs_go_seed_by_seed():
    r = reproduce("--table", "proxy-fmnist", "--dry-run", "--seeds", "3")
    lines = [x for x in r.stdout.splitlines() if not x.startswith("#")]
    # the teacher and KD+DOT at delta 0 ("seeds=1") once, six student rows three times
    assert len(lines) == 2 + 6 * 3
    assert [x.rsplit("seed: ", 1)[1].split()[0] for x in lines] == ["0"] * 8 + ["1"] * 6 + ["2"] * 6
    assert lines[0].startswith("configs/fashion_mnist/vanilla/resnet20.yaml")


def test_not_implemented_methods_are_not_missing():
    cells = [c for c in load_cells() if c.method == "OFD"]
    plans, runs = plan_table(cells)
    assert plans and all(p.status == "not implemented" for p in plans) and runs == []


def test_missing_config_fails_naming_the_cell(tmp_path):
    root = tmp_path / "configs"
    shutil.copytree(os.path.join(ROOT, "configs"), root)
    os.remove(root / "cifar100" / "dot" / "crd_vgg13_vgg8.yaml")
    r = reproduce("--table", "dot-3a", "--dry-run", "--configs-root", str(root))
    assert r.returncode == 2
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "vgg13->vgg8 CRD+DOT" in err and "configs/cifar100/dot/crd_vgg13_vgg8.yaml does not exist" in err


def test_unknown_table_is_one_line_through_the_cli():
    r = subprocess.run([sys.executable, TOOL, "--table", "dot-99", "--dry-run"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown table 'dot-99'")
    assert len(r.stderr.strip().splitlines()) == 1


def _write_summary(prefix, config, overrides, seed, best, last):
    opts = list(overrides) + ["EXPERIMENT.SEED", str(seed), "LOG.PREFIX", str(prefix)]
    if overrides:
        opts += ["EXPERIMENT.TAG", tag_suffix(overrides)]
    cfg = load_config(os.path.join(ROOT, config), opts)
    d = prefix / run_name(cfg)
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"best_top1": best, "last_top1": last, "seed": seed}))
    (d / "config.yaml").write_text(cfg.dump())


def test_collect_means_and_sample_std(tmp_path):
    prefix = tmp_path / "runs"
    kd = "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"
    # momentum 0.9 (the config's own value, so its own run): best 73, 74, 75 -> mean 74, sample std 1;
    # last 72, 72, 75 -> mean 73, std sqrt(3) = 1.732
    for seed, (best, last) in enumerate([(73.0, 72.0), (74.0, 72.0), (75.0, 75.0)]):
        _write_summary(prefix, kd, (), seed, best, last)
    # momentum 0.81: one seed -> std undefined
    _write_summary(prefix, kd, ("SOLVER.MOMENTUM", "0.81"), 0, 70.5, 70.0)
    # a run of another sweep point with seed 10 must not leak into 0.9 (run-name prefix match)
    _write_summary(prefix, kd, ("SOLVER.MOMENTUM", "0.95"), 10, 10.0, 10.0)
    md, out_csv = tmp_path / "t.md", tmp_path / "t.csv"
    r = reproduce("--table", "dot-2", "--collect", "--prefix", str(prefix), "--out-md", str(md), "--out-csv",
                  str(out_csv))
    assert r.returncode == 0, r.stderr
    rows = {row["note"]: row for row in csv.DictReader(open(out_csv))}
    m9 = rows["momentum=0.9"]
    assert (m9["n"], m9["best_mean"], m9["best_std"], m9["last_mean"], m9["last_std"]) == (
        "3", "74.00", "1.00", "73.00", "1.73")
    assert m9["paper"] == "73.33" and m9["diff"] == "0.67"
    m81 = rows["momentum=0.81"]
    assert (m81["n"], m81["best_mean"], m81["best_std"], m81["diff"]) == ("1", "70.50", "", "-3.03")
    assert rows["momentum=0.95"]["seeds"] == "10" and rows["momentum=0.95"]["best_mean"] == "10.00"
    assert rows["momentum=0.99"]["status"] == "missing runs" and rows["momentum=0.99"]["best_mean"] == ""
    text = md.read_text()
    assert "| 74.00 ± 1.00 | 73.00 ± 1.73 | 73.33 | +0.67 |" in text and "sample std (n-1)" in text
    assert "| missing | missing | 37.19 |" in text


def test_collect_teacher_row_reports_the_checkpoint(tmp_path):
    prefix = tmp_path / "runs"
    # the KD run of the plain config (the run name does not depend on the checkpoint), with its own teacher
    cfg = load_config(os.path.join(ROOT, "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"),
                      ["LOG.PREFIX", str(prefix), "DISTILLER.TEACHER_CKPT", "/ckpts/r32x4.pth"])
    d = prefix / run_name(cfg)
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"best_top1": 74.0, "last_top1": 73.0, "seed": 0}))
    (d / "config.yaml").write_text(cfg.dump())
    r = reproduce("--table", "dot-3a", "--collect", "--prefix", str(prefix))
    assert r.returncode == 0, r.stderr
    teacher = [x for x in r.stdout.splitlines() if "| resnet32x4 | resnet8x4 | teacher |" in x]
    assert len(teacher) == 1 and "teacher used: /ckpts/r32x4.pth" in teacher[0]


def test_collect_proxy_table_has_no_paper_number(tmp_path):
    prefix = tmp_path / "runs"
    _write_summary(prefix, "configs/fashion_mnist/vanilla/resnet20.yaml", (), 0, 88.0, 87.5)
    for seed, best in enumerate([85.0, 86.0]):
        _write_summary(prefix, "configs/fashion_mnist/kd/resnet20_resnet8.yaml", (), seed, best, best)
    r = reproduce("--table", "proxy-fmnist", "--collect", "--prefix", str(prefix))
    assert r.returncode == 0, r.stderr
    kd = [x for x in r.stdout.splitlines() if "| resnet20 | resnet8 | KD |" in x]
    assert kd == ["| resnet20 | resnet8 | KD |  | 2 | 85.50 ± 0.71 | 85.50 ± 0.71 | - |  | ok |"]
    teacher = [x for x in r.stdout.splitlines() if "| resnet8 | teacher |" in x][0]
    assert "| 88.00 | 87.50 | - |" in teacher
    assert "fashion_mnist_none_resnet20_vanilla_seed0/student_best.pth" in teacher  # the default teacher location


@pytest.mark.parametrize("slurm", [False, True])
def test_emit_script(tmp_path, slurm):
    path = tmp_path / "run.sh"
    r = reproduce("--table", "dot-1", "--seeds", "2", "--emit-script", str(path), *(["--slurm"] if slurm else []))
    assert r.returncode == 0, r.stderr
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    lines = [x for x in path.read_text().splitlines() if "torchrun " in x]
    assert len(lines) == 18  # 9 deltas x 2 seeds
    assert len(set(lines)) == 18 and all("tools/train.py --cfg configs/cifar100/dot/" in x for x in lines)
    if slurm:
        assert "#SBATCH --array=0-17" in path.read_text()
