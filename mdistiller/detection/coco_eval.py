"""COCO box AP through pycocotools' COCOeval, the official metric (AP, AP50, AP75, APs, APm, APl in percent).

pycocotools is imported inside the functions so that `import mdistiller` works without it (classification users).
Predictions use the model's convention (xyxy boxes in the original image's coordinates, contiguous labels 1..K);
they are converted to COCO's results format (xywh, category id) as Detectron2's instances_to_coco_json does.
"""

import contextlib
import io

from ..utils.errors import DataError

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]


def load_ground_truth(annotations):
    """A pycocotools COCO object from an annotation file path, a loaded COCO dict, or a COCO object."""
    from pycocotools.coco import COCO

    if isinstance(annotations, COCO):
        return annotations
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(annotations, dict):
            coco = COCO()
            coco.dataset = annotations
            coco.createIndex()
            return coco
        try:
            return COCO(annotations)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read COCO annotations {annotations}: {e}") from None


def _as_list(values):
    return values.tolist() if hasattr(values, "tolist") else list(values)


def to_coco_results(predictions, category_ids):
    """[{image_id, category_id, bbox xywh, score}] from [{image_id, boxes xyxy [N, 4], scores [N], labels [N]}];
    label l (1..K) is category_ids[l - 1]."""
    results = []
    for p in predictions:
        image_id = int(p["image_id"])
        boxes, scores, labels = _as_list(p["boxes"]), _as_list(p["scores"]), _as_list(p["labels"])
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels):
            if not 1 <= int(label) <= len(category_ids):
                raise ValueError(f"image {image_id}: label {label} is not a class 1..{len(category_ids)} "
                                 "(0 is background and is never a detection)")
            results.append({"image_id": image_id, "category_id": category_ids[int(label) - 1],
                            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(score)})
    return results


def evaluate(predictions, annotations, category_ids=None, image_ids=None):
    """{"AP", "AP50", "AP75", "APs", "APm", "APl"} in percent for `predictions` against `annotations` (path,
    dict or COCO object) over all its images, or `image_ids`. `category_ids` maps contiguous labels to COCO ids
    (default: the sorted ids, as CocoDetection numbers them). No detections at all scores 0 (pycocotools cannot
    load an empty result list); an area range without ground truth gives nan, as in Detectron2."""
    from pycocotools.cocoeval import COCOeval

    gt = load_ground_truth(annotations)
    category_ids = sorted(gt.getCatIds()) if category_ids is None else list(category_ids)
    results = to_coco_results(predictions, category_ids)
    if not results:
        return {name: 0.0 for name in METRICS}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        coco_eval = COCOeval(gt, dt, iouType="bbox")
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(int(i) for i in image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {name: float(v * 100) if v >= 0 else float("nan") for name, v in zip(METRICS, coco_eval.stats[:6])}
