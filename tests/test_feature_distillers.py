"""ReviewKD, DIST and AT against hand computations, identities and every teacher/student pair of the configs.
The distillers' terms are checked against the published formulas written out here (plain Python, or plain torch
for feature maps), never against the library's own loss functions."""

import glob
import math
import os

import pytest
import torch
import torch.nn.functional as F

from mdistiller.config import load_config
from mdistiller.distillers import DISTILL, DISTILLER_REGISTRY, TASK
from mdistiller.distillers.at import at_loss, attention_map, paired_stages
from mdistiller.distillers.dist import dist_loss, inter_class_relation, intra_class_relation
from mdistiller.distillers.reviewkd import hcl_loss
from mdistiller.models import build_model, model_names
from mdistiller.utils.errors import ConfigError
from plain_formulas import softmax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ImageNet models are fully convolutional: 112x112 keeps an odd level (7x7) at a quarter of 224's cost
INPUT = {"cifar100": 32, "fashion_mnist": 32, "tiny_imagenet": 64, "imagenet": 112}


def make(distiller_type, teacher="resnet20", student="resnet8", dataset="cifar100", *overrides):
    cfg = load_config(None, ["DATASET.TYPE", dataset, "DISTILLER.TYPE", distiller_type, "DISTILLER.TEACHER",
                             teacher, "DISTILLER.STUDENT", student, *overrides])
    method = DISTILLER_REGISTRY.get(distiller_type)
    return method.build(cfg, build_model(student, dataset), build_model(teacher, dataset), None)


def images(n=4, size=32):
    """A float64 batch: the distillers below run in float64 so that the references hold to 1e-9."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(6), dtype=torch.float64)


# ---------------------------------------------------------------- the published formulas, written out


def pearson(a, b, eps=1e-8):
    """DIST's correlation (hunto/DIST_KD: cosine of the centred vectors, eps added to the product of norms)."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    da, db = [v - ma for v in a], [v - mb for v in b]
    return sum(x * y for x, y in zip(da, db)) / (math.sqrt(sum(x * x for x in da)) *
                                                 math.sqrt(sum(y * y for y in db)) + eps)


def plain_dist(student_rows, teacher_rows, beta, gamma, tau):
    """DIST (Huang et al., NeurIPS 2022): tau^2 * (beta * (1 - mean row correlation) + gamma * (1 - mean column
    correlation)) of the probabilities softmax(z / tau)."""
    ps = [softmax([v / tau for v in r]) for r in student_rows]
    pt = [softmax([v / tau for v in r]) for r in teacher_rows]
    inter = 1 - sum(pearson(a, b) for a, b in zip(ps, pt)) / len(ps)
    columns = range(len(ps[0]))
    intra = 1 - sum(pearson([r[j] for r in ps], [r[j] for r in pt]) for j in columns) / len(columns)
    return tau**2 * (beta * inter + gamma * intra)


def average_pool(f, h, w):
    """(N, C, H, W) -> (N, C, h, w) by block means (H, W multiples of h, w: every case below)."""
    n, c, big_h, big_w = f.shape
    assert big_h % h == 0 and big_w % w == 0
    return f.reshape(n, c, h, big_h // h, w, big_w // w).mean(dim=(3, 5))


def plain_attention(f, p=2):
    """Zagoruyko & Komodakis: the channel mean of f^p, flattened, divided by its L2 norm."""
    a = f.pow(p).mean(dim=1).flatten(1)
    return a / a.pow(2).sum(dim=1, keepdim=True).sqrt()


def plain_at(student_feats, teacher_feats):
    """Sum over stage pairs of mean((a_s - a_t)^2), the larger map block-averaged to the smaller's size first."""
    total = 0.0
    for fs, ft in zip(student_feats, teacher_feats):
        h, w = min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1])
        fs, ft = average_pool(fs, h, w), average_pool(ft, h, w)
        total = total + (plain_attention(fs) - plain_attention(ft)).pow(2).mean()
    return total


