"""Reproduce a published table: list, plan, run, emit a cluster script, collect and compare.

    python tools/reproduce.py --list
    python tools/reproduce.py --table dot-3a --dry-run [--seeds 3]
    python tools/reproduce.py --table dot-3a --seeds 3 [--prefix output/repro]
    python tools/reproduce.py --table dot-3a --seeds 3 --emit-script run.sh [--slurm --time 24:00:00 ...]
    python tools/reproduce.py --table proxy-fmnist --seeds 3 --runs-per-device 2  # 2 runs at a time
    python tools/reproduce.py --table dot-3a --collect [--prefix output/repro] [--out-md F] [--out-csv F]

Cells map to configs by convention (mdistiller/reproduce/plan.py); runs are told apart by seed and, for sweep
rows, by an EXPERIMENT.TAG built from the overrides. Published numbers: mdistiller/reference/paper_results.csv
(top-1) and detection_results.csv (COCO AP, AP50, AP75: table kdpp-3).
A run that reads the checkpoint of a teacher the plan trains runs in a later stage, after that teacher finished
(mdistiller/reproduce/stages.py). --collect groups runs by their config (mdistiller/reproduce/runkey.py) and
refuses to average runs of different configs.
"""

import argparse
import collections
import os
import sys

import _path  # noqa: F401

from mdistiller.reproduce.plan import CONFIGS_ROOT, OK, MISSING, UNMAPPED, plan_table
from mdistiller.reproduce.table import cells_of, load_cells, table_ids
from mdistiller.utils.cli import run_cli
from mdistiller.utils.errors import UserError


def _cell_name(c):
    return f"{c.teacher}->{c.student} {c.method}" + (f" [{c.note}]" if c.note else "")


def do_list(cells, configs_root):
    print(f"{'table':<16} {'cells':>5} {'with config':>11} {'not impl.':>9} {'missing':>7}")
    for t in table_ids(cells):
        plans, _ = plan_table(cells_of(cells, t), 1, configs_root)
        n = collections.Counter(p.status for p in plans)
        print(f"{t:<16} {len(plans):>5} {n[OK]:>11} {n['not implemented']:>9} {n[MISSING] + n[UNMAPPED]:>7}")
    return 0


def check_complete(plans, table):
    bad = [p for p in plans if p.status in (MISSING, UNMAPPED)]
    if bad:
        raise UserError(f"table {table}: {len(bad)} implemented cell(s) cannot run: "
                        + "; ".join(f"{_cell_name(p.cell)}: {p.reason}" for p in bad))


def do_dry_run(plans, staged, table, prefix):
    for p in plans:
        if not p.runnable:
            print(f"# {_cell_name(p.cell)}: {p.status} ({p.reason})")
    for s in staged:
        r = s.run
        over = " ".join(r.overrides) or "-"
        print(f"{r.config}  overrides: {over}  seed: {r.seed}" + (f"  tag: {r.tag_suffix}" if r.tag_suffix else "")
              + "".join(f"  after: {os.path.basename(d)}" for d in s.reads))
    n_stages = len({s.stage for s in staged})
    print(f"# {len(staged)} runs for {sum(p.runnable for p in plans)} cells of table {table}; LOG.PREFIX {prefix}"
          + (f"; {n_stages} stages (teachers first)" if n_stages > 1 else ""))
    print_missing_inputs(staged)
    check_complete(plans, table)
    return 0


def print_missing_inputs(staged):
    """The data and weights the runs read that are not on this machine, each with the command that fetches it
    (mdistiller/reproduce/needs.py); '#' lines, so the run lines above stay the only others."""
    from mdistiller.reproduce.needs import missing_inputs

    missing = missing_inputs(staged)
    if not missing:
        print("# inputs: every dataset and weights file the runs read is in place")
        return
    print(f"# to fetch before training: {len(missing)} missing input(s)")
    for need, n in missing:
        print(f"# missing {need.kind} {need.what}: {need.path} ({n} run{'s' if n > 1 else ''}); fetch: {need.fetch}")


def do_run(plans, staged, table, prefix, runs_per_device=1, repo_root=None):
    """In this process, one run after the other in stage order: a teacher that fails stops the study. With
    runs_per_device > 1, each stage's runs are child processes, that many at a time (_run_packed)."""
    from mdistiller.utils import distributed
    from mdistiller.engine.launch import train_from_config

    check_complete(plans, table)
    if runs_per_device > 1:
        return _run_packed(staged, runs_per_device, prefix, repo_root)
    for i, s in enumerate(staged, 1):
        done = os.path.exists(os.path.join(s.run_dir, "summary.json"))
        print(f"[{i}/{len(staged)}] {s.run.config} {' '.join(s.run.opts())}" + (" (done, skipped)" if done else ""),
              flush=True)
        if not done:
            try:
                train_from_config(s.cfg, resume=True)
            finally:
                distributed.teardown()
    return 0


