"""The probe that decides SPEED's "auto" keys on a GPU by timing the run's own update (engine/speed_probe.py):
the candidates it times, the choice and its record, and that probing leaves the run exactly as it was (checked on
the CPU with real timed updates of the channels-last candidates; on a GPU tools/gpu_check.sh shows its choice)."""

import dataclasses

import torch

from mdistiller.bench.random_teacher import random_teacher_state
from mdistiller.bench.synthetic import SyntheticDataset
from mdistiller.config import load_config
from mdistiller.engine import build_run
from mdistiller.engine.speed import SpeedPlan, resolve_speed
from mdistiller.engine.speed_probe import candidates, label, probe_speed
from mdistiller.engine.update_rule import SGDRule

DATA = SyntheticDataset("fashion_mnist", 64, 64)
TEACHER = random_teacher_state("resnet20", "fashion_mnist", seed=5)


def _run():
    cfg = load_config(None, ["DISTILLER.TYPE", "DKD", "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT",
                             "resnet8", "EXPERIMENT.DEVICE", "cpu", "SOLVER.BATCH_SIZE", "8", "DATASET.ROOT",
                             "/nonexistent", "LOG.PRINT_FREQ", "0", "SPEED.AMP", "off", "SPEED.CHANNELS_LAST", "off",
                             "SPEED.TEACHER_HALF", "off"])
    return build_run(cfg, bundle=DATA(cfg), teacher_state=TEACHER)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g), torch.arange(8)


def test_candidates_are_every_combination_of_the_auto_keys():
    plan = SpeedPlan(device_type="cuda", amp=torch.bfloat16, teacher_dtype=torch.bfloat16, channels_last=True,
                     cuda_graphs=True)
    got = {label(p): p for p in candidates(plan, ("AMP", "CHANNELS_LAST", "CUDA_GRAPHS", "TEACHER_HALF"), True)}
    assert sorted(got) == sorted(["float32 nhwc graphs", "float32 nhwc", "float32 graphs", "float32",
                                  "bf16 nhwc graphs", "bf16 nhwc", "bf16 graphs", "bf16"])
    assert got["float32"].teacher_dtype is None and got["bf16 graphs"].teacher_dtype == torch.bfloat16
    # TEACHER_HALF set explicitly stays as set; a GPU without bf16 is probed in float32 only
    fixed = candidates(plan, ("AMP",), True)
    assert [p.teacher_dtype for p in fixed] == [torch.bfloat16, torch.bfloat16]
    assert [label(p) for p in candidates(plan, ("AMP", "CUDA_GRAPHS"), False)] == ["float32 nhwc graphs",
                                                                                  "float32 nhwc"]


def test_the_fastest_candidate_is_chosen_and_every_time_recorded():
    plan = SpeedPlan(device_type="cuda", amp=torch.bfloat16, teacher_dtype=torch.bfloat16, channels_last=True,
                     cuda_graphs=True, probe=("AMP", "CUDA_GRAPHS"), notes=("SPEED.AMP auto -> bf16: ...",))
    ms = {"bf16 nhwc graphs": 3.1, "bf16 nhwc": 14.2, "float32 nhwc graphs": 2.4}

    def timer(p):
        if label(p) not in ms:
            raise RuntimeError("out of memory\nmore")
        return ms[label(p)] / 1000

    chosen = probe_speed(plan, plan.probe, None, None, None, "cpu", 0.1, bf16=True, timer=timer)
    assert label(chosen) == "float32 nhwc graphs" and chosen.amp is None and chosen.cuda_graphs
    assert chosen.probe == () and chosen.notes[0] == plan.notes[0]
    note = chosen.notes[-1]
    assert note.startswith("SPEED probe (AMP auto, CUDA_GRAPHS auto; ")
    assert note.endswith("float32 nhwc graphs is fastest per update (float32 nhwc graphs 2.40 ms, bf16 nhwc graphs "
                         "3.10 ms, bf16 nhwc 14.20 ms; float32 nhwc failed (RuntimeError: out of memory))")


def test_a_probe_where_nothing_runs_keeps_the_rules_choice():
    plan = SpeedPlan(device_type="cuda", amp=torch.bfloat16, channels_last=True, probe=("CHANNELS_LAST",))

    def timer(p):
        raise RuntimeError("no")

    kept = probe_speed(plan, plan.probe, None, None, None, "cpu", 0.1, bf16=True, timer=timer)
    assert dataclasses.replace(kept, notes=()) == dataclasses.replace(plan, notes=())
    assert "no candidate ran" in kept.notes[-1]


def test_probing_times_real_updates_and_leaves_the_run_untouched():
    # Real updates of both channels-last candidates on copies of the method; the run then trains exactly as an
    # unprobed one: same weights, same random draws.
    plain, probed = _run(), _run()
    plan = dataclasses.replace(probed.speed, probe=("CHANNELS_LAST",))

    def build_rule(params, fp16):
        return SGDRule(params=params, lr=0.05, momentum=0.9, weight_decay=5e-4)

    rng = torch.get_rng_state()
    chosen = probe_speed(plan, plan.probe, probed.distiller, build_rule, _batch(9), "cpu", 0.05, bf16=False,
                         budget_s=2.0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert "is fastest per update" in chosen.notes[-1] and "float32 nhwc " in chosen.notes[-1]
    assert "float32 " in chosen.notes[-1].split("(", 2)[2]
    for i in range(3):
        a = plain.trainer.run_step(*_batch(i), epoch=1)
        b = probed.trainer.run_step(*_batch(i), epoch=1)
        assert all(torch.equal(a.losses[k], b.losses[k]) for k in a.losses)
    assert all(torch.equal(x, y) for x, y in zip(plain.distiller.state_dict().values(),
                                                 probed.distiller.state_dict().values()))


def test_the_probe_is_for_fresh_cuda_runs_only():
    assert resolve_speed(load_config(None, []), torch.device("cpu")).probe == ()
