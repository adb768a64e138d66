"""Progress and logging a user sees (issue 16, items 4-6): the training bar's loss on a terminal, a progress line
every LOG.PRINT_FREQ steps without one, everything a run says in train.log (KD++ class means, int8
calibration, warnings), and --resume anywhere on tools/train.py's command line.

Expected values come from elsewhere than the code under test: the losses a bar or a log line shows are checked
against the per-step losses the run wrote to TensorBoard (LOG.TENSORBOARD_FREQ 1), the line's average against
the mean of those, the step numbers against the schedule N, 2N, ... below the epoch's step count.
"""

import datetime
import errno
import fcntl
import importlib.util
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
import warnings

import pytest
import torch
import tqdm.utils

from mdistiller.analysis.run_logs import step_scalars
from mdistiller.bench.random_teacher import write_random_teacher
from mdistiller.config import load_config
from mdistiller.engine import HookBase
from mdistiller.engine.epoch_progress import EpochProgress
from mdistiller.engine.launch import train_from_config
from mdistiller.utils import progress
from mdistiller.utils.cli import run_cli
from mdistiller.utils.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENT_CFG = os.path.join(ROOT, "configs", "fashion_mnist", "vanilla", "resnet8.yaml")
KDPP_CFG = os.path.join(ROOT, "configs", "fashion_mnist", "kdpp", "resnet20_resnet8.yaml")
TRAIN = os.path.join(ROOT, "tools", "train.py")
# 640 images in batches of 64: 10 equal steps per epoch, so the epoch's mean loss is the plain mean of its steps.
TINY = ["EXPERIMENT.DEVICE", "cpu", "DATASET.TRAIN_SUBSET", "640", "DATASET.TEST_SUBSET", "64",
        "SOLVER.BATCH_SIZE", "64", "SOLVER.LR_DECAY_STAGES", "[]", "SOLVER.WARMUP_EPOCHS", "0",
        "LOG.MONITOR_TEACHER", "False", "LOG.TENSORBOARD_FREQ", "1"]
STEPS = 10


