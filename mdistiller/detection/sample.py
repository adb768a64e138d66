"""A small generated dataset in COCO 2017's real layout (annotations/instances_{train,val}2017.json, JPEG folders)
with COCO's 80 categories, of which three are drawn: filled rectangles of a fixed colour per class on a noisy
background. For runnable examples and tests without COCO: a detector learns it in a few hundred iterations."""

import json
import os

import numpy as np
from PIL import Image

DRAWN = {1: (220, 40, 40), 3: (40, 200, 60), 18: (50, 80, 230)}  # person, car, dog: colour of each class


def coco_categories():
    """COCO's 80 categories [{"id", "name"}] (torchvision's list, without the background and N/A slots)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return [{"id": i, "name": n, "supercategory": "none"} for i, n in enumerate(names)
            if n not in ("__background__", "N/A")]


def _image(rng, width, height, boxes_per_image, layout=None):
    pixels = rng.integers(90, 140, size=(height, width, 3), dtype=np.uint8)
    if layout is not None:  # the same boxes, other pixels
        for category, x, y, w, h in layout:
            pixels[y:y + h, x:x + w] = DRAWN[category]
        return Image.fromarray(pixels), list(layout)
    boxes = []
    for _ in range(boxes_per_image):
        category = int(rng.choice(list(DRAWN)))
        w, h = int(rng.integers(width // 5, width // 2)), int(rng.integers(height // 5, height // 2))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        pixels[y:y + h, x:x + w] = DRAWN[category]
        boxes.append((category, x, y, w, h))
    return Image.fromarray(pixels), boxes


def write_sample_coco(root, num_train=16, num_val=8, width=96, height=72, boxes_per_image=2, seed=0,
                      same_layout=False):
    """Write the dataset under `root`; returns root. Same arguments, same files (JPEG quality 95).
    `same_layout`: every image has the first image's boxes (tests that need equal sample counts per image)."""
    rng = np.random.default_rng(seed)
    layout = None
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    next_image, next_ann = 1, 1
    for split, count in (("train", num_train), ("val", num_val)):
        folder = os.path.join(root, f"{split}2017")
        os.makedirs(folder, exist_ok=True)
        images, annotations = [], []
        for _ in range(count):
            image, boxes = _image(rng, width, height, boxes_per_image, layout)
            if same_layout:
                layout = boxes
            name = f"{next_image:012d}.jpg"
            image.save(os.path.join(folder, name), quality=95)
            images.append({"id": next_image, "file_name": name, "width": width, "height": height})
            for category, x, y, w, h in boxes:
                annotations.append({"id": next_ann, "image_id": next_image, "category_id": category,
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
                next_ann += 1
            next_image += 1
        with open(os.path.join(root, "annotations", f"instances_{split}2017.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": coco_categories()}, f)
    return root
