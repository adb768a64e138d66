"""SSKD against student.py's formulas written out here with loops (float64, none of the library's losses): the
similarity matrix, the teacher-head loss, the selective transfer's kept rows (by hand), the four student terms,
which parameters each stage trains, the head stage's LR, and the config errors."""

import glob
import math
import os

import pytest
import torch

from mdistiller.config import load_config
from mdistiller.distillers import DISTILL, DISTILLER_REGISTRY, TASK
from mdistiller.distillers.sskd import cosine_matrix, kept_rows, ss_head_loss, target_rank
from mdistiller.models import build_model
from mdistiller.utils.errors import ConfigError
from plain_formulas import kl, softmax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWO_STAGES = ["SOLVER.EPOCHS", "5", "SOLVER.LR_DECAY_STAGES", "[4]", "SSKD.INIT_EPOCHS", "2"]


def make(*overrides, student="resnet8", teacher="resnet20"):
    torch.manual_seed(0)
    cfg = load_config(None, ["DISTILLER.TYPE", "SSKD", *overrides])
    return DISTILLER_REGISTRY.get("SSKD").build(
        cfg, build_model(student, "cifar100"), build_model(teacher, "cifar100"), None)


def views(n=4, seed=1):
    """(B, 4, C, H, W): view k the rotation by k * 90 degrees of one image, as the data pipeline gives them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    return torch.stack([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)], 1), torch.randint(0, 100, (n,),
                                                                                               generator=g)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- plain formulas

def plain_cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def plain_split(rows, batch):
    """student.py nor_index / aug_index: rows 4i are normal, 4i+1..4i+3 the rotated copies, in that order."""
    return [rows[4 * i] for i in range(batch)], [rows[4 * i + k] for i in range(batch) for k in (1, 2, 3)]


def plain_simi(rows, batch):
    nor, aug = plain_split(rows, batch)
    return [[plain_cos(a, n) for n in nor] for a in aug]


def plain_rank(row, target):
    """Position of `target` in the row sorted descending; Python's sort is stable: ties by index."""
    return sorted(range(len(row)), key=lambda c: -row[c]).index(target)


def plain_keep(ranks, ratio):
    """student.py: the rows of rank 0 and int(wrong * ratio) wrong rows of smallest rank (stable: by row order)."""
    wrong = sum(1 for r in ranks if r > 0)
    order = sorted(range(len(ranks)), key=lambda r: ranks[r])
    return set(order[:len(ranks) - wrong + int(wrong * ratio)])


def plain_log_softmax(row):
    top = max(row)
    lse = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - lse for v in row]


