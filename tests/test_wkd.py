"""WKD-L and WKD-F (Lv et al., NeurIPS 2024) against the authors' formulas written out here with loops (float64, none
of the library's losses): the Sinkhorn plan and distance, WKD-L's target and non-target parts, the CKA cost and its
sharpening, WKD-F's per-cell Gaussians, the cosine weight schedule; which parameters train, the config errors, the
cost's checkpoint-hash cache, the builder's teacher pass, and 2-epoch CLI runs on Fashion-MNIST."""

import hashlib
import json
import math
import os

import pytest
import torch

from cli_runs import FM_CONFIGS, SMALL, train_main
from data_fixtures import write_cifar100
from mdistiller.config import load_config
from mdistiller.distillers import DISTILL
from mdistiller.distillers.wkd import cosine_decayed, sinkhorn, sinkhorn_distance, wkd_logit_loss
from mdistiller.distillers.wkd_feature import wkd_feature_loss
from mdistiller.engine import build_run
from mdistiller.engine import wkd_cost
from mdistiller.models import build_model
from mdistiller.utils.errors import ConfigError
from test_fsp_cc_ickd import batch, make, rand

NOT_SET = "ignore:WKDL's cost matrix was never set"


# ---------------------------------------------------------------- plain formulas

def softmax(z, t=1.0):
    m = max(z)
    e = [math.exp((v - m) / t) for v in z]
    return [v / sum(e) for v in e]


def plain_sinkhorn_wd(p, q, cost, reg, iters):
    """(plan, sum_ij plan_ij cost_ij) of the authors' sinkhorn for one sample; cost already relu'd + 1e-8."""
    n = len(p)
    k = [[math.exp(-cost[i][j] / reg) for j in range(n)] for i in range(n)]
    u, v = [1.0 / n] * n, [0.0] * n
    for _ in range(iters):
        v = [q[j] / (sum(k[i][j] * u[i] for i in range(n)) + 1e-8) for j in range(n)]
        u = [p[i] / (sum(k[i][j] * v[j] for j in range(n)) + 1e-8) for i in range(n)]
    plan = [[u[i] * k[i][j] * v[j] for j in range(n)] for i in range(n)]
    return plan, sum(plan[i][j] * cost[i][j] for i in range(n) for j in range(n))


def plain_wkdl(zs, zt, labels, cost, temperature, reg, iters):
    """(target part, non-target WD) of `wkd_logit_loss_with_speration` before gamma, batch-averaged."""
    target, wd = 0.0, 0.0
    for s, t, y in zip(zs, zt, labels):
        target -= softmax(t)[y] * math.log(softmax(s)[y])
        keep = [c for c in range(len(s)) if c != y]
        sub = [[max(cost[i][j], 0.0) + 1e-8 for j in keep] for i in keep]
        wd += plain_sinkhorn_wd(softmax([s[c] for c in keep], temperature), softmax([t[c] for c in keep], temperature),
                                sub, reg, iters)[1]
    return target / len(zs), wd / len(zs)


def plain_cka(x, y):
    """Linear CKA of two lists of n rows, centred over the rows: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)."""
    def centred(a):
        means = [sum(r[d] for r in a) / len(a) for d in range(len(a[0]))]
        return [[r[d] - means[d] for d in range(len(r))] for r in a]

    def fro2(a, b):  # ||A^T B||_F^2
        return sum(sum(a[k][i] * b[k][j] for k in range(len(a))) ** 2
                   for i in range(len(a[0])) for j in range(len(b[0])))

    x, y = centred(x), centred(y)
    return fro2(y, x) / math.sqrt(fro2(x, x) * fro2(y, y))


