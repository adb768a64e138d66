"""FSP, CC and ICKD against their published formulas written out here with loops (float64, none of the library's
losses), which parameters each term trains, FSP's initialisation stage, and the config errors."""

import glob
import math
import os

import pytest
import torch

from mdistiller.config import load_config
from mdistiller.distillers import DISTILL, DISTILLER_REGISTRY, TASK
from mdistiller.distillers.cc import cc_loss_rbf, cc_loss_repdistiller
from mdistiller.distillers.fsp import fsp_loss
from mdistiller.distillers.ickd import ickd_loss
from mdistiller.models import build_model
from mdistiller.utils.errors import ConfigError
from plain_formulas import plain_kd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(method, *overrides, student="resnet8", teacher="resnet20"):
    torch.manual_seed(0)
    cfg = load_config(None, ["DISTILLER.TYPE", method, *overrides])
    return DISTILLER_REGISTRY.get(method).build(
        cfg, build_model(student, "cifar100"), build_model(teacher, "cifar100"), None)


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 100, (n,), generator=g)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def grads_of(distiller, term, epoch=1):
    distiller.zero_grad(set_to_none=True)
    x, y = batch()
    distiller.train_forward(x, y, epoch=epoch).terms[term].value.backward()
    return {n for n, p in distiller.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_methods_are_registered_with_plus_plus():
    names = DISTILLER_REGISTRY.names()
    for m in ("FSP", "CC", "ICKD"):
        assert m in names and m + "++" in names


# ---------------------------------------------------------------- FSP

def plain_avg_pool(m, h, w):
    """m: [C][H][W] nested lists, H and W multiples of h and w; block means."""
    bh, bw = len(m[0]) // h, len(m[0][0]) // w
    return [[[sum(m[c][i * bh + a][j * bw + b] for a in range(bh) for b in range(bw)) / (bh * bw)
              for j in range(w)] for i in range(h)] for c in range(len(m))]


def plain_fsp(feats_s, feats_t):
    """Yim et al.'s G(i, j) = sum_p top_i(p) bot_j(p) / (h w) between consecutive maps, the larger map average-pooled
    to the smaller; per pair the mean over (n, i, j) of the squared difference (RepDistiller's reduction), summed."""
    def gram(bot, top):
        h, w = min(len(bot[0]), len(top[0])), min(len(bot[0][0]), len(top[0][0]))
        bot, top = plain_avg_pool(bot, h, w), plain_avg_pool(top, h, w)
        return [[sum(top[i][y][x] * bot[j][y][x] for y in range(h) for x in range(w)) / (h * w)
                 for j in range(len(bot))] for i in range(len(top))]

    total = 0.0
    for k in range(len(feats_s) - 1):
        sq, count = 0.0, 0
        for n in range(len(feats_s[0])):
            g_s = gram(feats_s[k][n], feats_s[k + 1][n])
            g_t = gram(feats_t[k][n], feats_t[k + 1][n])
            for row_s, row_t in zip(g_s, g_t):
                for a, b in zip(row_s, row_t):
                    sq += (a - b) ** 2
                    count += 1
        total += sq / count
    return total


def test_fsp_loss_by_hand():
    # one sample, one channel, 1x1 maps: G = top * bot; student (2, 3) -> G_s = 6, teacher (1, 1) -> 1: (6 - 1)^2
    s = [torch.tensor([[[[2.0]]]]), torch.tensor([[[[3.0]]]])]
    t = [torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1)]
    assert fsp_loss(s, t).item() == pytest.approx(25.0)


