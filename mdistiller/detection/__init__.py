"""Object detection: torchvision Faster R-CNN + FPN models, COCO data/evaluation and distillation glue.

Not imported by `mdistiller/__init__`: classification users need neither COCO nor pycocotools (which coco_eval
imports only when it evaluates).
"""

from .coco_eval import evaluate  # noqa: F401
from .data import CocoDetection, collate, to_original  # noqa: F401
