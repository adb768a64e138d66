"""The Distiller: a student, an optional frozen teacher, and the losses that tie them - the method, nothing else.

Everything a method needs beyond the student (connectors, projectors, memory banks) lives in the distiller as
submodules, so the optimizer picks up their parameters and checkpoints save them without the engine knowing
about any particular method. The teacher is a `FrozenTeacher` (models/frozen.py), which owns how it runs; it is
excluded from the optimizer and from checkpoints (restored from its own file).

A method takes keyword arguments only; `from_config(cfg, data)` reads its own config section and returns them, and
`build(cfg, student, teacher, data)` makes the method a run trains, so tests and library users can build one
without a config. Its `forward_train` returns a `StepOutput`; the builder may add loss
terms to any method (`add_term`: the dino term of "X++") and a loss-weight ramp (`loss_ramp`), which
`train_forward` applies, so no method has to remember them.
"""

import torch.nn as nn

from ..models.frozen import FrozenTeacher
from .losses import StepOutput


class Distiller(nn.Module):
    #: whether DISTILLER.TEACHER is built, loaded and passed in for this method
    needs_teacher = True
    #: the loss terms LOSS_RAMP ramps when LOSS_RAMP.TERMS is empty (loss_ramp.py): the method's distillation term
    ramped_terms = ()
    #: "SECTION.KEY" -> term: the method's own ramp of a term, which must not be combined with LOSS_RAMP's
    own_ramp_keys = {}
    #: whether `forward` is the student alone, so that its student_*.pth is the whole trained model; False where the
    #: predictions also go through the method's own modules (SimKD: its projector and the teacher's classifier)
    evaluates_student_alone = True
    #: a view recipe of data/views.py ("weak_strong", "rotations4") where the published code feeds each image as several
    #: augmented copies: the training loader then yields images B x V x C x H x W; None: plain B x C x H x W batches
    train_views = None

    def __init__(self, *, student, teacher=None):
        """`teacher`: a FrozenTeacher, or a model (frozen here), or None. Subclasses take their hyper-parameters as
        keyword arguments too, so a call says which number is which."""
        super().__init__()
        self.student = student
        if teacher is not None and not isinstance(teacher, FrozenTeacher):
            teacher = FrozenTeacher(teacher)
        self.teacher = teacher
        self.loss_ramp = None  # a loss_ramp.LossRamp, set by the builder when LOSS_RAMP is on

    @classmethod
    def from_config(cls, cfg, data):
        """The keyword arguments of `__init__` besides the models, read from this method's config section; `data`
        is the training set's DatasetMeta (num_train, num_classes, image_size, train_targets)."""
        return {}

    @classmethod
    def build(cls, cfg, student, teacher, data):
        """The method a run with `cfg` trains, on these models."""
        return cls(student=student, teacher=teacher, **cls.from_config(cfg, data))

    @classmethod
    def validate_config(cls, cfg):
        """Raise ConfigError for invalid values in this method's section; nothing to check by default."""

    def prepare_capture(self):
        """Get the update ready to be recorded as a CUDA graph (engine/cuda_graph.py) where the method can (CRD's
        auto sampler switches to its sampler without host waits); returns why it cannot (a host wait, a shape
        that depends on the data), or None. The default asks every submodule that defines `prepare_capture`
        (an added term, a memory bank); a capture that still fails falls back to eager steps at run time."""
        for module in self.modules():
            if module is not self and hasattr(module, "prepare_capture"):
                why = module.prepare_capture()
                if why:
                    return why
        return None

    def unused_parameters(self):
        """Why some learnable parameters get no gradient in some steps (a stage that trains only part of the
        method), or None. DDP must then look for them each step (DISTRIBUTED.FIND_UNUSED_PARAMETERS), or it waits
        for their gradients and fails at the next step; the builder turns the option on when this says why."""
        return None

    def add_term(self, name, term):
        """Add a loss term to every step: `term(step_output, images, labels, teacher) -> LossTerm`, or a dict
        {name: LossTerm} for a term made of several logged parts (a module, so its parameters train and its state
        is checkpointed with the method's)."""
        if not hasattr(self, "added_terms"):
            self.added_terms = nn.ModuleDict()  # registered after the method's own modules: their order is kept
        self.added_terms[name] = term
        return term

    def forward_train(self, images, labels, epoch, index=None):
        """One training batch -> StepOutput (or a plain (logits, {name: LossTerm}) tuple); `epoch` is 1-based."""
        raise NotImplementedError

    def train_forward(self, images, labels, epoch, index=None):
        """What the loop calls: forward_train, then the added terms, then the loss-weight ramp."""
        out = self.forward_train(images, labels, epoch, index)
        if not isinstance(out, StepOutput):
            logits, terms = out
            out = StepOutput(logits, terms)
        added = getattr(self, "added_terms", {})
        if added:
            out.terms = dict(out.terms)
            for name, term in added.items():
                result = term(out, images, labels, self.teacher)
                # a term returns one LossTerm, logged under its name, or several {name: LossTerm}
                for key, value in (result.items() if isinstance(result, dict) else ((name, result),)):
                    if key in out.terms:
                        raise RuntimeError(f"{type(self).__name__} already returns a loss term named '{key}'")
                    out.terms[key] = value
        if self.loss_ramp is not None:
            out.terms = self.loss_ramp(out.terms, epoch)
        return out

    def stage_lr(self, epoch):
        """The learning rate of every step of the 1-based `epoch` where the method's own stage sets it (an
        initialisation stage that its published code runs at a constant LR of its own), or None: the run's
        schedule (engine/lr_schedule.StagedLR)."""
        return None

    def forward(self, images):
        """Evaluation uses the student alone."""
        return self.student(images)[0]

    def evaluation_modules(self):
        """The modules `forward` runs: their buffers (BatchNorm statistics) are rank 0's on every rank before a
        distributed evaluation."""
        return [self.student]

    def inference_state(self):
        """What `forward` needs, for the student files of a method that does not evaluate the student alone: the
        learnable state without the added terms (which only train)."""
        return {k: v for k, v in self.learnable_state_dict().items() if not k.startswith("added_terms.")}

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