def test_fsp_loss_matches_loops_with_pooling():
    # three maps per network: 2ch 4x4 -> 3ch 4x4 -> 2ch 2x2 (pooled 4x4 -> 2x2 for the second pair); the teacher's
    # spatial sizes differ from the student's (only the channels must agree)
    s = [rand(2, 2, 4, 4, seed=1), rand(2, 3, 4, 4, seed=2), rand(2, 2, 2, 2, seed=3)]
    t = [rand(2, 2, 8, 8, seed=4), rand(2, 3, 4, 4, seed=5), rand(2, 2, 2, 2, seed=6)]
    expected = plain_fsp([f.tolist() for f in s], [f.tolist() for f in t])
    assert fsp_loss(s, t).item() == pytest.approx(expected, rel=1e-10)
    assert fsp_loss(s, s).item() == 0.0


def test_fsp_term_on_all_maps_and_gradients():
    d = make("FSP", "FSP.INIT_EPOCHS", "0", "FSP.LOSS.FEAT_WEIGHT", "50")
    x, y = batch()
    out = d.train_forward(x, y, epoch=1)
    fs, ft = out.student_features["feats"], out.teacher_features["feats"]
    assert len(fs) == 4  # stem + three stages
    expected = plain_fsp([f.double().tolist() for f in fs], [f.double().tolist() for f in ft])
    assert set(out.terms) == {"ce", "fsp"}
    assert out.terms["fsp"].kind == DISTILL and out.terms["ce"].kind == TASK
    assert out.terms["fsp"].value.item() == pytest.approx(50.0 * expected, rel=1e-4)
    got = grads_of(d, "fsp")
    assert any(n.startswith("student.conv1.") for n in got) and any(n.startswith("student.layer3.") for n in got)
    assert not any(n.startswith(("student.fc.", "teacher.")) for n in got)


TWO_STAGES = ["SOLVER.EPOCHS", "5", "SOLVER.LR_DECAY_STAGES", "[4]", "FSP.INIT_EPOCHS", "2"]


def test_fsp_init_stage_then_ce():
    d = make("FSP", *TWO_STAGES, "FSP.LOSS.FEAT_WEIGHT", "0")
    x, y = batch()
    for epoch in (1, 2):
        out = d.train_forward(x, y, epoch=epoch)
        assert set(out.terms) == {"fsp"} and out.terms["fsp"].kind == DISTILL
        fs, ft = out.student_features["feats"], out.teacher_features["feats"]
        expected = plain_fsp([f.double().tolist() for f in fs], [f.double().tolist() for f in ft])
        assert out.terms["fsp"].value.item() == pytest.approx(expected, rel=1e-4)  # unweighted, as published
    got = grads_of(d, "fsp", epoch=1)
    assert any(n.startswith("student.layer1.") for n in got)
    assert not any(n.startswith(("student.fc.", "teacher.")) for n in got)  # the classifier is not trained
    assert set(d.train_forward(x, y, epoch=3).terms) == {"ce"}  # the published main stage: CE alone
    assert d.prepare_capture() is not None
    d2 = make("FSP", *TWO_STAGES, "FSP.LOSS.FEAT_WEIGHT", "3")
    assert set(d2.train_forward(x, y, epoch=3).terms) == {"ce", "fsp"}


def test_fsp_refuses_channel_mismatch():
    with pytest.raises(ConfigError, match=r"DISTILLER\.STUDENT"):
        make("FSP", student="resnet8", teacher="resnet32x4")


@pytest.mark.parametrize("overrides, key", [
    (["FSP.INIT_EPOCHS", "-1"], "FSP.INIT_EPOCHS"),
    (["SOLVER.EPOCHS", "30", "SOLVER.LR_DECAY_STAGES", "[20]", "FSP.INIT_EPOCHS", "30"], "FSP.INIT_EPOCHS"),
    (["FSP.LOSS.CE_WEIGHT", "-1"], "FSP.LOSS.CE_WEIGHT"),
    (["FSP.LOSS.FEAT_WEIGHT", "-1"], "FSP.LOSS.FEAT_WEIGHT"),
    (["FSP.INIT_EPOCHS", "0", "FSP.LOSS.FEAT_WEIGHT", "0"], "FSP.LOSS.FEAT_WEIGHT"),
])
def test_fsp_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["DISTILLER.TYPE", "FSP", *overrides])


