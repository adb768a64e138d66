"""DETECTION.ROI_ALIGN_ALIGNED / TEACHER_ROI_ALIGN_ALIGNED (issue 30): the box head's RoIAlign with Detectron2's
half-pixel shift (ROIAlignV2, aligned=True) or torchvision's default (aligned=False).

- pooling a hand-made feature map over a hand-made box equals the bilinear samples averaged by hand, the sampling
  grid at box * scale - 0.5 for aligned=True and at box * scale for aligned=False, and the two differ (a linear
  map gives the numbers in closed form: 16.5 against 22);
- AlignedMultiScaleRoIAlign(aligned=False) is torchvision's MultiScaleRoIAlign bit for bit on a four-level pyramid;
- the keys reach the student and the teacher a run builds; torchvision's COCO teacher is refused with aligned=True;
- a KD run with both keys True trains 2 epochs through tools/train.py and logs its loss terms.
Float64 feature maps: the comparisons hold on any CPU.
"""

import json
import os
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from mdistiller.config import load_config
from mdistiller.detection.models import AlignedMultiScaleRoIAlign, build_faster_rcnn
from mdistiller.detection.sample import write_sample_coco
from mdistiller.detection.task import build_student, build_teacher
from mdistiller.utils.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "configs", "coco", "sample", "_recipe.yaml")


def bilinear(f, y, x):
    """f (H, W) at the continuous point (y, x), strictly inside the map: the four neighbours weighted."""
    y0, x0 = int(y), int(x)
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * f[y0][x0] + (1 - ly) * lx * f[y0][x0 + 1]
            + ly * (1 - lx) * f[y0 + 1][x0] + ly * lx * f[y0 + 1][x0 + 1])


def roi_align_by_hand(f, box, out, ratio, scale, aligned):
    """RoIAlign's definition: the box scaled (and shifted by half a pixel when aligned), cut into out x out bins,
    each the mean of ratio x ratio bilinear samples at the sub-bin centres; without `aligned` the box is at least
    1 x 1 (the legacy rule)."""
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (v * scale - offset for v in box)
    w, h = x2 - x1, y2 - y1
    if not aligned:
        w, h = max(w, 1.0), max(h, 1.0)
    bw, bh = w / out, h / out
    pooled = [[0.0] * out for _ in range(out)]
    for i in range(out):
        for j in range(out):
            samples = [bilinear(f, y1 + i * bh + (iy + 0.5) * bh / ratio, x1 + j * bw + (ix + 0.5) * bw / ratio)
                       for iy in range(ratio) for ix in range(ratio)]
            pooled[i][j] = sum(samples) / len(samples)
    return pooled


FEATURE = [[0.3, -1.2, 2.0, 0.7, 1.1, -0.4],
           [1.5, 0.2, -0.8, 2.6, -1.9, 0.9],
           [-0.6, 1.8, 0.4, -2.2, 0.5, 1.7],
           [2.3, -0.9, 1.2, 0.8, -1.4, 0.1],
           [0.6, 1.4, -1.7, 0.3, 2.1, -0.5]]


@pytest.mark.parametrize("aligned", [True, False])
def test_pooling_equals_bilinear_samples_by_hand(aligned):
    feature = torch.tensor(FEATURE, dtype=torch.float64)[None, None]
    box = [1.3, 0.9, 4.1, 3.6]  # x1, y1, x2, y2 in image pixels; every sample strictly inside the 5 x 6 map
    pooler = AlignedMultiScaleRoIAlign(["0"], 2, 2, aligned=aligned)
    got = pooler(OrderedDict([("0", feature)]), [torch.tensor([box], dtype=torch.float64)], [(5, 6)])  # scale 1
    want = torch.tensor(roi_align_by_hand(FEATURE, box, 2, 2, 1.0, aligned), dtype=torch.float64)
    assert got.shape == (1, 1, 2, 2)
    assert torch.allclose(got[0, 0], want, rtol=1e-12, atol=1e-12)
    other = torch.tensor(roi_align_by_hand(FEATURE, box, 2, 2, 1.0, not aligned), dtype=torch.float64)
    assert (got[0, 0] - other).abs().max() > 0.1  # the check tells the two conventions apart


def test_half_pixel_shift_on_a_linear_map():
    """f(y, x) = 10 y + x is reproduced exactly by bilinear sampling: a 1 x 1 pooling of the box (1, 1, 3, 3) is f at
    the mean sample point, its centre (2, 2) -> 22 without the shift, (1.5, 1.5) -> 16.5 with it."""
    f = torch.tensor([[10.0 * y + x for x in range(5)] for y in range(5)], dtype=torch.float64)[None, None]
    box = [torch.tensor([[1.0, 1.0, 3.0, 3.0]], dtype=torch.float64)]
    for aligned, value in ((False, 22.0), (True, 16.5)):
        pooled = AlignedMultiScaleRoIAlign(["0"], 1, 2, aligned=aligned)(OrderedDict([("0", f)]), box, [(5, 5)])
        assert pooled.item() == pytest.approx(value, abs=1e-12)