def plain_gaussian_w2(fs, ft, grid, eps):
    """(mean_loss, cov_loss) of `wkd_feature_loss` with `adaptive_avg_std_pool2d`'s floor/ceil cells."""
    b, c, h, w = len(fs), len(fs[0]), len(fs[0][0]), len(fs[0][0][0])

    def cells(size):
        return [(math.floor(a * size / grid), math.ceil((a + 1) * size / grid)) for a in range(grid)]

    def stats(vals):
        m = sum(vals) / len(vals)
        return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1) + eps)

    mean_loss = cov_loss = 0.0
    for n in range(b):
        for ch in range(c):
            for r0, r1 in cells(h):
                for c0, c1 in cells(w):
                    ms, ss = stats([fs[n][ch][i][j] for i in range(r0, r1) for j in range(c0, c1)])
                    mt, st = stats([ft[n][ch][i][j] for i in range(r0, r1) for j in range(c0, c1)])
                    mean_loss += (ms - mt) ** 2
                    cov_loss += (ss - st) ** 2
    return mean_loss / (b * grid**2), cov_loss / (b * grid**2)


# ---------------------------------------------------------------- WKD-L

def test_sinkhorn_distance_matches_the_loop():
    p, q = torch.softmax(rand(3, 5, seed=1), 1), torch.softmax(rand(3, 5, seed=2), 1)
    cost = rand(5, 5, seed=3).abs()
    cost = (cost + cost.t()) / 2
    want = [plain_sinkhorn_wd(p[b].tolist(), q[b].tolist(), (cost + 1e-8).tolist(), 0.05, 10)[1] for b in range(3)]
    got = sinkhorn_distance(p, q, cost, 0.05, 10)
    assert got.item() == pytest.approx(sum(want) / 3, rel=1e-10)


def test_sinkhorn_plan_marginals_converge_to_both_distributions():
    p, q = torch.softmax(rand(2, 6, seed=4), 1), torch.softmax(rand(2, 6, seed=5), 1)
    cost = 1 - torch.exp(-rand(6, 6, seed=6).abs())
    plan = sinkhorn(p, q, torch.exp(-(cost + 1e-8) / 0.05).expand(2, -1, -1), 2000)
    # up to the 1e-8 the authors add to each denominator, which stalls the columns near 1e-5 (K is down to e^-20)
    first = sinkhorn(p, q, torch.exp(-(cost + 1e-8) / 0.05).expand(2, -1, -1), 1)
    torch.testing.assert_close(plan.sum(-1), p, atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(-2), q, atol=1e-4, rtol=0)
    assert (plan.sum(-2) - q).abs().max() < 1e-3 * (first.sum(-2) - q).abs().max()
    assert (plan >= 0).all()


def test_wkd_logit_loss_matches_the_loop_and_drops_the_target():
    zs, zt = rand(4, 7, seed=7) * 3, rand(4, 7, seed=8) * 3
    labels = torch.tensor([0, 3, 6, 3])
    cost = rand(7, 7, seed=9)  # negative entries too: relu'd
    want_t, want_wd = plain_wkdl(zs.tolist(), zt.tolist(), labels.tolist(), cost.tolist(), 4.0, 0.05, 10)
    got_t, got_wd = wkd_logit_loss(zs.float(), zt.float(), labels, cost.float(), 4.0, 0.05, 10)
    assert got_t.item() == pytest.approx(want_t, rel=1e-5)
    assert got_wd.item() == pytest.approx(want_wd, rel=1e-4)
    # the target row and column of the cost are never read
    changed = cost.clone()
    changed[0, :] = changed[:, 0] = 100.0
    only = labels == 0
    a = wkd_logit_loss(zs[only].float(), zt[only].float(), labels[only], cost.float(), 4.0, 0.05, 10)[1]
    b = wkd_logit_loss(zs[only].float(), zt[only].float(), labels[only], changed.float(), 4.0, 0.05, 10)[1]
    assert a.item() == b.item()


