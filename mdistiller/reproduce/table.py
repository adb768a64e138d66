"""The published cells of paper_results.csv, keyed by table id `<paper>-<table>` (e.g. dot-3a, kdpp-1), plus the
offline proxy tables of proxy_tables.csv (e.g. proxy-fmnist), which have the same columns and no published number,
and the detection tables of detection_results.csv (kdpp-3), whose number is COCO AP with AP50 and AP75 beside it.
A CSV's metric is the first of METRICS its header has."""

import csv
from dataclasses import dataclass

from ..reference import DETECTION_RESULTS_CSV, PAPER_RESULTS_CSV, PROXY_TABLES_CSV
from ..utils.errors import UserError

# metric column -> the further published columns shown beside it (collect reads last_<column> of each)
METRICS = {"top1": (), "AP": ("AP50", "AP75")}

# Paper short names by the start of the CSV's `source` column; the DOT appendix shares the paper's id space
# (its tables are numbered 6-8, after the paper's 1-5).
PAPER_IDS = (("DOT paper", "dot"), ("DOT appendix", "dot"), ("KD++ paper", "kdpp"), ("DKD appendix", "dkd"),
             ("mdistiller README", "mdistiller"), ("mdistiller proxy", "proxy"), ("CRD paper", "crd"),
             ("ICKD README", "ickd"), ("SimKD README", "simkd"), ("CTKD README", "ctkd"),
             ("WKD README", "wkd"), ("LS-KD README", "lskd"),
             ("SSKD README", "sskd"))


@dataclass(frozen=True)
class Cell:
    table: str  # table id, e.g. dot-3a
    dataset: str
    teacher: str
    student: str
    method: str
    note: str
    published: object  # the metric's number: float, or None where nothing is published (proxy tables)
    metric: str = "top1"  # a key of METRICS
    extra: tuple = ()  # ((column, float or None), ...): the metric's further published columns (AP50, AP75)


def paper_id(source):
    for prefix, short in PAPER_IDS:
        if source.startswith(prefix):
            return short
    raise UserError(f"paper_results.csv: unknown source {source!r}; add it to PAPER_IDS in {__name__}")


def _number(text):
    return float(text) if text.strip() else None


def _metric(path, header):
    for metric in METRICS:
        if metric in header:
            return metric
    raise UserError(f"{path}: no metric column; the header needs one of {', '.join(METRICS)}")


def load_cells(*paths):
    """Cells of the given CSVs; by default the published results, the proxy tables, then the detection tables."""
    cells = []
    for path in paths or (PAPER_RESULTS_CSV, PROXY_TABLES_CSV, DETECTION_RESULTS_CSV):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            metric = _metric(path, reader.fieldnames or ())
            cells += [Cell(f"{paper_id(r['source'])}-{r['table'].strip().lower()}", r["dataset"].strip(),
                           r["teacher"].strip(), r["student"].strip(), r["method"].strip(), r["note"].strip(),
                           _number(r[metric]), metric, tuple((k, _number(r[k])) for k in METRICS[metric]))
                      for r in reader]
    return cells


def table_ids(cells):
    """Ids in first-appearance order."""
    return list(dict.fromkeys(c.table for c in cells))


def cells_of(cells, table):
    chosen = [c for c in cells if c.table == table]
    if not chosen:
        raise UserError(f"unknown table {table!r}; `tools/reproduce.py --list` shows the known ids")
    return chosen
