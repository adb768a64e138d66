"""The update without host waits, on the CPU: the LR in a device tensor, DOT's fp16 skip decided on the device, and
the CUDA-graph stepper's logic (warm-up, capture, replay into static buffers, eager odd batches, a capture per
epoch) driven by a stand-in backend that replays by running the recorded function again. The CUDA capture itself
is tests/test_cuda_graphs.py's (on a GPU)."""

import pytest
import torch

from mdistiller.bench.random_teacher import random_teacher_state
from mdistiller.bench.synthetic import SyntheticDataset
from mdistiller.config import load_config
from mdistiller.engine import build_run
from mdistiller.engine.cuda_graph import WARMUP_STEPS, GraphedUpdate
from mdistiller.engine.dot_optimizer import DOTOptimizer
from mdistiller.engine.speed import resolve_speed
from mdistiller.utils.errors import ConfigError

DATA = SyntheticDataset("fashion_mnist", 64, 64)
TEACHER = random_teacher_state("resnet20", "fashion_mnist", seed=5)


def _run(*extra, method="KD"):
    cfg = load_config(None, ["DISTILLER.TYPE", method, "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT",
                             "resnet8", "EXPERIMENT.DEVICE", "cpu", "SOLVER.BATCH_SIZE", "8", "SOLVER.EPOCHS",
                             "2", "SOLVER.LR_DECAY_STAGES", "[2]", "DATASET.ROOT", "/nonexistent",
                             "LOG.PRINT_FREQ", "0", "SPEED.AMP", "off", "SPEED.CHANNELS_LAST", "off",
                             "SPEED.TEACHER_HALF", "off", *extra])
    return build_run(cfg, bundle=DATA(cfg), teacher_state=TEACHER)


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), torch.arange(n)


class RerunBackend:
    """Stands in for CUDA graphs: `capture` records the function without running it (as a capture does), and
    `replay` runs it again on the static inputs, refilling the same output list."""

    def __init__(self):
        self.captured = 0

    def run_on_side_stream(self, fn):
        return fn()

    def capture(self, fn):
        self.captured += 1
        outputs = []

        def replay():
            outputs[:] = fn()
        return replay, outputs


def _state(run):
    return {k: v.clone() for k, v in run.distiller.state_dict().items()}


# (epoch, batch size) of the steps below: two epochs, each ending with a smaller batch
SCHEDULE = [(1, 8)] * 6 + [(1, 5)] + [(2, 8)] * 3 + [(2, 5)]


def _train(run, lrs):
    losses = []
    for i, ((epoch, n), lr) in enumerate(zip(SCHEDULE, lrs)):
        run.trainer.set_lr(lr)
        step = run.trainer.run_step(*_batch(n, seed=i), epoch=epoch)
        losses.append({k: v.clone() for k, v in step.losses.items()})
    return losses


@pytest.mark.parametrize("method", ["KD", "DKD"])  # DKD's forward reads the epoch (its warm-up)
def test_graphed_update_steps_as_the_eager_loop_bit_for_bit(method):
    lrs = [0.05 * (0.9 ** i) for i in range(len(SCHEDULE))]  # a new LR every step, as a warm-up schedule sets
    plain = _run(method=method)
    expected = _train(plain, lrs)
    run = _run(method=method)
    run.update_rule.use_device_lr("cpu")
    backend = RerunBackend()
    graphed = GraphedUpdate(run.trainer.update, "cpu", backend=backend)
    run.trainer.replay_updates(graphed)
    got = _train(run, lrs)
    assert got == expected or all(
        g.keys() == e.keys() and all(torch.equal(g[k], e[k]) for k in g) for g, e in zip(got, expected))
    assert all(torch.equal(a, b) for a, b in zip(_state(run).values(), _state(plain).values()))
    # warm-up eagerly, one capture per epoch, the smaller batches eagerly, the rest replayed
    assert backend.captured == graphed.captures == 2
    assert graphed.eager_steps == WARMUP_STEPS + 2
    assert graphed.replays == len(SCHEDULE) - WARMUP_STEPS - 2


def test_a_capture_that_fails_leaves_the_run_eager_with_one_line(caplog):
    class Refuses(RerunBackend):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    run = _run()
    graphed = GraphedUpdate(run.trainer.update, "cpu", backend=Refuses(), label="the KD update")
    run.trainer.replay_updates(graphed)
    for i in range(WARMUP_STEPS + 3):
        run.trainer.run_step(*_batch(seed=i), epoch=1)
    assert graphed.disabled == "RuntimeError: operation not permitted when stream is capturing"
    assert graphed.captures == 0 and graphed.eager_steps == WARMUP_STEPS + 3
    lines = [r.getMessage() for r in caplog.records if "CUDA graphs off" in r.getMessage()]
    assert lines == ["CUDA graphs off: capturing the KD update failed (RuntimeError: operation not permitted when "
                     "stream is capturing); training goes on eagerly"]