@pytest.mark.filterwarnings(NOT_SET)
def test_wkdl_terms_are_the_plain_formula_with_the_scheduled_gamma():
    d = make("WKDL", "WKDL.T", "3.0", "WKDL.WEIGHT", "50", "WKDL.COSINE_DECAY_EPOCH", "150")
    raw = rand(100, 100, seed=10).abs().float()
    d.set_cost_matrix(raw)
    x, y = batch()
    for epoch in (1, 195):  # SOLVER.EPOCHS 240
        terms = d.train_forward(x, y, epoch).terms
        assert list(terms) == ["ce", "wkd_target", "wkd_logit"] and terms["wkd_logit"].kind == DISTILL
        with torch.no_grad():
            zs, zt = d.student(x)[0], d.teacher(x)[0]
        want_t, want_wd = plain_wkdl(zs.double().tolist(), zt.double().tolist(), y.tolist(),
                                     (1 - torch.exp(-raw.double())).tolist(), 3.0, 0.05, 10)
        gamma = 50.0 if epoch == 1 else 25.0  # half-way through the decay
        assert terms["wkd_target"].value.item() == pytest.approx(want_t, rel=1e-5)
        assert terms["wkd_logit"].value.item() == pytest.approx(gamma * want_wd, rel=1e-4)


def test_cost_sharpening_and_the_fc_cost():
    d = make("WKDL", "WKDL.COST_MATRIX_SHARPEN", "2.0")
    raw = rand(100, 100, seed=11).abs().float()
    d.set_cost_matrix(raw)
    torch.testing.assert_close(d.cost_matrix, 1 - torch.exp(-2.0 * raw))
    assert bool(d.cost_ready) and d.needs_cost_pass
    d0 = make("WKDL", "WKDL.COST_MATRIX_SHARPEN", "0")
    d0.set_cost_matrix(raw)
    assert torch.equal(d0.cost_matrix, raw)
    fc = make("WKDL", "WKDL.COST_MATRIX", "fc", "WKDL.COST_MATRIX_SHARPEN", "0")
    w = fc.teacher.model.fc.weight.double()
    cos = [[(w[i] @ w[j] / (w[i].norm() * w[j].norm())).item() for j in range(5)] for i in range(5)]
    torch.testing.assert_close(fc.cost_matrix[:5, :5].double(), 1 - torch.tensor(cos, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    assert bool(fc.cost_ready) and not fc.cost_matrix.requires_grad and not fc.needs_cost_pass


def test_cka_cost_matches_the_plain_formula():
    x = rand(4, 6, 3, seed=12)
    x[2] = x[1] * 3 + 1  # CKA is invariant to isotropic scaling and shifts: classes 1 and 2 cost 0
    cost = wkd_cost.cka_cost(x)
    for i in range(4):
        for j in range(4):
            assert cost[i, j].item() == pytest.approx(1 - plain_cka(x[i].tolist(), x[j].tolist()), abs=1e-6)
    assert torch.allclose(cost.diagonal(), torch.zeros(4), atol=1e-6) and abs(cost[1, 2].item()) < 1e-6
    torch.testing.assert_close(cost, cost.t())


class LabelTeacher(torch.nn.Module):
    """Logits = the image's first 3 pixel values (to read back which images were kept)."""

    def forward(self, images):
        return images.flatten(1)[:, :3], {}


def test_class_logits_keep_each_class_first_images_in_order():
    images = rand(11, 3, 2, 2, seed=13).float()
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 1, 2, 0, 1])
    batches = [(images[i:i + 4], labels[i:i + 4]) for i in range(0, 11, 4)]
    n = wkd_cost.smallest_class_count(labels, 3)
    kept = wkd_cost.collect_class_logits(LabelTeacher(), batches, 3, n)
    assert n == 3 and kept.shape == (3, 3, 3)
    for k in range(3):
        first = [i for i in range(11) if labels[i] == k][:3]
        torch.testing.assert_close(kept[k], images.flatten(1)[first, :3])
    with pytest.raises(ConfigError, match="WKDL.COST_MATRIX: cka needs 2 training images of every class, class 3"):
        wkd_cost.smallest_class_count(labels, 4)