def plain_sskd(logits_s, logits_t, rep_s, rep_t, labels, batch, kd_t=4.0, tf_t=4.0, ss_t=0.5, ratio_tf=1.0,
               ratio_ss=0.75, weights=(0.1, 0.9, 2.7, 10.0)):
    """student.py's four terms (weighted) from the 4B interleaved rows of logits and head outputs."""
    s_nor, s_aug = plain_split(logits_s, batch)
    t_nor, t_aug = plain_split(logits_t, batch)
    ce = sum(-plain_log_softmax(s)[y] for s, y in zip(s_nor, labels)) / batch

    def soft(row, temp):
        return softmax([v / temp for v in row])

    kd = sum(kl(soft(t, kd_t), soft(s, kd_t)) for s, t in zip(s_nor, t_nor)) / batch * kd_t ** 2
    aug_labels = [y for y in labels for _ in range(3)]
    keep = plain_keep([plain_rank(soft(t, tf_t), y) for t, y in zip(t_aug, aug_labels)], ratio_tf)
    tf = sum(kl(soft(t_aug[r], tf_t), soft(s_aug[r], tf_t)) for r in keep) / len(keep) * tf_t ** 2
    s_simi, t_simi = plain_simi(rep_s, batch), plain_simi(rep_t, batch)
    keep = plain_keep([plain_rank(t_simi[r], r // 3) for r in range(3 * batch)], ratio_ss)
    ss = sum(kl(soft(t_simi[r], ss_t), soft(s_simi[r], ss_t)) for r in keep) / len(keep) * ss_t ** 2
    return {name: w * v for name, w, v in zip(("ce", "kd", "tf", "ss"), weights, (ce, kd, tf, ss))}


def rows_of(d, x):
    """The 4B interleaved student and teacher logits and head outputs of the step on `x` (float64 lists)."""
    flat = x.flatten(0, 1)
    with torch.no_grad():
        logits_s, feat_s = d.student(flat)
        logits_t, feat_t = d.teacher(flat)
        rep_s, rep_t = d.student_head(feat_s["pooled_feat"]), d.teacher_head(feat_t["pooled_feat"])
    return [t.double().tolist() for t in (logits_s, logits_t, rep_s, rep_t)]


# ---------------------------------------------------------------- formulas

def test_registered_with_plus_plus_and_views():
    assert "SSKD" in DISTILLER_REGISTRY.names() and "SSKD++" in DISTILLER_REGISTRY.names()
    assert DISTILLER_REGISTRY.get("SSKD++").train_views == "rotations4"


def test_cosine_matrix_and_head_loss_match_loops():
    aug, nor = rand(6, 5, seed=1), rand(2, 5, seed=2)
    expected = [[plain_cos(a, n) for n in nor.tolist()] for a in aug.tolist()]
    got = cosine_matrix(aug, nor)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64),
                                                        atol=1e-6)
    rows = rand(8, 5, seed=3)  # two images x four views, interleaved
    simi = plain_simi(rows.tolist(), 2)
    by_loop = sum(-plain_log_softmax(row)[r // 3] for r, row in enumerate(simi)) / 6  # CE, target: the source
    assert ss_head_loss(rows, 2).item() == pytest.approx(by_loop, rel=1e-5)


def test_target_rank_and_kept_rows_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.4],   # target 1: the largest -> rank 0
                           [0.3, 0.3, 0.4],   # target 1: tied with column 0, which comes first -> rank 2
                           [0.2, 0.5, 0.3],   # target 2 -> rank 1
                           [0.6, 0.3, 0.1],   # target 2 -> rank 2
                           [0.2, 0.2, 0.6]])  # target 0: tied with column 1, which comes after it -> rank 1
    rank = target_rank(scores, torch.tensor([1, 1, 2, 2, 0]))
    assert rank.tolist() == [0, 2, 1, 2, 1]
    # one correct row (0), four wrong (ranks 2, 1, 2, 1): ratio 0.5 keeps int(4 * 0.5) = 2 of them, the two of rank 1
    assert kept_rows(rank, 0.5).tolist() == [True, False, True, False, True]
    # ratio 0.75 keeps 3: ranks 1, 1 (rows 2, 4), then of the rank-2 rows 1 and 3 the earlier one, row 1
    assert kept_rows(rank, 0.75).tolist() == [True, True, True, False, True]
    assert kept_rows(rank, 1.0).all() and kept_rows(rank, 0.0).tolist() == [True, False, False, False, False]
    assert kept_rows(torch.tensor([1, 1, 1]), 0.0).sum() == 0  # the term is then 0 (published: 0 / 0)


@pytest.mark.parametrize("ratios", [[], ["SSKD.RATIO_TF", "0.5", "SSKD.RATIO_SS", "0.4"]])
def test_student_terms_match_loops(ratios):
    d = make(*TWO_STAGES, *ratios)
    ratio_tf, ratio_ss = (1.0, 0.75) if not ratios else (0.5, 0.4)
    with torch.no_grad():  # heads far from their init, so that the similarity KL is not float32 noise
        for p in [*d.student_head.parameters(), *d.teacher_head.parameters()]:
            p.normal_()
    d.train()
    x, y = views()
    out = d.train_forward(x, y, epoch=3)
    assert set(out.terms) == {"ce", "kd", "tf", "ss"}
    assert out.terms["ce"].kind == TASK and all(out.terms[k].kind == DISTILL for k in ("kd", "tf", "ss"))
    expected = plain_sskd(*rows_of(d, x), y.tolist(), 4, ratio_tf=ratio_tf, ratio_ss=ratio_ss)
    for name, value in expected.items():
        assert out.terms[name].value.item() == pytest.approx(value, rel=1e-4), name
    # what the step hands on: the normal rows only (B rows for the hooks, the ++ term, the monitor)
    assert out.logits.shape == (4, 100) and out.teacher_logits.shape == (4, 100)
    assert out.student_features["pooled_feat"].shape == (4, 64)
    assert out.teacher_features["feats"][-1].shape[0] == 4


