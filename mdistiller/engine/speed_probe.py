"""SPEED "auto" on a GPU by measurement: a probe of a few seconds on the run's real update.

Which fast paths win on a GPU depends on the models, the batch and the card: bf16 autocast halves the arithmetic
but adds casts, which a launch-bound step pays for; NHWC suits tensor cores but not every small convolution; CUDA
graphs remove launches but the first capture costs time. The rules `resolve_speed` applies cannot know; the
probe measures. For every combination of the keys left "auto" (SPEED.AMP: off or bf16, SPEED.CHANNELS_LAST: on
or off, SPEED.CUDA_GRAPHS: on or off) it times the update on a copy of the run's method (its teacher, terms and
update rule, converted as that plan would), on a random batch of the run's shape, and keeps the fastest. The run
itself is untouched: the copies are discarded and the random number generators restored, so a probed run trains
from the same state as one that was not probed.

The decision and every measured time go to train.log and summary.json ("speed_decisions"); a resumed run keeps
the plan it recorded (speed.py), so it is probed only once. SPEED.PROBE False keeps the rule-based choices.
"""

import copy
import dataclasses
import itertools
import logging
import time

import torch

from ..data.views import view_recipe
from ..utils import distributed
from ..utils.env import rng_state, set_rng_state
from .cuda_graph import GraphedUpdate
from .ddp_wrap import wrap_for_training
from .speed import apply_speed
from .trainer import Trainer
from .update_rule import UPDATE_RULE_REGISTRY

logger = logging.getLogger("mdistiller")

PROBE_SECONDS = 5.0  # the whole probe, every candidate's copy, warm-up and timed steps included
TIMED_STEPS = 10  # at most, per candidate, after its warm-up


PROBED_KEYS = ("AMP", "CHANNELS_LAST", "CUDA_GRAPHS")


def candidates(plan, keys, bf16):
    """The plans the probe times: `plan` with every combination of the "auto" `keys` among PROBED_KEYS (and
    "TEACHER_HALF": auto follows AMP); `bf16`: the device can autocast to bf16."""
    choices = {
        "AMP": [("amp", None)] + ([("amp", torch.bfloat16)] if bf16 else []),
        "CHANNELS_LAST": [("channels_last", True), ("channels_last", False)],
        "CUDA_GRAPHS": [("cuda_graphs", True), ("cuda_graphs", False)],
    }
    axes = [choices[k] for k in PROBED_KEYS if k in keys]
    out = []
    for combo in itertools.product(*axes):
        changes = dict(combo)
        if "amp" in changes and "TEACHER_HALF" in keys:
            changes["teacher_dtype"] = changes["amp"]
        out.append(dataclasses.replace(plan, **changes))
    return out


