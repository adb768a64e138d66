"""CTKD: the gradient reversal layer through autograd, the cosine lambda curriculum against the authors' closed form,
the KD term at the learnable temperature against a plain-Python computation, where gradients go, bad config.
Every expected value comes from formulas written here (plain Python, or plain torch where a gradient is needed),
never from the library's own losses."""

import json
import math
import os

import pytest
import torch

from mdistiller.bench.random_teacher import random_teacher_state
from mdistiller.config import load_config
from mdistiller.data.bundle import DatasetMeta
from mdistiller.distillers.ctkd import CTKD, GlobalTemperature, cosine_lambda, gradient_reversal
from mdistiller.engine.classification import build_distiller
from mdistiller.utils.errors import ConfigError
from cli_runs import FM_CONFIGS, SMALL, train_main
from plain_formulas import plain_kd, softmax

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def torch_kd(s, t, temperature):
    """The same KD in plain torch ops, for the tests that need its gradient with respect to the temperature."""
    log_ps, log_pt = torch.log_softmax(s / temperature, dim=1), torch.log_softmax(t / temperature, dim=1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean() * temperature**2


def test_torch_kd_is_the_plain_kd():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
    assert torch_kd(s, t, 3.0).item() == pytest.approx(plain_kd(s.tolist(), t.tolist(), 3.0), rel=1e-12)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# --- the gradient reversal layer ------------------------------------------------------------------------------
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_grl_gives_the_temperature_minus_lambda_times_the_loss_gradient(lam):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64)
    t = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    through_grl = torch.tensor([0.4], dtype=torch.float64, requires_grad=True)
    plain = torch.tensor([0.4], dtype=torch.float64, requires_grad=True)
    temp_grl = 1.0 + 20.0 * torch.sigmoid(gradient_reversal(through_grl, lam))
    temp_plain = 1.0 + 20.0 * torch.sigmoid(plain)
    assert torch.equal(temp_grl, temp_plain)  # identity forward
    torch_kd(s, t, temp_grl[0]).backward()
    torch_kd(s, t, temp_plain[0]).backward()
    assert plain.grad.abs().item() > 1e-6
    torch.testing.assert_close(through_grl.grad, -lam * plain.grad, rtol=1e-12, atol=0)


def test_grl_leaves_the_students_gradient_alone():
    g = torch.Generator().manual_seed(1)
    s1 = torch.randn(3, 5, generator=g, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    t = torch.randn(3, 5, generator=g)
    module = GlobalTemperature()
    torch_kd(s1, t, module(0.7)).backward()
    torch_kd(s2, t, module(0.0).detach()).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=0, atol=0)


# --- the curriculum ---------------------------------------------------------------------------------------------
def authors_multiplier(i, decay_max=0.0, decay_min=-1.0, num_loops=10):
    """zhengli97/CTKD train_student.py CosineDecay.get_value, written out: the factor their GRL multiplies by."""
    i = min(max(i, 0), num_loops)
    return (math.cos(i * math.pi / num_loops) + 1.0) * 0.5 * (decay_max - decay_min) + decay_min


@pytest.mark.parametrize("epoch, expected", [(0, 0.0), (1, (1 - math.cos(math.pi / 10)) / 2), (5, 0.5),
                                             (10, 1.0), (11, 1.0), (240, 1.0)])
def test_lambda_schedule_closed_form(epoch, expected):
    lam = cosine_lambda(epoch, 0.0, 1.0, 10)
    assert lam == pytest.approx(expected, abs=1e-15)
    assert -lam == pytest.approx(authors_multiplier(epoch), abs=1e-15)  # the same update as the authors'


def test_lambda_schedule_between_other_bounds():
    # a quarter of the way through 20 epochs: (1 - cos(pi/4)) / 2 of the way from 0.2 to 0.8
    assert cosine_lambda(5, 0.2, 0.8, 20) == pytest.approx(0.2 + 0.6 * (1 - math.sqrt(0.5)) / 2, rel=1e-14)
    assert -cosine_lambda(7, 0.2, 0.8, 20) == pytest.approx(authors_multiplier(7, -0.2, -0.8, 20), abs=1e-15)


# --- the distiller ------------------------------------------------------------------------------------------------
def build(*overrides):
    cfg = load_config(None, ["DATASET.TYPE", "cifar100", "DISTILLER.TYPE", "CTKD", "DISTILLER.TEACHER", "resnet20",
                             "DISTILLER.STUDENT", "resnet8", *overrides])
    meta = DatasetMeta(name="cifar100", num_classes=100, image_size=32, num_train=8, num_test=0,
                       mean=(0.5,) * 3, std=(0.25,) * 3, train_targets=torch.arange(8) % 100)
    torch.manual_seed(0)
    distiller, _ = build_distiller(cfg, meta, torch.device("cpu"), random_teacher_state("resnet20", "cifar100"))
    return distiller.double().train()  # float64: the plain-Python references hold to 1e-9


def batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.tensor([3, 17, 42, 99])


