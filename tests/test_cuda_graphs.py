"""The update captured as a CUDA graph (SPEED.CUDA_GRAPHS, engine/cuda_graph.py) and the step without host waits,
on a GPU (skipped without one: CI has none; tools/gpu_check.sh runs this file on a lent GPU machine). The logic
around the capture is tested on the CPU in tests/test_sync_free_step.py."""

import pytest
import torch

from mdistiller.bench.random_teacher import random_teacher_state
from mdistiller.bench.synthetic import SyntheticDataset
from mdistiller.config import load_config
from mdistiller.engine import build_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (tools/gpu_check.sh runs it on one)")
DATA = SyntheticDataset("fashion_mnist", 256, 64)
TEACHER = random_teacher_state("resnet20", "fashion_mnist", seed=5)
# (DISTILLER.TYPE, SOLVER.UPDATE_RULE, extra keys): the methods issue 29 names
METHODS = [("KD", "vanilla", ()), ("DKD", "vanilla", ()), ("CRD", "vanilla", ("CRD.SAMPLER", "keys")),
           ("REVIEWKD", "vanilla", ()), ("KD++", "vanilla", ()), ("KD", "dot", ())]


@pytest.fixture(autouse=True)
def _float32(full_float32):  # conftest.py: TF32 off
    yield


def _run(method, rule, graphs, *extra):
    cfg = load_config(None, ["DISTILLER.TYPE", method, "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT",
                             "resnet8", "EXPERIMENT.DEVICE", "cuda", "SOLVER.BATCH_SIZE", "16", "SOLVER.EPOCHS",
                             "2", "SOLVER.LR_DECAY_STAGES", "[2]", "SOLVER.LR", "0.01", "DATASET.ROOT",
                             "/nonexistent", "LOG.PRINT_FREQ", "0", "SPEED.AMP", "off", "SPEED.CHANNELS_LAST",
                             "off", "SPEED.TEACHER_HALF", "off", "SOLVER.UPDATE_RULE", rule, "SPEED.CUDA_GRAPHS",
                             graphs, "SPEED.PROBE", "False", *extra])
    return build_run(cfg, bundle=DATA(cfg), teacher_state=TEACHER)


def _batch(i, n=16):
    g = torch.Generator().manual_seed(i)
    images = torch.randn(n, 3, 32, 32, generator=g).cuda()
    labels = torch.randint(0, 10, (n,), generator=g).cuda()
    return images, labels, torch.randint(0, 256, (n,), generator=g).cuda()


def _steps(run, n):
    torch.manual_seed(0)  # the same random draws (CRD's negatives) in both runs
    losses = []
    for i in range(n):
        run.trainer.set_lr(0.01 * (1 - i / (2 * n)))  # a new LR every step: the graph must read the current one
        step = run.trainer.run_step(*_batch(i % 7), epoch=1 + i // 60)  # an epoch change: a second capture
        losses.append(float(step.losses["total"]))
    return losses, {k: v.detach().float().cpu() for k, v in run.distiller.student.state_dict().items()}


@pytest.mark.parametrize("method,rule,extra", METHODS, ids=[f"{m}-{r}" for m, r, _ in METHODS])
def test_100_replayed_steps_equal_eager_steps(method, rule, extra):
    eager = _run(method, rule, "off", *extra)
    graphed = _run(method, rule, "on", *extra)
    assert graphed.trainer.graphed is not None and eager.trainer.graphed is None
    e_losses, e_w = _steps(eager, 100)
    g_losses, g_w = _steps(graphed, 100)
    g = graphed.trainer.graphed
    assert g.disabled is None and g.captures == 2 and g.replays == 100 - g.eager_steps
    for a, b in zip(g_losses, e_losses):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (a, b)
    for k in e_w:
        if e_w[k].is_floating_point():
            rel = float((g_w[k] - e_w[k]).norm() / e_w[k].norm().clamp_min(1e-2))
            assert rel < 1e-3, (k, rel)


@pytest.mark.parametrize("method,rule,extra,amp", [(*m, "off") for m in METHODS]
                         + [("KD", "vanilla", (), "fp16"), ("KD", "dot", (), "fp16"), ("KD", "vanilla", (), "bf16")])
def test_the_eager_update_never_waits_for_the_device(method, rule, extra, amp):
    # what makes it capturable: after a first step (lazy state), no update synchronises with the host
    run = _run(method, rule, "off", *extra, "SPEED.AMP", amp)
    run.update_rule.use_device_lr("cuda")
    run.trainer.run_step(*_batch(0), epoch=1)
    batches = [_batch(i) for i in range(1, 6)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches:
            run.trainer.set_lr(0.01)
            run.trainer.run_step(*batch, epoch=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_run_with_graphs_records_them_and_trains(tmp_path):
    run = _run("KD", "vanilla", "auto")
    assert run.speed.cuda_graphs and run.speed.as_dict()["cuda_graphs"]
    run.trainer.train()
    g = run.trainer.graphed
    assert g.disabled is None and g.captures == 2 and g.replays > 0
    assert run.evaluation.best is not None


def test_a_method_that_cannot_be_captured_falls_back_with_its_reason():
    run = _run("CRD", "vanilla", "auto", "CRD.SAMPLER", "redraw")
    assert not run.speed.cuda_graphs and run.trainer.graphed is None
    assert any("CUDA_GRAPHS auto -> off" in note and "CRD" in note for note in run.speed.notes)


def test_a_fresh_gpu_run_is_probed_and_records_the_times():
    cfg = load_config(None, ["DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT", "resnet8",
                             "EXPERIMENT.DEVICE", "cuda", "SOLVER.BATCH_SIZE", "16", "DATASET.ROOT", "/nonexistent"])
    run = build_run(cfg, bundle=DATA(cfg), teacher_state=TEACHER)
    assert run.speed.probe == ()
    probe = [n for n in run.speed.notes if n.startswith("SPEED probe")]
    assert len(probe) == 1 and "is fastest per update" in probe[0] and probe[0].count(" ms") >= 2, probe
