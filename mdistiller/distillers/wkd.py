"""WKD-L (Lv, Yang, Li, "Wasserstein Distance Rivals Kullback-Leibler Divergence for Knowledge Distillation",
NeurIPS 2024): the non-target class distributions of teacher and student compared by an entropic Wasserstein
distance whose ground cost says how far apart two classes are, instead of a KL that treats classes as unrelated.

As the authors' code (JiamingLv/WKD, mdistiller/distillers/WKD.py) computes it, per batch:
  - target part (`wkd_logit_loss_with_speration`, T = 1): -mean_b p_t(y) log p_s(y), the teacher's probability of
    the label detached;
  - non-target part: column y dropped from both models' logits and row and column y from the cost matrix M;
    p = softmax(z / T) in float32; `wkd_logit_loss`: M <- relu(M) + 1e-8, the plan of `sinkhorn` (LAMBDA, ITER
    iterations, unrolled and differentiated, no detach) and WD = mean_b sum_ij plan_ij M_ij; no T^2;
  - loss = CE_WEIGHT CE + target part + gamma(epoch) WD, gamma cosine-decayed after COSINE_DECAY_EPOCH.
The ground cost M (COST_MATRIX): "cka", 1 - linear CKA between classes of the teacher's logits over the training
set (engine/wkd_cost.py, a cached teacher pass, installed by `set_cost_matrix`), the published configs' choice;
"fc", 1 - cosine of the teacher's classifier rows. COST_MATRIX_SHARPEN kappa != 0: M <- 1 - exp(-kappa M).
The sharpened matrix is a buffer, so checkpoints carry the very matrix the loss used.

The losses run in float32 outside any autocast: the authors compute them after their autocast block, and a bf16
Sinkhorn on exp(-M / 0.05) would lose most of its mantissa.
"""

import math
import warnings

import torch
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .base import Distiller
from .classifier_head import classifier_linear
from .dkd import _non_target_columns
from .losses import StepOutput, ce_term, distill_loss
from .registry import DISTILLER_REGISTRY

COST_MATRICES = ("cka", "fc")

_cfg = CN()
_cfg.CE_WEIGHT = 1.0
_cfg.WEIGHT = 800.0  # gamma, the WD term's weight (the authors' resnet32x4 -> resnet8x4 CIFAR-100 config)
_cfg.T = 8.0  # temperature of the non-target distributions (target part: T 1)
_cfg.COST_MATRIX = "cka"  # cka: 1 - CKA of the teacher's class logits (engine/wkd_cost.py); fc: 1 - cos of its fc rows
_cfg.COST_MATRIX_SHARPEN = 1.0  # kappa: M <- 1 - exp(-kappa M); 0 keeps M
_cfg.COSINE_DECAY_EPOCH = 0  # after this epoch the weight decays as a half cosine to 0 at SOLVER.EPOCHS
_cfg.SINKHORN = CN()
_cfg.SINKHORN.LAMBDA = 0.05  # entropic regularisation
_cfg.SINKHORN.ITER = 10


def cosine_decayed(weight, epoch, decay_start, epochs):
    """The authors' schedule of both WKD weights: `weight` up to `decay_start`, then
    0.5 weight (1 + cos(pi (epoch - decay_start) / (epochs - decay_start))) for the 1-based `epoch` (0 at the last)."""
    if epoch <= decay_start or epochs <= decay_start:
        return weight
    return 0.5 * weight * (1 + math.cos((epoch - decay_start) / (epochs - decay_start) * math.pi))


def check_decay(section, cfg):
    if cfg[section].COSINE_DECAY_EPOCH < 0:
        raise ConfigError(f"config key {section}.COSINE_DECAY_EPOCH: must be >= 0 (0: decay from the first epoch; "
                          f">= SOLVER.EPOCHS: no decay), got {cfg[section].COSINE_DECAY_EPOCH}")
    if cfg[section].WEIGHT < 0:
        raise ConfigError(f"config key {section}.WEIGHT: must be >= 0, got {cfg[section].WEIGHT}")