def test_initial_temperature_is_the_authors():
    d = build()
    assert isinstance(d, CTKD)
    assert d.current_temperature() == pytest.approx(1 + 20 * sigmoid(1.0), rel=1e-6)  # 15.62...


def test_kd_term_uses_the_learnable_temperature():
    d = build()
    with torch.no_grad():
        d.temperature.theta.fill_(-0.5)
    x, y = batch()
    out = d.forward_train(x, y, epoch=3)
    temperature = 1 + 20 * sigmoid(-0.5)
    expected = 0.9 * plain_kd(out.logits.tolist(), out.teacher_logits.tolist(), temperature)
    assert out.terms["kd"].value.item() == pytest.approx(expected, rel=1e-9)
    ce = -sum(math.log(softmax(row)[label]) for row, label in zip(out.logits.tolist(), y.tolist())) / len(y)
    assert out.terms["ce"].value.item() == pytest.approx(0.1 * ce, rel=1e-9)


def test_kd_term_with_logit_standardization():
    """CTKD.LOGIT_STANDARDIZE (LSKD's "CTKD + ours"): the same KD on z-scored logits, at the learnable temperature."""
    d = build("CTKD.LOGIT_STANDARDIZE", "True")
    with torch.no_grad():
        d.temperature.theta.fill_(0.3)
    x, y = batch()
    with torch.no_grad():
        out = d.forward_train(x, y, epoch=3)
    s, t, temperature = out.logits.tolist(), out.teacher_logits.tolist(), 1 + 20 * sigmoid(0.3)
    expected = 0.9 * plain_kd(s, t, temperature, standardize=True)
    assert out.terms["kd"].value.item() == pytest.approx(expected, rel=1e-9)
    assert expected != pytest.approx(0.9 * plain_kd(s, t, temperature), rel=1e-3)  # standardizing matters here


def test_gradients_of_the_kd_term_reach_student_and_temperature_not_teacher():
    d = build()
    x, y = batch()
    epoch = 5  # lambda 0.5
    d.forward_train(x, y, epoch=epoch).terms["kd"].value.backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    theta_grad = d.temperature.theta.grad.clone()
    assert theta_grad.abs().item() > 0
    # the same loss with theta outside the GRL: theta's gradient is -lambda times it
    with torch.no_grad():
        out = d.forward_train(x, y, epoch=epoch)
    theta = d.temperature.theta.detach().clone().requires_grad_(True)
    temperature = (1.0 + 20.0 * torch.sigmoid(theta))[0]
    (0.9 * torch_kd(out.logits, out.teacher_logits, temperature)).backward()
    torch.testing.assert_close(theta_grad, -0.5 * theta.grad, rtol=1e-9, atol=0)
    assert any(p is d.temperature.theta for p in d.learnable_parameters())  # the run's optimizer trains it


def test_ce_term_alone_leaves_the_temperature_untouched():
    d = build()
    x, y = batch()
    d.forward_train(x, y, epoch=20).terms["ce"].value.backward()
    assert d.temperature.theta.grad is None


def test_epoch_zero_of_the_curriculum_freezes_the_temperature():
    d = build("CTKD.LAMBDA.MIN", "0.0")
    x, y = batch()
    d.forward_train(x, y, epoch=0).terms["kd"].value.backward()
    assert torch.equal(d.temperature.theta.grad, torch.zeros(1))


@pytest.mark.parametrize("key, value", [("CTKD.TEMP.RANGE", "0.0"), ("CTKD.TEMP.MIN", "-1.0"),
                                        ("CTKD.LAMBDA.EPOCHS", "0"), ("CTKD.LAMBDA.MAX", "-0.5"),
                                        ("CTKD.LAMBDA.MIN", "-0.1")])
def test_config_validation(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["DISTILLER.TYPE", "CTKD", key, value])


@pytest.mark.parametrize("path", ["cifar100/ctkd/resnet32x4_resnet8x4.yaml", "fashion_mnist/ctkd/resnet20_resnet8.yaml"])
def test_configs_hold_the_authors_defaults(path):
    c = load_config(os.path.join(CONFIGS, path), []).CTKD
    assert (c.CE_WEIGHT, c.KD_WEIGHT) == (0.1, 0.9)
    assert (c.TEMP.MIN, c.TEMP.RANGE, c.TEMP.INIT) == (1.0, 20.0, 1.0)
    assert (c.LAMBDA.MIN, c.LAMBDA.MAX, c.LAMBDA.EPOCHS) == (0.0, 1.0, 10)


# --- the instance-wise temperature (CTKD.INSTANCE_WISE) -----------------------------------------------------------
def plain_instance_kd(s, t, temperatures):
    """The authors' README: mean over the batch of KL_Loss(s_i, t_i, T_i) = T^2 sum_c q (log q - log_softmax(s/T)),
    q = softmax(t/T) + 1e-7 (issue #13), in plain Python."""
    total = 0.0
    for s_row, t_row, temp in zip(s, t, temperatures):
        q = [p + 1e-7 for p in softmax([v / temp for v in t_row])]
        log_ps = [math.log(p) for p in softmax([v / temp for v in s_row])]
        total += temp * temp * sum(qc * (math.log(qc) - lc) for qc, lc in zip(q, log_ps))
    return total / len(s)


