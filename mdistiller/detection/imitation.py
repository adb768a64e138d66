"""FitNet and FGFI on the FPN outputs of torchvision's Faster R-CNN: two detection loss terms and the methods made
of them (DISTILLER.TYPE FITNET and FGFI under TASK detection; FITNET++ and FGFI++ add the dino term).

Both are hint losses between a learned adaptation of each student FPN level ("0".."3" = P2..P5, "pool" = P6; one
conv per level, 256 -> 256 channels) and the teacher's map of the same level, which has the same size (same batch).

FitNet (Romero et al., ICLR 2015; the FitNet row of KD++ table 3, copied from the ReviewKD paper):
    fitnet = WEIGHT x sum over levels l of mean((a_l(s_l) - t_l)^2),
a_l a 1x1 conv with bias. The code behind the published detection number is not released (ReviewKD's Detection
folder has only ReviewKD); this is the FPN FitNet of HEAD (LutingWang/HEAD configs/kd/fitnet_r18_faster.py: a 1x1
conv per level, MSE per level summed, weight 1.0). The classification FitNet's conv-BN-ReLU regressor is not used:
FPN outputs are signed, and a ReLU would leave every negative teacher value out of reach.

FGFI (Wang et al., "Distilling Object Detectors with Fine-grained Feature Imitation", CVPR 2019; the original code
twangnh/Distilling-Object-Detectors):
  - mask: for each ground-truth box, the IoU of every anchor of the student's RPN (all levels; torchvision's
    AnchorGenerator, as the RPN calls it) with the box; an anchor is kept where its IoU > PSI x the box's largest
    IoU over all anchors (PSI 0.5; strictly greater, as anchor_target_layer.py); a location of a level is in the
    mask when any of its anchors is kept for any box of its image;
  - loss: fgfi = WEIGHT x sum over levels, images, masked locations and channels of (a_l(s_l) - t_l)^2, divided by
    2 x the number of masked locations (all levels and images together; trainval_net_sup.py: `norms =
    mask_batch.sum() * 2`); 0 when no location is masked. WEIGHT 0.01: the original's --ilw default.
  - a_l: a 3x3 conv (padding 1) with bias, its weights drawn as the original draws them (N(0, 1) folded into
    (-2, 2) by fmod, times 1e-4; bias at PyTorch's default). The original follows it with a ReLU (its VGG features
    are post-ReLU); the FPN's are signed, so there is none here.
The original is single-scale (VGG conv5, one anchor set); on an FPN the mask is the same rule over the union of the
levels' anchors, so each box's maximum is over all levels and a box is imitated on the levels whose anchors fit it.
The original's 400 iterations without imitation at the start are not kept: Detectron2's schedule already warms the
learning rate up over 1000 iterations (docs/differences.md).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import box_iou

from ..config.validate import _check
from ..distillers.losses import distill_loss
from .review import FPN_CHANNELS, FPN_LEVELS, _levels
from .terms import DETECTION_TERM_REGISTRY, register_method

FGFI_INIT_STD = 1e-4  # trainval_net_sup.py: normal_init(fasterRCNN.stu_feature_adap[0], 0, 0.0001, True)


class FPNAdapters(nn.Module):
    """One conv per FPN level, student channels -> teacher channels, size-preserving (kernel 1 or 3)."""

    def __init__(self, kernel_size=1, student_channels=FPN_CHANNELS, teacher_channels=FPN_CHANNELS,
                 num_levels=len(FPN_LEVELS)):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(student_channels, teacher_channels, kernel_size,
                                             padding=kernel_size // 2) for _ in range(num_levels))

    def forward(self, student_maps):
        if len(student_maps) != len(self.convs):
            raise ValueError(f"{len(self.convs)} adaptation convs for {len(student_maps)} FPN levels: build the term "
                             f"with num_levels={len(student_maps)}")
        return [conv(m) for conv, m in zip(self.convs, student_maps)]


def fitnet_loss(adapted, teacher):
    """Sum over the levels of the mean squared error over every element."""
    return sum(F.mse_loss(a, t) for a, t in zip(adapted, teacher))


@torch.no_grad()
def fgfi_masks(gt_boxes, anchors, shapes, psi=0.5):
    """FGFI's imitation masks, one (B, H_l, W_l) bool tensor per level.

    gt_boxes: per image (N_i, 4) xyxy; anchors: per level (H_l * W_l * A_l, 4), row-major over (y, x) with a
    location's A_l anchors consecutive (torchvision's order), the same for every image; shapes: per level (H_l, W_l).
    For each box, the anchors (over all levels) whose IoU with it is > psi x its largest IoU; a location is masked
    when any of its anchors is kept for any box."""
    counts = [len(a) for a in anchors]
    per_location = []
    for a, (h, w) in zip(counts, shapes):
        if a % (h * w):
            raise ValueError(f"{a} anchors do not fill a {h}x{w} level evenly: give the level's own anchors")
        per_location.append(a // (h * w))
    every = torch.cat(list(anchors))
    masks = [[] for _ in anchors]
    for boxes in gt_boxes:
        if len(boxes):
            iou = box_iou(boxes.to(every), every)  # (N, K)
            kept = (iou > psi * iou.max(dim=1, keepdim=True).values).any(dim=0)
        else:
            kept = torch.zeros(len(every), dtype=torch.bool, device=every.device)
        for level, (part, a, (h, w)) in enumerate(zip(kept.split(counts), per_location, shapes)):
            masks[level].append(part.view(h, w, a).any(dim=2))
    return [torch.stack(m) for m in masks]


def fgfi_loss(adapted, teacher, masks):
    """sum over levels, images, masked locations and channels of (adapted - teacher)^2 / (2 x masked locations)."""
    total = adapted[0].new_zeros(())
    count = 0
    for a, t, m in zip(adapted, teacher, masks):
        m = m.to(a.dtype).unsqueeze(1)  # (B, 1, H, W)
        total = total + ((a - t) ** 2 * m).sum()
        count = count + m.sum()
    return total / (2 * count).clamp_min(1)


@DETECTION_TERM_REGISTRY.register("fitnet")
class FPNFitNet(nn.Module):
    """FitNet on the five FPN levels: a 1x1 conv per student level, MSE to the teacher's, summed over the levels."""

    def __init__(self, *, weight=1.0, num_levels=len(FPN_LEVELS), channels=FPN_CHANNELS):
        super().__init__()
        self.weight = weight
        self.adapters = FPNAdapters(1, channels, channels, num_levels)

    @classmethod
    def from_config(cls, cfg):
        return {"weight": cfg.DETECTION.FITNET.WEIGHT}

    def forward(self, step):
        student, teacher = _levels(step)
        return distill_loss(self.weight * fitnet_loss(self.adapters(student), teacher))