def sinkhorn(w1, w2, kernel, iters):
    """The authors' `sinkhorn`: transport plans (B, N, N) between the rows of w1 and w2 (B, N) under the Gibbs kernel
    exp(-M / lambda) (B, N, N): u = 1/N; `iters` times v = w2 / (K^T u + 1e-8), u = w1 / (K v + 1e-8)."""
    w1, w2 = w1.unsqueeze(-1), w2.unsqueeze(-1)
    u = torch.full_like(w1, 1.0 / w1.shape[1])
    kernel_t = kernel.transpose(2, 1)
    for _ in range(iters):
        v = w2 / (torch.bmm(kernel_t, u) + 1e-8)
        u = w1 / (torch.bmm(kernel, v) + 1e-8)
    return u * kernel * v.transpose(2, 1)


def sinkhorn_distance(p_s, p_t, cost, reg, iters):
    """`wkd_logit_loss` on distributions: mean_b sum_ij plan_ij cost_ij, cost (B, N, N) or (N, N), relu'd + 1e-8."""
    cost = F.relu(cost) + 1e-8
    cost = cost.expand(p_s.shape[0], -1, -1) if cost.dim() == 2 else cost
    plan = sinkhorn(p_s, p_t, torch.exp(-cost / reg), iters)
    return (plan * cost).sum(-1).sum(-1).mean()


def wkd_logit_loss(logits_student, logits_teacher, target, cost, temperature, reg, iters):
    """(target part, WD of the non-target part), `wkd_logit_loss_with_speration` before its gamma; float32, no
    autocast. The non-target columns are gathered with index tensors (no boolean mask: no host wait per step)."""
    with torch.autocast(logits_student.device.type, enabled=False):
        zs, zt = logits_student.float(), logits_teacher.float().detach()
        p_target = F.softmax(zt, dim=1).gather(1, target[:, None])
        target_part = -(p_target * F.log_softmax(zs, dim=1).gather(1, target[:, None])).mean()
        others = _non_target_columns(target, zs.shape[1])
        p_s = F.softmax(zs.gather(1, others) / temperature, dim=-1)
        p_t = F.softmax(zt.gather(1, others) / temperature, dim=-1)
        cost_nt = cost.float()[others[:, :, None], others[:, None, :]]  # (B, C-1, C-1)
        return target_part, sinkhorn_distance(p_s, p_t, cost_nt, reg, iters)


def sharpen(cost, kappa):
    """The authors' COST_MATRIX_SHARPEN: 1 - exp(-kappa M), or M itself for kappa 0."""
    return 1 - torch.exp(-kappa * cost) if kappa != 0 else cost


def fc_cost(teacher_model):
    """1 - cosine similarity of the teacher classifier's rows (the authors' COST_MATRIX "fc"), without a graph."""
    weight = F.normalize(classifier_linear(teacher_model, "WKDL with WKDL.COST_MATRIX fc").weight.detach(), dim=-1)
    return 1 - weight @ weight.t()


