"""CRD against hand computations: memory update rule, class-aware sampling, NCE value and Z, rank-synchronised
memory under torch.distributed (2 CPU processes, gloo), and checkpoint round trips."""

import itertools
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from mdistiller.config import load_config
from mdistiller.data.bundle import DatasetMeta
from mdistiller.distillers import DISTILL, DISTILLER_REGISTRY, TASK
from mdistiller.distillers.crd_memory import ContrastMemory, nce_loss, row_scores
from mdistiller.distillers.crd_negatives import sample_positions
from mdistiller.utils.errors import ConfigError

T = 0.07


def normalize(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


class TinyNet(nn.Module):
    """The model contract reduced to what CRD reads (logits, pooled_feat, feat_dim), on 3 x 4 x 4 images."""

    def __init__(self, feat_dim, classes=4):
        super().__init__()
        self.feat_dim = feat_dim
        self.body = nn.Linear(48, feat_dim)
        self.fc = nn.Linear(feat_dim, classes)

    def forward(self, x):
        f = F.relu(self.body(x.flatten(1)))
        return self.fc(f), {"feats": [], "preact_feats": [], "pooled_feat": f}


TARGETS = torch.arange(40) % 4  # 40 samples, 4 classes of 10


def make_crd(*overrides, targets=TARGETS, seed=0):
    cfg = load_config(None, ["DISTILLER.TYPE", "CRD", "CRD.NCE_K", "8", "CRD.FEAT_DIM", "16", *overrides])
    meta = DatasetMeta("fashion_mnist", 4, 4, len(targets), 0, (0.5,) * 3, (0.25,) * 3, targets)
    torch.manual_seed(seed)
    return DISTILLER_REGISTRY.get("CRD").build(cfg, TinyNet(12), TinyNet(20), meta)


# --- memory update -------------------------------------------------------------------------------------------

def test_memory_update_by_hand():
    mem = ContrastMemory(4, torch.tensor([0, 1, 0, 1, 2]), 2, T, momentum=0.5)
    before_s, before_t = mem.memory_s.clone(), mem.memory_t.clone()
    index = torch.tensor([3, 0])
    v_s = F.normalize(torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.0, -1.0, 3.0, 1.0]]), dim=1)
    v_t = F.normalize(torch.tensor([[2.0, 0.0, 0.0, 1.0], [-1.0, -1.0, 1.0, 1.0]]), dim=1)
    mem.update(v_s, v_t, index)
    for bank, old, new in ((mem.memory_s, before_s, v_s), (mem.memory_t, before_t, v_t)):
        for row, i in enumerate(index.tolist()):
            expected = normalize([0.5 * a + 0.5 * b for a, b in zip(old[i].tolist(), new[row].tolist())])
            assert bank[i].tolist() == pytest.approx(expected, rel=1e-6)
        untouched = [1, 2, 4]
        assert torch.equal(bank[untouched], old[untouched])


def test_memory_init_scale():
    torch.manual_seed(0)
    mem = ContrastMemory(128, torch.arange(4000) % 10, 16, T, 0.5)
    stdv = 1 / math.sqrt(128 / 3)
    assert mem.memory_s.abs().max() <= stdv and mem.memory_t.min() >= -stdv
    # uniform in [-stdv, stdv]: variance stdv^2 / 3 = 1 / dim per entry, so rows have squared norm ~1
    assert mem.memory_s.pow(2).sum(1).mean().item() == pytest.approx(1.0, abs=0.02)
    assert not torch.equal(mem.memory_s, mem.memory_t)


# --- sampling ------------------------------------------------------------------------------------------------

UNBALANCED = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 1, 0])  # class 2 has 4 of 12 samples


def test_k_is_capped_by_the_smallest_negative_pool():
    assert ContrastMemory(4, UNBALANCED, 16384, T, 0.5).num_negatives == 12 - 4
    assert ContrastMemory(4, UNBALANCED, 5, T, 0.5).num_negatives == 5
    with pytest.raises(ValueError, match="two classes"):
        ContrastMemory(4, torch.zeros(5, dtype=torch.int64), 4, T, 0.5)