def test_cost_cache_is_keyed_by_checkpoint_hash(tmp_path):
    images = rand(12, 3, 2, 2, seed=14).float()
    labels = torch.arange(12) % 3
    ckpt = tmp_path / "teacher.pth"
    ckpt.write_bytes(b"weights version 1")
    calls = []

    def batches_fn():
        calls.append(1)
        return [(images[i:i + 5], labels[i:i + 5]) for i in range(0, 12, 5)]

    def run(per_class=4):
        return wkd_cost.load_or_compute_cost(str(ckpt), LabelTeacher(), 3, per_class, batches_fn, "toy-n12", 12)

    cost, path = run()
    sha = hashlib.sha256(b"weights version 1").hexdigest()
    assert path == f"{ckpt}.wkd_cka.toy-n12.{sha[:16]}.pt" and os.path.isfile(path) and len(calls) == 1
    mtime = os.stat(path).st_mtime_ns
    again, path2 = run()  # reused, not recomputed
    assert len(calls) == 1 and path2 == path and torch.equal(again, cost) and os.stat(path).st_mtime_ns == mtime
    run(per_class=3)  # other data: recomputed
    assert len(calls) == 2
    ckpt.write_bytes(b"weights version 2")  # a re-trained teacher at the same path
    _, path3 = run()
    assert len(calls) == 3 and path3 != path and not os.path.exists(path)  # the stale cache is gone
    cost_mem, none = wkd_cost.load_or_compute_cost(None, LabelTeacher(), 3, 4, batches_fn, "toy-n12", 12)
    assert none is None and len(calls) == 4 and torch.equal(cost_mem, cost)


def test_builder_installs_the_teacher_cka_cost_and_caches_it(tmp_path):
    data = write_cifar100(str(tmp_path), n_train=250, n_test=20)  # classes 0-49: 3 images, 50-99: 2
    torch.manual_seed(0)
    teacher = build_model("resnet8", "cifar100")
    ckpt = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, ckpt)
    cfg = load_config(None, [
        "DATASET.TYPE", "cifar100", "DATASET.ROOT", str(tmp_path), "DATASET.DOWNLOAD", "False",
        "DISTILLER.TYPE", "WKDL", "DISTILLER.TEACHER", "resnet8", "DISTILLER.STUDENT", "resnet8",
        "DISTILLER.TEACHER_CKPT", str(ckpt), "EXPERIMENT.DEVICE", "cpu", "SOLVER.BATCH_SIZE", "16",
        "SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[]", "DATASET.TEST.BATCH_SIZE", "64"])
    run = build_run(cfg)
    from mdistiller.data.cifar100 import MEAN, STD
    images, labels = data["train"]
    x = (torch.as_tensor(images, dtype=torch.float32) / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(STD).view(1, 3, 1, 1)
    teacher.eval()
    with torch.no_grad():
        logits = teacher(x)[0]
    labels = torch.as_tensor(labels)
    per_class = torch.stack([logits[labels == k][:2] for k in range(100)])
    want = 1 - torch.exp(-wkd_cost.cka_cost(per_class))
    torch.testing.assert_close(run.distiller.cost_matrix, want, rtol=1e-4, atol=1e-5)
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16]
    assert os.path.isfile(f"{ckpt}.wkd_cka.cifar100-n250.{sha}.pt") and bool(run.distiller.cost_ready)
    real, calls = wkd_cost.collect_class_logits, []
    wkd_cost.collect_class_logits = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        again = build_run(cfg).distiller  # a second run on the same teacher: loaded from the cache
    finally:
        wkd_cost.collect_class_logits = real
    assert calls == [] and torch.equal(again.cost_matrix, run.distiller.cost_matrix)


# ---------------------------------------------------------------- WKD-F

@pytest.mark.parametrize("grid,size", [(1, 5), (2, 4), (4, 7), (3, 8)])
def test_wkd_feature_loss_matches_the_loop(grid, size):
    fs, ft = rand(2, 3, size, size, seed=15), rand(2, 3, size, size, seed=16) * 2 + 1
    want = plain_gaussian_w2(fs.tolist(), ft.tolist(), grid, 1e-5)
    got = wkd_feature_loss(fs, ft, grid, 1e-5)
    assert [g.item() for g in got] == pytest.approx(list(want), rel=1e-10)