@DISTILLER_REGISTRY.register("WKDL", config=_cfg)
class WKDL(Distiller):
    ramped_terms = ("wkd_target", "wkd_logit")

    def __init__(self, *, student, teacher, num_classes, epochs, ce_weight=1.0, weight=800.0, temperature=8.0,
                 cost_matrix="cka", sharpen_kappa=1.0, decay_start=0, sinkhorn_lambda=0.05, sinkhorn_iter=10):
        super().__init__(student=student, teacher=teacher)
        check_cost_matrix(cost_matrix)
        self.ce_weight, self.weight, self.temperature = ce_weight, weight, temperature
        self.cost_kind, self.sharpen_kappa = cost_matrix, sharpen_kappa
        self.decay_start, self.epochs = decay_start, epochs
        self.sinkhorn_lambda, self.sinkhorn_iter = sinkhorn_lambda, sinkhorn_iter
        self.register_buffer("cost_matrix", torch.zeros(num_classes, num_classes))  # sharpened, as the loss uses it
        self.register_buffer("cost_ready", torch.tensor(False))
        self._ready_checked = False
        if cost_matrix == "fc":
            self.set_cost_matrix(fc_cost(self.teacher.model))

    @property
    def needs_cost_pass(self):
        """Whether the run's builder must install a teacher-pass cost matrix (engine/wkd_cost.py)."""
        return self.cost_kind == "cka"

    def set_cost_matrix(self, raw_cost):
        """Install the unsharpened class cost (C, C) (1 - CKA, or 1 - cos); it is sharpened here."""
        if tuple(raw_cost.shape) != tuple(self.cost_matrix.shape):
            raise ValueError(f"a cost matrix of shape {tuple(raw_cost.shape)} does not fit {self.cost_matrix.shape[0]}"
                             " classes")
        self.cost_matrix.copy_(sharpen(raw_cost.to(self.cost_matrix), self.sharpen_kappa))
        self.cost_ready.fill_(True)

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.WKDL
        return {"num_classes": data.num_classes if data is not None else 100, "epochs": cfg.SOLVER.EPOCHS,
                "ce_weight": c.CE_WEIGHT, "weight": c.WEIGHT, "temperature": c.T, "cost_matrix": c.COST_MATRIX,
                "sharpen_kappa": c.COST_MATRIX_SHARPEN, "decay_start": c.COSINE_DECAY_EPOCH,
                "sinkhorn_lambda": c.SINKHORN.LAMBDA, "sinkhorn_iter": c.SINKHORN.ITER}

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.WKDL
        check_cost_matrix(c.COST_MATRIX)
        check_decay("WKDL", cfg)
        if c.T <= 0:
            raise ConfigError(f"config key WKDL.T: must be > 0, got {c.T}")
        if c.SINKHORN.LAMBDA <= 0:
            raise ConfigError(f"config key WKDL.SINKHORN.LAMBDA: the entropic regularisation must be > 0 (the "
                              f"authors' 0.05), got {c.SINKHORN.LAMBDA}")
        if c.SINKHORN.ITER < 1:
            raise ConfigError(f"config key WKDL.SINKHORN.ITER: must be >= 1 (the authors' 10), got {c.SINKHORN.ITER}")
        if c.COST_MATRIX_SHARPEN < 0:
            raise ConfigError(f"config key WKDL.COST_MATRIX_SHARPEN: kappa must be >= 0 (0: no sharpening), got "
                              f"{c.COST_MATRIX_SHARPEN}")

    def forward_train(self, images, labels, epoch, index=None):
        logits, feats = self.student(images)
        logits_t, feats_t = self.teacher(images)
        if not self._ready_checked:  # once: reading the flag is a device sync
            self._ready_checked = True
            if not bool(self.cost_ready):
                warnings.warn("WKDL's cost matrix was never set (set_cost_matrix not called: the run's builder "
                              "does it); the WD term sees a zero cost until it is")
        target_part, wd = wkd_logit_loss(logits, logits_t, labels, self.cost_matrix, self.temperature,
                                         self.sinkhorn_lambda, self.sinkhorn_iter)
        gamma = cosine_decayed(self.weight, epoch, self.decay_start, self.epochs)
        return StepOutput(logits, {
            "ce": ce_term(logits, labels, self.ce_weight),
            "wkd_target": distill_loss(target_part),
            "wkd_logit": distill_loss(gamma * wd),
        }, feats, logits_t, feats_t)


def check_cost_matrix(name):
    if name not in COST_MATRICES:
        raise ConfigError(f"config key WKDL.COST_MATRIX: one of {', '.join(COST_MATRICES)} (cka: 1 - CKA of the "
                          f"teacher's class logits, the published configs'; fc: 1 - cos of its classifier rows), "
                          f"got {name!r}")