def _run_packed(staged, n, prefix, repo_root):
    """Each stage's unfinished runs as lone `tools/train.py --resume` children (the config each resolves to is the
    one this process staged: same config path, overrides and prefix), n at a time with the CPU threads divided
    among them; a stage with a failed run stops the study before the next stage."""
    from mdistiller.engine import multi_run
    from mdistiller.engine.task import build_task
    from mdistiller.utils.env import resolve_device

    multi_run.check_runs_per_device(n)
    if not staged:
        return 0
    threads = multi_run.threads_per_run(n)
    multi_run.announce(n, threads, resolve_device(staged[0].cfg.EXPERIMENT.DEVICE))
    stages = sorted({s.stage for s in staged})
    outcomes = []
    for k in stages:
        todo = [s for s in staged if s.stage == k and not os.path.exists(os.path.join(s.run_dir, "summary.json"))]
        skipped = sum(s.stage == k for s in staged) - len(todo)
        print(f"stage {k + 1} of {len(stages)}: {len(todo)} run(s) to train, {skipped} done (skipped)", flush=True)
        jobs = [multi_run.Job(os.path.basename(s.run_dir), tuple(_train_argv(s, prefix, repo_root)), s.run_dir,
                              build_task(s.cfg).metric, build_task(s.cfg).metric_label) for s in todo]
        outcomes += multi_run.run_queue(jobs, n, multi_run.child_env(n, threads))
        message = multi_run.failure_message(outcomes)
        if message:
            print(multi_run.table(outcomes))
            later = "; the later stages were not started" if k != stages[-1] else ""
            print(f"error: {message}{later}", file=sys.stderr, flush=True)
            return 1
    if outcomes:
        print(multi_run.table(outcomes))
    return 0


def _train_argv(s, prefix, repo_root):
    """A staged run's lone command: the config and overrides stage_runs resolved it from (stages.resolve), with
    --resume, started from this directory (a relative prefix means the same place)."""
    from mdistiller.engine.multi_run import TRAIN_PY

    return [sys.executable, TRAIN_PY, "--cfg", os.path.join(repo_root, s.run.config), "--resume"] + s.run.opts(prefix)


def do_emit(args, plans, staged, table, repo_root):
    from mdistiller.reproduce.script import Launcher, SlurmOptions, bash_script, default_python, slurm_script

    check_complete(plans, table)
    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    python = os.path.abspath(args.python) if args.python else default_python(repo_root)
    launcher = Launcher(python, repo_root, args.nproc, args.runs_per_device)
    prefix = os.path.abspath(args.prefix)  # the script cds to the repository; the prefix stays what was meant here
    if args.slurm:
        opts = SlurmOptions(args.time or "", args.partition or "", args.cpus_per_task or 0,
                            -1 if args.gpus is None else args.gpus,
                            os.path.abspath(args.output) if args.output else "", tuple(args.sbatch_arg))
        text = slurm_script(staged, prefix, table, launcher, opts)
    else:
        text = bash_script(staged, prefix, table, launcher)
    with open(args.emit_script, "w") as f:
        f.write(text)
    os.chmod(args.emit_script, 0o755)
    n_stages = len({s.stage for s in staged})
    packed = f", {args.runs_per_device} at a time per device" if args.runs_per_device > 1 else ""
    how = f"bash {args.emit_script}" + (" (on a login node: it calls sbatch)" if args.slurm else "")
    print(f"wrote {args.emit_script}: {len(staged)} runs in {n_stages} stage(s){packed}, {python}; start it with "
          f"{how}")
    return 0


