"""Object detection: torchvision Faster R-CNN + FPN models, COCO data/evaluation and distillation glue."""
