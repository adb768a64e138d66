"""FitNet and FGFI on the FPN (mdistiller/detection/imitation.py): DISTILLER.TYPE FITNET and FGFI under TASK
detection.

- FGFI's imitation mask on hand-made anchors and boxes equals the mask worked out by hand in this file (the IoUs
  are exact binary fractions, so the strict "> psi x max" is checked at equality too);
- each term's value equals the formula written out here with loops in float64 on the term's own adaptation convs;
- the anchors a training step exposes are the student RPN's, in the layout the mask assumes;
- gradients reach the student's FPN and the adaptation convs, never the teacher;
- the pair configs carry the weights, bad values are one ConfigError naming the key;
- each method trains 2 epochs through tools/train.py on the generated COCO sample and logs its term.
Comparisons to float64 formulas use tolerances far above float32 rounding, so they hold on any CPU kernel set.
"""

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from mdistiller.config import load_config
from mdistiller.detection.imitation import FPNFGFI, FPNFitNet, fgfi_masks
from mdistiller.detection.models import build_faster_rcnn
from mdistiller.detection.rcnn_distill import DetectionStep, RCNNDistillGlue
from mdistiller.detection.review import FPN_LEVELS
from mdistiller.detection.sample import write_sample_coco
from mdistiller.detection.terms import method_terms
from mdistiller.utils.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO = os.path.join(ROOT, "configs", "coco")
SAMPLE = os.path.join(COCO, "sample", "kdpp_resnet18_resnet18.yaml")
PAIRS = {"resnet101_resnet18": ("resnet101", "resnet18"), "resnet101_resnet50": ("resnet101", "resnet50"),
         "resnet50_mobilenet_v2": ("resnet50", "mobilenet_v2")}


# ---------------------------------------------------------------- the FGFI mask, by hand

# Level 0: a 2x2 grid of stride 10, one 10x10 anchor per location (row-major over y, x). Level 1: a 1x1 grid, two
# anchors: the 20x20 square and a 10x20 (w x h) box.
LEVEL0 = torch.tensor([[0., 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20], [10, 10, 20, 20]])
LEVEL1 = torch.tensor([[0., 0, 20, 20], [5, 0, 15, 20]])
SHAPES = [(2, 2), (1, 1)]
# image 0: A = the top-left cell exactly (IoU 1 there; level 1: 100/400 = 0.25 and 50/250 = 0.2);
#          B = (0, 0, 20, 18), area 360 (level 0: 100/360 twice, 80/380 twice; level 1: 360/400 = 0.9, 180/380);
# image 1: C = (12, 12, 20, 20), area 64 (level 0: 64/100 = 0.64 at the bottom-right cell; level 1: 64/400 =
#          0.16, 24/240 = 0.1);
# image 2: no boxes.
BOXES = [torch.tensor([[0., 0, 10, 10], [0, 0, 20, 18]]), torch.tensor([[12., 12, 20, 20]]), torch.zeros(0, 4)]


def test_fgfi_mask_from_hand_made_anchors_and_boxes():
    level0, level1 = fgfi_masks(BOXES, [LEVEL0, LEVEL1], SHAPES, psi=0.5)
    # psi 0.5: A keeps only its own cell (0.25 and 0.2 are not > 0.5); B's max is 0.9 on level 1, threshold 0.45:
    # both level-1 anchors (0.9, 0.474), no level-0 cell (0.278, 0.211); C: max 0.64, threshold 0.32: its cell only
    assert level0.tolist() == [[[True, False], [False, False]], [[False, False], [False, True]],
                               [[False, False], [False, False]]]
    assert level1.tolist() == [[[True]], [[False]], [[False]]]
    # psi 0.2: C's threshold is 0.128, so the level-1 square (0.16) joins; its other anchor (0.1) does not matter
    _, level1 = fgfi_masks(BOXES, [LEVEL0, LEVEL1], SHAPES, psi=0.2)
    assert level1.tolist() == [[[True]], [[True]], [[False]]]
    # strictly greater: psi 0.25 with A alone puts the threshold exactly on the square's IoU 100/400
    level0, level1 = fgfi_masks([BOXES[0][:1]], [LEVEL0, LEVEL1], SHAPES, psi=0.25)
    assert level0.tolist() == [[[True, False], [False, False]]] and level1.tolist() == [[[False]]]
    level0, level1 = fgfi_masks([BOXES[0][:1]], [LEVEL0, LEVEL1], SHAPES, psi=0.2499)
    assert level1.tolist() == [[[True]]]


