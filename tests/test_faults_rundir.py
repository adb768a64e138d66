"""Faults around the run directory, injected for real: a deleted latest.pth, a full or read-only disk (a tiny
tmpfs, when root), LOG.PREFIX naming a file, a half-written metrics line, a garbled config.yaml, leftover
temporary checkpoints, two runs of one name at once, a finished run resumed with another config, a run directory
moved under another LOG.PREFIX. Each must end with one line and a documented exit code, and never damage what
the run already wrote; every resume that goes on must still be bit-exact (compared with an uninterrupted run).
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from mdistiller.utils.errors import UserError
from mdistiller.utils.run_dir_io import RunDirError
from mdistiller.utils.run_lock import RunLock, RunLockedError
from mdistiller.engine.hooks import read_metrics
from mdistiller.engine.launch import train_from_config
from test_engine import STUDENT_CFG, CrashAfterEpoch, small_cfg, without_timing
from mdistiller.engine import HookBase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
TRAIN = os.path.join(ROOT, "tools", "train.py")
TINY = ("DATASET.TRAIN_SUBSET", "128", "DATASET.TEST_SUBSET", "64", "SOLVER.EPOCHS", "1",
        "SOLVER.LR_DECAY_STAGES", "[]", "EXPERIMENT.DEVICE", "cpu")


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_cli(prefix, *args, name="cli", resume=False):
    cmd = [sys.executable, TRAIN, "--cfg", STUDENT_CFG, *(["--resume"] if resume else []), "LOG.PREFIX",
           str(prefix), "EXPERIMENT.NAME", name, *TINY, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


def one_line_error(proc):
    """The stderr of a refused command: exactly one line, starting with "error:", and no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def same_weights(a, b):
    a, b = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"] and a["hooks"] == b["hooks"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 2-epoch run: what every resumed run below must equal."""
    prefix = tmp_path_factory.mktemp("straight")
    summary = train_from_config(small_cfg(prefix))
    return prefix / "run", summary


@contextlib.contextmanager
def tmpfs(path, size):
    """A tmpfs of `size` mounted at `path` (root only), unmounted afterwards."""
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory):
    """Write zeros into directory/filler until the file system is full; returns the filler's path."""
    filler = os.path.join(directory, "filler")
    with open(filler, "wb", buffering=0) as f:
        block = b"\0" * 4096
        with contextlib.suppress(OSError):
            while True:
                f.write(block)
    return filler


needs_root = pytest.mark.skipif(not IS_ROOT, reason="mounting a tiny tmpfs needs root (CI runs as root)")


# --- 2. results without a resumable checkpoint ----------------------------------------------------------------