@pytest.mark.parametrize("mode", ["exact", "relax"])
def test_negatives_from_other_classes_and_positives(mode):
    torch.manual_seed(0)
    mem = ContrastMemory(4, UNBALANCED, 8, T, 0.5, mode=mode)
    index = torch.arange(12).repeat(500)
    idx = mem.sample(index)
    assert idx.shape == (6000, 9)
    labels = UNBALANCED[index]
    assert (UNBALANCED[idx[:, 1:]] != labels[:, None]).all()
    if mode == "exact":
        assert torch.equal(idx[:, 0], index)
    else:
        assert torch.equal(UNBALANCED[idx[:, 0]], labels)
        assert (idx[:, 0] != index).any()  # not just the sample itself
    # negatives are uniform over the other classes' samples: for class-2 anchors each of the 8 candidates
    # is drawn with probability 1/8
    neg = idx[labels == 2, 1:].flatten()
    freq = torch.bincount(neg, minlength=12).double() / neg.numel()
    candidates = (UNBALANCED != 2).nonzero().flatten()
    assert freq[UNBALANCED == 2].sum() == 0
    assert torch.allclose(freq[candidates], torch.full((8,), 1 / 8, dtype=torch.float64), atol=0.015)


def _other_class(targets, label):
    return {i for i, t in enumerate(targets.tolist()) if t != label}


def _chi_square(counts, cells):
    """Pearson's statistic of observed counts (a dict) against equal expected counts over `cells`."""
    total = sum(counts.values())
    assert set(counts) <= set(cells)
    expected = total / len(cells)
    return sum((counts.get(c, 0) - expected) ** 2 / expected for c in cells)


@pytest.mark.parametrize("k", [3, 5, 8])
def test_negatives_are_uniform_k_subsets_of_the_other_classes(k):
    """np.random.choice(pool, K, replace=False), as CRD draws them, makes every K-subset of the other classes'
    samples equally likely: checked with a chi-square over all C(pool, K) subsets. UNBALANCED's pools are 8
    (classes 0, 2), 9 (class 1) and 11 (class 3), so K 3 .. 8 covers both ways of drawing (K <= pool / 2,
    K > pool / 2) and a whole pool (K = 8 for classes 0 and 2)."""
    torch.manual_seed(0)
    mem = ContrastMemory(4, UNBALANCED, k, T, 0.5)
    reps = 12000
    idx = mem.sample(torch.arange(12).repeat(reps))
    assert idx.shape == (12 * reps, 1 + k)
    counts = [{} for _ in range(4)]  # per anchor class: K-subset -> times drawn
    for row, label in zip(idx[:, 1:].tolist(), UNBALANCED.repeat(reps).tolist()):
        assert len(set(row)) == k, row  # no repeat within a row
        key = tuple(sorted(row))
        counts[label][key] = counts[label].get(key, 0) + 1
    for label in range(4):
        cells = list(itertools.combinations(sorted(_other_class(UNBALANCED, label)), k))
        assert set(counts[label]) <= set(cells)  # only other-class samples
        dof = len(cells) - 1
        if dof == 0:  # K = pool: the whole pool, once each
            continue
        # every subset, hence every other-class sample, is reachable
        assert len(counts[label]) == len(cells), (label, k)
        # Pearson's statistic has mean dof and sd sqrt(2 dof): 6 sd above the mean is far in the tail for an
        # honest sampler, while one that favours a candidate by a tenth fails by an order of magnitude
        assert _chi_square(counts[label], cells) < dof + 6 * math.sqrt(2 * dof), (label, k)


def test_negatives_at_cifar_scale_are_distinct_and_cover_the_other_classes():
    """CIFAR-100's shape: 50,000 samples of 100 classes, K 16384, batch 64. Drawing i.i.d. would repeat about
    15% of a row; here no row repeats and none holds its own class. Over n draws for one anchor class, a
    sample is in a row with probability p = K / pool, independently per row, so its count is Binomial(n, p):
    variance n p (1 - p), where i.i.d. draws would give about n p (Poisson)."""
    targets = torch.arange(50000) % 100
    torch.manual_seed(0)
    mem = ContrastMemory(4, targets, 16384, T, 0.5)
    assert mem.num_negatives == 16384
    g = torch.Generator().manual_seed(0)
    index = torch.randperm(50000, generator=g)[:64]
    idx = mem.sample(index)
    assert idx.shape == (64, 16385) and torch.equal(idx[:, 0], index)
    assert (idx[:, 1:].sort(1).values.diff(1) > 0).all()  # no repeat within a row
    assert (targets[idx[:, 1:]] != targets[index][:, None]).all()
    n, p = 60, 16384 / 49500
    freq = torch.bincount(mem.sample(torch.full((n,), 7))[:, 1:].flatten(), minlength=50000).double()
    other = targets != 7
    assert (freq[~other] == 0).all()
    assert (freq[other] > 0).all()  # every other-class sample reached; P(missed) = (1 - p)^60 per sample
    assert freq.max().item() <= n  # at most once per row
    assert freq[other].var().item() == pytest.approx(n * p * (1 - p), rel=0.05)


