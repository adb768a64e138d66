"""SPEED: the training fast paths, resolved once per run from the config and the device.

Every switch is optional and each keeps the numbers within a known distance of the plain float32 run
(tests/test_speed_switches.py states the tolerances):
  - AMP: autocast (bf16 or fp16) around the training forward + losses and the evaluation forward; fp16 adds a
    dynamic loss scale (torch's GradScaler for the vanilla trainer, loss_scaler.LossScaler for DOT's two
    gradients). Backward and optimizer step stay outside autocast, on float32 weights.
  - CHANNELS_LAST: every 4-d weight of the distiller (student, teacher, connectors) and every batch in NHWC.
  - COMPILE: torch.compile of the student's and teacher's `forward` (not of the module or its `__call__`): the
    module object, its state_dict keys (no "_orig_mod.") and its forward hooks (KD++ registers some per step)
    stay as they are, eager, around the compiled forward.
  - TEACHER_INFERENCE_MODE / TEACHER_HALF: how the FrozenTeacher (models/frozen.py) runs.
  - TEACHER_INT8 (CPU): the teacher's forward replaced by a calibrated int8 graph (teacher_int8.py).

`resolve_speed` turns "auto" into a decision (SpeedPlan) and `apply_speed` converts the models; the builder
does both once, after the added terms are prepared (KD++'s class means are computed by the plain float32 teacher,
so their cache never depends on these switches) and before DDP wraps the model.
"""

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..utils import distributed
from ..utils.errors import ConfigError
from ..utils.hardware import cpu_bf16_decision
from .teacher_int8 import install_int8_forward

#: the torch.compile backend; tests swap in a cheap one to check the wiring without inductor's compile time
COMPILE_BACKEND = "inductor"
# CHANNELS_LAST auto on the CPU: measured faster (docs/speed.md).
CPU_CHANNELS_LAST = True

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class SpeedPlan:
    """The resolved fast paths of one run."""

    device_type: str = "cpu"
    amp: Optional[torch.dtype] = None  # autocast dtype; None = float32
    channels_last: bool = False
    compile: bool = False
    teacher_inference_mode: bool = False
    teacher_dtype: Optional[torch.dtype] = None  # None = the teacher in float32
    teacher_int8: bool = False
    int8_calibration: int = 0  # images the int8 teacher is calibrated on
    cuda_graphs: bool = False  # the update replayed as a CUDA graph where the method can be captured
    cuda_graphs_required: bool = False  # SPEED.CUDA_GRAPHS on: a method that cannot be captured is an error
    # the "auto" keys a probe of the real update still decides (speed_probe.py; CUDA, SPEED.PROBE, a fresh run)
    probe: Tuple[str, ...] = ()
    # why each "auto" came out as it did, and what a resume kept (train.log, summary.json "speed_decisions")
    notes: Tuple[str, ...] = ()

    @property
    def needs_scaler(self):
        """fp16 gradients underflow without a loss scale; bf16 has float32's range and needs none."""
        return self.amp == torch.float16

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        # Under capture the cast weights must be recast on every replay: no autocast cache (same numbers).
        return torch.autocast(self.device_type, dtype=self.amp, cache_enabled=not self.cuda_graphs)

    def batch(self, images):
        """The batch in the layout the models were converted to."""
        if self.channels_last and torch.is_tensor(images) and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def as_dict(self):
        """JSON-friendly record (summary.json "speed")."""
        return {"amp": _DTYPE_NAMES.get(self.amp, "off"), "channels_last": self.channels_last,
                "compile": self.compile, "teacher_inference_mode": self.teacher_inference_mode,
                "teacher_half": _DTYPE_NAMES.get(self.teacher_dtype, "off"), "teacher_int8": self.teacher_int8,
                "cuda_graphs": self.cuda_graphs}

    def describe(self):
        d = self.as_dict()
        on = {True: "on", False: "off"}
        return (f"amp {d['amp']}, channels_last {on[d['channels_last']]}, compile {on[d['compile']]}, "
                f"teacher inference_mode {on[d['teacher_inference_mode']]}, teacher half {d['teacher_half']}, "
                f"teacher int8 {on[d['teacher_int8']]}, cuda graphs {on[d['cuda_graphs']]}")


