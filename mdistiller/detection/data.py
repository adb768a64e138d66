"""COCO in its standard layout as a torch Dataset for torchvision's detection models, with Detectron2's input recipe.

Detectron2 (what the KD++ and mdistiller detection results were trained with) resizes in the data loader: the short
side to a random choice of (640, ..., 800) capped so the long side is at most 1333, PIL bilinear on the uint8 image,
sizes rounded with int(x + 0.5), then a horizontal flip with probability 0.5; at test the short side is 800. It drops
crowd annotations, images left with none for training, and boxes empty after clipping to the image.

torchvision's GeneralizedRCNNTransform would resize again. The resize is done here (Detectron2's op, in the loader
workers) and the model must not repeat it: build it with min_size=800, max_size=1333 and _skip_resize=True
(torchvision's own switch for its multi-scale recipe: no resize in training). In eval mode the model still resizes to
min_size 800 / max 1333, which for an image already resized here is scale 1.0, an identity. Its predictions are
then in the resized image's coordinates: `to_original` maps them back (Detectron2's detector_postprocess) before
coco_eval. Labels are contiguous 1..K in sorted COCO category-id order, 0 is background, as torchvision expects;
`category_ids[label - 1]` is the COCO id.
"""

import json
import os

import torch
from PIL import Image, ImageOps
from torchvision.transforms.functional import pil_to_tensor

from ..utils.errors import DataError

TRAIN_SHORT_SIDES = (640, 672, 704, 736, 768, 800)
TEST_SHORT_SIDE = 800
MAX_SIZE = 1333
EMPTY_BOX = 1e-5  # Detectron2's Boxes.nonempty threshold on width and height


def output_size(height, width, short, max_size):
    """(new_h, new_w) of Detectron2's ResizeShortestEdge: short side to `short` unless the long side would pass
    `max_size`, then the long side to `max_size`; rounded half up."""
    scale = short / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize(image, boxes, short, max_size):
    """Resize a PIL image (bilinear) and its xyxy boxes [N, 4] by ResizeShortestEdge's rule."""
    new_h, new_w = output_size(image.height, image.width, short, max_size)
    scale = torch.tensor([new_w / image.width, new_h / image.height] * 2, dtype=boxes.dtype)
    return image.resize((new_w, new_h), Image.BILINEAR), boxes * scale


def hflip(image, boxes):
    """Mirror a PIL image and its xyxy boxes: x -> W - x, so x1 and x2 swap roles."""
    flipped = torch.stack([image.width - boxes[:, 2], boxes[:, 1], image.width - boxes[:, 0], boxes[:, 3]], dim=1)
    return image.transpose(Image.FLIP_LEFT_RIGHT), flipped


class DetectionTransform:
    """Random short side from `short_sides` (capped by `max_size`), then a flip with probability `flip_prob`.
    Randomness comes from torch's RNG (seeded per DataLoader worker) or the `generator` given to __call__."""

    def __init__(self, short_sides, max_size=MAX_SIZE, flip_prob=0.0):
        self.short_sides, self.max_size, self.flip_prob = tuple(short_sides), max_size, flip_prob

    def __call__(self, image, boxes, generator=None):
        pick = int(torch.randint(len(self.short_sides), (1,), generator=generator))
        image, boxes = resize(image, boxes, self.short_sides[pick], self.max_size)
        if self.flip_prob > 0 and float(torch.rand((), generator=generator)) < self.flip_prob:
            image, boxes = hflip(image, boxes)
        return image, boxes


def train_transform():
    """Detectron2's training input: short side from (640, ..., 800), long side at most 1333, flip 0.5."""
    return DetectionTransform(TRAIN_SHORT_SIDES, MAX_SIZE, flip_prob=0.5)


def test_transform():
    """Detectron2's test input: short side 800, long side at most 1333, no flip."""
    return DetectionTransform((TEST_SHORT_SIDE,), MAX_SIZE, flip_prob=0.0)


def clip_and_drop_empty(boxes, labels, height, width):
    """Clip xyxy boxes to the image and drop those with width or height not above EMPTY_BOX (Detectron2)."""
    boxes = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                         boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=1)
    keep = ((boxes[:, 2] - boxes[:, 0]) > EMPTY_BOX) & ((boxes[:, 3] - boxes[:, 1]) > EMPTY_BOX)
    return boxes[keep], labels[keep]


