"""DOT (SOLVER.UPDATE_RULE dot): the update rule against a hand-written two-buffer computation, Delta = 0 against the
vanilla trainer, both ways of computing the two gradients, config checks, and exact resume."""

import json
import math

import pytest
import torch
import torch.nn as nn

from mdistiller.config import load_config
from mdistiller.engine import build_run
from mdistiller.engine.dot import batched_grads, reachable_leaves, two_pass_grads
from mdistiller.engine.dot_optimizer import DOTOptimizer
from mdistiller.engine.hooks import HookBase
from mdistiller.engine.launch import train_from_config
from mdistiller.models import build_model
from mdistiller.utils.errors import ConfigError

from test_engine import ROOT, CrashAfterEpoch, read_metrics, without_timing

KD_CFG = f"{ROOT}/configs/fashion_mnist/kd/resnet20_resnet8.yaml"


class TwoHeads(nn.Module):
    """shared -> (head: task only) and (proj: distillation only): every case of appendix A.7 in three tensors."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Parameter(torch.tensor([[0.5, -0.3], [0.2, 0.8]], dtype=torch.float64))
        self.head = nn.Parameter(torch.tensor([0.7, -0.4], dtype=torch.float64))
        self.proj = nn.Parameter(torch.tensor([-0.6, 0.9], dtype=torch.float64))
        self.unused = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))

    def losses(self, x):
        h = torch.tanh(x @ self.shared)
        task = ((h @ self.head) - 1.0).pow(2).mean()
        distill = ((h @ self.proj) + 0.5).pow(2).mean()
        return task, distill


def test_update_rule_matches_hand_computation():
    torch.manual_seed(0)
    lr, mu, delta, wd = 0.1, 0.9, 0.075, 5e-4
    model = TwoHeads()
    opt = DOTOptimizer(model.parameters(), lr=lr, momentum=mu, delta=delta, weight_decay=wd)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    vt = {"shared": torch.zeros(2, 2, dtype=torch.float64)}
    vd = {"shared": torch.zeros(2, 2, dtype=torch.float64)}
    v1 = {"head": torch.zeros(2, dtype=torch.float64), "proj": torch.zeros(2, dtype=torch.float64)}
    for step in range(4):
        x = torch.randn(5, 2, dtype=torch.float64)
        # The hand computation: gradients of each loss at the reference weights, then Algorithm 2 line by line.
        r = {n: t.clone().requires_grad_(True) for n, t in ref.items()}
        h = torch.tanh(x @ r["shared"])
        gt = torch.autograd.grad(((h @ r["head"]) - 1.0).pow(2).mean(), [r["shared"], r["head"]], retain_graph=True)
        gd = torch.autograd.grad(((h @ r["proj"]) + 0.5).pow(2).mean(), [r["shared"], r["proj"]])
        vt["shared"] = gt[0] + wd * ref["shared"] + (mu - delta) * vt["shared"]  # weight decay once, with the task
        vd["shared"] = gd[0] + (mu + delta) * vd["shared"]
        ref["shared"] = ref["shared"] - lr * (vt["shared"] + vd["shared"])
        v1["head"] = gt[1] + wd * ref["head"] + mu * v1["head"]  # reached by one loss: plain mu
        ref["head"] = ref["head"] - lr * v1["head"]
        v1["proj"] = gd[1] + wd * ref["proj"] + mu * v1["proj"]
        ref["proj"] = ref["proj"] - lr * v1["proj"]

        task, distill = model.losses(x)
        opt.step_with_grads(*two_pass_grads(task, distill, opt.params()))
    for name, p in model.named_parameters():
        assert torch.allclose(p, ref[name], rtol=0, atol=1e-12), name
    assert torch.equal(model.unused, torch.tensor([1.0], dtype=torch.float64))  # reached by neither: untouched
    state = opt.state_dict()["state"]
    assert set(state[0]) == {"task_buffer", "distill_buffer"}
    assert set(state[1]) == set(state[2]) == {"momentum_buffer"} and 3 not in state


def test_delta_zero_single_loss_parameters_are_sgd_bit_for_bit():
    torch.manual_seed(0)
    a, b = TwoHeads(), TwoHeads()
    dot = DOTOptimizer([a.head], lr=0.1, momentum=0.9, delta=0.0, weight_decay=5e-4)
    sgd = torch.optim.SGD([b.head], lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(5):
        x = torch.randn(4, 2, dtype=torch.float64)
        task, _ = a.losses(x)
        dot.step_with_grads(torch.autograd.grad(task, [a.head]), [None])
        sgd.zero_grad()
        b.losses(x)[0].backward()
        sgd.step()
        assert torch.equal(a.head, b.head)


def test_batched_and_two_pass_gradients_agree():
    torch.manual_seed(0)
    model = build_model("resnet8", "fashion_mnist")
    extra = nn.Linear(64, 3)  # reached by the distillation loss only
    params = list(model.parameters()) + list(extra.parameters())
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))

    def losses():
        logits, feats = model(x)
        return nn.functional.cross_entropy(logits, y), extra(feats["pooled_feat"]).pow(2).mean() + logits.var()

    a, b = two_pass_grads(*losses(), params), batched_grads(*losses(), params)
    for ga, gb in zip(a[0] + a[1], b[0] + b[1]):
        assert (ga is None) == (gb is None)
        if ga is not None:
            assert torch.allclose(ga, gb, atol=1e-6)
    assert all(g is None for g in a[0][-2:]) and all(g is not None for g in a[1])
    task, _ = losses()
    assert {id(p) for p in model.parameters()} == reachable_leaves(task)


def _trainer(trainer, *extra, tmp_path):
    cfg = load_config(KD_CFG, ["EXPERIMENT.DEVICE", "cpu", "DATASET.TRAIN_SUBSET", "96", "DATASET.TEST_SUBSET",
                               "50", "SOLVER.BATCH_SIZE", "32", "SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES",
                               "[]", "SOLVER.UPDATE_RULE", trainer, "LOG.PREFIX", str(tmp_path), *extra])
    return build_run(cfg).trainer


@pytest.fixture(scope="module")
def random_teachers(tmp_path_factory):
    """Teacher checkpoints in the published format with random weights: what is compared is the optimisation."""
    d = tmp_path_factory.mktemp("teachers")
    paths = {}
    for name in ("resnet20", "resnet8x4"):
        torch.manual_seed(1)
        paths[name] = str(d / f"{name}.pth")
        torch.save({"model": build_model(name, "fashion_mnist").state_dict()}, paths[name])
    return paths


def _run_steps(trainer, steps):
    """`steps` updates through the trainer's own run_step, in float64 (see below); returns the learnable state."""
    trainer.distiller.double()  # in place: the optimizer keeps the same Parameter objects
    trainer.distiller.train()
    trainer.train_loader.set_epoch(0)
    torch.manual_seed(0)  # CRD draws its negatives from the global RNG: the same draws for both trainers
    for it, (images, labels, index) in enumerate(trainer.train_loader):
        if it == steps:
            break
        trainer.set_lr(0.05)
        trainer.run_step(images.double(), labels, index, 1)
    return trainer.distiller.learnable_state_dict()