def _cuda_bf16(device):
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _auto_amp(device):
    """(amp, why) of SPEED.AMP auto on `device`."""
    if device.type == "cuda":
        if _cuda_bf16(device):
            return "bf16", f"{torch.cuda.get_device_name(device)} supports bf16"
        return "off", f"{torch.cuda.get_device_name(device)} has no bf16"
    native, why = cpu_bf16_decision()
    return ("bf16" if native else "off"), why


def _keep_recorded(key, resolved, recorded, valid, notes):
    """A resumed run keeps its recorded choice of an "auto" key (exactness first) where this device can run it."""
    if recorded is None or recorded == resolved:
        return resolved
    if not valid:
        notes.append(f"SPEED.{key} auto: the run recorded {recorded}, which this device cannot run; using "
                     f"{resolved}")
        return resolved
    notes.append(f"SPEED.{key} auto: kept the run's recorded {recorded} (this machine would choose {resolved})")
    return recorded


def resolve_speed(cfg, device, recorded=None):
    """SpeedPlan for `cfg` on `device` (a torch.device); raises ConfigError for a choice the device cannot run.
    `recorded`: the plan (SpeedPlan.as_dict()) a resumed run was started with; its "auto" choices are kept."""
    s, device = cfg.SPEED, torch.device(device)
    cuda = device.type == "cuda"
    recorded = recorded or {}
    notes = []
    if s.TEACHER_INT8 and device.type != "cpu":  # config validation catches an explicit cuda; this is auto's
        raise ConfigError(f"config key SPEED.TEACHER_INT8: the int8 teacher runs on the CPU, this run is on "
                          f"{device.type}; on a GPU use SPEED.TEACHER_HALF")
    amp = s.AMP
    if amp == "auto":
        amp, why = _auto_amp(device)
        notes.append(f"SPEED.AMP auto -> {amp}: {why}")
        amp = _keep_recorded("AMP", amp, recorded.get("amp"),
                             recorded.get("amp") != "fp16" or cuda, notes)
    if amp == "fp16" and not cuda:
        raise ConfigError("config key SPEED.AMP: fp16 autocast is for CUDA GPUs; on the CPU use bf16 or off")
    if amp == "bf16" and cuda and not _cuda_bf16(device):
        raise ConfigError(f"config key SPEED.AMP: {torch.cuda.get_device_name(device)} has no bf16; use fp16 or off")
    amp_dtype = _DTYPES[amp]

    channels_last = s.CHANNELS_LAST == "on" or (s.CHANNELS_LAST == "auto" and (cuda or CPU_CHANNELS_LAST))
    if s.CHANNELS_LAST == "auto":
        channels_last = _keep_recorded("CHANNELS_LAST", channels_last, recorded.get("channels_last"), True, notes)
    teacher_half = s.TEACHER_HALF == "on" or (s.TEACHER_HALF == "auto" and amp_dtype is not None)
    teacher_half = teacher_half and not s.TEACHER_INT8  # an int8 teacher has its own precision
    teacher_dtype = None
    if teacher_half:
        if amp_dtype is not None:
            teacher_dtype = amp_dtype  # the teacher computes in the dtype the student's autocast uses
        else:
            teacher_dtype = torch.bfloat16 if not cuda or _cuda_bf16(device) else torch.float16
    if s.TEACHER_HALF == "auto" and not s.TEACHER_INT8 and "teacher_half" in recorded:
        name = _keep_recorded("TEACHER_HALF", _DTYPE_NAMES.get(teacher_dtype, "off"), recorded["teacher_half"],
                              recorded["teacher_half"] != "fp16" or cuda, notes)
        teacher_dtype = _DTYPES[name]
    graphs = _cuda_graphs(s.CUDA_GRAPHS, device, recorded, notes)
    probe = ()
    # a resumed run keeps what it recorded (probed once); a compiled run is not probed (a compile per candidate),
    # nor a multi-process one (each rank would time, and might choose, for itself)
    if cuda and s.PROBE and not recorded and not s.COMPILE and distributed.world_size() == 1:
        probe = tuple(k for k in ("AMP", "CHANNELS_LAST", "CUDA_GRAPHS", "TEACHER_HALF") if s[k] == "auto"
                      and (k != "CUDA_GRAPHS" or graphs) and (k != "AMP" or _cuda_bf16(device)))
        if not set(probe) & {"AMP", "CHANNELS_LAST", "CUDA_GRAPHS"}:
            probe = ()
    return SpeedPlan(device_type=device.type, amp=amp_dtype, channels_last=channels_last, compile=bool(s.COMPILE),
                     teacher_inference_mode=bool(s.TEACHER_INFERENCE_MODE), teacher_dtype=teacher_dtype,
                     teacher_int8=bool(s.TEACHER_INT8), int8_calibration=int(s.TEACHER_INT8_CALIBRATION),
                     cuda_graphs=graphs, cuda_graphs_required=s.CUDA_GRAPHS == "on", probe=probe,
                     notes=tuple(notes))


