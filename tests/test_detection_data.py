"""COCO data and box AP for the detection task, on a COCO-format dataset written by the test.

Expectations are computed here by hand: boxes from the JSON's xywh, Detectron2's resize rule worked out for given
sizes, a drawn white rectangle that the transformed box must still cover, and AP from COCO's definition (101-point
interpolated precision, averaged over categories and IoU thresholds 0.50:0.95).
"""

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mdistiller.detection import coco_eval, data
from mdistiller.utils.errors import DataError

# COCO ids 1, 3, 7 are non-contiguous: labels must be 1, 2, 3
CATEGORIES = [{"id": 7, "name": "seven"}, {"id": 1, "name": "one"}, {"id": 3, "name": "three"}]
IMAGES = [  # id, width, height, [(category, x, y, w, h, iscrowd)]
    (11, 64, 48, [(1, 4, 6, 10, 8, 0),      # small (area 80)
                  (3, 20, 10, 40, 30, 0),   # medium (1200)
                  (1, 0, 0, 30, 20, 1),     # crowd: dropped from training targets
                  (7, 70, 10, 5, 5, 0)]),   # outside the image: empty after clipping, dropped
    (12, 160, 120, [(7, 10, 10, 110, 90, 0),  # large (9900)
                    (3, 130, 20, 20, 20, 0)]),  # small (400)
    (13, 40, 40, [(1, 5, 5, 10, 10, 1)]),   # only a crowd box: no training image, still a test image
]