def test_head_stage_term_matches_loop_and_keeps_the_student_still():
    d = make(*TWO_STAGES)
    d.train()
    x, y = views()
    bn = dict(d.student.named_buffers())
    before = {k: v.clone() for k, v in bn.items()}
    out = d.train_forward(x, y, epoch=1)
    assert set(out.terms) == {"ss_head"} and out.terms["ss_head"].kind == DISTILL
    assert all(torch.equal(before[k], v) for k, v in bn.items())  # the student ran in eval mode
    _, _, _, rep_t = rows_of(d, x)
    simi = plain_simi(rep_t, 4)
    by_loop = sum(-plain_log_softmax(row)[r // 3] for r, row in enumerate(simi)) / 12
    assert out.terms["ss_head"].value.item() == pytest.approx(by_loop, rel=1e-5)
    assert d.student.training and not d.teacher_head.training
    assert out.logits.shape == (4, 100)


def grads(d, epoch, term=None):
    d.zero_grad(set_to_none=True)
    x, y = views()
    out = d.train_forward(x, y, epoch=epoch)
    loss = out.terms[term].value if term else sum(t.value for t in out.terms.values())
    loss.backward()
    return {n for n, p in d.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_gradient_reach_per_stage():
    d = make(*TWO_STAGES)
    d.train()
    head = {n for n, _ in d.named_parameters() if n.startswith("teacher_head.")}
    assert head and head <= {n for n, _ in d.named_parameters() if not n.startswith("teacher.")}
    assert grads(d, 1) == head  # init: the teacher's head alone
    main = grads(d, 3)
    assert any(n.startswith("student.layer1.") for n in main) and any(n.startswith("student.fc.") for n in main)
    assert {n for n, _ in d.named_parameters() if n.startswith("student_head.")} <= main
    assert not any(n.startswith(("teacher.", "teacher_head.")) for n in main)
    assert not any(n.startswith("student_head.") for n in grads(d, 3, "tf"))
    assert any(n.startswith("student_head.") for n in grads(d, 3, "ss"))
    # the optimizer and the checkpoints hold the teacher's head, not the teacher
    learnable = {id(p) for p in d.learnable_parameters()}
    assert all(id(p) in learnable for p in d.teacher_head.parameters())
    assert not any(id(p) in learnable for p in d.teacher.parameters())
    state = d.learnable_state_dict()
    assert any(k.startswith("teacher_head.") for k in state) and not any(k.startswith("teacher.") for k in state)


def test_stage_lr_is_the_published_multistep():
    d = make()
    lrs = {e: d.stage_lr(e) for e in (1, 30, 31, 45, 46, 60, 61, 300)}
    assert lrs == {1: 0.05, 30: 0.05, 31: pytest.approx(0.005), 45: pytest.approx(0.005),
                   46: pytest.approx(0.0005), 60: pytest.approx(0.0005), 61: None, 300: None}
    assert d.prepare_capture() is not None  # the terms change at the switch
    assert make("SSKD.INIT_EPOCHS", "0").stage_lr(1) is None


def test_refuses_a_batch_without_views():
    d = make(*TWO_STAGES)
    with pytest.raises(ValueError, match="rotations4"):
        d.train_forward(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), epoch=3)


@pytest.mark.parametrize("overrides, key", [
    (["SSKD.INIT_EPOCHS", "-1"], "SSKD.INIT_EPOCHS"),
    (["SOLVER.EPOCHS", "60", "SOLVER.LR_DECAY_STAGES", "[50]"], "SSKD.INIT_EPOCHS"),
    (["SOLVER.LR_DECAY_STAGES", "[60, 150]"], "SOLVER.LR_DECAY_STAGES"),
    (["SOLVER.EPOCHS", "300", "SOLVER.LR_DECAY_STAGES", "[210]", "SOLVER.WARMUP_EPOCHS", "5"], "SOLVER.WARMUP_EPOCHS"),
    (["LOSS_RAMP.EPOCHS", "20"], "LOSS_RAMP.EPOCHS"),
    (["SSKD.INIT_LR", "0"], "SSKD.INIT_LR"),
    (["SSKD.INIT_LR_DECAY_STAGES", "[45, 30]"], "SSKD.INIT_LR_DECAY_STAGES"),
    (["SSKD.INIT_LR_DECAY_RATE", "0"], "SSKD.INIT_LR_DECAY_RATE"),
    (["SSKD.KD_T", "0"], "SSKD.KD_T"), (["SSKD.TF_T", "-1"], "SSKD.TF_T"), (["SSKD.SS_T", "0"], "SSKD.SS_T"),
    (["SSKD.RATIO_TF", "1.5"], "SSKD.RATIO_TF"), (["SSKD.RATIO_SS", "-0.1"], "SSKD.RATIO_SS"),
    (["SSKD.LOSS.SS_WEIGHT", "-1"], "SSKD.LOSS.SS_WEIGHT"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["DISTILLER.TYPE", "SSKD", *overrides])


def test_published_defaults_and_cifar_configs():
    c = load_config(None, ["DISTILLER.TYPE", "SSKD"]).SSKD
    assert (c.INIT_EPOCHS, c.INIT_LR, list(c.INIT_LR_DECAY_STAGES), c.INIT_LR_DECAY_RATE) == (60, 0.05, [30, 45], 0.1)
    assert (c.KD_T, c.TF_T, c.SS_T, c.RATIO_TF, c.RATIO_SS) == (4.0, 4.0, 0.5, 1.0, 0.75)
    assert (c.LOSS.CE_WEIGHT, c.LOSS.KD_WEIGHT, c.LOSS.TF_WEIGHT, c.LOSS.SS_WEIGHT) == (0.1, 0.9, 2.7, 10.0)
    paths = glob.glob(os.path.join(ROOT, "configs", "cifar100", "sskd", "*.yaml"))
    assert len(paths) == 11  # command.sh's student runs
    small_lr = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}
    for path in paths:
        cfg = load_config(path)
        assert cfg.SOLVER.EPOCHS == 300 and list(cfg.SOLVER.LR_DECAY_STAGES) == [210, 240, 270]
        assert cfg.SOLVER.LR == (0.01 if cfg.DISTILLER.STUDENT in small_lr else 0.05), path
        assert (cfg.SSKD.INIT_EPOCHS, cfg.SSKD.INIT_LR, cfg.SOLVER.BATCH_SIZE) == (60, 0.05, 64)


# ---------------------------------------------------------------- through the CLI, on the rotated views

def two_epochs(tmp_path, teacher_ckpt, name, *overrides):
    """A 2-epoch Fashion-MNIST run: epoch 1 the teacher-head stage (LR 0.02), epoch 2 the student at LR 0.05."""
    from cli_runs import FM_CONFIGS, SMALL
    return load_config(os.path.join(FM_CONFIGS, "sskd", "resnet20_resnet8.yaml"), [
        "LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", name, "DISTILLER.TEACHER_CKPT", teacher_ckpt, *SMALL,
        "SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES", "[2]", "SSKD.INIT_EPOCHS", "1", "SSKD.INIT_LR", "0.02",
        *overrides])


def records_of(run):
    import json
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def loss_terms(record):
    return {k[5:] for k in record if k.startswith("loss/") and not k.endswith("_total")}


@pytest.mark.parametrize("method, rule", [("SSKD", "vanilla"), ("SSKD++", "vanilla"), ("SSKD", "dot")])
def test_two_stages_through_the_cli(method, rule, small_teacher_ckpt, tmp_path):
    from mdistiller.engine.launch import train_from_config

    cfg = two_epochs(tmp_path, small_teacher_ckpt, "run", "DISTILLER.TYPE", method, "SOLVER.UPDATE_RULE", rule)
    train_from_config(cfg)
    records = records_of(tmp_path / "run")
    dino = {"dino"} if method.endswith("++") else set()
    assert [loss_terms(r) for r in records] == [{"ss_head"} | dino, {"ce", "kd", "tf", "ss"} | dino]
    for r in records:
        assert all(math.isfinite(r["loss/" + t]) and r["loss/" + t] != 0 for t in loss_terms(r))
    assert [r["lr"] for r in records] == [pytest.approx(0.02), pytest.approx(0.05)]


@pytest.mark.kernels
def test_resume_across_the_switch_is_exact_and_the_head_stays_frozen(small_teacher_ckpt, tmp_path):
    """A run stopped after the teacher-head epoch and resumed ends bit-identical to one done in one go; the head
    the checkpoint holds after its stage is the one the run ends with (frozen in the student's epoch)."""
    from mdistiller.engine.launch import train_from_config
    from test_engine import CrashAfterEpoch, without_timing

    train_from_config(two_epochs(tmp_path, small_teacher_ckpt, "straight"))
    with pytest.raises(KeyboardInterrupt):
        train_from_config(two_epochs(tmp_path, small_teacher_ckpt, "moved"), extra_hooks=[CrashAfterEpoch(1)])
    after_head = torch.load(tmp_path / "moved" / "latest.pth", weights_only=False)["distiller"]
    train_from_config(two_epochs(tmp_path, small_teacher_ckpt, "moved"), resume=True)
    straight, moved = records_of(tmp_path / "straight"), records_of(tmp_path / "moved")
    assert [loss_terms(r) for r in straight] == [{"ss_head"}, {"ce", "kd", "tf", "ss"}]
    assert [without_timing(r) for r in straight] == [without_timing(r) for r in moved]
    a, b = (torch.load(tmp_path / name / "latest.pth", weights_only=False)["distiller"]
            for name in ("straight", "moved"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    head = [k for k in a if k.startswith("teacher_head.")]
    assert head and all(torch.equal(a[k], after_head[k]) for k in head)
    assert not all(torch.equal(a[k], after_head[k]) for k in a if k.startswith("student."))
