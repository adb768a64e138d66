"""Several runs at once on one device: each run a child `tools/train.py` process of its own, N alive at a time.

Why child processes: a child is the very command a lone run is (`tools/train.py --cfg FILE EXPERIMENT.SEED s ...`),
so its seed, data order, RNG streams, run directory, checkpoints and `--resume` are the lone run's by construction,
and a run that fails or is killed takes no other run with it. The one thing packing decides is the child's CPU
thread count: with N runs at a time each child gets OMP_NUM_THREADS = (this process's threads) // N, and kernels
split their sums by thread, so a packed run equals the lone run given the same OMP_NUM_THREADS, bit for bit (not
the lone run with every thread). On a GPU every child uses the device its config names; the runs overlap their
kernels only through CUDA MPS, which this module detects and reports but never starts.

Each child's console output goes to `<run dir>.console.log` (beside the run directory, which stays exactly a lone
run's); the terminal gets one line when a run starts, one when it ends, and a table at the end.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import load_config
from ..utils import distributed
from ..utils.env import REPO_ROOT, resolve_device
from ..utils.errors import UserError
from .launch import run_dir_for, train_from_config
from .task import build_task

TRAIN_PY = os.path.join(REPO_ROOT, "tools", "train.py")
MPS_CONTROL = "nvidia-cuda-mps-control"
MPS_PIPE_DEFAULT = "/tmp/nvidia-mps"  # the daemon's pipe directory unless CUDA_MPS_PIPE_DIRECTORY says otherwise


@dataclass(frozen=True)
class Job:
    """One child run: its label in status lines ("seed 3"), its command, where it writes, and its result metric."""

    label: str
    argv: tuple
    run_dir: str
    metric: str = "top1"  # summary.json holds best_<metric> and last_<metric>
    metric_label: str = "top-1"
    cwd: Optional[str] = None

    @property
    def log(self):
        return console_log(self.run_dir)


@dataclass(frozen=True)
class Outcome:
    job: Job
    returncode: int
    minutes: float
    summary: Optional[dict] = None  # the run's summary.json when it finished

    @property
    def ok(self):
        return self.returncode == 0 and self.summary is not None


def say_now(line):
    """Status lines reach a pipe or a log file as they happen, not when the queue ends."""
    print(line, flush=True)


def console_log(run_dir):
    """Where a child's stdout and stderr go: beside its run directory, so that the directory is a lone run's."""
    return os.path.normpath(run_dir) + ".console.log"


def world_size_from_env():
    """The process count torchrun announced (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if distributed.launched_by_torchrun() else 1


def check_runs_per_device(n):
    """--runs-per-device must be >= 1, and 1 under torchrun: a packed child would start its own process group
    inside every rank."""
    if n < 1:
        raise UserError(f"--runs-per-device must be >= 1, got {n}")
    if n > 1 and world_size_from_env() > 1:
        raise UserError(f"--runs-per-device {n} under torchrun (WORLD_SIZE {world_size_from_env()}): packed runs "
                        "are single-process children; start them without torchrun, or drop --runs-per-device to "
                        "train the seeds one after another in this process group")


def threads_per_run(n, total=None):
    """CPU threads each of `n` concurrent runs gets: this process's share (OMP_NUM_THREADS or torch's default)."""
    total = torch.get_num_threads() if total is None else total
    return max(1, total // n)


def child_env(n, threads):
    """The children's environment: ours, plus OMP_NUM_THREADS when runs share the CPU (a lone run, n = 1, keeps
    whatever this process has, so it is exactly the lone command)."""
    env = dict(os.environ)
    if n > 1:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def mps_status():
    """(MPS in use, one line saying so) for runs sharing a CUDA device. In use means the control daemon's pipe
    exists: CUDA clients then join it by themselves. Nothing is started here."""
    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", MPS_PIPE_DEFAULT)
    if os.path.exists(os.path.join(pipe_dir, "control")):
        return True, f"CUDA MPS: in use (control daemon at {pipe_dir}): the runs' kernels share the GPU at once"
    if shutil.which(MPS_CONTROL):
        return False, (f"CUDA MPS: not running ({MPS_CONTROL} is installed; `{MPS_CONTROL} -d` starts it); the runs "
                       "share the GPU by time-slicing")
    return False, "CUDA MPS: not available on this machine; the runs share the GPU by time-slicing"


def _last_line(path):
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f.read().splitlines()[-50:] if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1]


def _summary(run_dir):
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _result(o):
    s, m = o.summary, o.job.metric
    return f"best {o.job.metric_label} {s[f'best_{m}']:.2f}, last {o.job.metric_label} {s[f'last_{m}']:.2f}"


def _start(job, env):
    os.makedirs(os.path.dirname(job.log) or ".", exist_ok=True)
    with open(job.log, "a") as log:  # appended: a resumed run keeps the earlier attempts' output
        log.write(f"$ {shlex.join(job.argv)}\n")
        log.flush()
        proc = subprocess.Popen(list(job.argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=job.cwd)
    return proc


def _finish(job, proc, started, say):
    minutes = (time.monotonic() - started) / 60
    summary = _summary(job.run_dir) if proc.returncode == 0 else None
    o = Outcome(job, proc.returncode, minutes, summary)
    if o.ok:
        say(f"[{job.label}] finished in {minutes:.1f} min: {_result(o)}")
    else:
        why = f"exit {proc.returncode}" if proc.returncode else "exit 0 without summary.json"
        say(f"[{job.label}] FAILED ({why}) after {minutes:.1f} min: {_last_line(job.log)}; console output {job.log}")
    return o


class _Terminated(Exception):
    """SIGTERM reached the parent (kill, a scheduler's cancel): the children get it too, as a lone run would."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def run_queue(jobs, n, env=None, say=say_now, poll_s=0.2):
    """Start `jobs` in order with at most `n` alive; a failed one does not stop the others. Returns [Outcome] in
    the jobs' order. Ctrl-C at a terminal reaches the children too (one process group): they stop as a lone run
    does (resumable) and are waited for, each sent SIGINT itself if it is still alive 10 s later; SIGTERM is passed
    on to them. Either way the parent stops (KeyboardInterrupt, exit status 143)."""
    pending, alive, done = list(jobs), {}, {}
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        while pending or alive:
            while pending and len(alive) < n:
                job = pending.pop(0)
                alive[job] = (_start(job, env), time.monotonic())
                say(f"[{job.label}] started: run {job.run_dir} (console output {job.log})")
            for job, (proc, started) in list(alive.items()):
                if proc.poll() is not None:
                    done[job] = _finish(job, proc, started, say)
                    del alive[job]
            if alive:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        _stop([proc for proc, _ in alive.values()], signal.SIGINT, grace_s=10)
        raise
    except _Terminated:
        _stop([proc for proc, _ in alive.values()], signal.SIGTERM, grace_s=0)
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return [done[j] for j in jobs]


def _stop(procs, sig, grace_s):
    """Wait `grace_s` for the children to stop by themselves, send `sig` to those still alive, wait for them."""
    for proc in procs:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
    for proc in procs:
        proc.wait()


def table(outcomes):
    """The final table: one row per run, its result or its failure."""
    metric = outcomes[0].job.metric_label if outcomes else "top-1"
    rows = [("run", "run directory", f"best {metric}", f"last {metric}", "minutes")]
    for o in outcomes:
        m = o.job.metric
        result = (f"{o.summary[f'best_{m}']:.2f}", f"{o.summary[f'last_{m}']:.2f}") if o.ok else \
            ("FAILED", f"exit {o.returncode}")
        rows.append((o.job.label, o.job.run_dir, *result, f"{o.minutes:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def failure_message(outcomes):
    """One line naming the failed runs and their console logs ("" when every run finished)."""
    failed = [o for o in outcomes if not o.ok]
    if not failed:
        return ""
    return (f"{len(failed)} of {len(outcomes)} runs failed: "
            + "; ".join(f"{o.job.label} (exit {o.returncode}, console output {o.job.log}, run {o.job.run_dir})"
                        for o in failed))


def announce(n, threads, device, say=say_now):
    """The line(s) saying how the runs share the machine."""
    if n > 1:
        say(f"{n} runs at a time, each with {threads} CPU thread(s) (OMP_NUM_THREADS; this process has "
            f"{torch.get_num_threads()})")
    if device.type == "cuda":
        say(mps_status()[1] if n > 1 else "one run at a time on the GPU (no CUDA MPS needed)")


def _seed_configs(cfg_file, seeds, opts):
    """The config of each seed, as each lone command would resolve it; refuses what would make the runs collide."""
    if "EXPERIMENT.SEED" in opts[0::2]:
        raise UserError("EXPERIMENT.SEED and --seeds both set the seed: drop EXPERIMENT.SEED (--seeds 0 1 2 trains "
                        "one run per seed)")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise UserError(f"--seeds: seed(s) {' '.join(map(str, repeated))} given twice")
    cfgs = [load_config(cfg_file, ["EXPERIMENT.SEED", str(s)] + list(opts)) for s in seeds]
    dirs = [run_dir_for(c) for c in cfgs]
    if len(set(dirs)) < len(dirs):
        raise UserError(f"--seeds: every seed would write {dirs[0]} (EXPERIMENT.NAME {cfgs[0].EXPERIMENT.NAME!r} "
                        "names one directory whatever the seed); drop EXPERIMENT.NAME, whose default name ends in "
                        "_seed<SEED>, or set LOG.PREFIX per seed in separate commands")
    return cfgs


def seed_argv(cfg_file, seed, opts, resume=False, imports=()):
    """The lone command of one seed (the argument list of `python tools/train.py ...`)."""
    head = [sys.executable, TRAIN_PY, "--cfg", cfg_file]
    for name in imports:
        head += ["--import", name]
    return head + ["EXPERIMENT.SEED", str(seed)] + list(opts) + (["--resume"] if resume else [])


def _in_this_process(cfgs, resume, say):
    """Under torchrun: the seeds one after another in this process group (every rank runs each), which is joined
    once and left after the last (a group left and joined again between runs can fail to reconnect); the first
    failure stops the rest, since the ranks must stay together."""
    outcomes, task, finished = [], build_task(cfgs[0]), False
    try:
        for cfg in cfgs:
            started = time.monotonic()
            summary = train_from_config(cfg, resume=resume)
            job = Job(f"seed {cfg.EXPERIMENT.SEED}", (), run_dir_for(cfg), task.metric, task.metric_label)
            outcomes.append(Outcome(job, 0, (time.monotonic() - started) / 60, summary))
        finished = True
    finally:
        distributed.teardown(synchronize=finished)
    if int(os.environ.get("RANK", "0")) == 0:
        say(table(outcomes))
    return 0


def train_seeds(cfg_file, seeds, opts, resume=False, imports=(), runs_per_device=None, say=say_now):
    """tools/train.py --seeds: every seed's run exactly as its lone command, `runs_per_device` (default 1) at a
    time as child processes; under torchrun, one after another in this process. Returns the exit status: 0 when
    every run finished, 1 when any failed (the others still run to their end)."""
    n = 1 if runs_per_device is None else runs_per_device
    check_runs_per_device(n)
    cfgs = _seed_configs(cfg_file, list(seeds), opts)
    if world_size_from_env() > 1:
        return _in_this_process(cfgs, resume, say)
    threads = threads_per_run(n)
    announce(n, threads, resolve_device(cfgs[0].EXPERIMENT.DEVICE), say)
    task = build_task(cfgs[0])
    jobs = [Job(f"seed {s}", tuple(seed_argv(cfg_file, s, opts, resume, imports)), run_dir_for(c), task.metric,
                task.metric_label) for s, c in zip(seeds, cfgs)]
    outcomes = run_queue(jobs, n, child_env(n, threads), say)
    say(table(outcomes))
    message = failure_message(outcomes)
    if message:
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 1
    return 0
