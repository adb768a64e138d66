"""The Distiller: a student, an optional frozen teacher, and the losses that tie them.

Everything a training method needs beyond the student (connectors, projectors, memory banks) lives in the
distiller as submodules, so the optimizer picks up their parameters and checkpoints save them without the
engine knowing about any particular method. The teacher is excluded from both: it is frozen, stays in eval mode
whatever `train()` is called with, and is always restored from its own checkpoint.
"""

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .loss_ramp import apply_loss_ramp, ramp_factor, ramped_term_names
from .losses import task_loss


class Distiller(nn.Module):
    #: whether DISTILLER.TEACHER must be built and loaded for this method
    needs_teacher = True
    #: name of this method's own top-level config section (registered via `config_section`), or None
    config_section = None
    #: how teacher_forward runs the teacher; the trainer sets both from SPEED (engine/speed.apply_speed)
    teacher_inference_mode = False
    teacher_dtype = None
    #: the loss terms LOSS_RAMP ramps when LOSS_RAMP.TERMS is empty (loss_ramp.py): the method's distillation term
    ramped_terms = ()
    #: "SECTION.KEY" -> term: the method's own ramp of a term, which must not be combined with LOSS_RAMP's
    own_ramp_keys = {}

    def __init__(self, student, teacher, cfg, meta=None):
        """`meta` describes the training set (num_train, num_classes, train_targets) for methods that need it."""
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.cfg = cfg
        self.meta = meta
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher.eval()

    @classmethod
    def validate_config(cls, cfg):
        """Raise ConfigError for invalid values in this method's section; nothing to check by default."""

    def prepare(self, trainer):
        """Work that needs the run's data before the first step (e.g. KD++'s teacher class means); the Trainer
        calls it once, right after building the distiller. `trainer` gives cfg, meta and device. No-op here."""

    def train(self, mode=True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @classmethod
    def wants_teacher(cls, cfg):
        """Whether this run loads DISTILLER.TEACHER: the methods that distil, and the student alone when it is
        asked to monitor its distance to a teacher (LOG.MONITOR_TEACHER)."""
        return cls.needs_teacher

    def teacher_forward(self, images):
        """(logits, features) of the frozen teacher; constants for the losses (no graph is kept). The logits are
        kept for the trainer's monitor (the unweighted KL to the teacher, logged per epoch for DOT fig. 3).

        How the teacher runs is set by the trainer from SPEED (engine/speed.py): under torch.inference_mode instead
        of no_grad (`teacher_inference_mode`), and with weights and input in half precision (`teacher_dtype`).
        Either way the caller gets ordinary tensors (teacher_output_for_loss)."""
        grad_off = torch.inference_mode() if self.teacher_inference_mode else torch.no_grad()
        with grad_off:
            out = self.teacher(images if self.teacher_dtype is None else images.to(self.teacher_dtype))
        out = self.teacher_output_for_loss(out)
        self.last_teacher_logits = out[0]
        return out

    def teacher_output_for_loss(self, out):
        """The teacher's output (a tensor or nested tuples/lists/dicts of them) as tensors the losses may use:
        half-precision ones cast back to float32, and inference tensors copied outside inference mode, since
        autograd refuses to save an inference tensor for backward (an MSE or a Linear on teacher features
        would). Without either switch, `out` itself."""
        if self.teacher_dtype is None and not self.teacher_inference_mode:
            return out
        return _map_tensors(out, self._loss_tensor)

    def _loss_tensor(self, t):
        if self.teacher_dtype is not None and t.dtype == self.teacher_dtype:
            return t.float()  # a new tensor, made outside inference mode
        return t.clone() if t.is_inference() else t

    def forward_train(self, images, labels, epoch, index=None):
        """Return (student logits, {name: LossTerm}) for one training batch; `epoch` is 1-based."""
        raise NotImplementedError

    def train_forward(self, images, labels, epoch, index=None):
        """What the trainers call: forward_train, then the KD++-family loss-weight ramp (LOSS_RAMP) on the terms
        it covers. Kept out of forward_train so that no method, nor X++ around X, has to remember it."""
        logits, terms = self.forward_train(images, labels, epoch, index)
        epochs = self.cfg.LOSS_RAMP.EPOCHS
        if epochs > 0:
            terms = apply_loss_ramp(terms, ramped_term_names(self.cfg, type(self)), ramp_factor(epochs, epoch))
        return logits, terms

    def forward(self, images):
        """Evaluation uses the student alone."""
        return self.student(images)[0]

    def learnable_parameters(self):
        """Student and extra-module parameters: everything the optimizer updates."""
        return [p for name, p in self.named_parameters() if not name.startswith("teacher.") and p.requires_grad]

    def learnable_state_dict(self):
        """State of the student and the extra modules (the teacher is restored from its own checkpoint)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_learnable_state_dict(self, state):
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise RuntimeError(f"distiller state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _map_tensors(obj, fn):
    """`obj` with `fn` applied to every tensor in it: tuples and lists rebuilt, a dict's values mapped when first
    read (_LazyMapped), anything else kept."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, Mapping):
        return _LazyMapped(obj, fn)
    return obj


class _LazyMapped(Mapping):
    """A read-only view of a dict whose values are mapped on first access. A method reads few of the teacher's
    features (KD none, CRD the pooled vector, AT the post-ReLU stages); copying every feature map each step
    would be a pass over all of them for nothing."""

    def __init__(self, raw, fn):
        self._raw, self._fn, self._done = raw, fn, {}

    def __getitem__(self, key):
        if key not in self._done:
            self._done[key] = _map_tensors(self._raw[key], self._fn)
        return self._done[key]

    def __iter__(self):
        return iter(self._raw)

    def __len__(self):
        return len(self._raw)


def cross_entropy_term(logits, labels):
    return task_loss(F.cross_entropy(logits, labels))
