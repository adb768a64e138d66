"""Staged runs -> a bash script, or a SLURM driver that submits one array job per stage, each stage after the last.

Teachers first: a stage starts only when every earlier stage has finished without error (bash: `set -e` and the
order of the lines; SLURM: `sbatch --dependency=afterok:<earlier stage job ids>`). A run that reads a planned
teacher also checks, right before it starts, that the teacher's summary.json exists (written after its last
epoch), so a student never starts from a half-trained teacher even when the dependency is bypassed.
Commands call the interpreter given at emit time by absolute path (torchrun next to it for several processes),
and pass --resume, so running the script again skips finished runs and continues interrupted ones.

With --runs-per-device N > 1 the runs of a stage go in groups of N started together in the background on one
device, each with OMP_NUM_THREADS = CPUs // (N x processes per run) and its output in `<run dir>.console.log`
(engine/multi_run.py, as `tools/train.py --seeds` does); the group is waited for, and a failed run stops the script
(or the array task) after its group, naming its log. A SLURM array task runs one group, so a stage's array has
ceil(runs / N) tasks. Groups rather than a queue: bash gets every exit status without polling, and the local
script's groups are the array tasks' groups.
"""

import os
import shlex
import sys
from dataclasses import dataclass, field

from ..engine.multi_run import console_log
from ..utils.errors import UserError


@dataclass(frozen=True)
class Launcher:
    """How each run is started: `python tools/train.py ...`, or torchrun with `nproc` processes per run."""
    python: str
    repo_root: str
    nproc: int = 1
    runs_per_device: int = 1  # runs started together on one device, sharing its CPU threads (a group)

    @property
    def torchrun(self):
        exe = os.path.join(os.path.dirname(self.python), "torchrun")
        return [exe] if os.path.isfile(exe) else [self.python, "-m", "torch.distributed.run"]


@dataclass(frozen=True)
class SlurmOptions:
    time: str = ""  # empty: the partition's default limit
    partition: str = ""  # empty: the cluster's default partition
    cpus_per_task: int = 0  # 0: nproc x (DATASET.NUM_WORKERS + 1), the most any run of the stage uses
    gpus: int = -1  # GPUs per array task; -1: nproc
    output: str = ""  # --output pattern; empty: <prefix>/slurm/%x_%A_%a.out
    extra: tuple = field(default_factory=tuple)  # further sbatch options, e.g. --account=x


def default_python(repo_root):
    """The repository's own virtual environment when it has one, else the interpreter running this tool (its
    path as called, not resolved: a venv's python is a symlink to the base interpreter)."""
    venv = os.path.join(repo_root, ".venv", "bin", "python")
    return venv if os.path.isfile(venv) else os.path.abspath(sys.executable)


def argv(run, prefix, launcher):
    """The run's command as a list (relative to the repository root, where the scripts cd)."""
    args = ["tools/train.py", "--cfg", run.config, "--resume"] + run.opts(prefix)
    if launcher.nproc > 1:
        head = launcher.torchrun + ["--standalone", f"--nproc_per_node={launcher.nproc}"]
    else:
        head = [launcher.python]
    return head + args


def command(run, prefix, launcher):
    return " ".join(shlex.quote(a) for a in argv(run, prefix, launcher))


_GUARD = ['require_finished() {  # $1: a teacher run of an earlier stage; summary.json appears after its last epoch',
          '  if [[ ! -f "$1/summary.json" ]]; then',
          '    echo "teacher run $1 has not finished (no summary.json): run its stage first" >&2; exit 1',
          '  fi',
          '}']


def _guard(staged):
    return _GUARD if any(s.reads for s in staged) else []


def _run_lines(s, prefix, launcher):
    return [f"require_finished {shlex.quote(d)}" for d in s.reads] + [command(s.run, prefix, launcher)]