def to_original(boxes, size, orig_size):
    """Boxes predicted on the transformed image (size = (h, w)) in the original image's coordinates, clipped."""
    (h, w), (oh, ow) = size, orig_size
    boxes = boxes * torch.tensor([ow / w, oh / h] * 2, dtype=boxes.dtype, device=boxes.device)
    return torch.stack([boxes[:, 0].clamp(0, ow), boxes[:, 1].clamp(0, oh),
                        boxes[:, 2].clamp(0, ow), boxes[:, 3].clamp(0, oh)], dim=1)


def annotation_path(root, split):
    return os.path.join(root, "annotations", f"instances_{split}2017.json")


class CocoDetection(torch.utils.data.Dataset):
    """One COCO 2017 split: item i is (image float [0, 1] CxHxW after `transform`, target) with target keys
    boxes (xyxy float32 [N, 4]), labels (int64 1..K), image_id, orig_size and size ((h, w) before / after)."""

    def __init__(self, root, split, transform=None, train=None):
        ann, self.image_dir = annotation_path(root, split), os.path.join(root, f"{split}2017")
        if not os.path.isfile(ann):
            raise DataError(f"COCO annotations {ann} not found: put instances_{split}2017.json under "
                            f"{os.path.join(root, 'annotations')} (the standard COCO 2017 layout)")
        if not os.path.isdir(self.image_dir):
            raise DataError(f"COCO image folder {self.image_dir} not found: unpack {split}2017.zip under {root}")
        try:
            with open(ann) as f:
                coco = json.load(f)
            categories, images, annotations = coco["categories"], coco["images"], coco["annotations"]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"cannot read COCO annotations {ann}: {e}") from None
        self.train = split == "train" if train is None else train
        self.transform = transform if transform is not None else (train_transform() if self.train else
                                                                  test_transform())
        self.category_ids = sorted(c["id"] for c in categories)  # label i <-> category_ids[i - 1]
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.class_names = [{c["id"]: c["name"] for c in categories}[cid] for cid in self.category_ids]
        per_image = {}
        for a in annotations:
            if not a.get("iscrowd", 0):  # Detectron2's mapper skips crowd regions; COCOeval still sees them
                per_image.setdefault(a["image_id"], []).append(a)
        images = sorted(images, key=lambda im: im["id"])
        if self.train:  # Detectron2's FILTER_EMPTY_ANNOTATIONS: no image without a non-crowd annotation
            images = [im for im in images if per_image.get(im["id"])]
        self.images, self.annotations = images, per_image

    def __len__(self):
        return len(self.images)

    def boxes_and_labels(self, image_id):
        """The image's non-crowd boxes (COCO xywh -> xyxy) and contiguous labels, before any transform."""
        annotations = self.annotations.get(image_id, [])
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)],
                             dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.label_of[a["category_id"]] for a in annotations], dtype=torch.int64)
        return boxes, labels

    def __getitem__(self, index):
        return self.load(index)

    def load(self, index, generator=None):
        """Item `index`, its random augmentation drawn from `generator` (default: torch's global RNG)."""
        info = self.images[index]
        path = os.path.join(self.image_dir, info["file_name"])
        try:
            with Image.open(path) as raw:
                image = ImageOps.exif_transpose(raw).convert("RGB")  # Detectron2's read_image applies EXIF
        except OSError as e:
            raise DataError(f"cannot read COCO image {path}: {e}") from None
        if (image.height, image.width) != (info["height"], info["width"]):
            raise DataError(f"{path} is {image.width}x{image.height} but the annotations say "
                            f"{info['width']}x{info['height']}: the image or the annotation file is not COCO's")
        boxes, labels = self.boxes_and_labels(info["id"])
        orig_size = (image.height, image.width)
        image, boxes = self.transform(image, boxes, generator=generator) if generator is not None else \
            self.transform(image, boxes)
        boxes, labels = clip_and_drop_empty(boxes, labels, image.height, image.width)
        tensor = pil_to_tensor(image).float().div_(255)
        return tensor, {"boxes": boxes, "labels": labels, "image_id": info["id"], "orig_size": orig_size,
                        "size": (image.height, image.width)}


def collate(batch):
    """Detection batches stay lists (images differ in size; the model pads them): (images, targets)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)

