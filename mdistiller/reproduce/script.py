"""Staged runs -> a bash script, or a SLURM driver that submits one array job per stage, each stage after the last.

Teachers first: a stage starts only when every earlier stage has finished without error (bash: `set -e` and the
order of the lines; SLURM: `sbatch --dependency=afterok:<earlier stage job ids>`). A run that reads a planned
teacher also checks, right before it starts, that the teacher's summary.json exists (written after its last
epoch), so a student never starts from a half-trained teacher even when the dependency is bypassed.
Commands call the interpreter given at emit time by absolute path (torchrun next to it for several processes),
and pass --resume, so running the script again skips finished runs and continues interrupted ones.
"""

import os
import shlex
import sys
from dataclasses import dataclass, field

from ..utils.errors import UserError


@dataclass(frozen=True)
class Launcher:
    """How each run is started: `python tools/train.py ...`, or torchrun with `nproc` processes per run."""
    python: str
    repo_root: str
    nproc: int = 1

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


def command(run, prefix, launcher):
    args = ["tools/train.py", "--cfg", run.config, "--resume"] + run.opts(prefix)
    if launcher.nproc > 1:
        head = launcher.torchrun + ["--standalone", f"--nproc_per_node={launcher.nproc}"]
    else:
        head = [launcher.python]
    return " ".join(shlex.quote(a) for a in head + args)


_GUARD = ['require_finished() {  # $1: a teacher run of an earlier stage; summary.json appears after its last epoch',
          '  if [[ ! -f "$1/summary.json" ]]; then',
          '    echo "teacher run $1 has not finished (no summary.json): run its stage first" >&2; exit 1',
          '  fi',
          '}']


def _guard(staged):
    return _GUARD if any(s.reads for s in staged) else []


def _run_lines(s, prefix, launcher):
    return [f"require_finished {shlex.quote(d)}" for d in s.reads] + [command(s.run, prefix, launcher)]


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


def _cpus(runs, launcher, opts):
    if opts.cpus_per_task:
        return opts.cpus_per_task
    return launcher.nproc * (1 + max(s.cfg.DATASET.NUM_WORKERS for s in runs))


def _array_script(runs, name, prefix, launcher, opts, output):
    gpus = launcher.nproc if opts.gpus < 0 else opts.gpus
    head = ["#!/usr/bin/env bash", f"#SBATCH --job-name={name}", f"#SBATCH --array=0-{len(runs) - 1}",
            "#SBATCH --nodes=1", "#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={_cpus(runs, launcher, opts)}",
            f"#SBATCH --output={output}"]
    head += [f"#SBATCH --time={opts.time}"] if opts.time else []
    head += [f"#SBATCH --partition={opts.partition}"] if opts.partition else []
    head += [f"#SBATCH --gres=gpu:{gpus}"] if gpus else []
    head += [f"#SBATCH {x}" for x in opts.extra]
    body = ["set -euo pipefail", f"cd {shlex.quote(launcher.repo_root)}"] + _guard(runs) + \
        ['case "$SLURM_ARRAY_TASK_ID" in']
    for i, s in enumerate(runs):
        body.append(f"  {i}) " + "; ".join(_run_lines(s, prefix, launcher)) + " ;;")
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