def test_fsp_cifar_configs_run_the_published_two_stages():
    paths = glob.glob(os.path.join(ROOT, "configs", "cifar100", "fsp", "*.yaml"))
    assert len(paths) == 6
    for path in paths:
        cfg = load_config(path)
        assert (cfg.FSP.INIT_EPOCHS, cfg.FSP.LOSS.FEAT_WEIGHT, cfg.FSP.LOSS.CE_WEIGHT) == (30, 0.0, 1.0)
        assert cfg.SOLVER.EPOCHS == 270 and list(cfg.SOLVER.LR_DECAY_STAGES) == [180, 210, 240]


# ---------------------------------------------------------------- CC

def plain_cc(e_s, e_t):
    """RepDistiller's CC (the authors' code): d = |e_s - e_t|, mean over i of sum_k d[i][k] d[i+1][k]."""
    d = [[abs(a - b) for a, b in zip(rs, rt)] for rs, rt in zip(e_s, e_t)]
    return sum(sum(a * b for a, b in zip(d[i], d[i + 1])) for i in range(len(d) - 1)) / (len(d) - 1)


def plain_cc_rbf(e_s, e_t, gamma, order):
    """Unit rows, k(x, y) = sum_{p<=order} e^{-2 gamma} (2 gamma)^p / p! (x.y)^p, mean squared difference."""
    def corr(e):
        unit = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in e]
        return [[sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sum(a * b for a, b in zip(x, y)) ** p
                     for p in range(order + 1)) for y in unit] for x in unit]
    c_s, c_t = corr(e_s), corr(e_t)
    n = len(e_s)
    return sum((c_s[i][j] - c_t[i][j]) ** 2 for i in range(n) for j in range(n)) / n ** 2


def plain_linear(f, weight, bias):
    return [[sum(w * v for w, v in zip(wrow, row)) + b for wrow, b in zip(weight, bias)] for row in f]


def test_cc_losses_match_loops():
    e_s, e_t = rand(5, 7, seed=1), rand(5, 7, seed=2)
    assert cc_loss_repdistiller(e_s, e_t).item() == pytest.approx(plain_cc(e_s.tolist(), e_t.tolist()), rel=1e-12)
    assert cc_loss_rbf(e_s, e_t, 0.4, 2).item() == pytest.approx(
        plain_cc_rbf(e_s.tolist(), e_t.tolist(), 0.4, 2), rel=1e-10)
    # by hand: two samples, one dimension: |1 - 0| * |3 - 1| = 2
    assert cc_loss_repdistiller(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]])).item() == 2.0


def test_cc_term_on_embedded_pooled_features_and_gradients():
    d = make("CC")
    assert d.embed_s.out_features == 128 and d.embed_t.out_features == 128
    assert d.embed_s.in_features == 64 and d.embed_t.in_features == 64
    x, y = batch()
    out = d.train_forward(x, y, epoch=1)
    s, t = out.student_features["pooled_feat"], out.teacher_features["pooled_feat"]
    e_s = plain_linear(s.double().tolist(), d.embed_s.weight.double().tolist(), d.embed_s.bias.double().tolist())
    e_t = plain_linear(t.double().tolist(), d.embed_t.weight.double().tolist(), d.embed_t.bias.double().tolist())
    assert out.terms["cc"].kind == DISTILL and out.terms["ce"].kind == TASK
    assert out.terms["cc"].value.item() == pytest.approx(0.02 * plain_cc(e_s, e_t), rel=1e-4)
    got = grads_of(d, "cc")
    assert any(n.startswith("student.layer3.") for n in got)
    assert {"embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"} <= got  # both embeddings train
    assert not any(n.startswith(("student.fc.", "teacher.")) for n in got)


