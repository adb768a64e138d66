"""Faster R-CNN + FPN detectors (torchvision) for the detection half of KD++ table 3 and the DKD appendix.

Backbones: ResNet-18/50/101 (torchvision's resnet_fpn_backbone) and MobileNetV2, whose FPN torchvision does not
build (its mobilenet extractor finds the pyramid stages only in MobileNetV3), so it is assembled here from the four
stride-4/8/16/32 stages of `mobilenet_v2().features`. BatchNorm in the backbone is frozen (FrozenBatchNorm2d), as
torchvision and Detectron2 do for detection.

RoI pooling: torchvision's MultiScaleRoIAlign (7x7, sampling ratio 2) samples the feature map at continuous
coordinates box * scale (`aligned=False`, the legacy RoIAlign of Mask R-CNN's first code); Detectron2's ROIAlignV2,
which its FPN configs use by default (POOLER_TYPE "ROIAlignV2") and which therefore produced the published detection
numbers, shifts them by half a pixel, box * scale - 0.5 (`aligned=True`), so that a pixel's value sits at its
centre. torchvision's pooler has no `aligned` argument; `AlignedMultiScaleRoIAlign` is it with one
(`build_faster_rcnn(..., roi_align_aligned=True)`, config keys DETECTION.ROI_ALIGN_ALIGNED and
DETECTION.TEACHER_ROI_ALIGN_ALIGNED). Detectron2's sampling ratio 0 (adaptive) is not taken over: ours stays 2.

Label convention (one for the whole project): torchvision's, **background is class 0**, the 80 COCO categories
are 1..80 in increasing COCO category id. Detectron2 (and the KD++ repository's class-mean files, keys "0".."80")
put the 80 categories at 0..79 and background at 80: see `detectron2_to_torchvision_labels` and
`class_means_from_detectron2`. DKD's target on a background proposal is class 0 here (class 80 there); the maths
is the same, it is a permutation of the 81 columns.
"""

from collections import OrderedDict

import torch
import torch.nn as nn
from torchvision.models import mobilenet_v2
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

from ..utils.errors import ConfigError

NUM_CLASSES = 81  # 80 COCO categories + background (class 0)
BACKGROUND = 0
BOX_FEATURE_DIM = 1024  # TwoMLPHead's representation size: the KD++ "embedding"
RESNETS = ("resnet18", "resnet50", "resnet101")
BACKBONES = RESNETS + ("mobilenet_v2",)
# MobileNetV2 `features` children ending each stage of stride 4, 8, 16, 32, and their output channels.
_MV2_STAGE_ENDS = {"3": "0", "6": "1", "13": "2", "17": "3"}
_MV2_CHANNELS = [24, 32, 96, 320]
FPN_CHANNELS = 256
BOX_POOL_LEVELS = ["0", "1", "2", "3"]  # torchvision's FasterRCNN default box pooler: 7x7, sampling ratio 2
BOX_POOL_SIZE = 7
BOX_POOL_SAMPLING_RATIO = 2


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign with RoIAlign's `aligned` flag: True is Detectron2's ROIAlignV2 (the box's
    sampling grid shifted by -0.5 pixel), False pools exactly as torchvision's class does. The same FPN level
    assignment (canonical box 224 at level 4), scales inferred from the first batch, and output."""

    def __init__(self, featmap_names, output_size, sampling_ratio, *, aligned=False, **kwargs):
        super().__init__(featmap_names, output_size, sampling_ratio, **kwargs)
        self.aligned = bool(aligned)

    def forward(self, x, boxes, image_shapes):
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        if len(features) == 1:
            return roi_align(features[0], rois, self.output_size, self.scales[0], self.sampling_ratio, self.aligned)
        levels = self.map_levels(boxes)
        first = features[0]
        result = first.new_zeros((len(rois), first.shape[1]) + tuple(self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[index], self.output_size, scale, self.sampling_ratio, self.aligned)
            result[index] = pooled.to(result.dtype)
        return result

    def __repr__(self):
        return f"{super().__repr__()[:-1]}, aligned={self.aligned})"


def _imagenet_weights(backbone):
    """torchvision's ImageNet weights enum for `backbone` (loaded from the torch hub cache when used)."""
    from torchvision import models
    enum = {"resnet18": models.ResNet18_Weights, "resnet50": models.ResNet50_Weights,
            "resnet101": models.ResNet101_Weights, "mobilenet_v2": models.MobileNet_V2_Weights}[backbone]
    return enum.IMAGENET1K_V1


