"""The Distiller: a student, an optional frozen teacher, and the losses that tie them.

Everything a training method needs beyond the student (connectors, projectors, memory banks) lives in the
distiller as submodules, so the optimizer picks up their parameters and checkpoints save them without the
engine knowing about any particular method. The teacher is excluded from both: it is frozen, stays in eval mode
whatever `train()` is called with, and is always restored from its own checkpoint.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .losses import task_loss


class Distiller(nn.Module):
    #: whether DISTILLER.TEACHER must be built and loaded for this method
    needs_teacher = True
    #: name of this method's own top-level config section (registered via `config_section`), or None
    config_section = None

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

    @torch.no_grad()
    def teacher_forward(self, images):
        """(logits, features) of the frozen teacher; constants for the losses (no graph is kept). The logits are
        kept for the trainer's monitor (the unweighted KL to the teacher, logged per epoch for DOT fig. 3)."""
        out = self.teacher(images)
        self.last_teacher_logits = out[0]
        return out

    def forward_train(self, images, labels, epoch, index=None):
        """Return (student logits, {name: LossTerm}) for one training batch; `epoch` is 1-based."""
        raise NotImplementedError

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


def cross_entropy_term(logits, labels):
    return task_loss(F.cross_entropy(logits, labels))
