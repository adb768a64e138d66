"""TASK detection through the training entry point, on a generated COCO-layout dataset (CPU, offline).

- every detection method trains an iteration through train_from_config and logs its terms; the teacher's weights
  stay as loaded; metrics.jsonl and summary.json carry COCO AP, and summary.json's last AP is the saved last
  student's AP as pycocotools scores the detections this file computes with it;
- the evaluation hook scores ground truth returned as detections at AP 100 (pycocotools on the generated file);
- the LR by iteration is Detectron2's WarmupMultiStepLR, written out here;
- the image stream: W ranks read exactly the images and augmentations one process reads, epochs continue it;
- a run stopped after an epoch and resumed ends bit-identical to an uninterrupted one;
- 2 gloo processes with batch 1 each take the same steps as one process with batch 2 (float64).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mdistiller.config import load_config
from mdistiller.detection.task import build_student
from mdistiller.engine.build import build_run
from mdistiller.detection.hooks import COCOEvalHook, IterLRSchedule
from mdistiller.detection.loader import PeriodLoader
from mdistiller.detection.models import build_faster_rcnn
from mdistiller.detection.sample import DRAWN, write_sample_coco
from mdistiller.detection.data import CocoDetection
from mdistiller.engine.hooks import HookBase
from mdistiller.engine.launch import train_from_config
from mdistiller.utils.errors import CheckpointError, ConfigError
from test_engine import CrashAfterEpoch  # a run killed right after an epoch's checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "configs", "coco", "sample", "_recipe.yaml")
WORKER = os.path.join(ROOT, "tests", "detection_ddp_worker.py")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_sample_coco(str(tmp_path_factory.mktemp("coco")), num_train=6, num_val=3, width=64, height=48)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A resnet18 detector's weights in a student_best.pth-like file (random: the tests check mechanics)."""
    torch.manual_seed(3)
    model = build_faster_rcnn("resnet18")
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pth")
    torch.save({"model": model.state_dict(), "test_AP": 12.5}, path)
    return path


def tiny(coco, prefix, name, *extra):
    return ["DATASET.ROOT", coco, "LOG.PREFIX", str(prefix), "EXPERIMENT.NAME", name,
            "DETECTION.TRAIN_SHORT_SIDES", "[48]", "DETECTION.TEST_SHORT_SIDE", "48", "DETECTION.MAX_SIZE", "64",
            "DETECTION.ITERS_PER_EPOCH", "2", "DETECTION.WARMUP_ITERS", "2", "DETECTION.STEPS", "[3]",
            "DETECTION.DINO.CLASS_MEANS_ITERS", "2", "SOLVER.EPOCHS", "2", "SOLVER.BATCH_SIZE", "2",
            "LOG.TENSORBOARD_FREQ", "1", *extra]


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


TERMS = {"NONE": [], "KD": ["kd"], "DKD": ["dkd"], "KD++": ["dino", "kd"], "REVIEWKD": ["reviewkd"],
         "REVIEWKD_DKD": ["dkd", "reviewkd"], "REVIEWKD++": ["dino", "reviewkd"]}


class DetectDrawnClasses(HookBase):
    """Before the first step, raises the student's classifier bias for the three classes the sample draws, so that
    an untrained detector returns detections (about 1/3 score each) instead of none: its AP is small but not 0,
    and a wrong AP cannot hide behind 0 == 0."""

    def __init__(self, coco):
        with open(os.path.join(coco, "annotations", "instances_val2017.json")) as f:
            ids = sorted(c["id"] for c in json.load(f)["categories"])
        self.labels = [ids.index(c) + 1 for c in DRAWN]  # contiguous labels, background 0

    def before_train(self):
        with torch.no_grad():
            self.trainer.distiller.student.roi_heads.box_predictor.cls_score.bias[self.labels] += 8.0