def plain_hcl(fused, targets):
    """ReviewKD's hierarchical context loss (dvlab-research/ReviewKD hcl): per level the MSE at full size plus the
    MSE at 4x4, 2x2, 1x1 average pooling (each pooled size only when smaller than the map) weighted 1, 1/2, 1/4, ...
    and divided by the sum of the weights; summed over levels."""
    total = 0.0
    for fs, ft in zip(fused, targets):
        loss, weight, weights = (fs - ft).pow(2).mean(), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= fs.shape[-2]:
                continue
            weight /= 2
            loss = loss + weight * (average_pool(fs, size, size) - average_pool(ft, size, size)).pow(2).mean()
            weights += weight
        total = total + loss / weights
    return total


# ---------------------------------------------------------------- DIST

P_S = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], dtype=torch.float64)
P_T = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.4, 0.1]], dtype=torch.float64)
# Rows, centred (units of 1/30): s0 = (-4, -1, 5), t0 = (5, -1, -4): r = -39/42; s1 = (8, -1, -7),
# t1 = (5, 2, -7): r = 87 / sqrt(114 * 78).
INTER = 1 - (-39 / 42 + 87 / math.sqrt(114 * 78)) / 2
# Columns (two samples each): column 0 of P_T and column 1 of P_S are constant (r = 0), column 2 falls in
# both (r = 1).
INTRA = 1 - (0 + 0 + 1) / 3


def test_dist_relations_by_hand():
    assert inter_class_relation(P_S, P_T).item() == pytest.approx(INTER, abs=1e-7)
    assert intra_class_relation(P_S, P_T).item() == pytest.approx(INTRA, abs=1e-6)
    # softmax(4 log p / 4) = p, so these logits give exactly P_S, P_T at tau 4
    loss = dist_loss(4 * P_S.log(), 4 * P_T.log(), beta=2.0, gamma=3.0, tau=4.0)
    assert loss.item() == pytest.approx(16 * (2 * INTER + 3 * INTRA), abs=1e-5)


def test_dist_zero_for_identical_logits():
    z = torch.randn(8, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    # not exactly 0: the 1e-8 that keeps constant rows finite biases each correlation by ~1e-7,
    # times tau^2 (beta + gamma) = 64
    assert dist_loss(z, z, 2.0, 2.0, 4.0).item() == pytest.approx(0.0, abs=1e-4)
    # a logit shift per sample leaves the softmax, hence the loss, unchanged
    shifted = z + torch.arange(8.0, dtype=torch.float64)[:, None]
    assert dist_loss(shifted, z, 2.0, 2.0, 4.0).item() == pytest.approx(dist_loss(z, z, 2.0, 2.0, 4.0).item(),
                                                                        rel=1e-9)


def test_dist_invariant_to_positive_affine_map_of_probabilities():
    # spread-out distributions, so the 1e-8 guard in the correlation's denominator stays below 1e-6
    g = torch.Generator().manual_seed(1)
    p_s = (3 * torch.randn(6, 5, generator=g, dtype=torch.float64)).softmax(1)
    p_t = (3 * torch.randn(6, 5, generator=g, dtype=torch.float64)).softmax(1)
    q_s = 3.0 * p_s + 0.7  # one positive scale and shift for the whole matrix: both relations unchanged
    assert inter_class_relation(q_s, p_t).item() == pytest.approx(inter_class_relation(p_s, p_t).item(), abs=1e-7)
    assert intra_class_relation(q_s, p_t).item() == pytest.approx(intra_class_relation(p_s, p_t).item(), abs=1e-7)
    # a negative scale flips every correlation: relation -> 2 - relation
    assert inter_class_relation(-p_s, p_t).item() == pytest.approx(2 - inter_class_relation(p_s, p_t).item(),
                                                                   abs=1e-7)


def test_dist_inter_and_intra_see_different_transformations():
    g = torch.Generator().manual_seed(2)
    p_t = (3 * torch.randn(6, 5, generator=g, dtype=torch.float64)).softmax(1)
    rows = torch.rand(6, 1, generator=g, dtype=torch.float64) * 4 + 0.5  # one scale per sample
    cols = torch.rand(1, 5, generator=g, dtype=torch.float64) * 4 + 0.5  # one scale per class
    by_row, by_col = p_t * rows + rows, p_t * cols - cols
    # per-sample affine maps keep every row's correlation at 1: inter is 0, intra is not
    assert inter_class_relation(by_row, p_t).item() == pytest.approx(0.0, abs=1e-7)
    assert intra_class_relation(by_row, p_t).item() > 1e-3
    # per-class affine maps keep every column's correlation at 1: intra is 0, inter is not
    assert intra_class_relation(by_col, p_t).item() == pytest.approx(0.0, abs=1e-7)
    assert inter_class_relation(by_col, p_t).item() > 1e-3


def test_plain_dist_against_the_hand_computed_relations():
    """The reference above, on the matrices whose relations are worked out by hand at the top of this section."""
    logits_s, logits_t = (4 * P_S.log()).tolist(), (4 * P_T.log()).tolist()
    # the eps in each correlation's denominator moves it by ~1e-6 relative here (16 x 5 x that in the sum)
    assert plain_dist(logits_s, logits_t, 2.0, 3.0, 4.0) == pytest.approx(16 * (2 * INTER + 3 * INTRA), abs=1e-5)


def test_dist_distiller_terms():
    distiller = make("DIST").double()
    x, y = images(), torch.tensor([3, 17, 42, 99])
    out = distiller.forward_train(x, y, epoch=1)
    logits, terms = out.logits, out.terms
    assert set(terms) == {"ce", "dist"} and terms["ce"].kind == TASK and terms["dist"].kind == DISTILL
    with torch.no_grad():
        lt = distiller.teacher(x)[0]
    assert terms["ce"].value.item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-12)
    assert terms["dist"].value.item() == pytest.approx(plain_dist(logits.tolist(), lt.tolist(), 2.0, 2.0, 4.0),
                                                       rel=1e-9)
    with pytest.raises(ConfigError, match="DIST.TAU"):
        load_config(None, ["DISTILLER.TYPE", "DIST", "DIST.TAU", "0"])