def test_fgfi_mask_is_a_union_over_a_locations_anchors():
    # one location with three anchors, only the third fits the box: the location is masked
    anchors = [torch.tensor([[0., 0, 4, 4], [0, 0, 8, 8], [0, 0, 16, 16]])]
    (mask,) = fgfi_masks([torch.tensor([[0., 0, 16, 16]])], anchors, [(1, 1)])
    assert mask.tolist() == [[[True]]]
    with pytest.raises(ValueError, match="do not fill a 2x1 level"):
        fgfi_masks([torch.tensor([[0., 0, 16, 16]])], anchors, [(2, 1)])


# ---------------------------------------------------------------- the terms against the formulas, float64 loops

def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def plain_fgfi_mask(boxes_per_image, anchors, shapes, psi):
    """[level][image][y][x] booleans: the FGFI rule, loop by loop."""
    flat = [(lvl, i, a) for lvl, level in enumerate(anchors) for i, a in enumerate(level.tolist())]
    out = [[[[False] * w for _ in range(h)] for _ in boxes_per_image] for h, w in shapes]
    for img, boxes in enumerate(boxes_per_image):
        for box in boxes.tolist():
            ious = [_iou(a, box) for _, _, a in flat]
            best = max(ious)
            for (lvl, i, _), iou in zip(flat, ious):
                if iou > psi * best:
                    h, w = shapes[lvl]
                    per_location = len(anchors[lvl]) // (h * w)
                    y, x = divmod(i // per_location, w)
                    out[lvl][img][y][x] = True
    return out


def plain_conv(x, weight, bias):
    """conv2d with zero padding k // 2, stride 1: x (B, C, H, W), weight (O, C, k, k), as nested lists of floats."""
    B, C, H, W = len(x), len(x[0]), len(x[0][0]), len(x[0][0][0])
    O, k = len(weight), len(weight[0][0])
    p = k // 2
    out = [[[[bias[o]] * W for _ in range(H)] for o in range(O)] for _ in range(B)]
    for b in range(B):
        for o in range(O):
            for y in range(H):
                for xx in range(W):
                    s = bias[o]
                    for c in range(C):
                        for dy in range(k):
                            for dx in range(k):
                                yy, xs = y + dy - p, xx + dx - p
                                if 0 <= yy < H and 0 <= xs < W:
                                    s += weight[o][c][dy][dx] * x[b][c][yy][xs]
                    out[b][o][y][xx] = s
    return out


def _as64(t):
    return t.detach().double().tolist()


def synthetic_step(seed=0, channels=3):
    """A DetectionStep with small FPN maps (5 levels, 2 images), 2 anchors per location at each level's stride,
    and ground-truth boxes (one image without)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 8), (3, 4), (2, 2), (1, 2), (1, 1)]
    strides = [4, 8, 16, 32, 64]
    student = {n: torch.randn(2, channels, h, w, generator=g) for n, (h, w) in zip(FPN_LEVELS, shapes)}
    teacher = {n: torch.randn(2, channels, h, w, generator=g) for n, (h, w) in zip(FPN_LEVELS, shapes)}
    anchors = []
    for (h, w), s in zip(shapes, strides):
        level = []
        for y in range(h):
            for x in range(w):
                for half_w, half_h in ((s, s), (s, s / 2)):
                    level.append([x * s - half_w, y * s - half_h, x * s + half_w, y * s + half_h])
        anchors.append(torch.tensor(level))
    boxes = [torch.tensor([[2., 3, 13, 17], [5, 1, 30, 22], [0, 0, 32, 24]]), torch.zeros(0, 4)]
    step = DetectionStep({}, [], torch.zeros(0), None, None, None, None, [], student, teacher, boxes,
                         lambda: anchors)
    return step, shapes, anchors, boxes


def test_fitnet_term_is_the_formula():
    torch.manual_seed(1)
    term = FPNFitNet(weight=0.7, channels=3)
    step, *_ = synthetic_step()
    got = term(step)
    assert got.kind == "distill"
    expected = 0.0
    for conv, name in zip(term.adapters.convs, FPN_LEVELS):
        assert conv.kernel_size == (1, 1)
        a = plain_conv(_as64(step.student_fpn[name]), _as64(conv.weight), _as64(conv.bias))
        t = _as64(step.teacher_fpn[name])
        sq = [(a[b][c][y][x] - t[b][c][y][x]) ** 2 for b in range(len(t)) for c in range(len(t[0]))
              for y in range(len(t[0][0])) for x in range(len(t[0][0][0]))]
        expected += sum(sq) / len(sq)
    assert got.value.item() == pytest.approx(0.7 * expected, rel=1e-5)


def test_fgfi_term_is_the_formula():
    torch.manual_seed(2)
    term = FPNFGFI(weight=0.3, psi=0.5, channels=3)
    with torch.no_grad():  # the original's init is ~1e-4: make the convolution matter in the comparison
        for conv in term.adapters.convs:
            conv.weight.normal_(0, 0.3)
    step, shapes, anchors, boxes = synthetic_step()
    got = term(step)
    masks = plain_fgfi_mask(boxes, anchors, shapes, 0.5)
    assert [m.tolist() for m in fgfi_masks(boxes, anchors, shapes, 0.5)] == masks
    total, points = 0.0, 0
    for conv, name, mask in zip(term.adapters.convs, FPN_LEVELS, masks):
        assert conv.kernel_size == (3, 3)
        a = plain_conv(_as64(step.student_fpn[name]), _as64(conv.weight), _as64(conv.bias))
        t = _as64(step.teacher_fpn[name])
        for b, rows in enumerate(mask):
            for y, row in enumerate(rows):
                for x, on in enumerate(row):
                    if on:
                        points += 1
                        total += sum((a[b][c][y][x] - t[b][c][y][x]) ** 2 for c in range(len(t[0])))
    assert 0 < points < sum(2 * h * w for h, w in shapes)  # a partial mask: the comparison is not trivial
    assert got.value.item() == pytest.approx(0.3 * total / (2 * points), rel=1e-5)


def test_fgfi_without_boxes_is_zero_and_init_is_the_originals():
    torch.manual_seed(3)
    term = FPNFGFI(channels=3)
    step, *_ = synthetic_step()
    step.gt_boxes = [torch.zeros(0, 4), torch.zeros(0, 4)]
    assert term(step).value.item() == 0.0
    w = torch.cat([c.weight.flatten() for c in FPNFGFI().adapters.convs])
    assert w.abs().max() < 2e-4 and 0.5e-4 < w.std() < 1e-4  # N(0, 1) folded into (-2, 2), times 1e-4
    assert (term.weight, term.psi) == (0.01, 0.5)


# ---------------------------------------------------------------- a real training step

@pytest.fixture(scope="module")
def glue_step():
    torch.manual_seed(0)
    student = build_faster_rcnn("resnet18", min_size=32, max_size=64, _skip_resize=True)
    teacher = build_faster_rcnn("resnet18", min_size=32, max_size=64, _skip_resize=True)
    glue = RCNNDistillGlue(student, teacher).train()
    images = [torch.rand(3, 32, 40), torch.rand(3, 30, 36)]
    targets = [{"boxes": torch.tensor([[3., 2, 20, 25], [15, 5, 38, 16]]), "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[5., 6, 10, 15]]), "labels": torch.tensor([3])}]
    return glue, glue(images, targets), targets


def test_step_exposes_the_student_rpns_anchors_in_the_masks_layout(glue_step):
    glue, step, targets = glue_step
    gen = glue.student.rpn.anchor_generator
    anchors = step.student_anchors()
    assert len(anchors) == len(step.student_fpn) == 5
    padded = (32, 64)  # the batch padded to a multiple of 32
    for level, (a, fmap, per_location) in enumerate(zip(anchors, step.student_fpn.values(),
                                                         gen.num_anchors_per_location())):
        h, w = fmap.shape[-2:]
        assert a.shape == (h * w * per_location, 4)
        sy, sx = padded[0] // h, padded[1] // w
        centres = ((a[:, :2] + a[:, 2:]) / 2).view(h, w, per_location, 2)
        for y in range(h):
            for x in range(w):  # torchvision centres a location's anchors on (x * stride, y * stride)
                assert torch.equal(centres[y, x], torch.tensor([[x * sx, y * sy]] * per_location, dtype=a.dtype))
        sizes = (a[:per_location, 2:] - a[:per_location, :2]).prod(1).sqrt()
        # one size per level (32 .. 512; sqrt(area) up to a few % off where torchvision rounds the aspect ratios)
        assert torch.allclose(sizes, torch.full_like(sizes, 32.0 * 2 ** level), rtol=0.05)
    assert [b.tolist() for b in step.gt_boxes] == [t["boxes"].tolist() for t in targets]  # no resize: unchanged


@pytest.mark.parametrize("term_class", [FPNFitNet, FPNFGFI])
def test_gradients_reach_the_student_and_the_adapters_never_the_teacher(glue_step, term_class):
    glue, step, _ = glue_step
    torch.manual_seed(4)
    term = term_class()
    glue.student.zero_grad()
    value = term(step).value
    assert torch.isfinite(value) and value > 0
    value.backward(retain_graph=True)
    if term_class is FPNFGFI:  # a level's conv learns only where that level has masked locations
        masks = fgfi_masks(step.gt_boxes, step.student_anchors(), [m.shape[-2:] for m in step.student_fpn.values()])
        reached = [bool(m.any()) for m in masks]
        assert reached[0] and not all(reached)  # the boxes fit some levels' anchors and not others'
    else:
        reached = [True] * len(term.adapters.convs)
    assert [bool(c.weight.grad.abs().sum() > 0) for c in term.adapters.convs] == reached
    assert glue.student.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in glue.teacher.parameters())
    assert all(not t.requires_grad for t in step.teacher_fpn.values())


# ---------------------------------------------------------------- methods, configs, validation

def test_methods_and_their_plus_plus():
    assert method_terms("FITNET") == ("fitnet",) and method_terms("FGFI") == ("fgfi",)
    assert method_terms("FITNET++") == ("fitnet", "dino") and method_terms("FGFI++") == ("fgfi", "dino")


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("method,kind,weights", [("fitnet", "FITNET", {"FITNET.WEIGHT": 1.0}),
                                                 ("fgfi", "FGFI", {"FGFI.WEIGHT": 0.01, "FGFI.PSI": 0.5})])
def test_pair_configs(pair, method, kind, weights):
    cfg = load_config(os.path.join(COCO, method, f"{pair}.yaml"), [])
    teacher, student = PAIRS[pair]
    assert (cfg.DISTILLER.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT) == (kind, teacher, student)
    assert cfg.DISTILLER.TEACHER_CKPT == f"output/coco_teacher_{teacher}/student_best.pth"
    # KD++'s pair schedule, as the other methods of table 3
    assert (cfg.SOLVER.BATCH_SIZE, cfg.SOLVER.LR, cfg.SOLVER.EPOCHS * cfg.DETECTION.ITERS_PER_EPOCH,
            list(cfg.DETECTION.STEPS)) == (8, 0.01, 180000, [120000, 160000])
    for key, value in weights.items():
        section, name = key.split(".")
        assert cfg.DETECTION[section][name] == value


def test_bad_values_are_one_config_error_naming_the_key():
    base = os.path.join(COCO, "fgfi", "resnet101_resnet18.yaml")
    for psi in ("1.0", "-0.1"):
        with pytest.raises(ConfigError, match=r"DETECTION\.FGFI\.PSI: .*\[0, 1\).*got"):
            load_config(base, ["DETECTION.FGFI.PSI", psi])
    with pytest.raises(ConfigError, match=r"DETECTION\.FGFI\.WEIGHT: a loss weight must be >= 0"):
        load_config(base, ["DETECTION.FGFI.WEIGHT", "-1"])
    with pytest.raises(ConfigError, match=r"DETECTION\.FITNET\.WEIGHT: a loss weight must be >= 0"):
        load_config(os.path.join(COCO, "fitnet", "resnet101_resnet18.yaml"), ["DETECTION.FITNET.WEIGHT", "-1"])
    load_config(os.path.join(COCO, "kd", "resnet101_resnet18.yaml"), ["DETECTION.FGFI.PSI", "2"])  # not its term


# ---------------------------------------------------------------- through tools/train.py

def _train_main():
    """tools/train.py's own main(), loaded from the file (the CLI code path, in this process)."""
    tools = os.path.join(ROOT, "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    spec = importlib.util.spec_from_file_location("train_tool", os.path.join(tools, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    coco = write_sample_coco(str(root / "coco"), num_train=4, num_val=2, width=64, height=48)
    torch.manual_seed(3)
    teacher = str(root / "teacher.pth")
    torch.save({"model": build_faster_rcnn("resnet18").state_dict(), "test_AP": 12.5}, teacher)
    return coco, teacher


@pytest.mark.parametrize("method,term", [("FITNET", "fitnet"), ("FGFI", "fgfi")])
def test_method_trains_two_epochs_through_the_cli(method, term, sample, tmp_path):
    coco, teacher = sample
    main = _train_main()
    main(["--cfg", SAMPLE, "DISTILLER.TYPE", method, "DISTILLER.TEACHER_CKPT", teacher, "DATASET.ROOT", coco,
          "LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", "run", "SOLVER.EPOCHS", "2", "SOLVER.BATCH_SIZE", "1",
          "DETECTION.ITERS_PER_EPOCH", "1", "DETECTION.EVAL_PERIOD", "2", "DETECTION.WARMUP_ITERS", "1",
          "DETECTION.STEPS", "[2]", "DETECTION.TRAIN_SHORT_SIDES", "[32]", "DETECTION.TEST_SHORT_SIDE", "32",
          "DETECTION.MAX_SIZE", "48", "DATASET.TEST_SUBSET", "1", "LOG.TENSORBOARD_FREQ", "0"])
    run = tmp_path / "run"
    with open(run / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [1, 2]
    detector = {"loss_box_reg", "loss_classifier", "loss_objectness", "loss_rpn_box_reg"}
    for record in records:
        terms = {k[5:] for k in record if k.startswith("loss/") and not k.endswith("_total")}
        assert terms == detector | {term}
        assert math.isfinite(record[f"loss/{term}"]) and record[f"loss/{term}"] > 0
        assert record["loss/distill_total"] == pytest.approx(record[f"loss/{term}"])
    assert "test_AP" in records[-1]
    with open(run / "summary.json") as f:
        summary = json.load(f)
    assert summary["task"] == "detection" and summary["epochs"] == 2 and "best_AP" in summary
    assert summary["distiller"] == method
    state = torch.load(run / "latest.pth", weights_only=False)["distiller"]
    assert f"terms.{term}.adapters.convs.4.weight" in state  # the adaptation convs are trained and saved
    assert not any(k.startswith("teacher.") for k in state)