def test_k_above_the_pool_draws_with_replacement_and_covers_the_pool():
    """CRD's fallback (replace=True only when K > pool): i.i.d. uniform over the pool. ContrastMemory never
    needs it (K is capped), so the sampler is checked directly, next to rows whose pool is large enough."""
    torch.manual_seed(0)
    pool = torch.tensor([3, 8, 20] * 2000)
    pos = sample_positions(pool, 5)
    assert pos.shape == (6000, 5)
    assert ((pos >= 0) & (pos < pool[:, None])).all()
    small, mid, big = pos[pool == 3], pos[pool == 8], pos[pool == 20]
    assert all(len(set(r)) == 5 for r in mid.tolist() + big.tolist())  # K <= pool: distinct
    # K > pool: i.i.d. uniform, so each of the 3 positions is drawn 1/3 of the time in every column, and all
    # 3^5 = 243 sequences occur (2000 rows, about 8 each)
    for column in small.t():
        freq = torch.bincount(column, minlength=3).double() / column.numel()
        assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.04)
    assert len({tuple(r) for r in small.tolist()}) == 243
    # the distinct rows cover their pools uniformly: each position in K / pool of the rows
    for rows, size in ((mid, 8), (big, 20)):
        freq = torch.bincount(rows.flatten(), minlength=size).double() / rows.shape[0]
        assert torch.allclose(freq, torch.full((size,), 5 / size, dtype=torch.float64), atol=0.04)


def test_sample_positions_edge_cases():
    torch.manual_seed(0)
    assert sample_positions(torch.tensor([4, 9]), 0).shape == (2, 0)
    assert sample_positions(torch.tensor([], dtype=torch.int64), 5).shape == (0, 5)
    one = sample_positions(torch.tensor([6, 6, 1]), 1)  # K = 1, and a pool of one
    assert one[2].item() == 0 and 0 <= one[0].item() < 6 and 0 <= one[1].item() < 6
    full = sample_positions(torch.full((50,), 7), 7)  # K = pool: a permutation of the pool
    assert all(sorted(r) == list(range(7)) for r in full.tolist())
    with pytest.raises(ValueError, match="pool"):
        sample_positions(torch.tensor([3, 0]), 2)


def test_same_rng_state_same_negatives_next_step_others():
    """The draw follows the global torch RNG, which the trainer seeds from EXPERIMENT.SEED and checkpoints:
    the same state (seed, epoch, step) gives the same negatives, the next step new ones."""
    mem = ContrastMemory(4, torch.arange(2000) % 20, 512, T, 0.5, mode="relax")
    index = torch.arange(0, 2000, 37)
    torch.manual_seed(3)
    first, second = mem.sample(index), mem.sample(index)
    torch.manual_seed(3)
    assert torch.equal(mem.sample(index), first)
    assert torch.equal(mem.sample(index), second)
    assert not torch.equal(first, second)
    torch.manual_seed(4)
    assert not torch.equal(mem.sample(index), first)


# --- NCE -----------------------------------------------------------------------------------------------------

def test_row_scores_both_paths():
    g = torch.Generator().manual_seed(0)
    memory, anchor = torch.randn(50, 4, generator=g), torch.randn(3, 4, generator=g)
    for k in (20, 5):  # 50 <= 20 * 4: one product with the bank; 50 > 5 * 4: gathered rows
        idx = torch.randint(0, 50, (3, k), generator=g)
        expected = torch.tensor([[dot(memory[i].tolist(), anchor[b].tolist()) for i in idx[b].tolist()]
                                 for b in range(3)])
        torch.testing.assert_close(row_scores(memory, anchor, idx), expected, rtol=1e-5, atol=1e-6)


def hand_nce(memory, anchors, idx, z, n):
    """-log(P0 / (P0 + c)) - sum_k log(c / (Pk + c)), P = exp(<row, anchor> / T) / Z, c = K / n; batch mean."""
    c = (len(idx[0]) - 1) / n
    total = 0.0
    for a, rows in zip(anchors, idx):
        p = [math.exp(dot(memory[i], a) / T) / z for i in rows]
        total += -math.log(p[0] / (p[0] + c)) - sum(math.log(c / (pk + c)) for pk in p[1:])
    return total / len(anchors)