def plain_instance_temperatures(module, t, s):
    """MIN + RANGE * sigmoid(W2 relu(W1 [t, s] + b1) + b2) per sample, from the module's weights, in plain Python."""
    w1, b1 = module.mlp[0].weight.tolist(), module.mlp[0].bias.tolist()
    w2, b2 = module.mlp[2].weight.tolist()[0], module.mlp[2].bias.item()
    out = []
    for t_row, s_row in zip(t, s):
        x = list(t_row) + list(s_row)
        hidden = [max(0.0, sum(w * v for w, v in zip(row, x)) + b) for row, b in zip(w1, b1)]
        out.append(1.0 + 20.0 * sigmoid(sum(w * h for w, h in zip(w2, hidden)) + b2))
    return out


def test_instance_kd_term_is_the_authors_per_sample_loss():
    d = build("CTKD.INSTANCE_WISE", "True", "CTKD.INSTANCE_HIDDEN", "16")
    x, y = batch()
    with torch.no_grad():
        out = d.forward_train(x, y, epoch=3)
    s, t = out.logits.tolist(), out.teacher_logits.tolist()
    temperatures = plain_instance_temperatures(d.temperature, t, s)
    assert len(set(round(v, 9) for v in temperatures)) == len(temperatures)  # one per sample, all different
    assert all(1.0 < v < 21.0 for v in temperatures)
    expected = 0.9 * plain_instance_kd(s, t, temperatures)
    assert out.terms["kd"].value.item() == pytest.approx(expected, rel=1e-9)
    # with all temperatures equal it is the batch KD up to the authors' 1e-7 on the teacher's probabilities
    assert plain_instance_kd(s, t, [4.0] * 4) == pytest.approx(plain_kd(s, t, 4.0), abs=1e-3)


def test_instance_temperature_trains_through_the_grl_and_reads_detached_logits():
    d = build("CTKD.INSTANCE_WISE", "True", "CTKD.INSTANCE_HIDDEN", "16")
    x, y = batch()
    epoch = 5  # lambda 0.5
    out = d.forward_train(x, y, epoch=epoch)
    out.terms["kd"].value.backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    grads = {n: p.grad.clone() for n, p in d.temperature.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads.values())
    student_grads = [p.grad.clone() for p in d.student.parameters()]
    # the same loss outside the GRL: the MLP's gradient is -lambda times it
    d.zero_grad(set_to_none=True)
    logits, logits_t = d.student(x)[0], d.teacher(x)[0]
    inputs = torch.cat([logits_t, logits.detach()], dim=1)
    temperatures = (1.0 + 20.0 * torch.sigmoid(d.temperature.mlp(inputs))).squeeze(1)
    log_ps = torch.log_softmax(logits / temperatures[:, None], dim=1)
    q = torch.softmax(logits_t / temperatures[:, None], dim=1) + 1e-7
    (0.9 * ((q * (q.log() - log_ps)).sum(1) * temperatures**2).mean()).backward()
    for name, p in d.temperature.named_parameters():
        torch.testing.assert_close(grads[name], -0.5 * p.grad, rtol=1e-9, atol=1e-15)
    # the student's gradient is the KD's at these temperatures: none flows back through the temperature's input
    for before, p in zip(student_grads, d.student.parameters()):
        torch.testing.assert_close(before, p.grad, rtol=1e-9, atol=1e-15)


def test_instance_hidden_must_be_positive():
    with pytest.raises(ConfigError, match=r"CTKD\.INSTANCE_HIDDEN"):
        load_config(None, ["DISTILLER.TYPE", "CTKD", "CTKD.INSTANCE_WISE", "True", "CTKD.INSTANCE_HIDDEN", "0"])


@pytest.mark.parametrize("rule", ["vanilla", "dot"])
def test_instance_wise_run_trains_two_epochs(rule, small_teacher_ckpt, tmp_path):
    """The Fashion-MNIST instance-wise config through the CLI (SGD and DOT): both terms logged and finite, and the
    temperature MLP in the checkpoint (the optimizer trains it)."""
    train_main()(["--cfg", os.path.join(FM_CONFIGS, "ctkd_instance", "resnet20_resnet8.yaml"), "LOG.PREFIX",
                  str(tmp_path), "EXPERIMENT.NAME", "run", "DISTILLER.TEACHER_CKPT", small_teacher_ckpt, *SMALL,
                  "SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES", "[2]", "SOLVER.UPDATE_RULE", rule])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss/kd"]) and r["loss/kd"] > 0 and math.isfinite(r["loss/ce"]) for r in records)
    state = torch.load(tmp_path / "run" / "latest.pth", map_location="cpu", weights_only=False)
    keys = [k for k in state["distiller"] if k.startswith("temperature.mlp.")]
    assert sorted(keys) == ["temperature.mlp.0.bias", "temperature.mlp.0.weight", "temperature.mlp.2.bias",
                            "temperature.mlp.2.weight"]
