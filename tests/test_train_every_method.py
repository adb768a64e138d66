"""`tools/train.py` trains one epoch on a Fashion-MNIST subset for every DISTILLER.TYPE the registry knows, with the
vanilla trainer and with DOT.

Each method runs from its own Fashion-MNIST config where there is one (so the shipped configs are exercised end
to end), else from the KD config with DISTILLER.TYPE overridden (which is how a "++" variant of any method is
selected). The teacher is a resnet20 trained here for one epoch. What is checked is the contract a user relies
on: the run completes, its metrics.jsonl has exactly the method's own loss terms, each finite and non-zero (the
cross-entropy plus the distillation terms its paper defines, named in OWN_TERMS below; a "++" method adds
`loss/dino`), and summary.json is written. A method that silently stops adding its distillation term, or adds it
with weight zero, fails here.
"""

import glob
import json
import math
import os

import pytest
import yaml

from cli_runs import FM_CONFIGS, KD_CFG, SMALL, train_main
from mdistiller.distillers import DISTILLER_REGISTRY

# Each method's distillation terms, by the names its runs log (`loss/<name>`), written out here rather than read
# from the distillers, so that a term the code drops or renames is caught. Every method also logs `ce`.
OWN_TERMS = {
    "NONE": (), "KD": ("kd",), "DKD": ("dkd",), "CTKD": ("kd",), "DIST": ("dist",), "CRD": ("crd",),
    "REVIEWKD": ("reviewkd",), "AT": ("at",), "FITNET": ("fitnet",), "KDSVD": ("kdsvd",), "NST": ("nst",),
    "OFD": ("ofd",), "PKT": ("pkt",), "RKD": ("rkd",), "SP": ("sp",), "SRRL": ("fm", "sr"), "VID": ("vid",),
    "WKDL": ("wkd_target", "wkd_logit"), "WKDF": ("wkd_feat",), "MLKD": ("kd", "cc", "bc"),
    "SSKD": ("kd", "tf", "ss"), "FT": ("ft",), "AB": ("ab",),
    "FSP": ("fsp",), "CC": ("cc",), "ICKD": ("kd", "ickd"), "SIMKD": ("simkd",), "CATKD": ("cat",),
}
# Methods whose published loss has no cross-entropy (SimKD: `-c 0`, the feature loss alone).
NO_CE = {"SIMKD"}
# Overrides that give a one-epoch run every term: FSP's published recipe is an FSP-only stage, then the CE alone
# (tests/test_fsp_cc_ickd.py runs both stages), so here its one-stage variant, FSP beside the CE at weight 1.
ONE_EPOCH = {"FSP": ["FSP.INIT_EPOCHS", "0", "FSP.LOSS.FEAT_WEIGHT", "1"],
             # SSKD: its teacher SS-head stage is one term on the teacher's head (tests/test_sskd.py runs both stages)
             "SSKD": ["SSKD.INIT_EPOCHS", "0"],
             # FT and AB: their published recipes start with an init stage of another term (tests/test_ft_ab.py runs
             # both stages), so here FT without it and AB beside the CE at weight 1
             "FT": ["FT.INIT_EPOCHS", "0"], "AB": ["AB.INIT_EPOCHS", "0", "AB.LOSS.FEAT_WEIGHT", "1"],
             # WKD's weights decay to 0 at the last epoch after COSINE_DECAY_EPOCH (the section default 0): a
             # one-epoch run (X++ on the KD config with the section's defaults) keeps them whole up to epoch 1
             "WKDL": ["WKDL.COSINE_DECAY_EPOCH", "1"], "WKDF": ["WKDF.COSINE_DECAY_EPOCH", "1"]}


def expected_terms(method):
    """{"loss/ce", "loss/<term>", ...} for `method`; "X++" is X's terms plus the dino term."""
    base = method[:-2] if method.endswith("++") else method
    names = (() if base in NO_CE else ("ce",)) + OWN_TERMS[base] + (("dino",) if method.endswith("++") else ())
    return {f"loss/{n}" for n in names}


def test_every_registered_method_has_its_terms_written_out():
    # the package's own methods (another test registers a user's method, as the README shows, in this process)
    ours = [m for m in DISTILLER_REGISTRY.names() if DISTILLER_REGISTRY.get(m).__module__.startswith("mdistiller.")]
    assert {m[:-2] if m.endswith("++") else m for m in ours} == set(OWN_TERMS)


def _config_for(method):
    """The Fashion-MNIST config whose DISTILLER.TYPE is `method` (None if there is none)."""
    for path in sorted(glob.glob(os.path.join(FM_CONFIGS, "*", "*.yaml"))):
        if os.path.basename(path).startswith("_"):
            continue
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if (data.get("DISTILLER") or {}).get("TYPE") == method:
            return path
    return None


@pytest.mark.parametrize("trainer", ["vanilla", "dot"])
@pytest.mark.parametrize("method", DISTILLER_REGISTRY.names())
def test_train_tool_runs_one_epoch(method, trainer, small_teacher_ckpt, tmp_path):
    cfg_path = _config_for(method)
    overrides = ([] if cfg_path else ["DISTILLER.TYPE", method]) + ["SOLVER.UPDATE_RULE", trainer]
    overrides += ONE_EPOCH.get(method[:-2] if method.endswith("++") else method, [])
    cfg_path = cfg_path or KD_CFG
    train_main()(["--cfg", cfg_path, "LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", "run",
                   "DISTILLER.TEACHER_CKPT", small_teacher_ckpt, *SMALL, *overrides])
    run = tmp_path / "run"
    with open(run / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 1 and records[0]["epoch"] == 1
    record = records[0]
    totals = {k: record[k] for k in ("loss/task_total", "loss/distill_total") if k in record}
    terms = {k: v for k, v in record.items() if k.startswith("loss/") and k not in totals}
    assert set(terms) == expected_terms(method), f"{method} logged {sorted(terms)}"
    bad = {k: v for k, v in terms.items() if not (math.isfinite(v) and v != 0)}
    assert not bad, f"{method}: terms that are zero or not finite: {bad}"
    # the per-kind totals (what DOT balances) are the terms' sums: the task total is the CE, the rest distill
    distill = sum(v for k, v in terms.items() if k != "loss/ce")
    ce = terms.get("loss/ce", 0.0)
    assert totals.get("loss/task_total", ce) == pytest.approx(ce, rel=1e-5)
    assert totals.get("loss/distill_total", 0.0) == pytest.approx(distill, rel=1e-5)
    assert record["train_loss"] == pytest.approx(ce + distill, rel=1e-5)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["distiller"] == method and summary["trainer"] == trainer and summary["epochs"] == 1