def test_device_lr_is_filled_in_place_and_checkpointed_as_a_float():
    run = _run()
    rule = run.update_rule
    rule.use_device_lr("cpu")
    lr = rule.optimizer.param_groups[0]["lr"]
    run.trainer.set_lr(0.0125)
    assert rule.optimizer.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.0125)
    state = rule.state_dict()
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0125)
    assert not torch.is_tensor(state["optimizer"]["param_groups"][0]["lr"])
    other = _run()
    other.update_rule.use_device_lr("cpu")
    other.update_rule.load_state_dict(state)
    restored = other.update_rule.optimizer.param_groups[0]["lr"]
    assert torch.is_tensor(restored) and float(restored) == pytest.approx(0.0125)


def _dot_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(4, 3, generator=g), torch.randn(3, generator=g), torch.randn(2, generator=g)]
    grads_t = [torch.randn(4, 3, generator=g), torch.randn(3, generator=g), None]  # the third: distill only
    grads_d = [torch.randn(4, 3, generator=g), torch.randn(3, generator=g), torch.randn(2, generator=g)]
    return params, grads_t, grads_d


def _dot(params, lr=0.1):
    return DOTOptimizer(params, lr=lr, momentum=0.9, delta=0.075, weight_decay=5e-4)


def test_dot_fp16_skip_is_decided_on_the_device_and_exact():
    # found_inf 0: the update is the plain one, bit for bit; 1: weights, both momenta and the cosines keep their
    # bits, as GradScaler's skipped step leaves them.
    params, gt, gd = _dot_problem()
    ref = [p.clone() for p in params]
    plain = _dot(ref)
    plain.step_with_grads(gt, gd, track_cosine=True)
    plain.step_with_grads(gd, gt, track_cosine=True)
    opt = _dot(params)
    opt.step_with_grads(gt, gd, track_cosine=True, found_inf=torch.zeros(1))
    saved = [p.clone() for p in params]
    buffers = [(i, k, v.clone()) for i, p in enumerate(params) for k, v in opt.state[p].items()]
    cosines = [c.clone() for c in opt.cosines]
    bad = [g * float("inf") if g is not None else None for g in gd]
    opt.step_with_grads(gt, bad, track_cosine=True, found_inf=torch.ones(1))  # skipped
    assert all(torch.equal(p, s) for p, s in zip(params, saved))
    assert [(i, k) for i, p in enumerate(params) for k in opt.state[p]] == [(i, k) for i, k, _ in buffers]
    assert all(torch.equal(opt.state[params[i]][k], v) for i, k, v in buffers)
    assert all(torch.equal(c, s) for c, s in zip(opt.cosines, cosines))
    opt.step_with_grads(gd, gt, track_cosine=True, found_inf=torch.zeros(1))
    assert all(torch.equal(p, r) for p, r in zip(params, ref))


def test_dot_with_a_device_lr_follows_the_float_lr():
    # theta - lr * v with lr in a tensor (multiplied on the device) against the alpha form: float32 rounding apart
    params, gt, gd = _dot_problem(1)
    ref = [p.clone() for p in params]
    a, b = _dot(ref, lr=0.1), _dot(params, lr=0.1)
    b.param_groups[0]["lr"] = torch.tensor(0.1)
    for _ in range(3):
        a.step_with_grads(gt, gd)
        b.step_with_grads(gt, gd)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


def test_cuda_graphs_setting_is_resolved_for_the_device():
    cpu = torch.device("cpu")
    assert not resolve_speed(load_config(None, []), cpu).cuda_graphs  # auto: CUDA only
    assert not resolve_speed(load_config(None, ["SPEED.CUDA_GRAPHS", "off"]), cpu).cuda_graphs
    with pytest.raises(ConfigError, match="SPEED.CUDA_GRAPHS"):
        load_config(None, ["SPEED.CUDA_GRAPHS", "maybe"])
    with pytest.raises(ConfigError, match="SPEED.CUDA_GRAPHS"):
        load_config(None, ["SPEED.CUDA_GRAPHS", "on", "EXPERIMENT.DEVICE", "cpu"])