def test_resume_without_latest_refuses_instead_of_overwriting(tmp_path, straight):
    run = tmp_path / "run"
    shutil.copytree(straight[0], run)
    os.remove(run / "latest.pth")
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "best.pth", "student_last.pth",
                                                            "summary.json", "train.log", "config.yaml")}
    with pytest.raises(UserError) as e:
        train_from_config(small_cfg(tmp_path), resume=True)
    message = str(e.value)
    for fragment in ("no latest.pth", "metrics.jsonl (epochs 1-2)", "best.pth", "summary.json",
                     "delete " + str(run), "EXPERIMENT.NAME"):
        assert fragment in message, message
    assert {name: (run / name).read_bytes() for name in before} == before  # train.log and config.yaml too
    # Through the command line: one line, exit code 2.
    proc = subprocess.run([sys.executable, TRAIN, "--cfg", STUDENT_CFG, "--resume", *small_cfg_args(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 2 and "no latest.pth" in one_line_error(proc)


def small_cfg_args(prefix):
    """small_cfg's overrides as command-line pairs (tests/test_engine.py's run "run" under `prefix`)."""
    return ["LOG.PREFIX", str(prefix), "EXPERIMENT.NAME", "run", "EXPERIMENT.DEVICE", "cpu",
            "DATASET.TRAIN_SUBSET", "640", "DATASET.TEST_SUBSET", "300", "SOLVER.BATCH_SIZE", "64",
            "SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES", "[1]", "SOLVER.WARMUP_EPOCHS", "1",
            "LOG.TENSORBOARD_FREQ", "2", "LOG.SAVE_CHECKPOINT_FREQ", "1"]


@pytest.mark.kernels
def test_kill_during_the_first_checkpoint_write_still_resumes_exactly(tmp_path, straight):
    # Killed while writing epoch 1's files: metrics and student files of epoch 1, no latest.pth yet, and a
    # temporary checkpoint the kill left behind. Nothing was checkpointed, so --resume starts over.
    with pytest.raises(KeyboardInterrupt):
        train_from_config(small_cfg(tmp_path), extra_hooks=[CrashAfterEpoch(1)])
    run = tmp_path / "run"
    os.remove(run / "latest.pth")
    leftover = run / ".tmp-12345-0badc0de-latest.pth"
    leftover.write_bytes(b"half a checkpoint")
    resumed = train_from_config(small_cfg(tmp_path), resume=True)
    assert not leftover.exists()
    assert "removed 1 half-written file(s)" in (run / "train.log").read_text()
    same_weights(straight[0] / "latest.pth", run / "latest.pth")
    assert [without_timing(r) for r in metrics(run)] == [without_timing(r) for r in metrics(straight[0])]
    assert resumed["best_top1"] == straight[1]["best_top1"]


# --- 3. OS errors ---------------------------------------------------------------------------------------------

def test_log_prefix_naming_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    proc = train_cli(blocker / "sub")
    assert proc.returncode == 3
    line = one_line_error(proc)
    assert str(blocker) in line and "is a file, not a directory" in line and "LOG.PREFIX" in line


@needs_root
def test_read_only_run_directory_is_one_line(tmp_path):
    with tmpfs(tmp_path / "ro", "1m") as mount:
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        proc = train_cli(mount)
        assert proc.returncode == 3
        line = one_line_error(proc)
        assert str(mount / "cli") in line and "Read-only file system" in line
        assert os.listdir(mount) == []


def test_read_only_run_directory_without_root(tmp_path):
    if IS_ROOT:
        pytest.skip("root ignores permission bits; test_read_only_run_directory_is_one_line covers it with a "
                    "read-only tmpfs")
    prefix = tmp_path / "ro"
    prefix.mkdir()
    prefix.chmod(0o555)
    proc = train_cli(prefix)
    assert proc.returncode == 3 and "Permission denied" in one_line_error(proc)


@needs_root
def test_no_space_at_the_start_is_one_line_and_leaves_nothing(tmp_path):
    with tmpfs(tmp_path / "full", "256k") as mount:
        fill(mount)
        proc = train_cli(mount)
        assert proc.returncode == 3
        line = one_line_error(proc)
        assert str(mount / "cli") in line and "No space left on device" in line
        assert os.listdir(mount) == ["filler"]  # no half-made run directory to trip over


class FillDiskAfterEpoch(HookBase):
    """Runs after the checkpoint hook: once epoch `epoch` is safely written, the disk is full."""

    def __init__(self, epoch, directory):
        self.epoch, self.directory, self.filler = epoch, directory, None

    def after_epoch(self, record):
        if self.trainer.epoch == self.epoch:
            self.filler = fill(self.directory)


@needs_root
def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, straight):
    with tmpfs(tmp_path / "disk", "16m") as mount:
        filler = FillDiskAfterEpoch(1, str(mount))
        with pytest.raises(RunDirError) as e:
            train_from_config(small_cfg(mount), extra_hooks=[filler])
        run = mount / "run"
        message = str(e.value)
        assert "No space left on device" in message and str(run) in message and "\n" not in message
        assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]  # the half-written file is gone
        assert torch.load(run / "latest.pth", weights_only=False)["epoch"] == 1  # the previous one, intact
        os.remove(filler.filler)
        train_from_config(small_cfg(mount), resume=True)
        same_weights(straight[0] / "latest.pth", run / "latest.pth")
        assert [r["epoch"] for r in metrics(run)] == [1, 2]


def test_checkpoints_have_the_mode_of_every_other_file(straight):
    run = straight[0]
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    for name in ("config.yaml", "metrics.jsonl", "latest.pth", "best.pth", "student_last.pth", "ckpt_epoch_1.pth"):
        assert os.stat(run / name).st_mode & 0o777 == expected, name


# --- 4. half-written state ------------------------------------------------------------------------------------

@pytest.mark.kernels
def test_torn_metrics_line_and_a_moved_run_directory_resume_exactly(tmp_path, straight):
    with pytest.raises(KeyboardInterrupt):
        train_from_config(small_cfg(tmp_path / "before"), extra_hooks=[CrashAfterEpoch(1)])
    # The run directory moves to another LOG.PREFIX (LOG.PREFIX is where a run lives, not what it computes) ...
    shutil.move(str(tmp_path / "before" / "run"), str(tmp_path / "after" / "run"))
    run = tmp_path / "after" / "run"
    # ... and a kill during epoch 2's append left half a line.
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "lr": 0.005, "train_lo')
    resumed = train_from_config(small_cfg(tmp_path / "after"), resume=True)
    assert [without_timing(r) for r in metrics(run)] == [without_timing(r) for r in metrics(straight[0])]
    same_weights(straight[0] / "latest.pth", run / "latest.pth")
    assert resumed["best_top1"] == straight[1]["best_top1"]
    assert "removed a half-written last line" in (run / "train.log").read_text()


def test_read_metrics_repairs_only_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"epoch": 1, "a": 0.5}\n{"epoch": 2, "a"')
    records, raw, torn = read_metrics(str(path))
    assert records == [{"epoch": 1, "a": 0.5}] and raw == [b'{"epoch": 1, "a": 0.5}\n'] and torn == b'{"epoch": 2, "a"'
    path.write_bytes(b'{"epoch": 1}\n{"epo\n{"epoch": 3}\n')  # damage inside the file is not a torn append
    with pytest.raises(UserError, match="line 2 is not a metrics record"):
        read_metrics(str(path))


def test_garbled_config_is_one_line_and_a_failed_start_writes_nothing(tmp_path, straight):
    with pytest.raises(KeyboardInterrupt):
        train_from_config(small_cfg(tmp_path), extra_hooks=[CrashAfterEpoch(1)])
    run = tmp_path / "run"
    good = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(good[: len(good) // 2] + "\n  : [unclosed\n")
    files = {n: (run / n).read_bytes() for n in ("config.yaml", "train.log", "metrics.jsonl", "latest.pth")}
    proc = subprocess.run([sys.executable, TRAIN, "--cfg", STUDENT_CFG, "--resume", *small_cfg_args(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert str(run / "config.yaml") in line and "damaged" in line and "not valid YAML" in line
    assert {n: (run / n).read_bytes() for n in files} == files  # neither train.log nor config.yaml touched
    # A failure found only once the trainer is built (a latest.pth that cannot be read) touches them neither.
    (run / "config.yaml").write_text(good)
    (run / "latest.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read as a PyTorch checkpoint"):
        train_from_config(small_cfg(tmp_path), resume=True)
    assert (run / "train.log").read_bytes() == files["train.log"]
    assert (run / "metrics.jsonl").read_bytes() == files["metrics.jsonl"]


# --- 5. a finished run resumed with another config --------------------------------------------------------------

def test_finished_run_resumed_with_another_config_is_refused(tmp_path, straight):
    run = tmp_path / "run"
    shutil.copytree(straight[0], run)
    log = (run / "train.log").read_bytes()
    with pytest.raises(UserError) as e:
        train_from_config(small_cfg(tmp_path, "SOLVER.LR", "0.1"), resume=True)
    assert "finished run" in str(e.value) and "SOLVER.LR 0.05 -> 0.1" in str(e.value)
    assert (run / "train.log").read_bytes() == log
    proc = subprocess.run([sys.executable, TRAIN, "--cfg", STUDENT_CFG, "--resume", *small_cfg_args(tmp_path),
                           "SOLVER.WEIGHT_DECAY", "0.001"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 2 and "SOLVER.WEIGHT_DECAY 0.0005 -> 0.001" in one_line_error(proc)
    # The same config (the copy lives under another LOG.PREFIX) has nothing to add: the summary, exit 0; so has
    # one with another SOLVER.MAX_SKIPPED_STEPS, the limit the divergence error tells an fp16 run to raise.
    assert train_from_config(small_cfg(tmp_path), resume=True)["best_top1"] == straight[1]["best_top1"]
    again = train_from_config(small_cfg(tmp_path, "SOLVER.MAX_SKIPPED_STEPS", "500", "LOG.PRINT_FREQ", "7",
                                       "LOG.TENSORBOARD_FREQ", "0"), resume=True)
    assert again["best_top1"] == straight[1]["best_top1"]


# --- 6. two runs of one name ------------------------------------------------------------------------------------

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from mdistiller.utils.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_held_run_directory_is_refused_naming_the_holder_until_it_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT), str(tmp_path / "cli")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = train_cli(tmp_path)
        assert proc.returncode == 4
        line = one_line_error(proc)
        assert f"in use by pid {holder.pid} on host" in line and str(tmp_path / "cli") in line
        assert os.listdir(tmp_path / "cli") == [".lock"]  # the refused run wrote nothing
        with pytest.raises(RunLockedError):
            RunLock(str(tmp_path / "cli")).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(str(tmp_path / "cli")).acquire()  # the OS released the dead holder's lock
    lock.release()


# tools/train.py, paused right after it takes the run lock until a line arrives on its stdin: the test decides when
# the first run goes on, so the second start is sure to meet a live holder (started freely, the first run could
# finish before the second reaches the lock, and the second would then find a finished run instead).
TRAIN_PAUSED_AFTER_LOCK = """
import runpy, sys
sys.path[:0] = [{root!r}, {tools!r}]
from mdistiller.utils import run_lock
acquire = run_lock.RunLock.acquire
def acquire_then_wait(self):
    held = acquire(self)
    print("locked", flush=True)
    sys.stdin.readline()
    return held
run_lock.RunLock.acquire = acquire_then_wait
sys.argv = [{train!r}, *sys.argv[1:]]
runpy.run_path({train!r}, run_name="__main__")
"""


def test_a_second_run_while_the_first_trains_is_refused_and_the_first_completes(tmp_path):
    args = ["--cfg", STUDENT_CFG, "LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", "twin", *TINY]
    script = TRAIN_PAUSED_AFTER_LOCK.format(root=ROOT, tools=os.path.dirname(TRAIN), train=TRAIN)
    first = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        while (line := first.stdout.readline()) and line.strip() != "locked":
            pass
        assert line.strip() == "locked", first.communicate(timeout=600)[1][-2000:]
        run = tmp_path / "twin"
        assert json.loads((run / ".lock").read_text())["pid"] == first.pid  # the holder has recorded itself
        second = subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, cwd=ROOT,
                                timeout=600)
        assert second.returncode == 4, second.stderr[-2000:]
        message = one_line_error(second)
        assert f"in use by pid {first.pid} on host" in message and str(run) in message
        assert os.listdir(run) == [".lock"]  # the refused run wrote nothing (and the first one is still paused)
        out, err = first.communicate("go\n", timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err[-2000:]
    assert [r["epoch"] for r in metrics(run)] == [1]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1
    assert "in use by" not in (run / "train.log").read_text()  # nothing of the refused run in the first one's log


def test_a_second_run_in_the_same_process_is_refused(tmp_path):
    lock = RunLock(str(tmp_path / "run")).acquire()
    try:
        with pytest.raises(RunLockedError, match=f"in use by this process \\(pid {os.getpid()}\\)"):
            train_from_config(small_cfg(tmp_path))
    finally:
        lock.release()
    assert not (tmp_path / "run").exists()  # the lock made the directory and took it away again


def test_torchrun_prints_our_line_first(tmp_path):
    """Under torchrun the refused run's line comes before torchrun's own ChildFailedError report (exit code 1).
    The job stops because rank 0 shared its refusal with rank 1 (distributed.agree: the line names rank 0, rank 1
    stops quietly), not because rank 1 gave up waiting: the process group's timeout is set far beyond the hang
    guard below, so a job that only ended through it would fail the test by running into that guard."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT), str(tmp_path / "cli")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               TRAIN, "--cfg", STUDENT_CFG, "LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", "cli",
                               *TINY, "DISTRIBUTED.TIMEOUT_MIN", "60"], capture_output=True, text=True, cwd=ROOT,
                              timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("W")]
    first = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert lines[first].startswith(f"error: rank 0: run directory {tmp_path / 'cli'} is in use by pid {holder.pid}")
    assert all("Traceback" not in line and "ChildFailedError" not in line for line in lines[:first]), proc.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1  # rank 1 stops quietly
    assert "timed out" not in proc.stderr.lower() and "timeout" not in proc.stderr.lower(), proc.stderr[-3000:]
