"""SSKD, "Knowledge Distillation Meets Self-Supervision" (Xu et al., ECCV 2020): besides KD on the normal images,
the student mimics the teacher's class distributions on rotated copies and the teacher's cosine-similarity structure
between the rotated copies and the normal images, both through a selective transfer that drops some of the rotated
copies the teacher gets wrong.

As the authors' code computes it (xuguodong03/SSKD: cifar.py, wrapper.py, student.py, command.sh):
  - views (cifar.py CIFAR10.__getitem__): each training image is flipped (p 0.5) once, then rotated by 0, 90, 180,
    270 degrees, each rotation cropped independently. Here the data pipeline provides them (`train_views =
    "rotations4"`): forward_train receives (B, 4, C, H, W), view k the rotation by k * 90 degrees, view 0 the
    normal image. As published, one forward runs all 4B images interleaved [img_0 rot 0..3, img_1 rot 0..3, ...]
    (so BatchNorm sees the rotated images too): "nor" rows are rotation 0, "aug" rows the 3B others, in that order;
  - SS head (wrapper.py `proj_head`): Linear(d, d) - ReLU - Linear(d, d) on the pooled penultimate feature
    (features["pooled_feat"], d = feat_dim); the teacher and the student get one each, default nn.Linear init;
  - similarity (student.py): simi[j, i] = cos(head(aug_j), head(nor_i)), a 3B x B matrix;
  - teacher SS-head stage (student.py, "train ssp_head", before the student exists): --t-epoch 60 epochs on the
    training loader, SGD over [backbone at LR 0, proj_head at --t-lr 0.05], momentum 0.9, weight decay 5e-4,
    MultiStepLR([30, 45], 0.1); t_model.eval() throughout, backbone feature detached (bb_grad=False); loss
    F.cross_entropy(simi, source index of each rotated copy), no temperature;
  - student loss (student.py, the student loop): loss1 = CE(out[nor], y); loss2 = KL(softmax(t_nor / 4) ||
    softmax(s_nor / 4)) batchmean * 16; loss3 = the same at --tf-T 4 on the *kept* aug rows, batchmean over the
    kept count; loss4 = KL(softmax(t_simi / 0.5) || softmax(s_simi / 0.5)) on the kept rows of the similarity
    matrices, batchmean, * 0.25 (--ss-T squared); loss = 0.1 loss1 + 0.9 loss2 + 2.7 loss3 + 10 loss4. The
    teacher's logits and head output come under no_grad, the teacher (head included) in eval mode;
  - selective transfer ("error level ranking"): per aug row the rank of the ground truth in the teacher's
    descending order (loss3: the class label in softmax(t_aug / tf_T); loss4: the source image among the B normal
    images in t_simi); all rows of rank 0 are kept, plus int(wrong_num * ratio) wrong rows of the smallest rank
    (--ratio-tf 1.0: all kept; --ratio-ss 0.75);
  - recipe (command.sh): 240 epochs, batch 64 (x 4 views), SGD momentum 0.9, wd 5e-4, LR 0.05 (0.01 for the
    MobileNetV2 / ShuffleV1 / ShuffleV2 students), x 0.1 at 150, 180, 210.

Here both stages are one run: epochs 1..SSKD.INIT_EPOCHS train the teacher's head alone (the term "ss_head"; its LR
from `stage_lr`: INIT_LR, x INIT_LR_DECAY_RATE after each of INIT_LR_DECAY_STAGES, the published 0.05 / 0.005 /
0.0005), then the published student loss with the run's own schedule. The teacher's head is a trainable submodule
of the method (not of the FrozenTeacher), so the optimizer updates it and checkpoints carry it; it stays in eval mode,
and after its stage it runs under no_grad, so no gradient (nor weight decay or momentum: torch's SGD and DOT skip a
parameter without a gradient) reaches it again. The CIFAR-100 configs (configs/cifar100/sskd/) therefore run 300
epochs with the decay at 210 / 240 / 270. During the init stage the student is run only for the step's logs
(train_top1, the loss monitor): on the normal images, in eval mode (no BatchNorm statistic moves) under no_grad.

Where this differs from the published code (docs/differences.md): ties in both rankings are broken by position (the
class or image of lower index first; among rows of equal rank the earlier row is kept), where the published
torch.argsort is not stable; the kept rows are a mask (no host wait, same value); a kept count of 0 (every copy
ranked wrong and int(wrong x ratio) 0) gives a term of 0 where the published batchmean divides by 0; the cosine is
computed in float32 outside autocast as normalised rows times normalised rows (eps 1e-8 per norm); one optimizer
serves both stages (published: one SGD for the head, then a fresh one for the student; the same updates here, as the
student has no gradient, so no momentum, during the init stage, and the head none after it). Under
SOLVER.UPDATE_RULE dot the head's stage is plain SGD (one loss reaches it: DOTOptimizer's single-loss rule), as
published; so is the student's head (only the ss term reaches it). Under torchrun the builder turns on
DISTRIBUTED.FIND_UNUSED_PARAMETERS (init_stage.py): the init stage leaves the student without gradients, the main
stage the teacher's head.
"""

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .init_stage import InitStageDistiller
from .losses import StepOutput, distill_loss, task_loss
from .registry import DISTILLER_REGISTRY