def test_nce_and_z_by_hand():
    targets = torch.tensor([0, 1, 0, 1, 2, 2])
    torch.manual_seed(0)
    mem = ContrastMemory(4, targets, 2, T, 0.5)
    assert mem.num_negatives == 2
    mem.memory_s.copy_(F.normalize(torch.randn(6, 4), dim=1))
    mem.memory_t.copy_(F.normalize(torch.randn(6, 4), dim=1))
    v_s, v_t = F.normalize(torch.randn(2, 4), dim=1), F.normalize(torch.randn(2, 4), dim=1)
    idx = torch.tensor([[0, 1, 4], [3, 2, 5]])  # positive, then two negatives of other classes
    ms, mt, vs, vt, rows = (t.tolist() for t in (mem.memory_s, mem.memory_t, v_s, v_t, idx))
    # Z from this first batch: mean of exp(<row, anchor> / T) over all (1 + K) entries, times num_train
    z_s = sum(math.exp(dot(mt[i], a) / T) for a, r in zip(vs, rows) for i in r) / 6 * 6
    z_t = sum(math.exp(dot(ms[i], a) / T) for a, r in zip(vt, rows) for i in r) / 6 * 6
    loss = mem.loss(v_s, v_t, idx)
    assert mem.z.tolist() == pytest.approx([z_s, z_t], rel=1e-5)
    expected = hand_nce(mt, vs, rows, z_s, 6) + hand_nce(ms, vt, rows, z_t, 6)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Z is estimated once: a second batch keeps it
    mem.loss(v_t, v_s, idx)
    assert mem.z.tolist() == pytest.approx([z_s, z_t], rel=1e-5)


def test_nce_is_lower_when_student_aligns_with_teacher():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(200, 16, generator=g), dim=1)  # the teacher bank
    index = torch.arange(32)
    idx = torch.cat([index[:, None], torch.randint(32, 200, (32, 64), generator=g)], 1)
    unrelated = F.normalize(torch.randn(32, 16, generator=g), dim=1)
    log_z = ((row_scores(bank, unrelated, idx) / T).exp().mean() * 200).log()  # as estimated at the start
    losses = []
    for noise in (0.0, 0.25, 0.75):  # student anchor = the teacher's embedding of the sample, perturbed
        anchor = F.normalize(bank[index] + noise * torch.randn(32, 16, generator=g), dim=1)
        losses.append(nce_loss(row_scores(bank, anchor, idx) / T, log_z, 200).item())
    losses.append(nce_loss(row_scores(bank, unrelated, idx) / T, log_z, 200).item())
    assert all(0 < x and math.isfinite(x) for x in losses)
    assert losses == sorted(losses) and losses[-1] > 4 * losses[0]


# --- the distiller -------------------------------------------------------------------------------------------

def batch(index):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(40, 3, 4, 4, generator=g)
    return images[index], TARGETS[index], index


def test_distiller_terms():
    crd = make_crd()
    crd.train()
    assert crd.memory.memory_s.shape == crd.memory.memory_t.shape == (40, 16)
    assert crd.embed_s.linear.in_features == 12 and crd.embed_t.linear.in_features == 20
    images, labels, index = batch(torch.tensor([0, 5, 9, 22, 31]))
    out = crd.forward_train(images, labels, 1, index)
    logits, terms = out.logits, out.terms
    assert set(terms) == {"ce", "crd"} and terms["ce"].kind == TASK and terms["crd"].kind == DISTILL
    value = terms["crd"].value
    assert value.dim() == 0 and torch.isfinite(value) and value.item() > 0
    assert terms["ce"].value.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    (terms["ce"].value + value).backward()
    assert crd.embed_s.linear.weight.grad.abs().sum() > 0 and crd.embed_t.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in crd.teacher.parameters())
    # the updated rows are unit vectors now, the rest still carry the random initialisation
    norms = crd.memory.memory_s.norm(dim=1)
    assert torch.allclose(norms[index], torch.ones(5))
    assert not torch.allclose(norms[[1, 2, 3]], torch.ones(3))


def test_checkpoint_round_trip_restores_memory_and_z():
    crd = make_crd()
    images, labels, index = batch(torch.arange(8))
    crd.forward_train(images, labels, 1, index)
    state = {k: v.clone() for k, v in crd.learnable_state_dict().items()}
    assert {"memory.memory_s", "memory.memory_t", "memory.z"} <= set(state)
    assert not any(k.startswith("teacher.") or k.endswith(("order", "targets")) for k in state)
    assert (state["memory.z"] > 0).all()
    other = make_crd(seed=1)
    other.teacher.load_state_dict(crd.teacher.state_dict())  # the teacher comes from its own checkpoint
    other.load_learnable_state_dict(state)
    for key in ("memory_s", "memory_t", "z"):
        assert torch.equal(getattr(other.memory, key), getattr(crd.memory, key))
    # resuming continues exactly: same next loss, same banks, and Z is not re-estimated
    images, labels, index = batch(torch.arange(8, 16))
    torch.manual_seed(7)
    t1 = crd.forward_train(images, labels, 1, index).terms
    torch.manual_seed(7)
    t2 = other.forward_train(images, labels, 1, index).terms
    assert torch.equal(t1["crd"].value, t2["crd"].value)
    assert torch.equal(other.memory.memory_t, crd.memory.memory_t)
    assert torch.equal(other.memory.z, state["memory.z"])