def mobilenet_v2_fpn_backbone(weights=None, trainable_layers=19):
    """MobileNetV2 stages at strides 4/8/16/32 -> FPN (256 channels) + max-pool level, frozen BN.

    trainable_layers counts `features` children from the top (19 = all, KD++'s MV2 FREEZE_AT 0)."""
    if not 0 <= trainable_layers <= 19:
        raise ConfigError(f"MobileNetV2 trainable_layers must be in 0..19 (children of features), got "
                          f"{trainable_layers}")
    features = mobilenet_v2(weights=weights, norm_layer=FrozenBatchNorm2d).features
    for index, child in enumerate(features):
        if index < len(features) - trainable_layers:
            child.requires_grad_(False)
    body = nn.Sequential(OrderedDict((str(i), m) for i, m in enumerate(features) if i <= 17))
    return BackboneWithFPN(body, _MV2_STAGE_ENDS, _MV2_CHANNELS, FPN_CHANNELS, extra_blocks=LastLevelMaxPool())


def build_faster_rcnn(backbone, num_classes=NUM_CLASSES, pretrained_backbone=False, trainable_layers=None,
                      roi_align_aligned=False, **faster_rcnn_kwargs):
    """torchvision FasterRCNN with an FPN on `backbone` (one of BACKBONES).

    pretrained_backbone loads torchvision's ImageNet weights (hub cache; offline it must already be there).
    trainable_layers: ResNet stages trained from the top (default 3, Detectron2's FREEZE_AT 2); MobileNetV2
    `features` children (default all). roi_align_aligned: the box head pools with RoIAlign aligned=True
    (Detectron2's ROIAlignV2) instead of torchvision's aligned=False. Extra keyword arguments go to FasterRCNN
    (min_size, max_size, sampler sizes).
    """
    if backbone not in BACKBONES:
        raise ConfigError(f"detection backbone '{backbone}' is not supported: use one of {', '.join(BACKBONES)}")
    if num_classes < 2:
        raise ConfigError(f"detection num_classes must count the background too (>= 2; COCO: 81), got {num_classes}")
    weights = _imagenet_weights(backbone) if pretrained_backbone else None
    if backbone == "mobilenet_v2":
        body = mobilenet_v2_fpn_backbone(weights, 19 if trainable_layers is None else trainable_layers)
    else:
        layers = 3 if trainable_layers is None else trainable_layers
        if not 0 <= layers <= 5:
            raise ConfigError(f"ResNet trainable_layers must be in 0..5 (stages from the top), got {layers}")
        body = resnet_fpn_backbone(backbone_name=backbone, weights=weights, trainable_layers=layers)
    if roi_align_aligned:
        faster_rcnn_kwargs["box_roi_pool"] = AlignedMultiScaleRoIAlign(BOX_POOL_LEVELS, BOX_POOL_SIZE,
                                                                       BOX_POOL_SAMPLING_RATIO, aligned=True)
    return FasterRCNN(body, num_classes=num_classes, **faster_rcnn_kwargs)


def detectron2_to_torchvision_labels(labels):
    """Detectron2 class index (0..79 categories, 80 background) -> ours (0 background, 1..80 categories)."""
    return torch.where(labels == NUM_CLASSES - 1, torch.zeros_like(labels), labels + 1)


def torchvision_to_detectron2_labels(labels):
    """Ours (0 background, 1..80 categories) -> Detectron2's (0..79 categories, 80 background)."""
    return torch.where(labels == BACKGROUND, torch.full_like(labels, NUM_CLASSES - 1), labels - 1)


def class_means_from_detectron2(means):
    """(81, D) class means indexed the Detectron2 way (KD++'s R101_emb.json rows "0".."80") -> our row order."""
    if means.shape[0] != NUM_CLASSES:
        raise ValueError(f"expected {NUM_CLASSES} rows of class means (80 categories + background), got "
                         f"{means.shape[0]}")
    return torch.cat([means[NUM_CLASSES - 1:], means[:NUM_CLASSES - 1]], dim=0)


def coco91_state_dict_to_contiguous(state_dict, category_ids):
    """A torchvision COCO detector's state dict (91 outputs indexed by COCO category id, 0 background) -> ours
    (0 background, label i = category_ids[i - 1], category_ids sorted as data.CocoDetection has them), by keeping
    the predictor's rows of those classes (4 box-regression rows per class). Everything else is unchanged."""
    ids = list(category_ids)
    if ids != sorted(ids) or len(set(ids)) != len(ids):
        raise ValueError("category_ids must be the dataset's COCO category ids, sorted and distinct")
    out = dict(state_dict)
    prefix = "roi_heads.box_predictor."
    if prefix + "cls_score.weight" not in out:
        raise ValueError("not a Faster R-CNN state dict: no roi_heads.box_predictor.cls_score.weight")
    num_rows = out[prefix + "cls_score.weight"].shape[0]
    if max(ids) >= num_rows:
        raise ValueError(f"category id {max(ids)} has no row in this predictor ({num_rows} outputs)")
    rows = torch.tensor([BACKGROUND] + ids)
    box_rows = (rows.unsqueeze(1) * 4 + torch.arange(4)).flatten()
    for name, index in (("cls_score", rows), ("bbox_pred", box_rows)):
        for kind in ("weight", "bias"):
            key = f"{prefix}{name}.{kind}"
            out[key] = out[key][index].clone()
    return out