@DETECTION_TERM_REGISTRY.register("fgfi")
class FPNFGFI(nn.Module):
    """FGFI on the five FPN levels: a 3x3 conv per student level, squared error to the teacher's on the imitation
    mask of the student's anchors and the ground-truth boxes."""

    def __init__(self, *, weight=0.01, psi=0.5, num_levels=len(FPN_LEVELS), channels=FPN_CHANNELS):
        super().__init__()
        self.weight, self.psi = weight, psi
        self.adapters = FPNAdapters(3, channels, channels, num_levels)
        with torch.no_grad():
            for conv in self.adapters.convs:
                conv.weight.normal_().fmod_(2).mul_(FGFI_INIT_STD)

    @classmethod
    def from_config(cls, cfg):
        return {"weight": cfg.DETECTION.FGFI.WEIGHT, "psi": cfg.DETECTION.FGFI.PSI}

    @staticmethod
    def validate_config(cfg):
        psi = cfg.DETECTION.FGFI.PSI
        _check(0 <= psi < 1, "DETECTION.FGFI.PSI",
               f"the imitation threshold factor must be in [0, 1) (the paper's 0.5; 1 or more masks nothing), got "
               f"{psi}")

    def forward(self, step):
        student, teacher = _levels(step)
        masks = fgfi_masks(step.gt_boxes, step.student_anchors(), [s.shape[-2:] for s in student], self.psi)
        return distill_loss(self.weight * fgfi_loss(self.adapters(student), teacher, masks))


register_method("FITNET", "fitnet")
register_method("FGFI", "fgfi")