# ---------------------------------------------------------------- AT

def test_attention_map_by_hand():
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [1.0, 2.0]]]])
    # p = 2: channel mean of squares (1, 2, 5, 10), norm sqrt(130)
    expected = torch.tensor([[1.0, 2.0, 5.0, 10.0]]) / math.sqrt(130)
    torch.testing.assert_close(attention_map(f, 2), expected)
    # p = 1: channel mean of f itself, signed as published (f.pow(p), not |f|^p): (0, 1, 2, 3), norm sqrt(14)
    torch.testing.assert_close(attention_map(f, 1), torch.tensor([[0.0, 1.0, 2.0, 3.0]]) / math.sqrt(14))


def test_at_loss_by_hand():
    a = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    b = torch.tensor([[[[0.0, 7.0], [0.0, 0.0]]]])  # maps (1,0,0,0) vs (0,1,0,0): mean sq diff 2/4
    assert at_loss([a], [b]).item() == pytest.approx(0.5)
    assert at_loss([a, b], [3 * a, b]).item() == pytest.approx(0.0)  # scale-free: identical maps
    # 4x4 student vs 2x2 teacher: the student is pooled to [[1, 1], [0, 0]] -> (1,1,0,0)/sqrt2 vs (1,0,0,0)
    big = torch.zeros(1, 3, 4, 4)
    big[:, :, :2, :] = 1.0
    second = ((1 / math.sqrt(2) - 1) ** 2 + 0.5) / 4
    assert at_loss([a, big], [b, a]).item() == pytest.approx(0.5 + second, rel=1e-6)
    assert at_loss([a, big], [b, a]).item() == pytest.approx(0.5 + (2 - math.sqrt(2)) / 4, rel=1e-6)
    # the written-out reference used for the distiller below gives the same hand-computed numbers
    assert plain_at([a, big], [b, a]).item() == pytest.approx(0.5 + (2 - math.sqrt(2)) / 4, rel=1e-6)