@pytest.mark.parametrize("key,value,match", [("CRD.MODE", "loose", "CRD.MODE"), ("CRD.NCE_K", "0", "CRD.NCE_K"),
                                             ("CRD.NCE_MOMENTUM", "1.0", "CRD.NCE_MOMENTUM"),
                                             ("CRD.NCE_T", "0.0", "CRD.NCE_T")])
def test_config_validation(key, value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["DISTILLER.TYPE", "CRD", key, value])


# --- two processes -------------------------------------------------------------------------------------------

RANK_INDEX = [torch.tensor([0, 7, 13, 21, 30, 38]), torch.tensor([2, 9, 14, 26, 35])]  # uneven shares


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        crd = make_crd()  # same seed: identical initial banks and heads on every rank
        crd.train()
        images, labels, index = batch(RANK_INDEX[rank])
        start_t, start_s = crd.memory.memory_t.clone(), crd.memory.memory_s.clone()
        with torch.no_grad():
            v_s, v_t = crd.embeddings(crd.student(images)[1], crd.teacher(images)[1])
        torch.manual_seed(100 + rank)  # each rank draws different negatives
        rng = torch.get_rng_state()
        terms = crd.forward_train(images, labels, 1, index).terms
        terms["crd"].value.backward()
        # this rank's own share of the Z estimate, recomputed from the same draw
        torch.set_rng_state(rng)
        idx = crd.memory.sample(index)
        sums = [(row_scores(bank, v, idx) / T).double().exp().sum() for bank, v in ((start_t, v_s), (start_s, v_t))]
        torch.save({"memory_s": crd.memory.memory_s, "memory_t": crd.memory.memory_t, "z": crd.memory.z,
                    "v_s": v_s, "v_t": v_t, "index": index, "sums": torch.stack(sums), "count": idx.numel()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.kernels
@pytest.mark.slow
def test_two_ranks_keep_identical_memory(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for key in ("memory_s", "memory_t", "z"):
        assert torch.equal(r0[key], r1[key]), key
    # the single-process update with the concatenated batch (the ranks' own embeddings, in rank order)
    single = make_crd()
    cat = {k: torch.cat([r0[k], r1[k]]) for k in ("v_s", "v_t", "index")}
    single.memory.update(cat["v_s"], cat["v_t"], cat["index"])
    assert torch.equal(single.memory.memory_s, r0["memory_s"])
    assert torch.equal(single.memory.memory_t, r0["memory_t"])
    touched = cat["index"]
    assert not torch.equal(single.memory.memory_s[touched], make_crd().memory.memory_s[touched])
    # Z: the mean over both ranks' (1 + K) scores, not either rank's alone
    z = (r0["sums"] + r1["sums"]) / (r0["count"] + r1["count"]) * 40
    torch.testing.assert_close(r0["z"].double(), z, rtol=1e-5, atol=0)
    # and a single process that runs forward_train on the concatenated images ends with the same banks
    images, labels, index = batch(torch.cat(RANK_INDEX))
    single = make_crd()
    single.train()
    single.forward_train(images, labels, 1, index)
    torch.testing.assert_close(single.memory.memory_s, r0["memory_s"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(single.memory.memory_t, r0["memory_t"], rtol=1e-5, atol=1e-6)


def test_neg_replace_draws_iid_like_the_published_imagenet_sampler():
    """CRD.NEG_REPLACE: every row i.i.d. over the other classes (repeats allowed, K not capped at the pool), as
    mdistiller's ImageNet / Tiny-ImageNet samplers (np.random.choice(..., replace=True)); the configs of those
    datasets set it, CIFAR-100's do not."""
    import glob

    from mdistiller.config import load_config
    from mdistiller.distillers.crd_memory import ContrastMemory

    targets = torch.arange(40) % 4  # 4 classes of 10: each anchor's pool has 30 samples
    torch.manual_seed(0)
    mem = ContrastMemory(8, targets, 50, 0.07, 0.5, "exact", replace=True)
    assert mem.num_negatives == 50  # more than the pool: only possible with replacement
    idx = mem.sample(torch.arange(40))
    neg = idx[:, 1:]
    assert (targets[neg] != targets[:40].unsqueeze(1)).all()
    assert all(len(set(row.tolist())) < 50 for row in neg)  # 50 draws from a pool of 30: repeats in every row
    torch.manual_seed(0)
    capped = ContrastMemory(8, targets, 50, 0.07, 0.5, "exact")
    assert capped.num_negatives == 30
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in glob.glob(os.path.join(root, "configs", "*", "*", "*.yaml")):
        if os.path.basename(path).startswith("_"):
            continue
        cfg = load_config(path, validate=False)
        if cfg.DISTILLER.TYPE.rstrip("+") == "CRD":
            assert cfg.CRD.NEG_REPLACE == (cfg.DATASET.TYPE in ("imagenet", "tiny_imagenet")), path


# --- the keys sampler (CRD.SAMPLER keys / auto): no host waits, in-place memory ------------------------------

def test_keys_sampler_draws_k_distinct_other_class_samples():
    """Every row: K distinct dataset indices, none of the anchor's class; the positive from the right pool."""
    for mode in ("exact", "relax"):
        torch.manual_seed(0)
        mem = ContrastMemory(4, UNBALANCED, 8, T, 0.5, mode=mode, sampler="keys")
        index = torch.arange(12).repeat(300)
        idx = mem.sample(index)
        labels = UNBALANCED[index]
        assert idx.shape == (3600, 9)
        neg = idx[:, 1:]
        assert ((neg >= 0) & (neg < 12)).all()
        assert (UNBALANCED[neg] != labels[:, None]).all()
        assert (neg.sort(1).values.diff(1) > 0).all()  # distinct within a row
        if mode == "exact":
            assert torch.equal(idx[:, 0], index)
        else:
            assert torch.equal(UNBALANCED[idx[:, 0]], labels)


def test_keys_sampler_makes_every_k_subset_equally_likely():
    """A pool of 5 other-class samples, K = 2: each of the C(5, 2) = 10 subsets has probability 1/10, as
    np.random.choice(pool, 2, replace=False) gives. 20,000 draws, chi-square with 9 degrees of freedom against
    6 sd above its mean (a fixed seed, so the verdict is deterministic); the subsets are counted here from the
    returned indices, not from anything the sampler computes."""
    from mdistiller.distillers.crd_negatives import sample_keys

    targets = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0])  # class 0 anchors: pool {0, 2, 3, 5, 6}
    torch.manual_seed(0)
    n = 20000
    idx = sample_keys(targets, torch.zeros(n, dtype=torch.int64), 2)
    counts = {}
    for row in idx.tolist():
        key = tuple(sorted(row))
        counts[key] = counts.get(key, 0) + 1
    cells = list(itertools.combinations([0, 2, 3, 5, 6], 2))
    assert set(counts) == set(cells)
    dof = len(cells) - 1
    assert _chi_square(counts, cells) < dof + 6 * math.sqrt(2 * dof)
    # and a sampler that favoured one candidate by a tenth would fail it: the test has power
    biased = dict(counts)
    for c in cells:
        if 0 in c:
            biased[c] = round(biased[c] * 1.1)
    assert _chi_square(biased, cells) > 2 * (dof + 6 * math.sqrt(2 * dof))


@pytest.mark.parametrize("k", [3, 8])
def test_keys_sampler_uniform_on_unbalanced_classes(k):
    """The chi-square over all K-subsets of each class's pool, as for the redraw sampler above (pools 8 to 11)."""
    torch.manual_seed(1)
    mem = ContrastMemory(4, UNBALANCED, k, T, 0.5, sampler="keys")
    reps = 6000
    idx = mem.sample(torch.arange(12).repeat(reps))
    counts = [{} for _ in range(4)]
    for row, label in zip(idx[:, 1:].tolist(), UNBALANCED.repeat(reps).tolist()):
        key = tuple(sorted(row))
        counts[label][key] = counts[label].get(key, 0) + 1
    for label in range(4):
        cells = list(itertools.combinations(sorted(_other_class(UNBALANCED, label)), k))
        assert set(counts[label]) <= set(cells)
        dof = len(cells) - 1
        if dof:
            assert _chi_square(counts[label], cells) < dof + 6 * math.sqrt(2 * dof), (label, k)


def test_neg_replace_draws_match_the_published_definition():
    """With replacement: negative j of row b is position floor(u * pool) of the other classes' samples (class-
    sorted), u the next float64 uniform of the global RNG, as the masked sampler has always drawn them."""
    targets = torch.arange(40) % 4
    mem = ContrastMemory(8, targets, 50, T, 0.5, replace=True)
    index = torch.tensor([3, 17, 22, 0])
    torch.manual_seed(5)
    got = mem.sample(index)[:, 1:]
    torch.manual_seed(5)
    u = torch.rand(4, 50, dtype=torch.float64)
    order = torch.argsort(targets, stable=True)
    for b, i in enumerate(index.tolist()):
        others = [s for s in order.tolist() if targets[s] != targets[i]]  # the pool, in class-sorted order
        expected = [others[min(int(x * 30), 29)] for x in u[b].tolist()]
        assert got[b].tolist() == expected


def test_sampler_config_validation_and_memory_bound():
    with pytest.raises(ConfigError, match="CRD.SAMPLER: must be one of redraw, keys, auto, got 'topk'"):
        load_config(None, ["DISTILLER.TYPE", "CRD", "CRD.SAMPLER", "topk"])
    # 40 samples x a batch of 2^28 / 40 + 1 rows: over the bound; the error names the ways out
    huge = str(2 ** 28 // 40 + 1)
    with pytest.raises(ConfigError, match=r"CRD.SAMPLER.*redraw.*CRD.NEG_REPLACE"):
        make_crd("CRD.SAMPLER", "keys", "SOLVER.BATCH_SIZE", huge)
    assert make_crd("CRD.SAMPLER", "keys", "SOLVER.BATCH_SIZE", huge, "CRD.NEG_REPLACE", "true").memory.replace
    auto = make_crd("CRD.SAMPLER", "auto", "SOLVER.BATCH_SIZE", huge)  # auto never refuses: it stays on redraw
    assert auto.set_sync_free(True) is False and not auto.memory.uses_keys
    assert make_crd("CRD.SAMPLER", "keys", "SOLVER.BATCH_SIZE", str(2 ** 28 // 40)).memory.uses_keys


def test_auto_follows_the_sync_free_hook():
    """CRD.SAMPLER auto (the default): the redraw sampler's draws until set_sync_free(True), the keys sampler's
    while set."""
    index = torch.tensor([0, 5, 9, 22, 31])
    crd, keys = make_crd(), make_crd("CRD.SAMPLER", "keys")  # auto: the default
    redraw = make_crd("CRD.SAMPLER", "redraw")
    assert make_crd("CRD.SAMPLER", "redraw").set_sync_free(True) is False  # redraw stays redraw
    draws = {}
    for name, model in (("auto", crd), ("redraw", redraw), ("keys", keys)):
        torch.manual_seed(2)
        draws[name] = model.memory.sample(index)
    assert torch.equal(draws["auto"], draws["redraw"]) and not torch.equal(draws["redraw"], draws["keys"])
    assert crd.set_sync_free(True) is True
    torch.manual_seed(2)
    assert torch.equal(crd.memory.sample(index), draws["keys"])
    assert crd.set_sync_free(False) is False
    torch.manual_seed(2)
    assert torch.equal(crd.memory.sample(index), draws["redraw"])


def _old_row_scores(memory, anchor, idx):
    """row_scores before the in-place update: the product with the bank itself."""
    n, dim = memory.shape
    if n <= idx.shape[1] * dim:
        return (anchor @ memory.t()).gather(1, idx)
    return torch.bmm(memory[idx], anchor.unsqueeze(2)).squeeze(2)


@torch.no_grad()
def _old_update(self, v_s, v_t, index):
    """The published rule, out of place: rows <- normalize(m * row + (1 - m) * v), the buffer rebound."""
    for name, new in (("memory_s", v_s), ("memory_t", v_t)):
        bank = getattr(self, name).clone()
        bank[index] = F.normalize(bank[index] * self.momentum + new * (1 - self.momentum), dim=1)
        setattr(self, name, bank)


@pytest.mark.parametrize("sampler", ["redraw", "keys"])
def test_in_place_memory_update_matches_the_out_of_place_definition(sampler, monkeypatch):
    """Three SGD steps of two identical CRDs, one with the in-place update (buffers keep their storage, as a CUDA
    graph needs), one with the old out-of-place one: bit-identical losses, gradients and banks."""
    from mdistiller.distillers import crd_memory

    new, old = make_crd("CRD.SAMPLER", sampler), make_crd("CRD.SAMPLER", sampler)
    ptrs = (new.memory.memory_s.data_ptr(), new.memory.memory_t.data_ptr())
    runs = {}
    for name, crd in (("new", new), ("old", old)):
        if name == "old":
            monkeypatch.setattr(crd_memory, "row_scores", _old_row_scores)
            monkeypatch.setattr(crd.memory, "update", _old_update.__get__(crd.memory))
        crd.train()
        params = [p for p in crd.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        torch.manual_seed(11)
        losses, grads = [], []
        for step in range(3):
            images, labels, index = batch(torch.arange(step * 8, step * 8 + 8))
            opt.zero_grad()
            terms = crd.forward_train(images, labels, 1, index).terms
            loss = terms["ce"].value + terms["crd"].value
            loss.backward()
            opt.step()
            losses.append(terms["crd"].value.detach().clone())
            grads.append([p.grad.clone() for p in params])
        runs[name] = (losses, grads, crd.memory.memory_s.clone(), crd.memory.memory_t.clone())
        monkeypatch.undo()
    (l1, g1, s1, t1), (l2, g2, s2, t2) = runs["new"], runs["old"]
    assert all(torch.equal(a, b) for a, b in zip(l1, l2))
    assert all(torch.equal(a, b) for ga, gb in zip(g1, g2) for a, b in zip(ga, gb))
    assert torch.equal(s1, s2) and torch.equal(t1, t2)
    assert (new.memory.memory_s.data_ptr(), new.memory.memory_t.data_ptr()) == ptrs  # updated in place
    assert not torch.equal(s1[:24], make_crd().memory.memory_s[:24])  # the steps did move the touched rows


@pytest.mark.parametrize("extra", [("CRD.SAMPLER", "keys"), ("CRD.NEG_REPLACE", "true"),
                                   ("CRD.SAMPLER", "keys", "CRD.MODE", "relax"), ("CRD.SAMPLER", "redraw")])
def test_crd_update_waits_on_the_host_zero_times(extra, tmp_path):
    """The real training step of a built run (bench.variant, as tools/benchmark.py --ops counts it): after the
    first step (Z's one-off estimate), a CRD update with the keys sampler, or with replacement, makes no host
    wait; over one period of the loop's hooks the only wait is the finite guard's check, as for KD. The redraw
    sampler (the default) does wait, which shows the count sees CRD's waits."""
    from mdistiller.bench.op_count import count_ops
    from mdistiller.bench.random_teacher import random_teacher_state
    from mdistiller.bench.synthetic import SyntheticDataset
    from mdistiller.bench.variant import Variant
    from mdistiller.engine.finite_guard import CHECK_EVERY

    kd_cfg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs", "cifar100", "kd", "resnet32x4_resnet8x4.yaml")
    cfg = load_config(kd_cfg, ["LOG.PREFIX", str(tmp_path), "EXPERIMENT.DEVICE", "cpu", "SOLVER.BATCH_SIZE", "8",
                               "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT", "resnet8", "SPEED.AMP", "off",
                               "DISTILLER.TYPE", "CRD", *extra])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        v = Variant("crd", cfg, bundle=SyntheticDataset("cifar100", 64)(cfg),
                    teacher_state=random_teacher_state("resnet20", "cifar100"))
        sync_free = extra != ("CRD.SAMPLER", "redraw")
        assert v.trainer.distiller.memory.step_is_sync_free == sync_free
        v._step(v.batch)  # the first step estimates Z (one read of its buffer)
        bank = v.trainer.distiller.memory.memory_t.data_ptr()
        steps = count_ops(lambda: [v._step(v.batch) for _ in range(3)], 3)
        if not sync_free:
            assert steps["syncs"] >= 3 and v.trainer.distiller.memory.memory_t.data_ptr() == bank
            return
        assert steps["syncs"] == 0
        ops = count_ops(lambda: v.loop_steps(CHECK_EVERY), CHECK_EVERY)
    finally:
        torch.set_num_threads(threads)
    assert ops["syncs"] == 1 / CHECK_EVERY and ops["sync_ops"] == {"_local_scalar_dense": 1 / CHECK_EVERY}
    assert v.trainer.distiller.memory.memory_t.data_ptr() == bank


def test_prepare_capture_switches_auto_and_says_why_redraw_cannot_be_captured():
    """The engine's hook before a CUDA-graph capture (Distiller.prepare_capture asks the memory bank): keys and
    with-replacement draws are capturable, auto switches to keys, redraw names the sampler and the way out."""
    for extra, capturable in ((("CRD.SAMPLER", "keys"), True), (("CRD.NEG_REPLACE", "true"), True),
                              (("CRD.SAMPLER", "auto"), True), (("CRD.SAMPLER", "redraw"), False)):
        crd = make_crd(*extra)
        why = crd.memory.prepare_capture()
        assert (why is None) == capturable, extra
        assert crd.memory.step_is_sync_free == capturable
        if not capturable:
            assert "CRD.SAMPLER redraw" in why and "keys" in why
    auto = make_crd("CRD.SAMPLER", "auto")
    auto.memory.prepare_capture()
    assert auto.memory.uses_keys
    huge = make_crd("CRD.SAMPLER", "auto", "SOLVER.BATCH_SIZE", str(2 ** 28 // 40 + 1))
    assert "CRD.NEG_REPLACE" in huge.memory.prepare_capture()