def _pack_helpers(launcher):
    """Shell functions and the thread share of packed runs (--runs-per-device > 1)."""
    share = launcher.runs_per_device * launcher.nproc
    return [f'THREADS=$(( $(nproc) / {share} )); (( THREADS > 0 )) || THREADS=1  # CPU threads per process of a '
            f'run: {launcher.runs_per_device} runs x {launcher.nproc} process(es) share the CPUs',
            'PIDS=(); LOGS=()',
            'started() {  # $1: the console log of the run just started in the background',
            '  PIDS+=("$!"); LOGS+=("$1")',
            '}',
            'wait_runs() {  # wait for every run started since the last call; stop, naming their logs, if any failed',
            '  local i failed=()',
            '  for i in "${!PIDS[@]}"; do wait "${PIDS[$i]}" || failed+=("${LOGS[$i]}"); done',
            '  PIDS=(); LOGS=()',
            '  if (( ${#failed[@]} > 0 )); then echo "${#failed[@]} run(s) failed; their output: ${failed[*]}" >&2; '
            'exit 1; fi',
            '}',
            'if [[ -e "${CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}/control" ]]; then echo "CUDA MPS: in use"; '
            f'elif command -v nvidia-smi > /dev/null; then echo "CUDA MPS: not running ({launcher.runs_per_device} '
            'runs on one GPU share it by time-slicing)"; fi']


def _log_dirs(runs):
    dirs = sorted({os.path.dirname(console_log(s.run_dir)) for s in runs})
    return [f"mkdir -p {' '.join(shlex.quote(d) for d in dirs)}"] if dirs else []


def _group_lines(group, prefix, launcher):
    """One group of packed runs: every teacher check first (nothing is started when one fails), then each run in
    the background with its thread share and its log, then the wait."""
    reads = list(dict.fromkeys(d for s in group for d in s.reads))
    lines = [f"require_finished {shlex.quote(d)}" for d in reads]
    for s in group:
        log = shlex.quote(console_log(s.run_dir))
        lines += [f"OMP_NUM_THREADS=$THREADS {command(s.run, prefix, launcher)} > {log} 2>&1 &", f"started {log}"]
    return lines + ["wait_runs"]


def _groups(runs, n):
    return [runs[i:i + n] for i in range(0, len(runs), n)]


def _stages(staged):
    out = {}
    for s in staged:
        out.setdefault(s.stage, []).append(s)
    return [out[k] for k in sorted(out)]


def _stage_title(i, stages):
    n = len(stages[i])
    if len(stages) == 1:
        role = "no run reads another's checkpoint"
    elif i == 0:
        role = "they read no planned run; the teachers of later stages are here"
    else:
        role = f"each reads a checkpoint of stage {i}"
    return f"stage {i + 1} of {len(stages)}: {n} run{'s' * (n != 1)} ({role})"


def bash_script(staged, prefix, table, launcher):
    if launcher.runs_per_device > 1:
        return _packed_bash_script(staged, prefix, table, launcher)
    stages = _stages(staged)
    lines = ["#!/usr/bin/env bash",
             f"# {len(staged)} runs of table {table} in {len(stages)} stage(s), one run at a time; a failure stops "
             "the script, so no student starts after a failed teacher.",
             "# Run it with bash from anywhere; again after an interruption to continue (--resume).",
             "set -euo pipefail", f"cd {shlex.quote(launcher.repo_root)}"] + _guard(staged)
    for i, runs in enumerate(stages):
        lines += ["", f"# {_stage_title(i, stages)}"]
        for s in runs:
            lines += _run_lines(s, prefix, launcher)
    return "\n".join(lines) + "\n"


def _packed_bash_script(staged, prefix, table, launcher):
    n, stages = launcher.runs_per_device, _stages(staged)
    lines = ["#!/usr/bin/env bash",
             f"# {len(staged)} runs of table {table} in {len(stages)} stage(s), {n} at a time on this machine's "
             "device: each group runs in the background and is waited for before the next starts; a failed run "
             "stops the script after its group, so no student starts after a failed teacher.",
             "# Each run's output: <run dir>.console.log. Run it with bash from anywhere; again after an "
             "interruption to continue (--resume).",
             "set -euo pipefail", f"cd {shlex.quote(launcher.repo_root)}"] + _guard(staged) + \
        _pack_helpers(launcher) + _log_dirs(staged)
    for i, runs in enumerate(stages):
        lines += ["", f"# {_stage_title(i, stages)}"]
        for j, group in enumerate(_groups(runs, n)):
            lines += [f"# group {j + 1} of {-(-len(runs) // n)}"] + _group_lines(group, prefix, launcher)
    return "\n".join(lines) + "\n"


