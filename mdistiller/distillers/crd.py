"""CRD, Contrastive Representation Distillation (Tian et al., ICLR 2020).

KD matches only the teacher's output distribution; CRD makes the student's penultimate representation carry
the teacher's by contrasting: a linear head + L2 normalisation maps both models' pooled features to a common
128-d space, and an NCE objective pulls a student embedding towards the teacher's embedding of the same
sample (positive) and away from teacher embeddings of samples of other classes (negatives), and vice versa.
The K negatives come from memory banks of past embeddings (crd_memory.py) instead of from the batch, which
is what makes 16384 negatives affordable at batch 64.

loss = CE_WEIGHT * CE + FEAT_WEIGHT * (NCE(student anchor, teacher bank) + NCE(teacher anchor, student bank)).
The teacher's head is learnable too (the teacher itself stays frozen). Defaults are CRD's CIFAR-100 settings.

CRD.SAMPLER picks how K distinct negatives are drawn (crd_memory.py): "redraw" redraws collisions and
waits on the host a few times a step; "keys" draws the same distribution with fixed shapes, no host wait, so the
step can be captured in a CUDA graph, at batch x num_train float64 keys of memory; "auto" is "keys" only once
the step is made ready for a CUDA-graph capture (ContrastMemory.prepare_capture, which the engine reaches
through Distiller.prepare_capture; or `set_sync_free(True)`), "redraw" otherwise. "auto" is the default: a CPU
run draws exactly what "redraw" draws, a GPU run whose update is replayed as a CUDA graph draws with "keys".
"""

import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..utils.distributed import world_size
from ..utils.errors import ConfigError
from .base import Distiller
from .crd_memory import KEYS_MAX_ELEMENTS, MODES, SAMPLERS, ContrastMemory, keys_fit
from .losses import StepOutput, ce_term, distill_loss
from .registry import DISTILLER_REGISTRY

_cfg = CN()
_cfg.FEAT_DIM = 128  # embedding size of both heads and of the memory rows
_cfg.NCE_K = 16384  # negatives per anchor (capped at the smallest other-class pool, see crd_memory.py)
_cfg.NCE_T = 0.07
_cfg.NCE_MOMENTUM = 0.5  # memory rows: m * old + (1 - m) * new, then re-normalised
_cfg.MODE = "exact"  # positive: the sample itself (exact) or a random same-class sample (relax)
# Negatives drawn with replacement (i.i.d.), as the published ImageNet / Tiny-ImageNet samplers do; False: K distinct
# samples per anchor, as the published CIFAR-100 sampler does.
_cfg.NEG_REPLACE = False
# How the K distinct negatives are drawn (ignored with NEG_REPLACE): "redraw" redraws collisions (host waits each
# step); "keys" the K largest of i.i.d. random keys (no host wait, batch x num_train keys of memory); "auto" keys
# where the step must be sync-free (a CUDA-graph capture: prepare_capture / set_sync_free), else redraw. Same
# distribution, different draws.
_cfg.SAMPLER = "auto"
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 1.0
_cfg.LOSS.FEAT_WEIGHT = 0.8


