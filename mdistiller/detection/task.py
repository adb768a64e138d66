"""TASK detection: what a detection run gives the assembler (engine/build.py), which builds it with the same loop,
update rules, hooks, run directory, resume and DDP as classification: COCO loaders cut into epochs of
DETECTION.ITERS_PER_EPOCH iterations, Faster R-CNN student and teacher, the detection distiller with its method's
registered loss terms (terms.py), the dino term's teacher class means, the LR by iteration, and COCO AP as the
evaluation."""

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

import torch

from ..config.registry import TASK_REGISTRY
from ..config.validate import _check
from ..data.fingerprint import file_sha256
from ..engine.speed import SpeedPlan
from ..engine.task import Task
from ..engine.train_hooks import FiniteGuardHook, LRScheduleHook, SpeedPlanHook
from ..models.external.pretrained import torch_hub_checkpoints
from ..utils import distributed
from ..utils.checkpoint import atomic_save, extract_state_dict, load_file, load_weights
from ..utils.errors import CheckpointError, ConfigError
from .config import BACKBONES, DETECTION_CFG
from .data import CocoDetection, DetectionTransform, annotation_path
from .hooks import COCOEvalHook, DetectionLogHook, IterLRSchedule
from .loader import PeriodLoader, test_loader
from .method import DetectionDistiller, collect_class_means
from .terms import DETECTION_TERM_REGISTRY, method_terms
from .models import _imagenet_weights, build_faster_rcnn, class_means_from_detectron2, \
    coco91_state_dict_to_contiguous

logger = logging.getLogger("mdistiller")

TORCHVISION_TEACHER = "torchvision"  # DISTILLER.TEACHER_CKPT: torchvision's COCO weights (resnet50 only)
CLASS_MEANS_FILE = "class_means.pt"  # in the run directory: the collected ND class means, reused on resume


@dataclass
class DetectionData:
    """What launch.py records about the data (summary.json)."""

    name: str
    num_train: int
    num_test: int
    classes: list
    sources: list
    category_ids: list
    train_set: object = field(default=None, repr=False)  # the CocoDetection ND's class means are collected over
    test_set: object = field(default=None, repr=False)  # the CocoDetection AP is computed on


def _model_kwargs(d):
    return dict(min_size=d.TEST_SHORT_SIDE, max_size=d.MAX_SIZE, _skip_resize=True,
                rpn_pre_nms_top_n_train=d.RPN_PRE_NMS_TOPK_TRAIN, rpn_post_nms_top_n_train=d.RPN_POST_NMS_TOPK_TRAIN,
                rpn_pre_nms_top_n_test=d.RPN_PRE_NMS_TOPK_TEST, rpn_post_nms_top_n_test=d.RPN_POST_NMS_TOPK_TEST,
                rpn_batch_size_per_image=d.RPN_BATCH_SIZE_PER_IMAGE, box_batch_size_per_image=d.ROI_BATCH_SIZE_PER_IMAGE,
                box_detections_per_img=d.DETECTIONS_PER_IMAGE)


def _hub_file(weights, key):
    path = os.path.join(torch_hub_checkpoints(), os.path.basename(weights.url))
    if not os.path.isfile(path):
        raise CheckpointError(f"{key}: torchvision's weights file {path} is missing and runs never download; fetch "
                              f"it once with python -c \"import torchvision; torchvision.models.get_weight("
                              f"'{weights.__class__.__name__}.{weights.name}').get_state_dict()\"")
    return path


def build_student(cfg):
    d = cfg.DETECTION
    if d.STUDENT_PRETRAINED:
        _hub_file(_imagenet_weights(cfg.DISTILLER.STUDENT), "DETECTION.STUDENT_PRETRAINED")
    return build_faster_rcnn(cfg.DISTILLER.STUDENT, pretrained_backbone=d.STUDENT_PRETRAINED,
                             trainable_layers=None if d.TRAINABLE_LAYERS < 0 else d.TRAINABLE_LAYERS,
                             roi_align_aligned=d.ROI_ALIGN_ALIGNED, **_model_kwargs(d))


def teacher_file(cfg):
    """The file DISTILLER.TEACHER_CKPT names (torchvision's COCO weights file for "torchvision")."""
    ckpt = cfg.DISTILLER.TEACHER_CKPT
    if ckpt == TORCHVISION_TEACHER:
        from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights
        return _hub_file(FasterRCNN_ResNet50_FPN_Weights.COCO_V1, "DISTILLER.TEACHER_CKPT")
    if not ckpt:
        raise ConfigError(f"config key DISTILLER.TEACHER_CKPT: a detection teacher needs its weights: the "
                          f"student_best.pth of a run of configs/coco/teacher/{cfg.DISTILLER.TEACHER}.yaml"
                          + (", or 'torchvision' (torchvision's COCO weights)" if cfg.DISTILLER.TEACHER == "resnet50"
                             else ""))
    if not os.path.isfile(ckpt):
        raise CheckpointError(f"DISTILLER.TEACHER_CKPT {ckpt} not found: train the teacher with "
                              f"configs/coco/teacher/{cfg.DISTILLER.TEACHER}.yaml and point this key at its "
                              f"student_best.pth")
    return ckpt


