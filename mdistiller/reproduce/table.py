"""The published cells of paper_results.csv, keyed by table id `<paper>-<table>` (e.g. dot-3a, kdpp-1), plus the
offline proxy tables of proxy_tables.csv (e.g. proxy-fmnist), which have the same columns and no published number."""

import csv
from dataclasses import dataclass

from ..reference import PAPER_RESULTS_CSV, PROXY_TABLES_CSV
from ..utils.errors import UserError

# Paper short names by the start of the CSV's `source` column; the DOT appendix shares the paper's id space
# (its tables are numbered 6-8, after the paper's 1-5).
PAPER_IDS = (("DOT paper", "dot"), ("DOT appendix", "dot"), ("KD++ paper", "kdpp"), ("DKD appendix", "dkd"),
             ("mdistiller README", "mdistiller"), ("mdistiller proxy", "proxy"))


@dataclass(frozen=True)
class Cell:
    table: str  # table id, e.g. dot-3a
    dataset: str
    teacher: str
    student: str
    method: str
    note: str
    top1: object  # float, or None where nothing is published (proxy tables)


def paper_id(source):
    for prefix, short in PAPER_IDS:
        if source.startswith(prefix):
            return short
    raise UserError(f"paper_results.csv: unknown source {source!r}; add it to PAPER_IDS in {__name__}")


def load_cells(*paths):
    """Cells of the given CSVs; by default the published results followed by the proxy tables."""
    rows = []
    for path in paths or (PAPER_RESULTS_CSV, PROXY_TABLES_CSV):
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    return [Cell(f"{paper_id(r['source'])}-{r['table'].strip().lower()}", r["dataset"].strip(), r["teacher"].strip(),
                 r["student"].strip(), r["method"].strip(), r["note"].strip(),
                 float(r["top1"]) if r["top1"].strip() else None)
            for r in rows]


def table_ids(cells):
    """Ids in first-appearance order."""
    return list(dict.fromkeys(c.table for c in cells))


def cells_of(cells, table):
    chosen = [c for c in cells if c.table == table]
    if not chosen:
        raise UserError(f"unknown table {table!r}; `tools/reproduce.py --list` shows the known ids")
    return chosen