class Embed(nn.Module):
    """Linear projection onto the unit sphere, where dot products are cosine similarities."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x):
        return F.normalize(self.linear(x.flatten(1)), dim=1)


@DISTILLER_REGISTRY.register("CRD", config=_cfg)
class CRD(Distiller):
    ramped_terms = ("crd",)

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.CRD
        if c.MODE not in MODES:
            raise ConfigError(f"config key CRD.MODE: must be one of {', '.join(MODES)}, got {c.MODE!r}")
        if c.NCE_K <= 0:
            raise ConfigError(f"config key CRD.NCE_K: number of negatives must be > 0, got {c.NCE_K}")
        if not 0 <= c.NCE_MOMENTUM < 1:
            raise ConfigError(f"config key CRD.NCE_MOMENTUM: must be in [0, 1), got {c.NCE_MOMENTUM}")
        if c.NCE_T <= 0:
            raise ConfigError(f"config key CRD.NCE_T: temperature must be > 0, got {c.NCE_T}")
        if c.FEAT_DIM <= 0:
            raise ConfigError(f"config key CRD.FEAT_DIM: embedding size must be > 0, got {c.FEAT_DIM}")
        if c.SAMPLER not in SAMPLERS:
            raise ConfigError(f"config key CRD.SAMPLER: must be one of {', '.join(SAMPLERS)}, got {c.SAMPLER!r}")

    def __init__(self, *, student, teacher, train_targets, feat_dim=128, nce_k=16384, nce_t=0.07, nce_momentum=0.5,
                 mode="exact", neg_replace=False, sampler="auto", max_rows=None, ce_weight=1.0, feat_weight=0.8):
        """`train_targets`: the labels of the training set in dataset-index order (the memory bank's rows);
        `max_rows`: the per-process batch, which bounds the keys sampler's memory (None: unchecked)."""
        super().__init__(student=student, teacher=teacher)
        self.ce_weight, self.feat_weight = ce_weight, feat_weight
        self.embed_s = Embed(student.feat_dim, feat_dim)
        self.embed_t = Embed(self.teacher.feat_dim, feat_dim)
        self.memory = ContrastMemory(feat_dim, train_targets, nce_k, nce_t, nce_momentum, mode, neg_replace,
                                     sampler, max_rows)

    @classmethod
    def from_config(cls, cfg, data):
        if len(data.train_targets) != data.num_train:
            raise ValueError(f"train_targets has {len(data.train_targets)} labels, num_train is {data.num_train}")
        c = cfg.CRD
        rows = -(-cfg.SOLVER.BATCH_SIZE // world_size())  # each process draws for its share of the batch
        if c.SAMPLER == "keys" and not c.NEG_REPLACE and not keys_fit(rows, data.num_train):
            raise ConfigError(
                f"config key CRD.SAMPLER: 'keys' would draw {rows} x {data.num_train} random keys per step (batch "
                f"per process x training samples), more than {KEYS_MAX_ELEMENTS}; set CRD.SAMPLER redraw, or "
                f"CRD.NEG_REPLACE true (with replacement, also free of host waits), or a smaller SOLVER.BATCH_SIZE")
        return {"train_targets": data.train_targets, "feat_dim": c.FEAT_DIM, "nce_k": c.NCE_K, "nce_t": c.NCE_T,
                "nce_momentum": c.NCE_MOMENTUM, "mode": c.MODE, "neg_replace": c.NEG_REPLACE,
                "sampler": c.SAMPLER, "max_rows": rows, "ce_weight": c.LOSS.CE_WEIGHT,
                "feat_weight": c.LOSS.FEAT_WEIGHT}

    def set_sync_free(self, enabled=True):
        """A switch for a caller that needs a step without host waits (Distiller.prepare_capture, which the engine
        calls before a CUDA-graph capture, sets it through ContrastMemory.prepare_capture, which also says why not):
        with CRD.SAMPLER auto, negatives come from the keys sampler while enabled. Returns whether drawing
        negatives is then free of host waits (False: redraw, or auto whose keys would not fit)."""
        self.memory.sync_free = bool(enabled)
        return self.memory.step_is_sync_free

    def embeddings(self, feats, feats_t):
        """(student embedding, teacher embedding); the teacher's head sees constant features."""
        return self.embed_s(feats["pooled_feat"]), self.embed_t(feats_t["pooled_feat"])

    def forward_train(self, images, labels, epoch, index=None):
        if index is None:
            raise ValueError("CRD needs the batch's dataset indices (index=) to address its memory bank")
        logits, feats = self.student(images)
        logits_t, feats_t = self.teacher(images)
        v_s, v_t = self.embeddings(feats, feats_t)
        return StepOutput(logits, {
            "ce": ce_term(logits, labels, self.ce_weight),
            "crd": distill_loss(self.feat_weight * self.memory(v_s, v_t, index)),
        }, feats, logits_t, feats_t)