def test_unaligned_is_torchvisions_pooler_bit_for_bit_and_aligned_differs():
    g = torch.Generator().manual_seed(0)
    x = OrderedDict((str(i), torch.randn(2, 3, 64 // 2 ** i, 48 // 2 ** i, generator=g, dtype=torch.float64))
                    for i in range(4))
    x["pool"] = torch.randn(2, 3, 4, 3, generator=g, dtype=torch.float64)
    boxes = [torch.tensor([[1.0, 2.0, 30.0, 40.0], [5.0, 5.0, 180.0, 250.0], [0.0, 0.0, 191.0, 255.0]],
                          dtype=torch.float64),
             torch.tensor([[10.0, 10.0, 100.0, 120.0], [3.0, 60.0, 17.0, 90.0]], dtype=torch.float64)]
    shapes = [(256, 192), (256, 192)]
    names = ["0", "1", "2", "3"]
    reference = MultiScaleRoIAlign(names, 7, 2)(x, boxes, shapes)
    assert torch.equal(AlignedMultiScaleRoIAlign(names, 7, 2)(x, boxes, shapes), reference)
    aligned = AlignedMultiScaleRoIAlign(names, 7, 2, aligned=True)
    shifted = aligned(x, boxes, shapes)
    assert shifted.shape == reference.shape and not torch.allclose(shifted, reference)
    assert aligned.scales == [0.25, 0.125, 0.0625, 0.03125]  # the level scales torchvision infers


def test_keys_reach_the_student_and_the_teacher(tmp_path):
    plain = build_faster_rcnn("resnet18")
    aligned = build_faster_rcnn("resnet18", roi_align_aligned=True)
    assert type(plain.roi_heads.box_roi_pool) is MultiScaleRoIAlign  # the default model is unchanged
    assert aligned.roi_heads.box_roi_pool.aligned
    assert aligned.state_dict().keys() == plain.state_dict().keys()  # the same checkpoints load into either
    for student, teacher in ((True, False), (False, True)):
        cfg = load_config(SAMPLE, ["DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "resnet18",
                                   "DETECTION.ROI_ALIGN_ALIGNED", str(student),
                                   "DETECTION.TEACHER_ROI_ALIGN_ALIGNED", str(teacher)])
        assert getattr(build_student(cfg).roi_heads.box_roi_pool, "aligned", False) == student
        model = build_teacher(cfg, list(range(1, 81)), state=plain.state_dict())
        assert getattr(model.roi_heads.box_roi_pool, "aligned", False) == teacher


def test_torchvisions_coco_teacher_must_pool_unaligned():
    base = ["DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "resnet50", "DISTILLER.TEACHER_CKPT", "torchvision"]
    with pytest.raises(ConfigError, match="DETECTION.TEACHER_ROI_ALIGN_ALIGNED"):
        load_config(SAMPLE, base + ["DETECTION.TEACHER_ROI_ALIGN_ALIGNED", "True"])
    load_config(SAMPLE, base + ["DETECTION.ROI_ALIGN_ALIGNED", "True"])  # the student may pool aligned


def test_coco_recipes_pool_as_detectron2():
    """configs/coco/: students and the teachers trained by configs/coco/teacher/ pool with ROIAlignV2."""
    import glob
    for path in glob.glob(os.path.join(ROOT, "configs", "coco", "*", "*.yaml")):
        if os.sep + "sample" + os.sep in path:
            continue
        cfg = load_config(path)
        assert cfg.DETECTION.ROI_ALIGN_ALIGNED and cfg.DETECTION.TEACHER_ROI_ALIGN_ALIGNED, path


@pytest.mark.slow
def test_aligned_kd_trains_two_epochs_through_the_cli(tmp_path):
    coco = write_sample_coco(str(tmp_path / "coco"), num_train=2, num_val=2, width=64, height=48)
    torch.manual_seed(3)
    teacher = str(tmp_path / "teacher.pth")
    torch.save({"model": build_faster_rcnn("resnet18", roi_align_aligned=True).state_dict()}, teacher)
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "train.py"), "--cfg", SAMPLE, "DISTILLER.TYPE", "KD",
         "DISTILLER.TEACHER", "resnet18", "DISTILLER.TEACHER_CKPT", teacher, "DATASET.ROOT", coco,
         "LOG.PREFIX", str(tmp_path / "out"), "EXPERIMENT.NAME", "r", "DETECTION.TRAIN_SHORT_SIDES", "[48]",
         "DETECTION.TEST_SHORT_SIDE", "48", "DETECTION.MAX_SIZE", "64", "DETECTION.ITERS_PER_EPOCH", "1",
         "DETECTION.WARMUP_ITERS", "1", "DETECTION.STEPS", "[3]", "SOLVER.EPOCHS", "2", "SOLVER.BATCH_SIZE", "1",
         "DETECTION.ROI_ALIGN_ALIGNED", "True", "DETECTION.TEACHER_ROI_ALIGN_ALIGNED", "True"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(tmp_path / "out" / "r" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 2
    names = {"loss/kd", "loss/loss_classifier", "loss/loss_box_reg", "loss/loss_objectness", "loss/loss_rpn_box_reg"}
    assert all(names <= set(r) for r in records)
    log = (tmp_path / "out" / "r" / "train.log").read_text()
    assert "RoIAlign aligned=True (Detectron2's ROIAlignV2): student and teacher" in log
