"""Several runs per device (mdistiller/engine/multi_run.py): `tools/train.py --seeds ... --runs-per-device 2` runs
each seed as a child that is its lone command, so its run directory, metrics and checkpoints equal the lone run's
with the same thread count bit for bit, also after a crash and --resume; a failed seed leaves the others running
and is named; the wrong combinations are one-line errors. tools/reproduce.py packs the same way in process, in its
local script (groups of N in the background, waited for per group, stages in order) and in SLURM (ceil(runs / N)
array tasks of N runs), parsed and executed with a fake interpreter."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mdistiller.engine import multi_run
from mdistiller.utils.errors import UserError
from test_engine import STUDENT_CFG, without_timing
from test_reproduce import FAKE_PYTHON, TEACHER_CFG, TEACHER_RUN, _emit, _executable, _heredocs, reproduce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "tools", "train.py")
# 2 iterations of 64 images per epoch, 64 test images; no teacher to monitor (none is trained here).
TINY = ["DATASET.TRAIN_SUBSET", "128", "DATASET.TEST_SUBSET", "64", "SOLVER.BATCH_SIZE", "64",
        "SOLVER.LR_DECAY_STAGES", "[]", "EXPERIMENT.DEVICE", "cpu", "LOG.MONITOR_TEACHER", "False"]
RUN = "fashion_mnist_none_resnet8_vanilla_seed{}"  # the default run name of STUDENT_CFG (engine/launch.run_name)

# Imported with --import by the children of the first packed call: seed 0 stops right after epoch 1's checkpoints,
# as a killed run does (KeyboardInterrupt: exit 130, resumable); other seeds are left alone.
CRASH_SEED0 = """
import sys
from mdistiller.engine import hooks

_save = hooks.CheckpointHook.after_epoch


def after_epoch(self, record):
    _save(self, record)
    argv = sys.argv
    if self.trainer.epoch == 1 and argv[argv.index("EXPERIMENT.SEED") + 1] == "0":
        raise KeyboardInterrupt


hooks.CheckpointHook.after_epoch = after_epoch
"""


def _env(threads):
    return dict(os.environ, OMP_NUM_THREADS=str(threads))


def _train(*args, threads=2):
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=_env(threads))


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [without_timing(json.loads(line)) for line in f]


def _equal(x, y, where="latest.pth"):
    """Recursive equality of two checkpoints' contents, tensors bit for bit."""
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            _equal(x[k], y[k], f"{where}/{k}")
    elif isinstance(x, (list, tuple)):
        assert type(x) is type(y) and len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _equal(u, v, f"{where}/{i}")
    elif isinstance(x, np.ndarray):
        assert np.array_equal(x, y), where
    else:
        assert x == y, where


def _same_run(a, b):
    """Bit-identical runs whose LOG.PREFIX differs: metrics (timings aside), the final training checkpoint
    (weights, optimizer, RNG, hooks; its timing counters aside), the student's last weights, the config, the
    summary's results."""
    assert a.name == b.name and _metrics(a) == _metrics(b)
    x, y = (torch.load(d / "latest.pth", weights_only=False) for d in (a, b))
    for state, d in ((x, a), (y, b)):
        state["config"] = state["config"].replace(str(d.parent), "PREFIX")
        for key in ("train_time_s", "wall_time_s"):
            del state["counters"][key]
    _equal(x, y)
    _equal(*(torch.load(d / "student_last.pth", weights_only=False) for d in (a, b)), "student_last.pth")
    assert (a / "config.yaml").read_text().replace(str(a.parent), "P") == \
        (b / "config.yaml").read_text().replace(str(b.parent), "P")
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("best_top1", "best_top5", "last_top1", "last_top5", "best_epoch", "epochs", "seed"):
        assert sa[key] == sb[key], key