def build_teacher(cfg, category_ids, state=None):
    """The teacher detector with its weights (`state` instead of its file when given); frozen by the distiller."""
    model = build_faster_rcnn(cfg.DISTILLER.TEACHER, roi_align_aligned=cfg.DETECTION.TEACHER_ROI_ALIGN_ALIGNED,
                              **_model_kwargs(cfg.DETECTION))
    if state is None and cfg.DISTILLER.TEACHER_CKPT != TORCHVISION_TEACHER:
        return load_weights(model, teacher_file(cfg), f"{cfg.DISTILLER.TEACHER} (Faster R-CNN, 81 classes)",
                            hint=f"use a checkpoint of configs/coco/teacher/{cfg.DISTILLER.TEACHER}.yaml")
    if state is None:  # torchvision's 91-output COCO layout
        path = teacher_file(cfg)
        state = coco91_state_dict_to_contiguous(extract_state_dict(load_file(path, "detection teacher"), path),
                                                category_ids)
    model.load_state_dict(state)
    return model


def _datasets(cfg):
    d = cfg.DETECTION
    root = cfg.DATASET.ROOT
    train = CocoDetection(root, "train", DetectionTransform(d.TRAIN_SHORT_SIDES, d.MAX_SIZE,
                                                               flip_prob=0.5 if d.RANDOM_FLIP else 0.0))
    test = CocoDetection(root, "val", DetectionTransform((d.TEST_SHORT_SIDE,), d.MAX_SIZE, flip_prob=0.0))
    if cfg.DATASET.TRAIN_SUBSET:
        train.images = train.images[:cfg.DATASET.TRAIN_SUBSET]
    if cfg.DATASET.TEST_SUBSET:
        test.images = test.images[:cfg.DATASET.TEST_SUBSET]
    return train, test


def class_means(cfg, distiller, train, device, run_dir):
    """The dino term's teacher class means: from DETECTION.DINO.CLASS_MEANS_FILE, else the run directory's cache,
    else collected from the teacher (and cached there)."""
    nd = cfg.DETECTION.DINO
    if nd.CLASS_MEANS_FILE:
        try:
            with open(nd.CLASS_MEANS_FILE) as f:
                rows = json.load(f)
            means = torch.tensor([rows[str(k)] for k in range(len(rows))], dtype=torch.float32)
            return class_means_from_detectron2(means)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"DETECTION.DINO.CLASS_MEANS_FILE {nd.CLASS_MEANS_FILE}: cannot read KD++ class "
                                  f"means ({e}); it must be a JSON object with keys \"0\"..\"80\" of 1024 numbers") from None
    cached = os.path.join(run_dir, CLASS_MEANS_FILE) if run_dir else None
    key = _class_means_key(cfg, distiller.teacher)

    def read_cache():  # rank 0 decides and tells the others: ranks on other nodes may not see the run directory
        if distributed.rank() != 0 or not cached or not os.path.isfile(cached):
            return None
        saved = load_file(cached, "class means")
        if isinstance(saved, dict) and saved.get("key") == key:
            return saved["means"]
        logger.info("%s was collected from another teacher or recipe: collecting again", cached)
        return None

    means = distributed.broadcast_object(read_cache())
    if means is not None:
        return means
    loader = PeriodLoader(train, cfg.SOLVER.BATCH_SIZE, nd.CLASS_MEANS_ITERS, cfg.EXPERIMENT.SEED + 1,
                          distributed.rank(), distributed.world_size(), cfg.DATASET.NUM_WORKERS)
    logger.info("collecting the teacher's class means over %d iterations", nd.CLASS_MEANS_ITERS)
    with torch.random.fork_rng(devices=[]):  # the training's random stream is the same with or without this
        means = collect_class_means(distiller.teacher, loader, nd.CLASS_MEANS_ITERS, device)
    if cached and distributed.rank() == 0:
        os.makedirs(run_dir, exist_ok=True)
        atomic_save({"key": key, "means": means}, cached)
    return means


def _class_means_key(cfg, teacher):
    """What the collected class means depend on: the teacher's weights, the data, the input and sampler settings,
    the batch and the seed. A cache with another key is not used."""
    h = hashlib.sha256()
    for name, tensor in teacher.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    recipe = {"teacher": h.hexdigest(), "detection": cfg.DETECTION.dump(), "batch": cfg.SOLVER.BATCH_SIZE,
              "seed": cfg.EXPERIMENT.SEED, "root": os.path.abspath(cfg.DATASET.ROOT),
              "train_subset": cfg.DATASET.TRAIN_SUBSET}
    return json.dumps(recipe, sort_keys=True)


