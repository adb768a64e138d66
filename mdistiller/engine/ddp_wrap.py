"""What the optimisation loop calls for a training forward: the distiller's forward_train, under DDP when several
processes train.

DDP wraps a module and hooks its `forward`, but a distiller's training step is `train_forward` (its `forward`
is the student alone, for evaluation). `TrainForward` is the thin module whose forward is that training step;
one process calls it directly, several call it through DistributedDataParallel, so the loop has one code path.

What DDP sees: the student and the distiller's extra modules (connectors, heads, projectors) with their
BatchNorm statistics. It is told to ignore the teacher (frozen, identical on every rank, never broadcast) and
the distillers' own state buffers (CRD's memory banks, KD++ class means), which the methods keep identical on
all ranks themselves; broadcasting a CRD memory of num_train x 128 floats every step would be pure waste.
A teacher that follows the training mode (OFD.TEACHER_MODE train) moves its BatchNorm statistics with each rank's
batch: those are broadcast from rank 0 like the student's, so every rank holds rank 0's, as nn.DataParallel keeps
its first GPU's (what mdistiller's OFD ran under), and a resumed run continues them on every rank.
"""

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel as DDP

from ..utils import distributed
from ..utils.errors import ConfigError


class TrainForward(nn.Module):
    def __init__(self, distiller):
        super().__init__()
        self.distiller = distiller

    def forward(self, images, labels, epoch, index):
        return self.distiller.train_forward(images, labels, epoch, index)


def _ignored_state(wrapper):
    """Fully qualified names of the parameters and buffers DDP must leave alone (see the module docstring)."""
    names = []
    teacher = getattr(wrapper.distiller, "teacher", None)
    teacher_bn_moves = bool(getattr(teacher, "follows_train", False))
    for mod_name, module in wrapper.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        in_teacher = mod_name == "distiller.teacher" or mod_name.startswith("distiller.teacher.")
        for name, _ in module.named_parameters(recurse=False):
            if in_teacher:
                names.append(prefix + name)
        for name, _ in module.named_buffers(recurse=False):
            moving_bn = isinstance(module, _BatchNorm) and (not in_teacher or teacher_bn_moves)
            if not moving_bn:
                names.append(prefix + name)
    return names


def wrap_for_training(distiller, device, sync_bn=False, find_unused_parameters=False):
    """TrainForward(distiller), in DDP when several processes train (utils/distributed.py)."""
    several = distributed.active()
    if sync_bn and several:
        if device.type != "cuda":
            raise ConfigError("config key DISTRIBUTED.SYNC_BN: torch's SyncBatchNorm runs on CUDA only; set it "
                              "False for CPU training (each rank then normalises with its own batch statistics)")
        distiller.student = nn.SyncBatchNorm.convert_sync_batchnorm(distiller.student)
    wrapper = TrainForward(distiller)
    if not several:
        return wrapper
    DDP._set_params_and_buffers_to_ignore_for_model(wrapper, _ignored_state(wrapper))
    return DDP(wrapper, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters)