def test_cc_rbf_kernel_through_the_method():
    d = make("CC", "CC.KERNEL", "gaussian_rbf", "CC.GAMMA", "0.5", "CC.P_ORDER", "3")
    x, y = batch()
    out = d.train_forward(x, y, epoch=1)
    s, t = out.student_features["pooled_feat"], out.teacher_features["pooled_feat"]
    e_s = plain_linear(s.double().tolist(), d.embed_s.weight.double().tolist(), d.embed_s.bias.double().tolist())
    e_t = plain_linear(t.double().tolist(), d.embed_t.weight.double().tolist(), d.embed_t.bias.double().tolist())
    assert out.terms["cc"].value.item() == pytest.approx(0.02 * plain_cc_rbf(e_s, e_t, 0.5, 3), rel=1e-4)


@pytest.mark.parametrize("key, value", [("CC.FEAT_DIM", "0"), ("CC.KERNEL", "rbf"), ("CC.GAMMA", "0"),
                                        ("CC.P_ORDER", "-1"), ("CC.LOSS.CE_WEIGHT", "-1"),
                                        ("CC.LOSS.FEAT_WEIGHT", "-1")])
def test_cc_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["DISTILLER.TYPE", "CC", key, value])


def test_cc_published_defaults():
    c = load_config(None, ["DISTILLER.TYPE", "CC"]).CC
    assert (c.FEAT_DIM, c.KERNEL, c.LOSS.CE_WEIGHT, c.LOSS.FEAT_WEIGHT) == (128, "repdistiller", 1.0, 0.02)


# ---------------------------------------------------------------- ICKD

def plain_ickd(f_s, f_t):
    """Per sample, G = F F^T over the flattened positions, each row divided by its L2 norm; sum of the squared
    differences over samples and entries, divided by channels * batch."""
    n, c = len(f_s), len(f_s[0])

    def corr(f):
        flat = [[v for row in ch for v in row] for ch in f]
        g = [[sum(a * b for a, b in zip(x, y)) for y in flat] for x in flat]
        return [[v / max(math.sqrt(sum(u * u for u in row)), 1e-12) for v in row] for row in g]

    total = 0.0
    for k in range(n):
        g_s, g_t = corr(f_s[k]), corr(f_t[k])
        total += sum((g_s[i][j] - g_t[i][j]) ** 2 for i in range(c) for j in range(c))
    return total / (c * n)