def build_data(cfg, device, bundle=None):
    """(train loader, test loader, DetectionData) of this process."""
    if bundle is not None:
        raise ValueError("TASK detection reads its COCO files; it takes no in-memory bundle")
    d, rank, world_size = cfg.DETECTION, distributed.rank(), distributed.world_size()
    train, test = _datasets(cfg)
    data = DetectionData("coco", len(train), len(test), list(train.class_names),
                         [annotation_path(cfg.DATASET.ROOT, "train"), annotation_path(cfg.DATASET.ROOT, "val")],
                         list(train.category_ids), train, test)
    if len(train.category_ids) != 80 or train.category_ids != test.category_ids:
        raise ConfigError(f"DATASET.ROOT {cfg.DATASET.ROOT}: the detectors have COCO's 80 categories; the "
                          f"annotations list {len(train.category_ids)} (train) and {len(test.category_ids)} (val)")
    train_loader = PeriodLoader(train, cfg.SOLVER.BATCH_SIZE, d.ITERS_PER_EPOCH, cfg.EXPERIMENT.SEED, rank,
                                world_size, cfg.DATASET.NUM_WORKERS)
    evaluation_loader = test_loader(test, cfg.DATASET.TEST.BATCH_SIZE, rank, world_size, cfg.DATASET.NUM_WORKERS)
    return train_loader, evaluation_loader, data


def build_distiller(cfg, data, device, teacher_state=None):
    """(the detection distiller on `device`, None): student, then teacher when the method has terms, then the
    terms in their registration order (their random initialisations depend on it)."""
    names = DETECTION_TERM_REGISTRY.in_order(method_terms(cfg.DISTILLER.TYPE))
    student = build_student(cfg)
    teacher = build_teacher(cfg, data.category_ids, teacher_state) if names else None
    terms = {}
    for name in names:
        term = DETECTION_TERM_REGISTRY.get(name)
        terms[name] = term(**term.from_config(cfg))
    d = cfg.DETECTION
    pooled = [who for who, on in (("student", d.ROI_ALIGN_ALIGNED),
                                  ("teacher", teacher is not None and d.TEACHER_ROI_ALIGN_ALIGNED)) if on]
    if pooled:
        logger.info("RoIAlign aligned=True (Detectron2's ROIAlignV2): %s", " and ".join(pooled))
    distiller = DetectionDistiller(student=student, teacher=teacher, terms=terms,
                                   teacher_flip_channels=cfg.DETECTION.TEACHER_FLIP_CHANNELS)
    return distiller.to(device), None


def detection_teacher_record(cfg):
    """summary.json's "teacher" of a detection run: the weights file and its AP when the file records one."""
    path = os.path.abspath(teacher_file(cfg))
    ap = None
    if cfg.DISTILLER.TEACHER_CKPT != TORCHVISION_TEACHER:
        raw = load_file(path, "detection teacher")
        ap = raw.get("test_AP") if isinstance(raw, dict) else None
    return {"name": cfg.DISTILLER.TEACHER, "checkpoint": path, "sha256": file_sha256(path), "AP": ap,
            "AP_source": "its checkpoint" if ap is not None else None, "metric": "AP"}