def _cuda_graphs(mode, device, recorded, notes):
    """SPEED.CUDA_GRAPHS as far as the device decides it (the method may still decline: build.py)."""
    if mode == "off":
        return False
    if device.type != "cuda":
        if mode == "on":
            raise ConfigError(f"config key SPEED.CUDA_GRAPHS: CUDA graphs replay GPU work, this run is on "
                              f"{device.type}; set it to auto or off")
        return False
    if distributed.world_size() > 1:
        why = (f"{distributed.world_size()} processes train: the gradient all-reduce is not captured (one-process "
               f"runs only)")
        if mode == "on":
            raise ConfigError(f"config key SPEED.CUDA_GRAPHS on: {why}; set it to auto or off")
        notes.append(f"SPEED.CUDA_GRAPHS auto -> off: {why}")
        return False
    if mode == "auto":
        notes.append("SPEED.CUDA_GRAPHS auto -> on: one CUDA process")
        return _keep_recorded("CUDA_GRAPHS", True, recorded.get("cuda_graphs"), True, notes)
    return True


def recorded_plan(run_dir):
    """The fast paths (SpeedPlan.as_dict()) a run in `run_dir` recorded: its summary.json's (a finished run; the
    small file first), else its latest.pth's; None for a run that recorded none (started before checkpoints
    recorded plans, or not started). Both are written from the same plan."""
    summary = os.path.join(run_dir, "summary.json")
    if os.path.isfile(summary):
        try:
            with open(summary) as f:
                speed = json.load(f).get("speed")
        except (OSError, ValueError, AttributeError):
            speed = None
        if isinstance(speed, dict):
            return speed
    ckpt = os.path.join(run_dir, "latest.pth")
    if os.path.isfile(ckpt):
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)  # our own run's file
        except Exception:
            state = None  # a damaged checkpoint is reported by the resume that reads it
        if isinstance(state, dict):
            hook = (state.get("hooks") or {}).get("speed_plan", state)  # without "hooks": the flat layout
            if isinstance(hook, dict) and isinstance(hook.get("speed"), dict):
                return hook["speed"]
    return None


def compile_forward(module):
    """torch.compile `module.forward` in place (see the module docstring for why not the module itself)."""
    module.forward = torch.compile(module.forward, backend=COMPILE_BACKEND)
    return module


def apply_speed(plan, distiller, extra_teachers=(), calibration_batches=None):
    """Convert the distiller's models, and any other FrozenTeacher the run uses (the loss monitor's), for `plan`,
    in place (parameters keep their identity).

    calibration_batches: a callable returning an iterable of (images, ...) training batches, needed for
    plan.teacher_int8 (called once per teacher, before any other conversion, on the float32 teacher)."""
    teachers = [t for t in (distiller.teacher, *extra_teachers) if t is not None]
    if plan.teacher_int8 and teachers:
        if calibration_batches is None:
            raise ValueError("apply_speed: SPEED.TEACHER_INT8 needs calibration_batches")
        for teacher in teachers:
            install_int8_forward(teacher.model, calibration_batches(), plan.int8_calibration)
    if plan.channels_last:
        distiller.to(memory_format=torch.channels_last)
        for teacher in extra_teachers:
            teacher.to(memory_format=torch.channels_last)
    for teacher in teachers:
        teacher.run_in(plan.teacher_inference_mode, plan.teacher_dtype)
    if plan.compile:
        compile_forward(distiller.student)
        for teacher in teachers:
            if not plan.teacher_int8:
                compile_forward(teacher.model)
    return distiller