def plain_embed(f, weight, gamma, beta, eps=1e-5):
    """1x1 conv without bias, then training-mode BatchNorm (batch mean, biased batch variance), in plain float64."""
    y = torch.einsum("oc,nchw->nohw", weight, f)
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = ((y - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (y - mean) / torch.sqrt(var + eps) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


def test_ickd_loss_matches_loops_and_ignores_spatial_size():
    f_s, f_t = rand(2, 3, 2, 2, seed=1), rand(2, 3, 4, 4, seed=2)
    assert ickd_loss(f_s, f_t).item() == pytest.approx(plain_ickd(f_s.tolist(), f_t.tolist()), rel=1e-10)
    assert ickd_loss(f_t, f_t).item() == 0.0
    # by hand: one sample, two orthogonal channels (normalised G = I) vs two equal ones (rows (1, 1) / sqrt 2):
    # each row contributes (1 - 1/sqrt 2)^2 + 1/2; two rows, divided by 2 channels * 1 sample
    a = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    b = torch.tensor([[[[1.0, 1.0]], [[1.0, 1.0]]]])
    by_hand = 2 * ((1 - 1 / math.sqrt(2)) ** 2 + 0.5) / 2
    assert ickd_loss(a, b).item() == pytest.approx(by_hand, rel=1e-6)


def test_ickd_term_embeds_the_last_stage_and_gradients():
    d = make("ICKD", student="resnet8", teacher="resnet32x4")  # 64 -> 256 channels
    conv, bn = d.embed[0], d.embed[1]
    assert conv.weight.shape == (256, 64, 1, 1) and conv.bias is None and bn.num_features == 256
    x, y = batch()
    out = d.train_forward(x, y, epoch=1)
    fs, ft = out.student_features["feats"][-1], out.teacher_features["feats"][-1]
    emb = plain_embed(fs.double(), conv.weight.double()[:, :, 0, 0], bn.weight.double(), bn.bias.double())
    assert set(out.terms) == {"ce", "kd", "ickd"}
    assert out.terms["ickd"].kind == DISTILL and out.terms["kd"].kind == DISTILL and out.terms["ce"].kind == TASK
    assert out.terms["ickd"].value.item() == pytest.approx(2.5 * plain_ickd(emb.tolist(), ft.double().tolist()),
                                                           rel=1e-4)
    kd = plain_kd(out.logits.double().tolist(), out.teacher_logits.double().tolist(), 4.0)
    assert out.terms["kd"].value.item() == pytest.approx(kd, rel=1e-4)
    got = grads_of(d, "ickd")
    assert any(n.startswith("student.layer3.") for n in got)
    assert {"embed.0.weight", "embed.1.weight", "embed.1.bias"} <= got
    assert not any(n.startswith(("student.fc.", "teacher.")) for n in got)


def test_ickd_without_kd():
    d = make("ICKD", "ICKD.LOSS.KD_WEIGHT", "0")
    x, y = batch()
    assert set(d.train_forward(x, y, epoch=1).terms) == {"ce", "ickd"}


@pytest.mark.parametrize("key, value", [("ICKD.TEMPERATURE", "0"), ("ICKD.LOSS.CE_WEIGHT", "-1"),
                                        ("ICKD.LOSS.KD_WEIGHT", "-1"), ("ICKD.LOSS.FEAT_WEIGHT", "-1"),
                                        ("ICKD.LOSS.FEAT_WEIGHT", "0")])
def test_ickd_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["DISTILLER.TYPE", "ICKD", key, value])


def test_ickd_published_defaults():
    c = load_config(None, ["DISTILLER.TYPE", "ICKD"]).ICKD
    assert (c.TEMPERATURE, c.LOSS.CE_WEIGHT, c.LOSS.KD_WEIGHT, c.LOSS.FEAT_WEIGHT) == (4.0, 1.0, 1.0, 2.5)


@pytest.mark.kernels
def test_fsp_published_stages_through_the_cli_resume_across_the_switch(small_teacher_ckpt, tmp_path):
    """The published recipe's two stages in one run (FSP alone, then CE alone), and a run stopped at the switch and
    resumed ends bit-identical to one done in one go."""
    import json

    from cli_runs import FM_CONFIGS, SMALL
    from mdistiller.engine.launch import train_from_config
    from test_engine import CrashAfterEpoch, without_timing

    def cfg(name):
        return load_config(os.path.join(FM_CONFIGS, "fsp", "resnet20_resnet8.yaml"), [
            "LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", name, "DISTILLER.TEACHER_CKPT", small_teacher_ckpt,
            *SMALL, "SOLVER.EPOCHS", "2", "FSP.INIT_EPOCHS", "1", "FSP.LOSS.FEAT_WEIGHT", "0"])

    train_from_config(cfg("straight"))
    with pytest.raises(KeyboardInterrupt):
        train_from_config(cfg("moved"), extra_hooks=[CrashAfterEpoch(1)])
    train_from_config(cfg("moved"), resume=True)
    records = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("straight", "moved")}
    terms = [{k for k in r if k.startswith("loss/") and not k.endswith("_total")} for r in records["straight"]]
    assert terms == [{"loss/fsp"}, {"loss/ce"}]
    assert [without_timing(r) for r in records["straight"]] == [without_timing(r) for r in records["moved"]]
    a, b = (torch.load(tmp_path / name / "latest.pth", weights_only=False)["model"] for name in ("straight", "moved"))
    assert all(torch.equal(a[k], b[k]) for k in a)