@pytest.mark.kernels
@pytest.mark.parametrize("method,teacher", [("KD", "resnet20"), ("KD++", "resnet8x4"), ("CRD", "resnet20")])
def test_delta_zero_equals_vanilla_trainer(method, teacher, random_teachers, tmp_path):
    # KD: every parameter is reached by both losses. KD++ from a 256-d teacher into a 64-d student: a projector
    # reached only by the dino term. CRD: two embedding heads reached only by the distillation loss, and a memory
    # bank updated inside the step.
    # In float64: g_task + g_distill and the gradient of (task + distill) differ by float32 rounding (~1e-6
    # relative), and early training on real data amplifies a weight difference about 50x per step (measured),
    # so a float32 comparison would test rounding, not the update rule.
    extra = ["DISTILLER.TYPE", method, "DISTILLER.TEACHER", teacher, "DISTILLER.TEACHER_CKPT",
             random_teachers[teacher], "SOLVER.DOT.DELTA", "0.0"]
    vanilla, dot = _trainer("vanilla", *extra, tmp_path=tmp_path), _trainer("dot", *extra, tmp_path=tmp_path)
    if method == "KD++":
        assert any("projector" in n for n, _ in dot.distiller.named_parameters())
    steps = 3
    a, b = _run_steps(vanilla, steps), _run_steps(dot, steps)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), rtol=0, atol=1e-6), key
    # ... and a non-zero Delta really changes the trajectory.
    c = _run_steps(_trainer("dot", *extra[:-1], "0.075", tmp_path=tmp_path), steps)
    assert any(not torch.allclose(a[k], c[k], atol=1e-6) for k in a if a[k].is_floating_point())