def _train_main():
    tools = os.path.join(ROOT, "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    spec = importlib.util.spec_from_file_location("train_tool", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _log(run_dir):
    with open(os.path.join(run_dir, "train.log")) as f:
        return f.read()


# 6: --resume anywhere ------------------------------------------------------------------------------------------

def test_resume_after_the_key_value_pairs_and_before_them(tmp_path):
    pairs = ["LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", "cli", *TINY, "DATASET.TRAIN_SUBSET", "128"]
    train_from_config(load_config(STUDENT_CFG, [*pairs, "SOLVER.EPOCHS", "1"]))
    run_dir = tmp_path / "cli"
    # after the pairs, through the command line: extends the 1-epoch run to 2 epochs
    proc = subprocess.run([sys.executable, TRAIN, "--cfg", STUDENT_CFG, *pairs, "SOLVER.EPOCHS", "2", "--resume"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "has no value" not in proc.stderr
    log = _log(run_dir)
    assert "resumed from" in log and "SOLVER.EPOCHS 1 -> 2" in log
    with open(run_dir / "metrics.jsonl") as f:
        assert [int(line.split('"epoch": ')[1].split(",")[0]) for line in f if line.strip()] == [1, 2]
    # before the pairs (as it always worked), and between them: the finished run is found again
    for argv in (["--cfg", STUDENT_CFG, "--resume", *pairs, "SOLVER.EPOCHS", "2"],
                 ["--cfg", STUDENT_CFG, *pairs[:4], "--resume", *pairs[4:], "SOLVER.EPOCHS", "2"]):
        before = _log(run_dir).count("already complete")
        with pytest.raises(SystemExit) as e:
            run_cli(_train_main(), argv)
        assert e.value.code == 0
        assert _log(run_dir).count("already complete") == before + 1


@pytest.mark.parametrize("tail, message", [
    (["SOLVER.EPOCHS"], "command-line overrides must be KEY VALUE pairs; 'SOLVER.EPOCHS' has no value"),
    (["SOLVER.EPOCHS", "--resume"], "'SOLVER.EPOCHS' has no value"),  # the flag is not taken as the value
    (["SOLVER.EPOCHS", "2", "--resum"], "unknown option --resum (the options are --help, --cfg, --resume, --import, --seeds, --runs-per-device)"),
    (["SOLVER.EPOCHS", "2", "--cfg", "other.yaml"], "--cfg takes a value: put it before the KEY VALUE pairs"),
])
def test_command_line_mistakes_after_the_pairs_are_one_line(tail, message, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(_train_main(), ["--cfg", STUDENT_CFG, "EXPERIMENT.DEVICE", "cpu", *tail])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert message in err, err


# 4: progress without a terminal, 5: warnings in train.log ------------------------------------------------------

LINE = re.compile(r"epoch (\d+)/(\d+)  iter (\d+)/(\d+)  loss (\d+\.\d{4}) \(avg (\d+\.\d{4})\)  "
                  r"lr (\d+\.\d{5})  (\d+) img/s  eta (\d+):(\d\d):(\d\d)$")


class WarnAtStep(HookBase):
    def __init__(self, step):
        self.step = step

    def after_step(self, step):
        if self.trainer.global_step == self.step:
            warnings.warn(f"a warning raised at step {self.step}", UserWarning)


def test_progress_line_every_print_freq_steps_and_warnings_land_in_train_log(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)  # as under CI / SLURM, even when pytest runs -s
    cfg = load_config(STUDENT_CFG, ["LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", "plain", *TINY,
                                    "SOLVER.EPOCHS", "2", "LOG.PRINT_FREQ", "3"])
    console = []  # what Python shows on the console by default (pytest records warnings instead)

    def show_on_console(message, category, filename, lineno, file=None, line=None):
        console.append(f"{category.__name__}: {message}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show_on_console
        train_from_config(cfg, extra_hooks=[WarnAtStep(5)])
        assert warnings.showwarning is show_on_console  # the run's routing ends with the run
    run_dir = str(tmp_path / "plain")
    lines = _log(run_dir).splitlines()
    found = [(i, LINE.search(line)) for i, line in enumerate(lines) if LINE.search(line)]
    # every 3 steps of each 10-step epoch, never at step 0 or past the end
    assert [(int(m[1]), int(m[3])) for _, m in found] == [(e, s) for e in (1, 2) for s in (3, 6, 9)]
    losses = dict(step_scalars(run_dir, "total"))
    lrs = dict(step_scalars(run_dir, "lr"))
    for _, m in found:
        epoch, step = int(m[1]), int(m[3])
        assert (int(m[2]), int(m[4])) == (2, STEPS)
        global_step = (epoch - 1) * STEPS + step
        assert float(m[5]) == pytest.approx(losses[global_step], abs=6e-5)
        epoch_so_far = [losses[(epoch - 1) * STEPS + k] for k in range(1, step + 1)]
        assert float(m[6]) == pytest.approx(sum(epoch_so_far) / step, abs=6e-5)
        assert float(m[7]) == pytest.approx(lrs[global_step], abs=6e-6)
        assert m[8].isdigit()  # img/s, a whole number (LINE's (\d+)); its size is the machine's, not the code's
        assert datetime.timedelta(hours=int(m[9]), minutes=int(m[10]), seconds=int(m[11])) >= datetime.timedelta(0)
    # the warning, in train.log between the lines of steps 3 and 6, and still on the console as Python shows it
    at = [i for i, line in enumerate(lines) if "UserWarning: a warning raised at step 5" in line]
    assert len(at) == 1 and found[0][0] < at[0] < found[1][0]
    assert console == ["UserWarning: a warning raised at step 5"]  # shown as before, once
    assert "a warning raised" not in capfd.readouterr().err  # the log's console handler does not repeat it


class StopAfterEpoch(HookBase):
    def __init__(self, error):
        self.error = error

    def after_epoch(self, record):
        raise self.error


@pytest.mark.parametrize("error, line", [
    (KeyboardInterrupt(), "interrupted; a run can be continued with --resume"),
    (DataError("image 7 of the training set cannot be read"), "error: image 7 of the training set cannot be read"),
])
def test_how_a_run_stopped_is_the_last_line_of_train_log(error, line, tmp_path):
    cfg = load_config(STUDENT_CFG, ["LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", "stopped", *TINY,
                                    "DATASET.TRAIN_SUBSET", "128", "SOLVER.EPOCHS", "2", "LOG.TENSORBOARD_FREQ", "0"])
    with pytest.raises(type(error)):
        train_from_config(cfg, extra_hooks=[StopAfterEpoch(error)])
    assert _log(str(tmp_path / "stopped")).splitlines()[-1].endswith("] " + line)


def test_print_freq_zero_is_quiet_and_negative_is_refused(tmp_path, monkeypatch):
    from mdistiller.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="LOG.PRINT_FREQ"):
        load_config(STUDENT_CFG, ["LOG.PRINT_FREQ", "-1"])
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    cfg = load_config(STUDENT_CFG, ["LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", "quiet", *TINY,
                                    "DATASET.TRAIN_SUBSET", "128", "SOLVER.EPOCHS", "1", "LOG.PRINT_FREQ", "0"])
    train_from_config(cfg)
    assert " iter " not in _log(str(tmp_path / "quiet"))


# 5: KD++ class means and int8 calibration in train.log, in order -----------------------------------------------

def test_class_means_and_int8_calibration_lines_are_in_train_log_in_order(tmp_path):
    ckpt = write_random_teacher(tmp_path / "teacher" / "resnet20.pth", "resnet20", "fashion_mnist")
    cfg = load_config(KDPP_CFG, ["LOG.PREFIX", str(tmp_path / "out"), "EXPERIMENT.NAME", "kdpp", *TINY,
                                 "DATASET.TRAIN_SUBSET", "128", "SOLVER.EPOCHS", "1", "LOG.TENSORBOARD_FREQ", "0",
                                 "DISTILLER.TEACHER_CKPT", ckpt, "SPEED.TEACHER_INT8", "True",
                                 "SPEED.TEACHER_INT8_CALIBRATION", "64"])
    train_from_config(cfg)
    lines = _log(str(tmp_path / "out" / "kdpp")).splitlines()

    def first(text):
        return next(i for i, line in enumerate(lines) if text in line)

    order = [first("run directory"), first("teacher class means: computing them"),
             first("teacher class means: 128 images, 10 classes"), first("int8 teacher: "),
             first("training resnet8 on fashion_mnist"), first("epoch 1/1  lr")]
    assert order == sorted(order)
    assert "calibrated on 64 training images" in lines[order[3]]


# 4: bars on a terminal -----------------------------------------------------------------------------------------

def _run_in_pty(argv, env, timeout=600):
    """(exit code, everything written to the terminal) of a command whose stdout and stderr are a pty."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # 200 columns: whole postfixes
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 1 << 16)
            except OSError as e:  # EIO: the child closed the terminal
                if e.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=120), b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(not hasattr(tqdm.utils, "envwrap"), reason="tqdm < 4.66 ignores TQDM_MININTERVAL")
def test_training_bar_shows_every_steps_loss_on_a_terminal(tmp_path):
    env = {**os.environ, "TQDM_MININTERVAL": "0", "COLUMNS": "200"}  # tqdm redraws at every step
    code, out = _run_in_pty([sys.executable, TRAIN, "--cfg", STUDENT_CFG, "LOG.PREFIX", str(tmp_path),
                             "EXPERIMENT.NAME", "tty", *TINY, "SOLVER.EPOCHS", "1", "LOG.PRINT_FREQ", "3"], env)
    assert code == 0, out[-2000:]
    draws = {}
    for m in re.finditer(rf"epoch 1/1:.*?\|\s*(\d+)/{STEPS} \[[^\]]*loss=(\d+\.\d{{3}}), lr=(\d+\.\d{{4}})\]", out):
        draws[int(m[1])] = float(m[2])
    losses = dict(step_scalars(str(tmp_path / "tty"), "total"))
    assert sorted(draws) == list(range(1, STEPS + 1))  # a loss at every step
    for step, shown in draws.items():
        assert shown == pytest.approx(losses[step], abs=6e-4), step  # the step's own loss, 3 decimals
    assert re.search(r"eval:.*\d+/\d+", out)  # the evaluation bar
    assert " iter 3/" not in out  # a terminal gets the bar, not the log lines
    assert "epoch 1/1  lr" in out and "done: best top-1" in out


class _CountedLoss:
    """A loss whose reads are counted: on CUDA each read would be a device sync."""

    def __init__(self):
        self.reads = 0

    def __float__(self):
        self.reads += 1
        return 1.0


@pytest.mark.parametrize("device, mininterval, reads", [
    ("cpu", 1e9, 5),  # free on the CPU: every step, whatever tqdm's redraw interval
    ("cuda", 1e9, 0),  # CUDA: only when tqdm will redraw, which this interval never allows
    ("cuda", 0.0, 5),  # ... and at every step when it redraws at every step
])
def test_the_bar_reads_the_loss_only_when_it_is_free_or_shown(device, mininterval, reads, monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    p = EpochProgress(range(5), 1, 1, 5, 100, 0, 1, torch.device(device))
    p.bar.mininterval = mininterval
    loss = _CountedLoss()
    for it in p:
        p.step(it, loss, 0.1, 64 * (it + 1), 64.0 * (it + 1))
    p.close()
    assert loss.reads == reads