def label(plan):
    amp = {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[plan.amp]
    return f"{amp}{' nhwc' if plan.channels_last else ''}{' graphs' if plan.cuda_graphs else ''}"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_update(plan, distiller, build_rule, batch, device, budget_s, lr):
    """Seconds per update of `plan` on a copy of `distiller`: its warm-up (and capture) untimed, then up to
    TIMED_STEPS updates within `budget_s`. `build_rule(params, fp16)`: the run's update rule for the copy."""
    method = copy.deepcopy(distiller)
    apply_speed(plan, method)
    why = method.prepare_capture() if plan.cuda_graphs else None
    if why:
        raise RuntimeError(f"the update cannot be captured: {why}")
    rule = build_rule(method.learnable_parameters(), plan.needs_scaler)
    trainer = Trainer(method, wrap_for_training(method, device), None, rule, speed=plan, device=device)
    trainer.set_lr(lr)
    warm = 1
    if plan.cuda_graphs:
        rule.use_device_lr(device)
        graphed = GraphedUpdate(trainer.update, device, label="the probe's update")
        trainer.replay_updates(graphed)
        warm = graphed.warmup + 2  # warm-up, the capture, one replay
    method.train()
    images, labels, index = batch
    for _ in range(warm):
        trainer.run_step(images, labels, index, 1)
    if trainer.graphed is not None and trainer.graphed.disabled:
        raise RuntimeError(trainer.graphed.disabled)
    _sync(device)
    start, steps = time.perf_counter(), 0
    while steps < TIMED_STEPS and (steps == 0 or time.perf_counter() - start < budget_s):
        trainer.run_step(images, labels, index, 1)
        steps += 1
        if steps == 1:
            _sync(device)  # the first step alone says whether the budget allows more
    _sync(device)
    return (time.perf_counter() - start) / steps


def probe_speed(plan, keys, distiller, build_rule, batch, device, lr, bf16, budget_s=PROBE_SECONDS, timer=None):
    """The fastest of `candidates(plan, keys, bf16)`, with notes naming every measured time. `timer(plan) ->
    seconds per update` replaces the measurement (tests); the run's RNG state is restored either way."""
    device = torch.device(device)
    plans = candidates(plan, keys, bf16)
    saved = rng_state()
    started, times, failed = time.perf_counter(), {}, {}
    try:
        for i, cand in enumerate(plans):
            left = budget_s - (time.perf_counter() - started)
            if left <= 0 and times:
                failed[label(cand)] = "not timed: the probe's time was up"
                continue
            try:
                if timer is not None:
                    times[cand] = timer(cand)
                else:
                    per = max(left / (len(plans) - i), 0.05) / 2  # half for the copy and warm-up
                    times[cand] = time_update(cand, distiller, build_rule, batch, device, per, lr)
            except Exception as e:  # noqa: BLE001 - a candidate that cannot run is not chosen
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                failed[label(cand)] = f"failed ({type(e).__name__}: {first})"
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        set_rng_state(saved)
    if not times:
        note = "SPEED probe: no candidate ran (" + "; ".join(f"{k} {v}" for k, v in failed.items()) + \
               "); keeping the rule-based choices"
        return dataclasses.replace(plan, notes=plan.notes + (note,))
    best = min(times, key=times.get)
    measured = ", ".join(f"{label(p)} {1000 * t:.2f} ms" for p, t in sorted(times.items(), key=lambda kv: kv[1]))
    extra = "".join(f"; {k} {v}" for k, v in failed.items())
    probed = ", ".join(f"{k} auto" for k in PROBED_KEYS if k in keys)
    note = (f"SPEED probe ({probed}; {time.perf_counter() - started:.1f} s): "
            f"{label(best)} is fastest per update ({measured}{extra})")
    return dataclasses.replace(best, probe=(), notes=plan.notes + (note,))


def probe_run_speed(cfg, plan, distiller, data, device):
    """probe_speed for a classification run: a random batch of the run's per-process size and image shape, the
    run's update rule and LR (the task calls this before converting the method for the chosen plan)."""
    device = torch.device(device)
    rows = max(1, cfg.SOLVER.BATCH_SIZE // distributed.world_size())
    g = torch.Generator().manual_seed(0)
    size = data.image_size
    views = view_recipe(getattr(distiller, "train_views", None))  # a method fed several views: B x V x C x H x W
    shape = (rows,) + ((views.num_views,) if views else ()) + (3, size, size)
    batch = (torch.randn(*shape, generator=g).to(device),
             torch.randint(0, data.num_classes, (rows,), generator=g).to(device),
             torch.randint(0, max(1, data.num_train), (rows,), generator=g).to(device))
    rule_cls = UPDATE_RULE_REGISTRY.get(cfg.SOLVER.UPDATE_RULE, "SOLVER.UPDATE_RULE")

    def build_rule(params, fp16):
        return rule_cls.build(cfg, params, device, fp16)

    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return probe_speed(plan, plan.probe, distiller, build_rule, batch, device, cfg.SOLVER.LR, bf16)