def _check_flags(args):
    """Script options given where they do nothing are an error, not silently ignored."""
    slurm = [f for f, v in (("--time", args.time), ("--partition", args.partition), ("--output", args.output),
                            ("--cpus-per-task", args.cpus_per_task), ("--gpus", args.gpus is not None),
                            ("--sbatch-arg", args.sbatch_arg)) if v]
    if slurm and not (args.emit_script and args.slurm):
        raise UserError(f"{', '.join(slurm)}: only with --emit-script PATH --slurm")
    script = [f for f, v in (("--python", args.python), ("--nproc", args.nproc != 1), ("--slurm", args.slurm)) if v]
    if script and not args.emit_script:
        raise UserError(f"{', '.join(script)}: only with --emit-script PATH")
    if args.ignore_key and not args.collect:
        raise UserError("--ignore-key: only with --collect")
    if args.runs_per_device < 1:
        raise UserError(f"--runs-per-device must be >= 1, got {args.runs_per_device}")
    if args.runs_per_device > 1 and (args.collect or args.dry_run):
        raise UserError("--runs-per-device: only to train, here or with --emit-script PATH")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="the known table ids, their cells and how many have configs")
    ap.add_argument("--table", help="table id, e.g. dot-3a")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the planned runs and the missing data and weights with the commands that fetch "
                         "them (reads configs only: needs neither); non-zero if a config is missing")
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per cell (default 1)")
    ap.add_argument("--prefix", default=os.path.join("output", "repro"), help="LOG.PREFIX of the runs (default output/repro)")
    ap.add_argument("--emit-script", metavar="PATH",
                    help="write a bash script of the runs instead of running them (teachers first, in stages)")
    ap.add_argument("--slurm", action="store_true",
                    help="with --emit-script: a driver that submits one SLURM array job per stage, later stages "
                         "with --dependency=afterok on the earlier ones")
    ap.add_argument("--python", help="interpreter the script calls (default: the repository's .venv/bin/python, "
                                     "else this one)")
    ap.add_argument("--nproc", type=int, default=1,
                    help="processes (GPUs) per run; >1 starts each run with torchrun (default 1)")
    ap.add_argument("--runs-per-device", type=int, default=1, metavar="N",
                    help="N runs at a time on one device, each a lone tools/train.py child with 1/N of the CPU "
                         "threads: here, in the --emit-script's groups, or per SLURM array task (default 1)")
    ap.add_argument("--time", help="--slurm: #SBATCH --time of every array task (default: the partition's)")
    ap.add_argument("--partition", help="--slurm: #SBATCH --partition (default: the cluster's)")
    ap.add_argument("--cpus-per-task", type=int,
                    help="--slurm: #SBATCH --cpus-per-task (default: nproc x (DATASET.NUM_WORKERS + 1))")
    ap.add_argument("--gpus", type=int, help="--slurm: GPUs per array task, #SBATCH --gres=gpu:N (default: "
                                             "--nproc; 0 for CPU-only jobs)")
    ap.add_argument("--output", help="--slurm: #SBATCH --output pattern (default: <prefix>/slurm/%%x_%%A_%%a.out)")
    ap.add_argument("--sbatch-arg", action="append", default=[], metavar="OPT",
                    help="--slurm: a further #SBATCH option, e.g. --sbatch-arg=--account=NAME (repeatable)")
    ap.add_argument("--collect", action="store_true",
                    help="mean and std per cell over the finished runs of one config; exit status 1 when a cell's "
                         "runs have different configs (refused, not averaged)")
    ap.add_argument("--out-md", help="with --collect: write the Markdown table here (default: stdout)")
    ap.add_argument("--out-csv", help="with --collect: also write a CSV")
    ap.add_argument("--ignore-key", action="append", default=[], metavar="KEY",
                    help="with --collect: a config key whose values may differ among a cell's runs, e.g. "
                         "DISTILLER.TEACHER_CKPT for one published teacher at two paths (repeatable)")
    ap.add_argument("--configs-root", default=CONFIGS_ROOT, help=argparse.SUPPRESS)  # tests
    ap.add_argument("--results", default=None, help="paper results CSV (default: the packaged one)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    cells = load_cells(args.results) if args.results else load_cells()
    if args.list:
        return do_list(cells, args.configs_root)
    if not args.table:
        raise UserError("give --list, or --table ID with --dry-run, --seeds N, --emit-script PATH or --collect")
    _check_flags(args)
    table = args.table.lower()
    plans, runs = plan_table(cells_of(cells, table), args.seeds, args.configs_root)
    repo_root = os.path.dirname(os.path.abspath(args.configs_root))
    if args.collect:
        from mdistiller.reproduce.collect import collect, to_markdown, write_csv

        rows = collect(plans, args.prefix, repo_root, args.ignore_key)
        md = to_markdown(table, rows, plans[0].cell.metric)
        if args.out_md:
            with open(args.out_md, "w") as f:
                f.write(md)
        else:
            sys.stdout.write(md)
        if args.out_csv:
            write_csv(rows, args.out_csv)
        refused = [r for r in rows if r["status"].startswith("refused")]
        for r in refused:
            cell = f"{r['teacher']}->{r['student']} {r['method']}" + (f" [{r['note']}]" if r["note"] else "")
            print(f"{cell}: {r['status']}", file=sys.stderr)
        if refused:
            print(f"error: {len(refused)} cell(s) refused: their runs have different configs; move the runs that "
                  "do not belong out of the prefix (or --ignore-key KEY where the difference does not matter)",
                  file=sys.stderr)
        return 1 if refused else 0
    from mdistiller.reproduce.stages import stage_runs

    staged = stage_runs(runs, args.prefix, repo_root)
    if args.dry_run:
        return do_dry_run(plans, staged, table, args.prefix)
    if args.emit_script:
        return do_emit(args, plans, staged, table, repo_root)
    return do_run(plans, staged, table, args.prefix, args.runs_per_device, repo_root)


if __name__ == "__main__":
    run_cli(main)