@pytest.mark.slow
@pytest.mark.kernels
def test_packed_seeds_equal_lone_runs_and_resume_exactly(tmp_path):
    lone, packed = tmp_path / "lone", tmp_path / "packed"
    two = ["SOLVER.EPOCHS", "2", "LOG.SAVE_CHECKPOINT_FREQ", "1", *TINY]
    # The lone commands with 1 thread, started beside the packed one (independent processes: same bits).
    procs = [subprocess.Popen([sys.executable, TRAIN, "--cfg", STUDENT_CFG, "EXPERIMENT.SEED", str(s), "LOG.PREFIX",
                               str(lone), *two], cwd=ROOT, env=_env(1), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for s in (0, 1)]
    # Packed, 2 threads here -> 1 per run; seed 0 is stopped after epoch 1 (a crash), seed 1 runs to its end.
    crash = tmp_path / "crash_seed0.py"
    crash.write_text(CRASH_SEED0)
    args = ["--seeds", "0", "1", "--runs-per-device", "2", "--cfg", STUDENT_CFG, "LOG.PREFIX", str(packed), *two]
    first = _train("--import", str(crash), *args)
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    assert first.returncode == 1, first.stderr
    assert "2 runs at a time, each with 1 CPU thread(s)" in first.stdout
    log0 = multi_run.console_log(str(packed / RUN.format(0)))
    assert "[seed 0] FAILED (exit 130)" in first.stdout and "[seed 1] finished" in first.stdout
    error = first.stderr.strip().splitlines()[-1]
    assert error.startswith("error: 1 of 2 runs failed: seed 0 (exit 130") and log0 in error, first.stderr
    assert (packed / RUN.format(0) / "latest.pth").is_file() and not (packed / RUN.format(0) / "summary.json").exists()
    assert "interrupted; a run can be continued with --resume" in open(log0).read()
    # Seed 1, packed from the start, is its lone run; both seeds' runs carry the lone runs' names.
    _same_run(lone / RUN.format(1), packed / RUN.format(1))
    assert sorted(p.name for p in packed.iterdir() if p.is_dir()) == sorted(p.name for p in lone.iterdir())
    # The same command with --resume: seed 0 continues from epoch 1 to the lone run's bits, seed 1 is complete.
    second = _train(*args, "--resume")
    assert second.returncode == 0, second.stderr
    _same_run(lone / RUN.format(0), packed / RUN.format(0))
    assert "already complete" in open(multi_run.console_log(str(packed / RUN.format(1)))).read()
    for s in (0, 1):
        assert "device cpu (1 threads)" in (packed / RUN.format(s) / "train.log").read_text()
    table = second.stdout[second.stdout.index("run  "):].splitlines()
    assert [row.split()[:2] for row in table[1:]] == [["seed", "0"], ["seed", "1"]]
    best0 = json.load(open(lone / RUN.format(0) / "summary.json"))["best_top1"]
    assert f"{best0:.2f}" in table[1]


@pytest.mark.slow
def test_a_refused_seed_fails_alone_and_is_named(tmp_path):
    taken = tmp_path / RUN.format(1)
    taken.mkdir()
    (taken / "config.yaml").write_text("{}\n")  # another run's directory: a new run there is refused (exit 2)
    proc = _train("--seeds", "0", "1", "--runs-per-device", "2", "--cfg", STUDENT_CFG, "LOG.PREFIX", str(tmp_path),
                  "SOLVER.EPOCHS", "1", *TINY)
    assert proc.returncode == 1
    log1 = multi_run.console_log(str(taken))
    assert "[seed 1] FAILED (exit 2) after" in proc.stdout and "already holds a run" in proc.stdout
    assert f"seed 1 (exit 2, console output {log1}" in proc.stderr
    assert (tmp_path / RUN.format(0) / "summary.json").is_file()
    assert (taken / "config.yaml").read_text() == "{}\n"
    assert re.search(r"seed 1 .* FAILED +exit 2", proc.stdout)


def _train_main():
    spec = importlib.util.spec_from_file_location("train_tool", TRAIN)
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("flags,pairs,env,fragment", [
    (["--seeds", "0", "1"], ["EXPERIMENT.SEED", "3"], {}, "EXPERIMENT.SEED and --seeds both set the seed"),
    (["--runs-per-device", "2"], [], {}, "--runs-per-device: only with --seeds"),
    (["--seeds", "0", "--runs-per-device", "0"], [], {}, "--runs-per-device must be >= 1"),
    (["--seeds", "0", "0"], [], {}, "seed(s) 0 given twice"),
    (["--seeds", "0", "1"], ["EXPERIMENT.NAME", "x"], {}, "EXPERIMENT.NAME 'x' names one directory"),
    (["--seeds", "0", "1", "--runs-per-device", "2"], [], {"RANK": "0", "WORLD_SIZE": "2"}, "under torchrun"),
])
def test_wrong_combinations_are_one_line_errors(tmp_path, monkeypatch, flags, pairs, env, fragment):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError) as e:
        _train_main()([*flags, "--cfg", STUDENT_CFG, *pairs, "LOG.PREFIX", str(tmp_path)])
    assert fragment in str(e.value)
    assert not os.listdir(tmp_path)