_cfg = CN()
# the teacher SS-head stage at the start of the run (student.py --t-epoch 60); 0: none (the head stays at its random
# init, which no published number uses)
_cfg.INIT_EPOCHS = 60
_cfg.INIT_LR = 0.05  # --t-lr
_cfg.INIT_LR_DECAY_STAGES = [30, 45]  # --t-milestones, epochs of the init stage
_cfg.INIT_LR_DECAY_RATE = 0.1  # --gamma
_cfg.KD_T = 4.0  # --kd-T
_cfg.TF_T = 4.0  # --tf-T
_cfg.SS_T = 0.5  # --ss-T
_cfg.RATIO_TF = 1.0  # --ratio-tf: share of the wrongly ranked rotated rows kept in loss3
_cfg.RATIO_SS = 0.75  # --ratio-ss: the same for loss4
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 0.1  # --ce-weight
_cfg.LOSS.KD_WEIGHT = 0.9  # --kd-weight
_cfg.LOSS.TF_WEIGHT = 2.7  # --tf-weight
_cfg.LOSS.SS_WEIGHT = 10.0  # --ss-weight

VIEWS = 4  # rotations by 0, 90, 180, 270 degrees


def ss_head(dim):
    """wrapper.py `proj_head`: Linear(d, d) - ReLU - Linear(d, d)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


def split_rows(x, batch):
    """(nor, aug) rows of a (4B, ...) tensor in the interleaved order: nor (B, ...) the rotation-0 rows, aug
    (3B, ...) the others, image by image (student.py nor_index / aug_index)."""
    grouped = x.unflatten(0, (batch, VIEWS))
    return grouped[:, 0], grouped[:, 1:].flatten(0, 1)


def normal_rows(obj, batch):
    """`obj` (a tensor, or a list / dict of them, rows in the interleaved order) reduced to its rotation-0 rows; a
    dict lazily (_NormalRows), as the features a StepOutput carries are mostly never read."""
    if torch.is_tensor(obj):
        return obj.unflatten(0, (batch, VIEWS))[:, 0] if obj.dim() > 0 and obj.shape[0] == batch * VIEWS else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(normal_rows(o, batch) for o in obj)
    if isinstance(obj, Mapping):
        return _NormalRows(obj, batch)
    return obj


class _NormalRows(Mapping):
    """A read-only view of a features dict whose values are reduced to the normal rows when first read."""

    def __init__(self, raw, batch):
        self._raw, self._batch, self._done = raw, batch, {}

    def __getitem__(self, key):
        if key not in self._done:
            self._done[key] = normal_rows(self._raw[key], self._batch)
        return self._done[key]

    def __iter__(self):
        return iter(self._raw)

    def __len__(self):
        return len(self._raw)


def cosine_matrix(aug, nor):
    """simi[j, i] = cos(aug_j, nor_i) (student.py's expand + F.cosine_similarity), in float32 outside autocast, so
    that the ranking does not see bf16 ties."""
    with torch.autocast(aug.device.type, enabled=False):
        a = F.normalize(aug.float(), dim=1, eps=1e-8)
        n = F.normalize(nor.float(), dim=1, eps=1e-8)
        return a @ n.t()


def source_index(batch, device):
    """The normal image each aug row was made from: 0, 0, 0, 1, 1, 1, ... (student.py aug_target)."""
    return torch.arange(batch, device=device).repeat_interleave(VIEWS - 1)


def target_rank(scores, target):
    """Position of column target[r] in row r of `scores` sorted descending (student.py: argsort then the index of
    the target), ties broken by column index (a stable sort): #(scores > s_t) + #(scores == s_t, column < t)."""
    s_t = scores.gather(1, target[:, None])
    cols = torch.arange(scores.shape[1], device=scores.device)
    return (scores > s_t).sum(1) + ((scores == s_t) & (cols[None, :] < target[:, None])).sum(1)


def kept_rows(rank, ratio):
    """Bool mask of the rows the selective transfer keeps: every row of rank 0 plus int(wrong_num * ratio) wrong
    rows of the smallest rank, rows of equal rank in row order (a stable sort; the published argsort is not).
    On the device, no host wait."""
    wrong = (rank > 0).sum()
    exact = torch.float32 if rank.device.type == "mps" else torch.float64  # int() of a Python float: float64
    keep = rank.numel() - wrong + torch.floor(wrong.to(exact) * ratio).long()
    order = torch.sort(rank, stable=True).indices
    position = torch.empty_like(order).scatter_(0, order, torch.arange(rank.numel(), device=rank.device))
    return position < keep


def kl_rows(logits_s, logits_t, temperature):
    """Per row, KL(softmax(t / T) || softmax(s / T)) as F.kl_div(log_softmax, softmax) sums it (student.py)."""
    log_p_s = F.log_softmax(logits_s / temperature, dim=1)
    p_t = F.softmax(logits_t / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="none").sum(1)


def masked_batchmean(values, keep):
    """Sum over kept rows / kept count (F.kl_div batchmean on the kept rows); 0 when no row is kept."""
    return (values * keep).sum() / keep.sum().clamp_min(1)


def ss_head_loss(rep, batch):
    """The teacher-head stage's loss: CE(cos(aug_rep, nor_rep), source index), no temperature (student.py)."""
    nor, aug = split_rows(rep, batch)
    return F.cross_entropy(cosine_matrix(aug, nor), source_index(batch, rep.device))


def check_views(images):
    if images.dim() != 5 or images.shape[1] != VIEWS:
        raise ValueError(f"SSKD trains on the 4 rotated views of each image, a (B, 4, C, H, W) batch (its "
                         f"class's train_views = 'rotations4' asks the data pipeline for them); got shape "
                         f"{tuple(images.shape)}")


def _non_negative(c, keys):
    for key in keys:
        section, _, leaf = key.rpartition(".")
        value = c[section][leaf] if section else c[leaf]
        if value < 0:
            raise ConfigError(f"config key SSKD.{key}: must be >= 0, got {value}")


@DISTILLER_REGISTRY.register("SSKD", config=_cfg)
class SSKD(InitStageDistiller):
    init_section, init_stage, published_init_epochs = "SSKD", "teacher-head stage", 60
    ramped_terms = ("kd", "tf", "ss")
    train_views = "rotations4"  # the data contract: (B, 4, C, H, W) training batches (data/views.py)

    def __init__(self, *, student, teacher, init_epochs=60, init_lr=0.05, init_lr_decay_stages=(30, 45),
                 init_lr_decay_rate=0.1, kd_t=4.0, tf_t=4.0, ss_t=0.5, ratio_tf=1.0, ratio_ss=0.75,
                 ce_weight=0.1, kd_weight=0.9, tf_weight=2.7, ss_weight=10.0):
        super().__init__(student=student, teacher=teacher)
        self.student_head = ss_head(student.feat_dim)
        self.teacher_head = ss_head(self.teacher.feat_dim)  # a submodule here, not of the FrozenTeacher: it trains
        self.teacher_head.train(False)
        self.init_epochs, self.init_lr = init_epochs, init_lr
        self.init_lr_decay_stages, self.init_lr_decay_rate = tuple(init_lr_decay_stages), init_lr_decay_rate
        self.kd_t, self.tf_t, self.ss_t, self.ratio_tf, self.ratio_ss = kd_t, tf_t, ss_t, ratio_tf, ratio_ss
        self.weights = {"ce": ce_weight, "kd": kd_weight, "tf": tf_weight, "ss": ss_weight}

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.SSKD
        return {"init_epochs": c.INIT_EPOCHS, "init_lr": c.INIT_LR,
                "init_lr_decay_stages": list(c.INIT_LR_DECAY_STAGES), "init_lr_decay_rate": c.INIT_LR_DECAY_RATE,
                "kd_t": c.KD_T, "tf_t": c.TF_T, "ss_t": c.SS_T,
                "ratio_tf": c.RATIO_TF, "ratio_ss": c.RATIO_SS, "ce_weight": c.LOSS.CE_WEIGHT,
                "kd_weight": c.LOSS.KD_WEIGHT, "tf_weight": c.LOSS.TF_WEIGHT, "ss_weight": c.LOSS.SS_WEIGHT}

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.SSKD
        cls.validate_init_epochs(cfg)
        early = [s for s in cfg.SOLVER.LR_DECAY_STAGES if s <= c.INIT_EPOCHS]
        if early:
            raise ConfigError(f"config key SOLVER.LR_DECAY_STAGES: {early} fall in the SSKD.INIT_EPOCHS "
                              f"{c.INIT_EPOCHS} teacher-head epochs, so the student would start at a decayed LR; shift "
                              f"the stages by INIT_EPOCHS (the published 150/180/210 -> 210/240/270)")
        if c.INIT_EPOCHS > 0 and cfg.SOLVER.WARMUP_EPOCHS > 0:
            raise ConfigError("config key SOLVER.WARMUP_EPOCHS: the warm-up would run in the SSKD.INIT_EPOCHS "
                              "teacher-head stage (whose LR is SSKD.INIT_LR), not for the student; set it 0")
        if c.INIT_EPOCHS > 0 and cfg.LOSS_RAMP.EPOCHS > 0:
            raise ConfigError("config key LOSS_RAMP.EPOCHS: the ramp counts from epoch 1, in the SSKD.INIT_EPOCHS "
                              "stage that has none of the ramped terms; set LOSS_RAMP.EPOCHS 0 or SSKD.INIT_EPOCHS 0")
        if c.INIT_LR <= 0:
            raise ConfigError(f"config key SSKD.INIT_LR: must be > 0, got {c.INIT_LR} (0.05 is the published --t-lr)")
        stages = list(c.INIT_LR_DECAY_STAGES)
        if any(s <= 0 for s in stages) or stages != sorted(set(stages)):
            raise ConfigError(f"config key SSKD.INIT_LR_DECAY_STAGES: must be increasing positive epochs, got "
                              f"{stages} (the published [30, 45])")
        if not 0 < c.INIT_LR_DECAY_RATE <= 1:
            raise ConfigError(f"config key SSKD.INIT_LR_DECAY_RATE: must be in (0, 1], got {c.INIT_LR_DECAY_RATE}")
        for key in ("KD_T", "TF_T", "SS_T"):
            if c[key] <= 0:
                raise ConfigError(f"config key SSKD.{key}: a temperature must be > 0, got {c[key]}")
        for key in ("RATIO_TF", "RATIO_SS"):
            if not 0 <= c[key] <= 1:
                raise ConfigError(f"config key SSKD.{key}: the share of wrongly ranked rows kept must be in [0, 1], "
                                  f"got {c[key]} (published: RATIO_TF 1.0, RATIO_SS 0.75)")
        _non_negative(c, ("LOSS.CE_WEIGHT", "LOSS.KD_WEIGHT", "LOSS.TF_WEIGHT", "LOSS.SS_WEIGHT"))

    def stage_lr(self, epoch):
        """The published MultiStepLR of the head stage: INIT_LR x rate per stage passed (epoch 31 is the first at
        0.005 for stage 30); None after the stage (the run's schedule)."""
        if not self.in_init_stage(epoch):
            return None
        return self.init_lr * self.init_lr_decay_rate ** sum(epoch > s for s in self.init_lr_decay_stages)

    def train(self, mode=True):
        """The teacher's head stays in eval mode, as the published t_model.eval() (it has no mode-dependent layer)."""
        super().train(mode)
        self.teacher_head.train(False)
        return self

    def forward_train(self, images, labels, epoch, index=None):
        check_views(images)
        batch = images.shape[0]
        flat = images.flatten(0, 1)  # (4B, C, H, W), interleaved image by image
        logits_t, features_t = self.teacher(flat)
        feat_t = features_t["pooled_feat"].detach()
        teacher_nor = normal_rows(features_t, batch)
        if self.in_init_stage(epoch):
            return self._head_stage(images[:, 0], feat_t, logits_t, teacher_nor, batch)
        logits, features = self.student(flat)
        rep_s = self.student_head(features["pooled_feat"])
        with torch.no_grad():
            rep_t = self.teacher_head(feat_t)
        terms = self.student_terms(logits, logits_t, rep_s, rep_t, labels, batch)
        return StepOutput(split_rows(logits, batch)[0], terms, normal_rows(features, batch),
                          split_rows(logits_t, batch)[0], teacher_nor)

    def _head_stage(self, normal_images, feat_t, logits_t, teacher_nor, batch):
        """The teacher's head alone learns; the student runs for the step's logs only (eval mode, no_grad)."""
        terms = {"ss_head": distill_loss(ss_head_loss(self.teacher_head(feat_t), batch))}
        was_training = self.student.training
        self.student.train(False)
        try:
            with torch.no_grad():
                logits, features = self.student(normal_images)
        finally:
            self.student.train(was_training)
        return StepOutput(logits, terms, features, split_rows(logits_t, batch)[0], teacher_nor)

    def student_terms(self, logits, logits_t, rep_s, rep_t, labels, batch):
        """ce, kd, tf, ss of student.py: logits and head outputs of all 4B rows in the interleaved order."""
        s_nor, s_aug = split_rows(logits, batch)
        t_nor, t_aug = split_rows(logits_t.detach(), batch)
        aug_labels = labels.repeat_interleave(VIEWS - 1)
        keep_tf = kept_rows(target_rank(F.softmax(t_aug / self.tf_t, dim=1), aug_labels), self.ratio_tf)
        loss_tf = masked_batchmean(kl_rows(s_aug, t_aug, self.tf_t), keep_tf) * self.tf_t ** 2
        s_rep_nor, s_rep_aug = split_rows(rep_s, batch)
        t_rep_nor, t_rep_aug = split_rows(rep_t.detach(), batch)
        s_simi, t_simi = cosine_matrix(s_rep_aug, s_rep_nor), cosine_matrix(t_rep_aug, t_rep_nor)
        keep_ss = kept_rows(target_rank(t_simi, source_index(batch, t_simi.device)), self.ratio_ss)
        loss_ss = masked_batchmean(kl_rows(s_simi, t_simi, self.ss_t), keep_ss) * self.ss_t ** 2
        w = self.weights
        return {
            "ce": task_loss(w["ce"] * F.cross_entropy(s_nor, labels)),
            "kd": distill_loss(w["kd"] * kl_rows(s_nor, t_nor, self.kd_t).mean() * self.kd_t ** 2),
            "tf": distill_loss(w["tf"] * loss_tf),
            "ss": distill_loss(w["ss"] * loss_ss),
        }
