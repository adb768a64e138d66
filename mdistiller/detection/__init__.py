"""Object detection (TASK detection): torchvision Faster R-CNN + FPN students and teachers on COCO, distilled with
KD, DKD, KD++, ReviewKD, ReviewKD+DKD, ReviewKD++, FitNet and FGFI on the same loop, update rules and run directory as
classification. pycocotools is imported only when AP is computed.
"""

from .task import DetectionTask  # noqa: F401  (registers TASK detection)
from . import imitation  # noqa: F401  (registers the FitNet and FGFI terms and methods)
from .coco_eval import evaluate  # noqa: F401
from .data import CocoDetection, collate, to_original  # noqa: F401