class CosinesByHand(HookBase):
    """After every step: cos(v_task, v) and cos(v_distill, v), v = v_task + v_distill, computed here from the
    optimizer's two momentum buffers as they stand after the update (the step that was just taken), over every
    parameter that has both (the ones both losses reach), as one flattened vector; next to what the step logged."""

    def __init__(self):
        self.rows = []

    def after_step(self, step):
        dot = task_norm = distill_norm = v_norm = distill_dot = 0.0
        both = 0
        for p in self.trainer.optimizer.params():
            state = self.trainer.optimizer.state.get(p, {})
            if "task_buffer" not in state:
                continue
            both += 1
            vt, vd = state["task_buffer"].double(), state["distill_buffer"].double()
            v = vt + vd
            dot += float((vt * v).sum())
            distill_dot += float((vd * v).sum())
            task_norm += float((vt * vt).sum())
            distill_norm += float((vd * vd).sum())
            v_norm += float((v * v).sum())
        by_hand = (dot / math.sqrt(task_norm * v_norm), distill_dot / math.sqrt(distill_norm * v_norm))
        logged = (float(step.stats["dot/cos_task"]), float(step.stats["dot/cos_distill"]))
        self.rows.append((by_hand, logged, len(step.labels), both))


def test_cosines_are_logged(random_teachers, tmp_path):
    trainer = _trainer("dot", "DISTILLER.TEACHER_CKPT", random_teachers["resnet20"], "SOLVER.DOT.LOG_COSINE",
                       "True", tmp_path=tmp_path)
    hand = CosinesByHand()
    trainer.register_hooks([hand])
    stats = trainer.train_one_epoch(1)
    assert len(hand.rows) == 3  # 96 images, batches of 32
    n_params = sum(1 for p in trainer.optimizer.params() if p.requires_grad)
    for by_hand, logged, _, both in hand.rows:
        assert both == n_params  # KD: every student parameter is reached by both losses
        assert logged == pytest.approx(by_hand, rel=1e-9, abs=1e-12)
        # the two cosines are different numbers (a swap or a copy of one would show) and neither is trivial
        assert abs(by_hand[0] - by_hand[1]) > 1e-3 and all(abs(c) < 1 - 1e-6 for c in by_hand)
    # the epoch's figure is the image-weighted mean of the steps'
    seen = sum(n for _, _, n, _ in hand.rows)
    for i, key in enumerate(("dot/cos_task", "dot/cos_distill")):
        assert stats[key] == pytest.approx(sum(row[0][i] * row[2] for row in hand.rows) / seen, rel=1e-9)
    assert stats["loss/task_total"] + stats["loss/distill_total"] == pytest.approx(stats["train_loss"], rel=1e-5)


@pytest.mark.parametrize("delta,match", [("0.2", r"0.9 \+ 0.2 = 1.1 is outside \[0, 1\)"),
                                         ("-0.95", r"0.9 - -0.95 = 1.85 is outside")])
def test_invalid_delta_is_a_config_error(delta, match):
    with pytest.raises(ConfigError, match=match):
        load_config(KD_CFG, ["SOLVER.UPDATE_RULE", "dot", "SOLVER.DOT.DELTA", delta])


def test_negative_delta_and_bad_grad_mode():
    load_config(KD_CFG, ["SOLVER.UPDATE_RULE", "dot", "SOLVER.DOT.DELTA", "-0.05"])  # the task-oriented ablation
    with pytest.raises(ConfigError, match="SOLVER.DOT.GRAD_MODE"):
        load_config(KD_CFG, ["SOLVER.UPDATE_RULE", "dot", "SOLVER.DOT.GRAD_MODE", "fast"])


@pytest.mark.kernels
def test_dot_resume_is_bit_exact(random_teachers, tmp_path):
    def cfg(name):
        return load_config(KD_CFG, [
            "LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", name, "EXPERIMENT.DEVICE", "cpu",
            "DATASET.TRAIN_SUBSET", "160", "DATASET.TEST_SUBSET", "100", "SOLVER.BATCH_SIZE", "32",
            "SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES", "[1]", "SOLVER.UPDATE_RULE", "dot",
            "DISTILLER.TEACHER_CKPT", random_teachers["resnet20"], "LOG.TENSORBOARD_FREQ", "0"])

    train_from_config(cfg("straight"))
    with pytest.raises(KeyboardInterrupt):
        train_from_config(cfg("crashed"), extra_hooks=[CrashAfterEpoch(1)])
    train_from_config(cfg("crashed"), resume=True)
    a = torch.load(tmp_path / "straight" / "latest.pth", weights_only=False)
    b = torch.load(tmp_path / "crashed" / "latest.pth", weights_only=False)
    for key in a["distiller"]:
        assert torch.equal(a["distiller"][key], b["distiller"][key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(set(s) == {"task_buffer", "distill_buffer"} for s in sa.values())
    for k in sa:
        for buf in ("task_buffer", "distill_buffer"):
            assert torch.equal(sa[k][buf], sb[k][buf])
    ma, mb = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "crashed")
    assert [without_timing(r) for r in ma] == [without_timing(r) for r in mb]
    assert json.loads((tmp_path / "crashed" / "summary.json").read_text())["trainer"] == "dot"