def test_threads_and_mps_detection(tmp_path, monkeypatch):
    assert multi_run.threads_per_run(2, total=2) == 1 and multi_run.threads_per_run(3, total=8) == 2
    assert multi_run.threads_per_run(4, total=2) == 1
    assert multi_run.child_env(1, 5).get("OMP_NUM_THREADS") == os.environ.get("OMP_NUM_THREADS")  # lone: untouched
    assert multi_run.child_env(2, 3)["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "mps"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    used, line = multi_run.mps_status()
    assert not used and "not available" in line
    (tmp_path / "bin").mkdir()
    _executable(tmp_path / "bin" / multi_run.MPS_CONTROL, "#!/bin/sh\n")
    used, line = multi_run.mps_status()
    assert not used and "not running" in line and f"{multi_run.MPS_CONTROL} -d" in line
    (tmp_path / "mps").mkdir()
    (tmp_path / "mps" / "control").write_text("")
    used, line = multi_run.mps_status()
    assert used and line.startswith("CUDA MPS: in use")


# ---------------------------------------------------------------- tools/reproduce.py --runs-per-device

FAKE_PYTHON_THREADS = FAKE_PYTHON.replace('echo "$*" >> "$FAKE_LOG"', 'echo "OMP=$OMP_NUM_THREADS $*" >> "$FAKE_LOG"')


def _groups(lines):
    """[(stage title, [[commands started in the background] per group])] of a packed local script."""
    stages = []
    for line in lines:
        if line.startswith("# stage "):
            stages.append((line, [[]]))
        elif stages and line.endswith(" &"):
            stages[-1][1][-1].append(line)
        elif stages and line == "wait_runs":
            stages[-1][1].append([])
    return [(title, [g for g in groups if g]) for title, groups in stages]


def test_packed_local_script_runs_groups_of_n_and_waits_per_stage(tmp_path):
    python = _executable(tmp_path / "python", FAKE_PYTHON_THREADS)
    text = _emit(tmp_path, "proxy-fmnist", "--python", python, "--runs-per-device", "2")
    lines = text.splitlines()
    stages = _groups(lines)
    assert [len(groups) for _, groups in stages] == [1, 9]  # the teacher alone; 18 students in groups of 2
    assert [len(g) for g in stages[0][1]] == [1] and all(len(g) == 2 for g in stages[1][1])
    assert TEACHER_CFG in stages[0][1][0][0]
    for _, groups in stages:
        for g in groups:
            for cmd in g:
                assert cmd.startswith(f"OMP_NUM_THREADS=$THREADS {python} tools/train.py --cfg ") and "--resume" in cmd
                log = cmd.split(" > ")[1].split(" 2>&1")[0]
                assert log.endswith(".console.log") and f"started {log}" in lines
    # every group is waited for: a wait_runs closes it before the next group or stage
    assert lines.count("wait_runs") == 10 and lines[-1] == "wait_runs"
    assert "THREADS=$(( $(nproc) / 2 ))" in text
    log = tmp_path / "calls.log"
    env = dict(os.environ, FAKE_LOG=str(log), FAKE_TEACHER_DIR=str(tmp_path / "runs" / TEACHER_RUN))
    r = subprocess.run(["bash", str(tmp_path / "run.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    threads = max(1, int(subprocess.check_output(["nproc"], env=env)) // 2)
    assert len(calls) == 19 and TEACHER_CFG in calls[0] and all(c.startswith(f"OMP={threads} ") for c in calls)
    # a failed teacher stops the script after its group: no student starts, the message names its log
    log.unlink()
    r = subprocess.run(["bash", str(tmp_path / "run.sh")], env=dict(env, FAKE_TEACHER="fail"), capture_output=True,
                       text=True)
    teacher_log = multi_run.console_log(str(tmp_path / "runs" / TEACHER_RUN))
    assert r.returncode == 1 and f"1 run(s) failed; their output: {teacher_log}" in r.stderr
    assert len(log.read_text().splitlines()) == 1


def test_packed_slurm_tasks_run_n_runs_each(tmp_path):
    python = _executable(tmp_path / "python", FAKE_PYTHON_THREADS)
    text = _emit(tmp_path, "proxy-fmnist", "--slurm", "--python", python, "--runs-per-device", "2")
    stages = _heredocs(text)
    assert "#SBATCH --array=0-0" in stages[1][1] and "#SBATCH --array=0-8" in stages[2][1]  # ceil(18 / 2) = 9
    assert "--dependency=afterok:${stage1}" in stages[2][0]
    # Fashion-MNIST (DATASET.NUM_WORKERS 2): 2 runs x 1 process x (2 workers + 1)
    assert "#SBATCH --cpus-per-task=6" in stages[2][1] and "#SBATCH --gres=gpu:1" in stages[2][1]
    body = stages[2][1].splitlines()
    arms = [i for i, line in enumerate(body) if re.fullmatch(r"  \d+\)", line)]
    assert len(arms) == 9
    for start in arms:
        arm = body[start + 1:body.index("    wait_runs ;;", start) + 1]
        assert arm[0] == f"    require_finished {tmp_path}/runs/{TEACHER_RUN}"
        assert sum(x.endswith(" &") for x in arm) == 2 and sum(x.startswith("    started ") for x in arm) == 2
    log = tmp_path / "calls.log"
    env = dict(os.environ, FAKE_LOG=str(log), FAKE_TEACHER_DIR=str(tmp_path / "runs" / TEACHER_RUN))
    for stage, task in ((1, 0), (2, 8)):
        r = subprocess.run(["bash", "-s"], input=stages[stage][1], text=True, capture_output=True,
                           env=dict(env, SLURM_ARRAY_TASK_ID=str(task)))
        assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 3 and TEACHER_CFG in calls[0]  # the teacher, then the last task's two students


FAKE_TRAIN = """
# tools/train.py stand-in (no torch import: quick): records when it ran, then writes its run's summary.json; the
# run directory of each (config, seed) comes from FAKE_DIRS, computed by the test from the plan.
import json, os, sys, time
args = sys.argv[1:]
key = args[args.index("--cfg") + 1] + " " + args[args.index("EXPERIMENT.SEED") + 1]
run_dir = json.load(open(os.environ["FAKE_DIRS"]))[key]
start = time.time()
time.sleep(1.0)
os.makedirs(run_dir, exist_ok=True)
with open(os.path.join(run_dir, "summary.json"), "w") as f:
    json.dump({"best_top1": 50.0, "last_top1": 49.0}, f)
with open(os.environ["FAKE_TIMES"], "a") as f:
    f.write(json.dumps([os.path.basename(run_dir), start, time.time(), os.environ.get("OMP_NUM_THREADS")]) + "\\n")
"""


def test_reproduce_here_packs_runs_stage_by_stage(tmp_path, monkeypatch):
    from mdistiller.reproduce.plan import CONFIGS_ROOT, plan_table
    from mdistiller.reproduce.stages import stage_runs
    from mdistiller.reproduce.table import cells_of, load_cells

    results = tmp_path / "t.csv"
    results.write_text("source,table,dataset,teacher,student,method,top1,top5,note\n"
                       "mdistiller proxy,x,fashion_mnist,resnet20,resnet8,KD,,,\n"
                       "mdistiller proxy,x,fashion_mnist,resnet20,resnet8,DKD,,,\n"
                       "mdistiller proxy,x,fashion_mnist,resnet20,resnet8,teacher,,,seeds=1\n")
    staged = stage_runs(plan_table(cells_of(load_cells(str(results)), "proxy-x"), 2, CONFIGS_ROOT)[1],
                        str(tmp_path / "p"), ROOT)
    (tmp_path / "dirs.json").write_text(json.dumps({f"{os.path.join(ROOT, s.run.config)} {s.run.seed}": s.run_dir
                                                    for s in staged}))
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    monkeypatch.setattr(multi_run, "TRAIN_PY", str(fake))
    monkeypatch.setenv("FAKE_TIMES", str(tmp_path / "times.jsonl"))
    monkeypatch.setenv("FAKE_DIRS", str(tmp_path / "dirs.json"))
    monkeypatch.setattr(multi_run.torch, "get_num_threads", lambda: 4)
    started = time.time()
    r = reproduce("--table", "proxy-x", "--results", str(results), "--seeds", "2", "--prefix", str(tmp_path / "p"),
                  "--runs-per-device", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    times = [json.loads(line) for line in (tmp_path / "times.jsonl").read_text().splitlines()]
    assert len(times) == 5 and all(t[3] == "2" for t in times)  # 4 threads here, 2 per run
    teacher = [t for t in times if t[0].startswith("fashion_mnist_none_resnet20")]
    students = [t for t in times if t not in teacher]
    assert len(teacher) == 1 and all(s[1] >= teacher[0][2] for s in students)  # stage 2 after stage 1 ended
    for t in times:  # never more than 2 alive
        assert sum(u[1] < t[2] and t[1] < u[2] for u in times) <= 2
    assert min(t[1] for t in times) >= started
    assert "stage 2 of 2: 4 run(s) to train" in r.stdout and "50.00" in r.stdout
    # again: everything is finished, nothing is started
    r = reproduce("--table", "proxy-x", "--results", str(results), "--seeds", "2", "--prefix", str(tmp_path / "p"),
                  "--runs-per-device", "2")
    assert r.returncode == 0 and len((tmp_path / "times.jsonl").read_text().splitlines()) == 5


def test_reproduce_runs_per_device_errors(tmp_path):
    r = reproduce("--table", "dot-1", "--dry-run", "--runs-per-device", "2")
    assert r.returncode == 2 and "--runs-per-device: only to train" in r.stderr
    r = reproduce("--table", "dot-1", "--emit-script", str(tmp_path / "x.sh"), "--runs-per-device", "0")
    assert r.returncode == 2 and "--runs-per-device must be >= 1" in r.stderr