def coco_ap_of_saved_student(cfg, coco, path):
    """(AP, AP50) in percent of the student weights in `path` on the val split, computed here: the val JPEGs read
    with PIL (64x48, already at the test size 48 / max 64, so no resize and no box mapping), one batch through the
    detector in eval mode, the detections written in COCO's results format and scored by pycocotools itself."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    student = build_student(cfg)
    student.load_state_dict(torch.load(path)["model"])
    student.eval()
    ann_file = os.path.join(coco, "annotations", "instances_val2017.json")
    with open(ann_file) as f:
        ann = json.load(f)
    category_ids = sorted(c["id"] for c in ann["categories"])
    infos = sorted(ann["images"], key=lambda im: im["id"])
    batch = []
    for info in infos:
        with Image.open(os.path.join(coco, "val2017", info["file_name"])) as im:
            pixels = np.asarray(im.convert("RGB"))
        assert pixels.shape == (48, 64, 3)
        batch.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255)
    with torch.no_grad():
        outputs = student(batch)
    results = []
    for info, out in zip(infos, outputs):
        for (x1, y1, x2, y2), score, label in zip(out["boxes"].tolist(), out["scores"].tolist(),
                                                  out["labels"].tolist()):
            results.append({"image_id": info["id"], "category_id": category_ids[label - 1],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    assert results, "the student returned no detections: the AP comparison would be 0 == 0"
    gt = COCO(ann_file)
    evaluation = COCOeval(gt, gt.loadRes(results), iouType="bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return 100 * evaluation.stats[0], 100 * evaluation.stats[1]


@pytest.mark.parametrize("method", list(TERMS))
def test_each_method_trains_through_the_entry_point(method, coco, teacher_file, tmp_path):
    cfg = load_config(SAMPLE, tiny(coco, tmp_path, "run", "DISTILLER.TYPE", method, "DISTILLER.TEACHER", "resnet18",
                                   "DISTILLER.TEACHER_CKPT", teacher_file, "SOLVER.EPOCHS", "1",
                                   "DETECTION.ITERS_PER_EPOCH", "1"))
    summary = train_from_config(cfg, extra_hooks=[DetectDrawnClasses(coco)])
    run_dir = str(tmp_path / "run")
    (record,) = records(run_dir)
    detector = ["loss_box_reg", "loss_classifier", "loss_objectness", "loss_rpn_box_reg"]
    assert sorted(k[5:] for k in record if k.startswith("loss/") and not k.endswith("_total")) == \
        sorted(detector + TERMS[method])
    for key in ("test_AP", "test_AP50", "test_AP75", "best_AP"):
        assert key in record
    assert summary["task"] == "detection" and summary["epochs"] == 1 and "best_AP" in summary
    ap, ap50 = coco_ap_of_saved_student(cfg, coco, os.path.join(run_dir, "student_last.pth"))
    assert ap > 0 and ap50 > 0  # the comparison below is between non-trivial numbers
    assert summary["last_AP"] == pytest.approx(ap, rel=1e-9) and summary["last_AP50"] == pytest.approx(ap50, rel=1e-9)
    assert record["test_AP"] == summary["last_AP"]
    if TERMS[method]:
        assert summary["teacher"]["AP"] == 12.5 and summary["teacher"]["metric"] == "AP"
        state = torch.load(teacher_file)["model"]
        run = build_run(cfg)  # the teacher as a run loads it: every tensor the file's
        assert all(torch.equal(v, state[k]) for k, v in run.distiller.teacher.state_dict().items())
    student = torch.load(os.path.join(run_dir, "student_best.pth"))
    assert "test_AP" in student and "roi_heads.box_predictor.cls_score.weight" in student["model"]


def test_dot_update_rule_trains_a_detector(coco, teacher_file, tmp_path):
    cfg = load_config(SAMPLE, tiny(coco, tmp_path, "dot", "DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "resnet18",
                                   "DISTILLER.TEACHER_CKPT", teacher_file, "SOLVER.UPDATE_RULE", "dot",
                                   "SOLVER.EPOCHS", "1", "DETECTION.ITERS_PER_EPOCH", "1"))
    train_from_config(cfg)
    (record,) = records(str(tmp_path / "dot"))
    assert "loss/task_total" in record and "loss/distill_total" in record


class Perfect(torch.nn.Module):
    """Returns each image's ground-truth boxes (in the resized image's coordinates) with score 1."""

    def __init__(self, dataset):
        super().__init__()
        self.truth = [dataset[i][1] for i in range(len(dataset))]
        self.next = 0

    def forward(self, images):
        out = []
        for _ in images:
            t = self.truth[self.next]
            self.next += 1
            out.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))})
        return out


def test_ground_truth_as_detections_scores_ap_100(coco):
    from mdistiller.detection.data import DetectionTransform, annotation_path
    from mdistiller.detection.loader import test_loader

    ds = CocoDetection(coco, "val", DetectionTransform((100,), 200))  # resized: boxes must be mapped back
    hook = COCOEvalHook(student=Perfect(ds), loader=test_loader(ds, 2), annotations=annotation_path(coco, "val"),
                        category_ids=ds.category_ids, image_ids=[im["id"] for im in ds.images], device="cpu")
    result = hook.evaluate()
    assert result["AP"] == pytest.approx(100.0) and result["AP50"] == pytest.approx(100.0)


def test_lr_is_detectron2_warmup_multistep():
    s = IterLRSchedule(lr=0.02, steps=[60000, 80000], gamma=0.1, warmup_iters=1000, warmup_factor=0.001)
    assert s.at(0) == pytest.approx(0.02 * 0.001)
    assert s.at(500) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert s.at(1000) == pytest.approx(0.02)
    assert s.at(59999) == pytest.approx(0.02) and s.at(60000) == pytest.approx(0.002)
    assert s.at(80000) == pytest.approx(0.0002)
    assert s(epoch=2, iteration=3, iters_per_epoch=5000) == s.at(5003)


def test_two_ranks_read_what_one_process_reads(coco):
    ds = CocoDetection(coco, "train")

    def batches(rank, world, epoch):
        loader = PeriodLoader(ds, 4, 3, seed=7, rank=rank, world_size=world)
        loader.set_epoch(epoch)
        return list(loader)

    for epoch in (0, 1):
        one = batches(0, 1, epoch)
        two = [batches(r, 2, epoch) for r in (0, 1)]
        for it, (images, targets, positions) in enumerate(one):
            mine = two[0][it][0] + two[1][it][0]
            assert len(images) == 4 and all(torch.equal(a, b) for a, b in zip(images, mine))
            assert positions.tolist() == two[0][it][2].tolist() + two[1][it][2].tolist()
    # the stream goes on: epoch 1 starts where epoch 0 ended, and a pass over the data is a permutation
    ends = batches(0, 1, 0)[-1][2].tolist()[-1]
    assert batches(0, 1, 1)[0][2].tolist()[0] == ends + 1
    first_pass = [t["image_id"] for _, targets, _ in batches(0, 1, 0) for t in targets][:len(ds)]
    assert sorted(first_pass) == sorted(im["id"] for im in ds.images)


@pytest.mark.kernels
def test_resume_is_bit_exact(coco, teacher_file, tmp_path):
    opts = ["DISTILLER.TYPE", "KD++", "DISTILLER.TEACHER", "resnet18", "DISTILLER.TEACHER_CKPT", teacher_file]
    straight = load_config(SAMPLE, tiny(coco, tmp_path, "straight", *opts))
    train_from_config(straight)
    stopped = load_config(SAMPLE, tiny(coco, tmp_path, "stopped", *opts))
    with pytest.raises(KeyboardInterrupt):
        train_from_config(stopped, extra_hooks=[CrashAfterEpoch(1)])
    assert not (tmp_path / "stopped" / "summary.json").exists()
    train_from_config(stopped, resume=True)
    a = torch.load(tmp_path / "straight" / "latest.pth", weights_only=False)
    b = torch.load(tmp_path / "stopped" / "latest.pth", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4
    for key in a["distiller"]:
        assert torch.equal(a["distiller"][key], b["distiller"][key]), key
    for k in a["optimizer"]["state"]:
        for buf, value in a["optimizer"]["state"][k].items():
            assert torch.equal(value, b["optimizer"]["state"][k][buf]), (k, buf)
    ra, rb = records(str(tmp_path / "straight")), records(str(tmp_path / "stopped"))
    drop = ("epoch_time_s", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ra] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rb]


def test_class_means_cache_serves_only_its_own_teacher(coco, teacher_file, tmp_path):
    opts = ["DISTILLER.TYPE", "KD++", "DISTILLER.TEACHER", "resnet18"]
    cfg = load_config(SAMPLE, tiny(coco, tmp_path, "cm", *opts, "DISTILLER.TEACHER_CKPT", teacher_file))
    run_dir = tmp_path / "cm"
    collected = build_run(cfg, run_dir=str(run_dir)).distiller.terms["dino"].class_means.clone()
    saved = torch.load(run_dir / "class_means.pt")
    assert torch.equal(saved["means"], collected) and collected.abs().sum() > 0
    torch.save({"key": saved["key"], "means": torch.full_like(collected, 7.0)}, run_dir / "class_means.pt")
    assert (build_run(cfg, run_dir=str(run_dir)).distiller.terms["dino"].class_means == 7).all()  # the cache is read
    torch.manual_seed(4)
    other_file = str(tmp_path / "other_teacher.pth")
    torch.save({"model": build_faster_rcnn("resnet18").state_dict()}, other_file)
    other = load_config(SAMPLE, tiny(coco, tmp_path, "cm", *opts, "DISTILLER.TEACHER_CKPT", other_file))
    assert not (build_run(other, run_dir=str(run_dir)).distiller.terms["dino"].class_means == 7).any()  # not reused


def test_teacher_of_another_architecture_is_one_checkpoint_error(coco, teacher_file):
    cfg = load_config(SAMPLE, ["DATASET.ROOT", coco, "DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "resnet50",
                               "DISTILLER.TEACHER_CKPT", teacher_file])
    with pytest.raises(CheckpointError, match="does not fit model resnet50.*configs/coco/teacher/resnet50.yaml"):
        build_run(cfg)


def test_bad_detection_config_is_one_config_error(coco):
    with pytest.raises(ConfigError, match="DISTILLER.TYPE"):
        load_config(SAMPLE, ["DATASET.ROOT", coco, "DISTILLER.TYPE", "CRD"])
    with pytest.raises(ConfigError, match="SOLVER.LR_DECAY_STAGES"):
        load_config(SAMPLE, ["SOLVER.LR_DECAY_STAGES", "[2]"])
    with pytest.raises(ConfigError, match="DISTILLER.TEACHER_CKPT"):
        cfg = load_config(SAMPLE, ["DATASET.ROOT", coco, "DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "resnet18"])
        build_run(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["vanilla", pytest.param("dot", marks=pytest.mark.kernels)])
def test_two_processes_equal_one_process(trainer, teacher_file, tmp_path):
    # Every image has the same boxes and no flip, all anchors and proposals are sampled and every image keeps the
    # same number of proposals: each image contributes the same number of samples to every loss, so the mean of
    # the two ranks' means (DDP) is the mean over the whole batch (one process). float64, so that what is
    # compared is that algebra and not float32 rounding.
    coco = write_sample_coco(str(tmp_path / "coco"), num_train=4, num_val=2, width=64, height=48, same_layout=True)
    args = ["--steps", "2", "--cfg", SAMPLE,
            *tiny(coco, tmp_path, "eq", "DISTILLER.TYPE", "KD++", "DISTILLER.TEACHER", "resnet18",
                  "DISTILLER.TEACHER_CKPT", teacher_file, "SOLVER.UPDATE_RULE", trainer,
                  "DETECTION.RANDOM_FLIP", "False",
                  "DETECTION.RPN_BATCH_SIZE_PER_IMAGE", "100000", "DETECTION.ROI_BATCH_SIZE_PER_IMAGE", "100000",
                  "DETECTION.RPN_POST_NMS_TOPK_TRAIN", "8", "DETECTION.RPN_PRE_NMS_TOPK_TRAIN", "2000",
                  "EXPERIMENT.DEVICE", "cpu")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          WORKER, "steps", str(tmp_path / "two.pt"), *args], capture_output=True, text=True,
                         env=env, timeout=600, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, WORKER, "steps", str(tmp_path / "one.pt"), *args], capture_output=True,
                         text=True, env=env, timeout=600, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for key in a["initial"]:
        assert torch.equal(a["initial"][key], b["initial"][key]), key
    moved = 0.0
    for key in a["final"]:
        assert torch.allclose(a["final"][key], b["final"][key], rtol=0, atol=1e-10), key
        moved = max(moved, float((a["final"][key] - a["initial"][key]).abs().max()))
    assert moved > 1e-4
