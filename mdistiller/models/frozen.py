"""FrozenTeacher: everything about running a teacher, so that a method only calls `self.teacher(images)`.

The teacher never trains: its parameters are frozen, it stays in eval mode whatever `train()` is called with,
and no autograd graph is kept of its forward. One exception, asked for by a method: `follow_train_mode()` lets
`train()` put the teacher's modules in training mode as it does the student's (mdistiller's OFD does this), so its
BatchNorm normalises with the batch's statistics and updates its running statistics in place, exactly as torch's
BatchNorm does in training mode under no_grad (or inference_mode: the buffers stay ordinary tensors); its parameters
stay frozen and no graph is kept. `buffer_state()` is then what a checkpoint must carry to resume it.
How it runs is the run's speed plan's business (engine/speed.py): under torch.inference_mode instead of no_grad,
with weights and input in half precision, as an int8 graph, or compiled. Whatever the plan, the caller gets
ordinary tensors a loss may use: half-precision outputs cast back to float32, and inference tensors copied outside
inference mode (autograd refuses to save an inference tensor for backward, which an MSE or a Linear on teacher
features would do).
"""

from collections.abc import Mapping

import torch
import torch.nn as nn


class FrozenTeacher(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        self.inference_mode = False
        self.dtype = None  # None: float32
        self.follows_train = False  # True: train(True) puts the teacher in training mode (follow_train_mode)

    @property
    def feat_dim(self):
        return self.model.feat_dim

    def stage_channels(self):
        return self.model.stage_channels()

    def train(self, mode=True):
        """Eval, the teacher's BatchNorm statistics and dropout fixed; unless it follows the training mode."""
        return super().train(bool(mode) and self.follows_train)

    def follow_train_mode(self, on=True):
        """From the next `train(mode)` call on, the teacher's modules are set to `mode` (still frozen, still without a
        graph); until then it stays as it is (eval)."""
        self.follows_train = bool(on)
        return self

    def buffer_state(self):
        """The teacher's buffers (BatchNorm running statistics, counters) as state_dict entries, without its
        parameters: what moves when it runs in training mode."""
        params = {name for name, _ in self.named_parameters()}
        return {k: v for k, v in self.state_dict().items() if k not in params}

    def run_in(self, inference_mode, dtype=None):
        """Run under torch.inference_mode (or no_grad) and with weights and input in `dtype` (None: float32)."""
        self.inference_mode = bool(inference_mode)
        if dtype is not None:
            self.model.to(dtype)
        self.dtype = dtype
        return self

    def forward(self, images):
        """(logits, features) as the model returns them, as tensors the losses may use (no graph)."""
        grad_off = torch.inference_mode() if self.inference_mode else torch.no_grad()
        with grad_off:
            out = self.model(images if self.dtype is None else images.to(self.dtype))
        if self.dtype is None and not self.inference_mode:
            return out
        return _map_tensors(out, self._loss_tensor)

    def _loss_tensor(self, t):
        if self.dtype is not None and t.dtype == self.dtype:
            return t.float()  # a new tensor, made outside inference mode
        return t.clone() if t.is_inference() else t


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
