"""Planned runs -> a bash script (one torchrun command a line) or a SLURM array script (one run a task).

Every command passes --resume, so re-submitting the script skips finished runs and continues interrupted ones.
"""

import shlex


def command(run, prefix, nproc_var="${NPROC:-1}"):
    args = ["tools/train.py", "--cfg", run.config, "--resume"] + run.opts(prefix)
    return f"torchrun --standalone --nproc_per_node={nproc_var} " + " ".join(shlex.quote(a) for a in args)


def bash_script(runs, prefix, table):
    lines = ["#!/usr/bin/env bash", f"# {len(runs)} runs of table {table}; run from the repository root.",
             "# NPROC=<GPUs per run> bash this_script.sh", "set -euo pipefail"]
    lines += [command(r, prefix) for r in runs]
    return "\n".join(lines) + "\n"


def slurm_script(runs, prefix, table):
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name=repro-{table}", f"#SBATCH --array=0-{len(runs) - 1}",
             "#SBATCH --gpus-per-task=1", f"# {len(runs)} runs of table {table}, one per array task; submit from "
             "the repository root with sbatch.", "set -euo pipefail", 'NPROC="${SLURM_GPUS_ON_NODE:-1}"',
             'case "$SLURM_ARRAY_TASK_ID" in']
    lines += [f"  {i}) {command(r, prefix, '${NPROC}')} ;;" for i, r in enumerate(runs)]
    lines += ['  *) echo "no run for task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', "esac"]
    return "\n".join(lines) + "\n"