def _cpus(runs, launcher, opts):
    if opts.cpus_per_task:
        return opts.cpus_per_task
    return launcher.runs_per_device * launcher.nproc * (1 + max(s.cfg.DATASET.NUM_WORKERS for s in runs))


def _case_body(runs, prefix, launcher):
    """The array script's case arms: one run per task, or one group of runs_per_device runs per task."""
    if launcher.runs_per_device == 1:
        return [f"  {i}) " + "; ".join(_run_lines(s, prefix, launcher)) + " ;;" for i, s in enumerate(runs)]
    out = []
    for i, group in enumerate(_groups(runs, launcher.runs_per_device)):
        lines = _group_lines(group, prefix, launcher)
        out += [f"  {i})"] + [f"    {x}" for x in lines[:-1]] + [f"    {lines[-1]} ;;"]
    return out


def _array_script(runs, name, prefix, launcher, opts, output):
    gpus = launcher.nproc if opts.gpus < 0 else opts.gpus
    tasks = -(-len(runs) // launcher.runs_per_device)
    head = ["#!/usr/bin/env bash", f"#SBATCH --job-name={name}", f"#SBATCH --array=0-{tasks - 1}",
            "#SBATCH --nodes=1", "#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={_cpus(runs, launcher, opts)}",
            f"#SBATCH --output={output}"]
    head += [f"#SBATCH --time={opts.time}"] if opts.time else []
    head += [f"#SBATCH --partition={opts.partition}"] if opts.partition else []
    head += [f"#SBATCH --gres=gpu:{gpus}"] if gpus else []
    head += [f"#SBATCH {x}" for x in opts.extra]
    packed = _pack_helpers(launcher) + _log_dirs(runs) if launcher.runs_per_device > 1 else []
    body = ["set -euo pipefail", f"cd {shlex.quote(launcher.repo_root)}"] + _guard(runs) + packed + \
        ['case "$SLURM_ARRAY_TASK_ID" in'] + _case_body(runs, prefix, launcher)
    body += ['  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', "esac"]
    return head + body


def slurm_script(staged, prefix, table, launcher, opts=SlurmOptions()):
    """A bash driver (run it with bash on the login node) that submits each stage as an array job with
    `sbatch --parsable`, every stage after `--dependency=afterok:` on the job ids of all earlier stages."""
    for x in opts.extra:
        if not x.startswith("--") or "\n" in x:
            raise UserError(f"--sbatch-arg {x!r}: give one sbatch option such as --account=NAME")
    stages = _stages(staged)
    output = opts.output or os.path.join(prefix, "slurm", "%x_%A_%a.out")
    lines = ["#!/usr/bin/env bash",
             f"# {len(staged)} runs of table {table} in {len(stages)} SLURM array job(s), one per stage; each stage "
             "starts only after every earlier one succeeded (afterok).",
             "# Submit with `bash THIS_FILE` on a login node; submitting again after a failure continues (--resume).",
             "set -euo pipefail", f"cd {shlex.quote(launcher.repo_root)}"]
    log_dir = os.path.dirname(output)
    if log_dir and "%" not in log_dir:
        lines.append(f"mkdir -p {shlex.quote(log_dir)}")
    ids = []
    for i, runs in enumerate(stages):
        var, tag = f"stage{i + 1}", f"STAGE{i + 1}_SCRIPT"
        dep = f" --dependency=afterok:{':'.join('${' + v + '}' for v in ids)} --kill-on-invalid-dep=yes" if ids \
            else ""
        lines += ["", f"# {_stage_title(i, stages)}", f"{var}=$(sbatch --parsable{dep} <<'{tag}'"]
        lines += _array_script(runs, f"repro-{table}-s{i + 1}", prefix, launcher, opts, output)
        lines += [tag, ")", f'{var}="${{{var}%%;*}}"  # --parsable prints JOBID or JOBID;CLUSTER',
                  f'echo "{_stage_title(i, stages)}: job ${{{var}}}"']
        ids.append(var)
    return "\n".join(lines) + "\n"