def test_at_pairs_from_the_shallowest_stage_as_published():
    assert paired_stages(["stem", 1, 2, 3, 4], ["stem", "a", "b", "c"]) == [(1, "a"), (2, "b"), (3, "c")]
    assert paired_stages(["stem", 1, 2, 3, 4], ["stem", "a", "b", "c"], "deepest") == [(2, "a"), (3, "b"),
                                                                                       (4, "c")]
    distiller = make("AT", "vgg13", "resnet8").double()  # 4 teacher stages, 3 student stages
    x, y = images(), torch.tensor([3, 17, 42, 99])
    terms = distiller.forward_train(x, y, epoch=1).terms
    with torch.no_grad():
        fs = distiller.student(x)[1]["feats"]
        ft = distiller.teacher(x)[1]["feats"]
    expected = 1000 * plain_at(fs[1:], ft[1:4])
    assert terms["at"].kind == DISTILL and terms["at"].value.item() == pytest.approx(expected.item(), rel=1e-9)
    deepest = make("AT", "vgg13", "resnet8", "cifar100", "AT.PAIRING", "deepest").double()
    deepest.load_state_dict(distiller.state_dict())
    terms = deepest.forward_train(x, y, epoch=1).terms
    expected_deepest = 1000 * plain_at(fs[1:], ft[2:])
    assert terms["at"].value.item() == pytest.approx(expected_deepest.item(), rel=1e-9)
    assert expected_deepest.item() != pytest.approx(expected.item(), rel=1e-3)  # the pairings differ here
    same = make("AT", "resnet8", "resnet8").double()
    same.student.load_state_dict(same.teacher.model.state_dict())
    same.eval()  # both use running BN statistics: identical features
    terms = same.forward_train(x, y, epoch=1).terms
    assert terms["at"].value.item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- ReviewKD

def _halves(size, shift=0.0):
    """(1, 1, size, size): +1 on the left half, -1 on the right half, plus `shift`."""
    t = torch.ones(1, 1, size, size, dtype=torch.float64)
    t[..., size // 2:] = -1.0
    return t + shift


def test_hcl_by_hand():
    zero8, zero4, zero1 = (torch.zeros(1, 1, s, s, dtype=torch.float64) for s in (8, 4, 1))
    # 8x8, halves + 0.5: MSE 1.25 at full size, at 4x4 and at 2x2; the 1x1 mean is 0.5 -> 0.25.
    # Weights 1, 1/2, 1/4, 1/8, sum 1.875.
    eight = (1.25 + 1.25 / 2 + 1.25 / 4 + 0.25 / 8) / 1.875
    assert hcl_loss([zero8], [_halves(8, 0.5)]).item() == pytest.approx(eight, rel=1e-12)
    # 4x4: the 4x4 pooling is the map itself and is skipped; 2x2 (weight 1/2) and 1x1 (1/4) remain.
    four = (1.0 + 1.0 / 2 + 0.0 / 4) / 1.75
    assert hcl_loss([zero4], [_halves(4)]).item() == pytest.approx(four, rel=1e-12)
    # 1x1 (the pooled level): the full-size term alone
    assert hcl_loss([zero1], [zero1 + 3]).item() == pytest.approx(9.0)
    # summed over levels; a checkerboard averages to 0 under every pooling: 1 / 1.875
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1.0
    total = hcl_loss([zero8, zero4, zero1, zero8], [_halves(8, 0.5), _halves(4), zero1 + 3,
                                                    checker.double()[None, None]])
    assert total.item() == pytest.approx(eight + four + 9.0 + 1 / 1.875, rel=1e-12)
    # the written-out reference used for the distiller below gives the same hand-computed numbers
    assert plain_hcl([zero8, zero4, zero1, zero8], [_halves(8, 0.5), _halves(4), zero1 + 3,
                                                    checker.double()[None, None]]).item() == \
        pytest.approx(eight + four + 9.0 + 1 / 1.875, rel=1e-12)


def _config_pairs():
    pairs = set()
    for path in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True):
        if os.path.basename(path).startswith("_"):
            continue
        cfg = load_config(path)
        if cfg.TASK == "classification" and DISTILLER_REGISTRY.get(cfg.DISTILLER.TYPE).needs_teacher:
            pairs.add((cfg.DATASET.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT))
    return sorted(pairs)


