"""Reproduce a published table: list, plan, run, emit a cluster script, collect and compare.

    python tools/reproduce.py --list
    python tools/reproduce.py --table dot-3a --dry-run [--seeds 3]
    python tools/reproduce.py --table dot-3a --seeds 3 [--prefix output/repro]
    python tools/reproduce.py --table dot-3a --seeds 3 --emit-script run.sh [--slurm]
    python tools/reproduce.py --table dot-3a --collect [--prefix output/repro] [--out-md F] [--out-csv F]

Cells map to configs by convention (mdistiller/reproduce/plan.py); runs are told apart by seed and, for sweep
rows, by an EXPERIMENT.TAG built from the overrides. Published numbers: mdistiller/reference/paper_results.csv.
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


def do_dry_run(plans, runs, table, prefix):
    for p in plans:
        if not p.runnable:
            print(f"# {_cell_name(p.cell)}: {p.status} ({p.reason})")
    for r in runs:
        over = " ".join(r.overrides) or "-"
        print(f"{r.config}  overrides: {over}  seed: {r.seed}" + (f"  tag: {r.tag_suffix}" if r.tag_suffix else ""))
    print(f"# {len(runs)} runs for {sum(p.runnable for p in plans)} cells of table {table}; LOG.PREFIX {prefix}")
    check_complete(plans, table)
    return 0


def do_run(plans, runs, table, prefix, repo_root):
    from mdistiller.config import load_config
    from mdistiller.utils import distributed
    from mdistiller.engine.launch import run_dir_for, train_from_config

    check_complete(plans, table)
    for i, r in enumerate(runs, 1):
        cfg = load_config(os.path.join(repo_root, r.config), r.opts(prefix))
        done = os.path.exists(os.path.join(run_dir_for(cfg), "summary.json"))
        print(f"[{i}/{len(runs)}] {r.config} {' '.join(r.opts())}" + (" (done, skipped)" if done else ""), flush=True)
        if not done:
            try:
                train_from_config(cfg, resume=True)
            finally:
                distributed.teardown()
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="the known table ids, their cells and how many have configs")
    ap.add_argument("--table", help="table id, e.g. dot-3a")
    ap.add_argument("--dry-run", action="store_true", help="print the planned runs; non-zero if a config is missing")
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per cell (default 1)")
    ap.add_argument("--prefix", default=os.path.join("output", "repro"), help="LOG.PREFIX of the runs")
    ap.add_argument("--emit-script", metavar="PATH", help="write a bash script of torchrun commands instead of running")
    ap.add_argument("--slurm", action="store_true", help="with --emit-script: a SLURM array script, one run per task")
    ap.add_argument("--collect", action="store_true", help="aggregate the runs' summary.json files")
    ap.add_argument("--out-md", help="with --collect: write the Markdown table here (default: stdout)")
    ap.add_argument("--out-csv", help="with --collect: also write a CSV")
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
    table = args.table.lower()
    plans, runs = plan_table(cells_of(cells, table), args.seeds, args.configs_root)
    repo_root = os.path.dirname(os.path.abspath(args.configs_root))
    if args.dry_run:
        return do_dry_run(plans, runs, table, args.prefix)
    if args.emit_script:
        from mdistiller.reproduce.script import bash_script, slurm_script

        check_complete(plans, table)
        text = (slurm_script if args.slurm else bash_script)(runs, args.prefix, table)
        with open(args.emit_script, "w") as f:
            f.write(text)
        os.chmod(args.emit_script, 0o755)
        print(f"wrote {args.emit_script}: {len(runs)} runs")
        return 0
    if args.collect:
        from mdistiller.reproduce.collect import collect, to_markdown, write_csv

        rows = collect(plans, args.prefix, repo_root)
        md = to_markdown(table, rows)
        if args.out_md:
            with open(args.out_md, "w") as f:
                f.write(md)
        else:
            sys.stdout.write(md)
        if args.out_csv:
            write_csv(rows, args.out_csv)
        return 0
    return do_run(plans, runs, table, args.prefix, repo_root)


if __name__ == "__main__":
    run_cli(main)