def validate_detection(cfg):
    d, s = cfg.DETECTION, cfg.SOLVER
    _check(cfg.DATASET.TYPE == "coco", "DATASET.TYPE", f"TASK detection trains on coco, got '{cfg.DATASET.TYPE}'")
    terms = method_terms(cfg.DISTILLER.TYPE)  # ConfigError naming the methods when there is none of that name
    for role in ("STUDENT", "TEACHER") if terms else ("STUDENT",):
        _check(cfg.DISTILLER[role] in BACKBONES, f"DISTILLER.{role}",
               f"detection backbones are {', '.join(BACKBONES)}; got '{cfg.DISTILLER[role]}'")
    for name in terms:  # each of the method's terms checks its own settings, if it has any to check
        check = getattr(DETECTION_TERM_REGISTRY.get(name), "validate_config", None)
        if check is not None:
            check(cfg)
    _check(not (terms and cfg.DISTILLER.TEACHER_CKPT == TORCHVISION_TEACHER and d.TEACHER_ROI_ALIGN_ALIGNED),
           "DETECTION.TEACHER_ROI_ALIGN_ALIGNED", "torchvision's COCO weights (DISTILLER.TEACHER_CKPT torchvision) "
           "were trained with RoIAlign aligned=False and must pool so: set it False")
    _check(d.ITERS_PER_EPOCH > 0, "DETECTION.ITERS_PER_EPOCH", f"must be > 0, got {d.ITERS_PER_EPOCH}")
    _check(d.EVAL_PERIOD > 0, "DETECTION.EVAL_PERIOD", f"must be > 0 epochs, got {d.EVAL_PERIOD}")
    _check(list(d.STEPS) == sorted(d.STEPS) and all(x > 0 for x in d.STEPS), "DETECTION.STEPS",
           f"must be increasing positive iterations, got {list(d.STEPS)}")
    _check(d.WARMUP_ITERS >= 0, "DETECTION.WARMUP_ITERS", f"must be >= 0, got {d.WARMUP_ITERS}")
    _check(0 < d.WARMUP_FACTOR <= 1, "DETECTION.WARMUP_FACTOR", f"must be in (0, 1], got {d.WARMUP_FACTOR}")
    _check(len(d.TRAIN_SHORT_SIDES) > 0 and all(x > 0 for x in d.TRAIN_SHORT_SIDES), "DETECTION.TRAIN_SHORT_SIDES",
           f"must list positive sizes, got {list(d.TRAIN_SHORT_SIDES)}")
    _check(0 < d.TEST_SHORT_SIDE <= d.MAX_SIZE, "DETECTION.TEST_SHORT_SIDE", "must be in (0, DETECTION.MAX_SIZE]")
    _check(not s.LR_DECAY_STAGES, "SOLVER.LR_DECAY_STAGES",
           "TASK detection decays the LR at DETECTION.STEPS (iterations); leave this empty")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # checked before the process group exists
    _check(s.BATCH_SIZE % world == 0, "SOLVER.BATCH_SIZE",
           f"the global batch {s.BATCH_SIZE} must divide among the {world} processes")
    _check(d.DINO.CLASS_MEANS_ITERS > 0, "DETECTION.DINO.CLASS_MEANS_ITERS", "must be > 0")
    sp = cfg.SPEED
    _check(sp.AMP in ("auto", "off"), "SPEED.AMP", "TASK detection trains in float32: set auto or off")
    _check(sp.CHANNELS_LAST in ("auto", "off") and not sp.COMPILE and not sp.TEACHER_INT8
           and sp.TEACHER_HALF in ("auto", "off"), "SPEED",
           "TASK detection has none of the classification fast paths: leave SPEED at its defaults")
    _check(not cfg.DISTRIBUTED.SYNC_BN, "DISTRIBUTED.SYNC_BN", "the detectors' BatchNorm is frozen: set it False")


@TASK_REGISTRY.register("detection", config=DETECTION_CFG, section="DETECTION",
                        loss_weights=("DKD.ALPHA", "DKD.BETA"), renamed={"ND": "DINO"})
class DetectionTask(Task):
    metric = metric_label = "AP"
    epoch_scalars = ("test_AP", "test_AP50", "test_AP75", "train_loss", "lr", "images_per_s")
    validate_config = staticmethod(validate_detection)

    def speed_plan(self, cfg, device, recorded_speed=None):
        return SpeedPlan(torch.device(device).type, notes=("detection runs in float32 with its models in NCHW: "
                                                           "SPEED's fast paths are for classification",))

    def build_data(self, cfg, device, bundle=None):
        return build_data(cfg, device, bundle)

    def build_distiller(self, cfg, data, device, teacher_state=None):
        return build_distiller(cfg, data, device, teacher_state)

    def prepare(self, cfg, distiller, data, device, *, speed, run_dir=None, bundle=None, teacher_state=None,
                monitor_teacher=None):
        """The dino term's teacher class means (file, run-directory cache or collected) into its buffer."""
        if "dino" in distiller.terms:
            means = distributed.agree(class_means, cfg, distiller, data.train_set, torch.device(device), run_dir)
            distiller.terms["dino"].class_means.copy_(means)

    def hooks(self, cfg, distiller, test_loader, *, data, speed, device, run_dir=None, monitor_teacher=None):
        device = torch.device(device)
        evaluation = COCOEvalHook(student=distiller.student, loader=test_loader, category_ids=data.category_ids,
                                  image_ids=[im["id"] for im in data.test_set.images], device=device,
                                  **COCOEvalHook.from_config(cfg))
        return [LRScheduleHook(schedule=IterLRSchedule(**IterLRSchedule.from_config(cfg))),
                FiniteGuardHook(device=device, run_dir=run_dir), evaluation, DetectionLogHook(),
                SpeedPlanHook(plan=speed)], evaluation

    def teacher_record(self, cfg):
        return detection_teacher_record(cfg)

    def result_line(self, summary):
        return (f"best AP {summary['best_AP']:.2f} (epoch {summary['best_epoch']})  last AP {summary['last_AP']:.2f}"
                f"  AP50 {summary['last_AP50']:.2f}  AP75 {summary['last_AP75']:.2f}")