CROSS_PAIRS = [
    ("cifar100", "resnet32x4", "ShuffleV1"),
    ("cifar100", "resnet32x4", "ShuffleV2"),
    ("cifar100", "wrn_40_2", "wrn_16_2"),
    ("cifar100", "ResNet50", "MobileNetV2"),
    ("cifar100", "vgg13", "resnet8"),  # 4 teacher stages, 3 student stages
    ("cifar100", "resnet8", "vgg8"),  # and the other way round
    ("tiny_imagenet", "ResNet18", "MobileNetV2"),  # odd sizes 33/17/9 vs 64/32/16/8
    ("imagenet", "ResNet50", "MobileNetV1"),
]


@pytest.mark.parametrize("dataset,teacher,student", _config_pairs() + CROSS_PAIRS,
                         ids=lambda v: v)
def test_reviewkd_fused_shapes_equal_teacher_shapes(dataset, teacher, student):
    names = model_names(dataset)
    library = [m for m in (teacher, student) if m not in names]
    assert all(m.startswith(("timm:", "torchvision:")) for m in library), f"{library} not registered for {dataset}"
    flat = [m for m in library if not getattr(build_model(m, dataset), "feature_pyramid", True)]
    if flat:  # KD++ table B2's ViT teachers: one token grid, no pyramid to fuse; ReviewKD says so and stops
        with pytest.raises(ConfigError, match=r"REVIEWKD fuses a feature pyramid.*pair CNNs"):
            make("REVIEWKD", teacher, student, dataset)
        return
    distiller = make("REVIEWKD", teacher, student, dataset).eval()
    size = INPUT[dataset]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        _, fs = distiller.student(x)
        _, ft = distiller.teacher(x)
        fused, targets = distiller.fused_and_targets(fs, ft)
    teacher_levels = list(ft["preact_feats"][1:]) + [ft["pooled_feat"][:, :, None, None]]
    k = min(len(fs["feats"]) + 1, len(ft["feats"]))  # student entries with, teacher's without the stem; + pooled
    assert len(fused) == len(targets) == k
    expected = [tuple(t.shape) for t in teacher_levels[-k:]]
    assert [tuple(t.shape) for t in targets] == expected
    assert [tuple(f.shape) for f in fused] == expected
    assert expected[-1] == (2, distiller.teacher.feat_dim, 1, 1)


def test_reviewkd_warmup_ramp_and_terms():
    distiller = make("REVIEWKD", "resnet20", "resnet8", "cifar100", "REVIEWKD.WARMUP_EPOCHS", "20",
                     "REVIEWKD.LOSS.REVIEWKD_WEIGHT", "3.0").double()
    x, y = images(), torch.tensor([3, 17, 42, 99])
    distiller.eval()  # running BN statistics in the fusion modules: the same fused maps on every forward
    with torch.no_grad():
        values = {e: distiller.forward_train(x, y, epoch=e).terms for e in (1, 10, 20, 40)}
        fused, targets = distiller.fused_and_targets(distiller.student(x)[1], distiller.teacher(x)[1])
    # HCL of the fused student maps against the teacher's (pre-ReLU stages and the pooled vector), by the formula
    assert [tuple(f.shape[-2:]) for f in fused] == [(32, 32), (16, 16), (8, 8), (1, 1)]
    full = 3.0 * plain_hcl(fused, targets).item()
    assert values[20]["reviewkd"].value.item() == pytest.approx(full, rel=1e-9)
    assert values[40]["reviewkd"].value.item() == pytest.approx(full, rel=1e-9)
    assert values[10]["reviewkd"].value.item() == pytest.approx(full / 2, rel=1e-9)
    assert values[1]["reviewkd"].value.item() == pytest.approx(full / 20, rel=1e-9)
    distiller.train()
    assert values[1]["reviewkd"].kind == DISTILL and values[1]["ce"].kind == TASK
    # the review term trains the student and the fusion modules, never the teacher
    terms = distiller.forward_train(x, y, epoch=20).terms
    terms["reviewkd"].value.backward()
    assert all(p.grad is not None for p in distiller.fusion.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.parameters())
    assert all(p.grad is None for p in distiller.teacher.parameters())
    with pytest.raises(ConfigError, match="REVIEWKD.WARMUP_EPOCHS"):
        load_config(None, ["DISTILLER.TYPE", "REVIEWKD", "REVIEWKD.WARMUP_EPOCHS", "-1"])