def test_wkdf_term_weights_the_two_parts_and_trains_student_and_projector():
    d = make("WKDF", "WKDF.WEIGHT", "0.5", "WKDF.MEAN_COV_RATIO", "3.0", "WKDF.SPATIAL_GRID", "2")
    x, y = batch()
    term = d.train_forward(x, y, 1).terms["wkd_feat"]
    with torch.no_grad():
        f_s = d.projector(d.student(x)[1]["feats"][-1])
        mean_loss, cov_loss = plain_gaussian_w2(f_s.double().tolist(), d.teacher(x)[1]["feats"][-1].double().tolist(),
                                                2, 1e-5)
    assert term.value.item() == pytest.approx(0.5 * (3.0 * mean_loss + cov_loss), rel=1e-4)
    term.value.backward()
    trained = {n.split(".")[0] for n, p in d.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {"student", "projector"}


@pytest.mark.filterwarnings(NOT_SET)
def test_wkdl_trains_the_student_only():
    d = make("WKDL")
    d.set_cost_matrix(rand(100, 100, seed=17).abs().float())
    x, y = batch()
    terms = d.train_forward(x, y, 1).terms
    (terms["wkd_target"].value + terms["wkd_logit"].value).backward()
    trained = {n.split(".")[0] for n, p in d.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {"student"} and all(p.grad is None for p in d.teacher.parameters())


def test_projectors_and_shapes():
    shuffle = make("WKDF", "WKDF.SPATIAL_GRID", "4", student="ShuffleV1", teacher="wrn_40_2")
    assert isinstance(shuffle.projector.conv, torch.nn.ConvTranspose2d)  # 4x4 onto 8x8, as mdistiller's ConvReg
    b = make("WKDF", "WKDF.PROJECTOR", "bottleneck")
    convs = (b.projector.conv1, b.projector.conv2, b.projector.conv3)
    assert [m.kernel_size for m in convs] == [(1, 1), (3, 3), (1, 1)]
    assert b.projector.conv1.out_channels == 256
    x, _ = batch()
    assert b.projector(b.student(x)[1]["feats"][-1]).shape == b.teacher(x)[1]["feats"][-1].shape


# ---------------------------------------------------------------- schedule and config errors

def test_cosine_weight_schedule():
    assert cosine_decayed(800, 150, 150, 240) == 800 and cosine_decayed(800, 1, 150, 240) == 800
    assert cosine_decayed(800, 195, 150, 240) == pytest.approx(400)
    assert cosine_decayed(800, 240, 150, 240) == pytest.approx(0, abs=1e-9)
    assert cosine_decayed(800, 151, 150, 240) == pytest.approx(400 * (1 + math.cos(math.pi / 90)))
    assert cosine_decayed(30, 1, 0, 100) == pytest.approx(15 * (1 + math.cos(math.pi / 100)))
    assert cosine_decayed(5, 3, 4, 4) == 5 and cosine_decayed(5, 2, 9, 2) == 5  # no decay within the run


@pytest.mark.parametrize("overrides,match", [
    (["DISTILLER.TYPE", "WKDL", "WKDL.COST_MATRIX", "euclid"], "WKDL.COST_MATRIX: one of cka, fc"),
    (["DISTILLER.TYPE", "WKDL", "WKDL.SINKHORN.LAMBDA", "0.0"], "WKDL.SINKHORN.LAMBDA"),
    (["DISTILLER.TYPE", "WKDL", "WKDL.SINKHORN.ITER", "0"], "WKDL.SINKHORN.ITER"),
    (["DISTILLER.TYPE", "WKDL", "WKDL.T", "0.0"], "WKDL.T"),
    (["DISTILLER.TYPE", "WKDL", "WKDL.COST_MATRIX_SHARPEN", "-1.0"], "WKDL.COST_MATRIX_SHARPEN"),
    (["DISTILLER.TYPE", "WKDL", "WKDL.COSINE_DECAY_EPOCH", "-1"], "WKDL.COSINE_DECAY_EPOCH"),
    (["DISTILLER.TYPE", "WKDF", "WKDF.SPATIAL_GRID", "0"], "WKDF.SPATIAL_GRID: must be >= 1"),
    (["DISTILLER.TYPE", "WKDF", "WKDF.PROJECTOR", "mlp"], "WKDF.PROJECTOR: one of conv1x1, bottleneck"),
    (["DISTILLER.TYPE", "WKDF", "WKDF.PROBE", "noise"], "WKDF.PROBE"),
    (["DISTILLER.TYPE", "WKDF", "WKDF.WEIGHT", "-0.1"], "WKDF.WEIGHT"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_build_errors_name_the_key():
    with pytest.raises(ConfigError, match="WKDF.SPATIAL_GRID: a 8x8 grid on the teacher's 8x8 map"):
        make("WKDF", "WKDF.SPATIAL_GRID", "8")
    with pytest.raises(ConfigError, match="WKDF.HINT_LAYER: 4 is not a stage"):
        make("WKDF", "WKDF.HINT_LAYER", "4")
    with pytest.raises(ConfigError, match="WKDF.PROJECTOR: bottleneck needs maps of one size"):
        make("WKDF", "WKDF.PROJECTOR", "bottleneck", student="ShuffleV1", teacher="wrn_40_2")
    with pytest.raises(ConfigError, match="WKDF.HINT_LAYER: no regressor"):
        make("WKDF", "WKDF.SPATIAL_GRID", "1", student="MobileNetV2", teacher="resnet8")  # 2x2 onto 8x8


# ---------------------------------------------------------------- the CLI, 2 epochs on Fashion-MNIST

def _train(tmp_path, method_dir, teacher_ckpt, *overrides):
    cfg = os.path.join(FM_CONFIGS, method_dir, "resnet20_resnet8.yaml")
    small = [*SMALL]
    small[small.index("SOLVER.EPOCHS") + 1] = "2"
    small[small.index("SOLVER.LR_DECAY_STAGES") + 1] = "[2]"
    train_main()(["--cfg", cfg, "LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", "run",
                   "DISTILLER.TEACHER_CKPT", teacher_ckpt, *small, *overrides])
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("method_dir,overrides,terms", [
    ("wkdl", [], {"ce", "wkd_target", "wkd_logit"}),
    ("wkdl", ["DISTILLER.TYPE", "WKDL++"], {"ce", "wkd_target", "wkd_logit", "dino"}),
    ("wkdl", ["SOLVER.UPDATE_RULE", "dot", "WKDL.COSINE_DECAY_EPOCH", "1"], {"ce", "wkd_target", "wkd_logit"}),
    ("wkdf", [], {"ce", "wkd_feat"}),
])
def test_train_cli_two_epochs(method_dir, overrides, terms, small_teacher_ckpt, tmp_path):
    records = _train(tmp_path, method_dir, small_teacher_ckpt, *overrides)
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        logged = {k[len("loss/"):] for k in r if k.startswith("loss/") and not k.endswith("_total")}
        assert logged == terms and all(math.isfinite(r[f"loss/{t}"]) for t in terms)
    decayed = "WKDL.COSINE_DECAY_EPOCH" in overrides
    for t in terms - {"ce"}:
        assert records[0][f"loss/{t}"] != 0
        assert (records[1][f"loss/{t}"] == 0) == (decayed and t == "wkd_logit")  # weight 0 at the last epoch
    if method_dir == "wkdl":  # the teacher pass was cached next to the teacher checkpoint
        sha = hashlib.sha256(open(small_teacher_ckpt, "rb").read()).hexdigest()[:16]
        assert os.path.isfile(f"{small_teacher_ckpt}.wkd_cka.fashion_mnist-n320.{sha}.pt")