def write_coco(root, split="val", images=IMAGES, draw=True):
    """COCO layout under `root`: annotations/instances_<split>2017.json and <split>2017/*.jpg (black images with
    each non-crowd box drawn white)."""
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, f"{split}2017"), exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": CATEGORIES}
    for image_id, w, h, boxes in images:
        name = f"{image_id:012d}.jpg"
        coco["images"].append({"id": image_id, "file_name": name, "width": w, "height": h})
        picture = Image.new("RGB", (w, h))
        for cat, x, y, bw, bh, crowd in boxes:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                        "category_id": cat, "bbox": [x, y, bw, bh], "area": bw * bh,
                                        "iscrowd": crowd})
            if draw and not crowd:
                ImageDraw.Draw(picture).rectangle([x, y, x + bw - 1, y + bh - 1], fill=(255, 255, 255))
        picture.save(os.path.join(root, f"{split}2017", name), quality=95)
    path = os.path.join(root, "annotations", f"instances_{split}2017.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    return path


class Fixed:
    """A transform that leaves image and boxes as they are (to check loading alone)."""

    def __call__(self, image, boxes, generator=None):
        return image, boxes


def test_boxes_labels_and_ids_are_the_annotations(tmp_path):
    write_coco(str(tmp_path), "val")
    ds = data.CocoDetection(str(tmp_path), "val", transform=Fixed())
    assert ds.category_ids == [1, 3, 7] and ds.class_names == ["one", "three", "seven"]
    assert len(ds) == 3  # test split keeps the crowd-only image
    image, target = ds[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert target["image_id"] == 11 and target["orig_size"] == (48, 64) == target["size"]
    # crowd box and the box outside the image gone; xywh -> xyxy; COCO ids 1, 3 -> labels 1, 2
    assert torch.equal(target["boxes"], torch.tensor([[4., 6., 14., 14.], [20., 10., 60., 40.]]))
    assert torch.equal(target["labels"], torch.tensor([1, 2]))
    _, target = ds[1]
    assert torch.equal(target["labels"], torch.tensor([3, 2]))  # COCO id 7 -> label 3
    _, target = ds[2]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_training_split_drops_images_without_usable_annotations(tmp_path):
    write_coco(str(tmp_path), "train")
    ds = data.CocoDetection(str(tmp_path), "train", transform=Fixed())
    assert [im["id"] for im in ds.images] == [11, 12]
    assert data.CocoDetection(str(tmp_path), "train").transform.short_sides == (640, 672, 704, 736, 768, 800)
    assert data.CocoDetection(str(tmp_path), "train", train=False).transform.short_sides == (800,)


def test_resize_rule_is_detectron2s():
    # 48x64 (h x w), short side 800: scale 800/48, long side 1066.67 -> 1067
    assert data.output_size(48, 64, 800, 1333) == (800, 1067)
    # 40x200, short 800 would make the long side 4000 > 1333: scale 1333/200, h = 266.6 -> 267
    assert data.output_size(40, 200, 800, 1333) == (267, 1333)
    assert data.output_size(480, 640, 640, 1333) == (640, 853)  # 853.33 -> 853


@pytest.mark.parametrize("short,flip", [(640, False), (800, True), (672, True)])
def test_transform_keeps_boxes_on_the_drawn_rectangles(tmp_path, short, flip):
    write_coco(str(tmp_path), "val")
    transform = data.DetectionTransform((short,), 1333, flip_prob=1.0 if flip else 0.0)
    ds = data.CocoDetection(str(tmp_path), "val", transform=transform)
    for index in (0, 1):
        raw_boxes, _ = ds.boxes_and_labels(ds.images[index]["id"])
        image, target = ds[index]
        h, w = image.shape[1:]
        assert target["size"] == (h, w) and (min(h, w) == short or max(h, w) == 1333)
        white = image.mean(0) > 0.5
        covered = torch.zeros_like(white)
        for x1, y1, x2, y2 in target["boxes"].tolist():
            inside = white[math.ceil(y1) + 1:math.floor(y2) - 1, math.ceil(x1) + 1:math.floor(x2) - 1]
            assert inside.float().mean() > 0.95  # the box lies on white pixels
            covered[max(0, math.floor(y1) - 1):math.ceil(y2) + 1, max(0, math.floor(x1) - 1):math.ceil(x2) + 1] = True
        assert not (white & ~covered).any()  # and every white pixel lies in a box (1-pixel margin)
        # boxes by hand: scale each axis, then mirror x when flipped
        sx, sy = w / ds.images[index]["width"], h / ds.images[index]["height"]
        kept = raw_boxes[:len(target["boxes"])] * torch.tensor([sx, sy, sx, sy])
        if flip:
            kept = torch.stack([w - kept[:, 2], kept[:, 1], w - kept[:, 0], kept[:, 3]], 1)
        assert torch.allclose(target["boxes"], kept, atol=1e-4)


def test_random_choice_covers_the_short_sides_and_flips_about_half():
    transform = data.train_transform()
    image = Image.new("RGB", (30, 20))
    boxes = torch.tensor([[1., 2., 5., 6.]])
    g = torch.Generator().manual_seed(0)
    shorts, flips = set(), 0
    for _ in range(200):
        out, b = transform(image, boxes, generator=g)
        shorts.add(min(out.size))
        flips += bool(b[0, 0] > out.width / 2)
    assert shorts == set(data.TRAIN_SHORT_SIDES)
    assert 70 < flips < 130


def test_torchvision_model_transform_does_not_resize_again(tmp_path):
    """Built as data.py says (min 800, max 1333, _skip_resize), the model's own transform is an identity on our
    images in both modes, so the boxes it predicts are in our transformed image's coordinates."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.rpn import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    write_coco(str(tmp_path), "val", images=[(5, 333, 217, [(1, 3, 3, 50, 40, 0)]),
                                             (6, 217, 700, [(3, 3, 3, 50, 40, 0)])])
    backbone = torch.nn.Conv2d(3, 8, 3)
    backbone.out_channels = 8
    model = FasterRCNN(backbone, num_classes=4, min_size=800, max_size=1333, _skip_resize=True,
                       image_mean=[0., 0., 0.], image_std=[1., 1., 1.],
                       rpn_anchor_generator=AnchorGenerator(((32,),), ((1.0,),)),
                       box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2))
    model_transform = model.transform  # what FasterRCNN built from those keyword arguments
    for train in (True, False):
        ds = data.CocoDetection(str(tmp_path), "val", transform=data.train_transform() if train else None)
        model_transform.train(train)
        for image, target in (ds[0], ds[1]):
            batch, targets = model_transform([image], [dict(target)])
            assert batch.image_sizes[0] == tuple(image.shape[1:])
            assert torch.equal(targets[0]["boxes"], target["boxes"])
            h, w = batch.image_sizes[0]
            assert torch.equal(batch.tensors[0, :, :h, :w], image)


def test_to_original_undoes_the_resize():
    boxes = torch.tensor([[10., 20., 110., 220.], [0., 0., 2000., 5.]])
    back = data.to_original(boxes, (800, 1067), (48, 64))
    assert torch.allclose(back[0], torch.tensor([10 * 64 / 1067, 20 * 48 / 800, 110 * 64 / 1067, 220 * 48 / 800]))
    assert back[1, 2] == 64  # clipped to the original width


def test_collate_keeps_lists(tmp_path):
    write_coco(str(tmp_path), "val")
    ds = data.CocoDetection(str(tmp_path), "val")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=data.collate)
    images, targets = next(iter(loader))
    assert len(images) == len(targets) == 2 and [t["image_id"] for t in targets] == [11, 12]
    assert images[0].shape[1:] == (800, 1067) and images[1].shape[1:] == (800, 1067)


def test_missing_annotations_or_images_is_one_data_error(tmp_path):
    with pytest.raises(DataError, match="instances_train2017.json"):
        data.CocoDetection(str(tmp_path), "train")
    write_coco(str(tmp_path), "val")
    os.rename(tmp_path / "val2017", tmp_path / "elsewhere")
    with pytest.raises(DataError, match="val2017"):
        data.CocoDetection(str(tmp_path), "val")


# ---- evaluation --------------------------------------------------------------------------------------------------

def gt_predictions(ds, keep=lambda image_id, label, i: True):
    """The non-crowd ground truth as predictions with score 1 (labels contiguous, xyxy)."""
    out = []
    for info in ds.images:
        boxes, labels = ds.boxes_and_labels(info["id"])
        chosen = [i for i in range(len(labels)) if keep(info["id"], int(labels[i]), i)]
        out.append({"image_id": info["id"], "boxes": boxes[chosen], "scores": torch.ones(len(chosen)),
                    "labels": labels[chosen]})
    return out


def test_ground_truth_as_predictions_scores_100(tmp_path):
    path = write_coco(str(tmp_path), "val")
    ds = data.CocoDetection(str(tmp_path), "val", transform=Fixed())
    result = coco_eval.evaluate(gt_predictions(ds), path, ds.category_ids)
    assert set(result) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(v == pytest.approx(100.0) for v in result.values()), result


def test_half_the_boxes_of_one_category_by_hand(tmp_path):
    """Two categories, each with 2 equal boxes in 2 images. Predicting both boxes of A (score 1) gives AP_A = 1.
    Predicting one of B's two gives recall 1/2 at precision 1 and nothing after: of COCO's 101 recall points
    0, 0.01, ..., 1 the 51 up to 0.5 have precision 1, so AP_B = 51/101 at every IoU threshold.
    Category C (COCO id 7) has no ground truth here and so no AP: the mean is over A and B, (1 + 51/101) / 2."""
    images = [(1, 100, 100, [(1, 10, 10, 40, 40, 0), (3, 50, 50, 40, 40, 0)]),
              (2, 100, 100, [(1, 20, 20, 40, 40, 0), (3, 5, 50, 40, 40, 0)])]
    path = write_coco(str(tmp_path), "val", images=images)
    with open(path) as f:
        gt = json.load(f)  # the loaded dict is accepted as well as the path
    ds = data.CocoDetection(str(tmp_path), "val", transform=Fixed())
    preds = gt_predictions(ds, keep=lambda image_id, label, i: label == 1 or image_id == 1)
    result = coco_eval.evaluate(preds, gt, category_ids=[1, 3, 7])
    expected = 100 * (1 + 51 / 101) / 2
    assert result["AP"] == pytest.approx(expected) and result["AP50"] == pytest.approx(expected)
    assert result["AP75"] == pytest.approx(expected) and result["APm"] == pytest.approx(expected)
    assert math.isnan(result["APs"]) and math.isnan(result["APl"])  # no ground truth of those sizes


def test_a_shifted_box_counts_only_below_its_iou(tmp_path):
    """One 40x40 box predicted 4 px to the right: IoU = 36*40 / (44*40) = 0.818..., a hit at thresholds
    0.50..0.80 (7 of the 10) and a miss above, so AP = 70, AP50 = AP75 = 100."""
    path = write_coco(str(tmp_path), "val", images=[(1, 100, 100, [(3, 10, 10, 40, 40, 0)])])
    pred = [{"image_id": 1, "boxes": np.array([[14., 10., 54., 50.]]), "scores": [0.9], "labels": [2]}]
    result = coco_eval.evaluate(pred, path, category_ids=[1, 3, 7])
    assert result["AP"] == pytest.approx(70.0)
    assert result["AP50"] == pytest.approx(100.0) and result["AP75"] == pytest.approx(100.0)


def test_no_predictions_is_zero_not_a_crash(tmp_path):
    path = write_coco(str(tmp_path), "val")
    empty = [{"image_id": 11, "boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}]
    assert coco_eval.evaluate([], path) == {k: 0.0 for k in coco_eval.METRICS}
    assert coco_eval.evaluate(empty, path) == {k: 0.0 for k in coco_eval.METRICS}


def test_background_label_is_refused(tmp_path):
    path = write_coco(str(tmp_path), "val")
    with pytest.raises(ValueError, match="background"):
        coco_eval.evaluate([{"image_id": 11, "boxes": [[0, 0, 5, 5]], "scores": [1.0], "labels": [0]}], path)


def test_importing_mdistiller_does_not_import_pycocotools():
    import subprocess
    import sys

    code = "import sys, mdistiller, mdistiller.detection; print('pycocotools' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
