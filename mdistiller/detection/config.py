"""The DETECTION config section (TASK detection): input recipe, model settings, schedule in iterations, and the
detection loss terms' weights (terms.py). Defaults are Detectron2's (what the KD++ and mdistiller detection results
were trained with) where torchvision differs: RPN post-NMS top-k 1000 per image in training (torchvision: 2000)."""

from yacs.config import CfgNode as CN

from .data import MAX_SIZE, TEST_SHORT_SIDE, TRAIN_SHORT_SIDES

BACKBONES = ("resnet18", "resnet50", "resnet101", "mobilenet_v2")

_D = CN()
_D.TRAIN_SHORT_SIDES = list(TRAIN_SHORT_SIDES)  # short side drawn from these per training image
_D.TEST_SHORT_SIDE = TEST_SHORT_SIDE
_D.MAX_SIZE = MAX_SIZE  # long side cap (train and test)
_D.RANDOM_FLIP = True  # horizontal flip with probability 0.5 in training (Detectron2's INPUT.RANDOM_FLIP)
# The loop's "epoch" is a period of this many iterations: each ends with evaluation (every EVAL_PERIOD epochs and
# the last), metrics.jsonl's line and the checkpoints. SOLVER.EPOCHS x ITERS_PER_EPOCH = Detectron2's MAX_ITER.
_D.ITERS_PER_EPOCH = 5000
_D.EVAL_PERIOD = 1  # evaluate on the test split every N epochs (and always after the last)
_D.STEPS = [60000, 80000]  # iterations after which the LR is multiplied by SOLVER.LR_DECAY_RATE (Detectron2 1x)
_D.WARMUP_ITERS = 1000  # linear warm-up from WARMUP_FACTOR x LR (Detectron2's WarmupMultiStepLR)
_D.WARMUP_FACTOR = 0.001
_D.STUDENT_PRETRAINED = True  # ImageNet backbone weights from the torch hub cache (never downloaded by a run)
_D.TRAINABLE_LAYERS = -1  # -1: Detectron2's defaults (ResNet FREEZE_AT 2 = 3 stages trained; MobileNetV2 all)
_D.TEACHER_FLIP_CHANNELS = False  # the teacher was trained on BGR input (a converted Detectron2-zoo model)
# The box head's RoIAlign: True is Detectron2's ROIAlignV2 (aligned=True: the sampling grid shifted by -0.5 pixel),
# which its FPN configs use and the published detection numbers were trained with; False is torchvision's
# MultiScaleRoIAlign as it ships (aligned=False). The teacher has its own key: it must pool as it was trained
# (configs/coco/teacher/ runs: their ROI_ALIGN_ALIGNED; torchvision's COCO weights: False). models.py
_D.ROI_ALIGN_ALIGNED = False
_D.TEACHER_ROI_ALIGN_ALIGNED = False
_D.RPN_PRE_NMS_TOPK_TRAIN = 2000
_D.RPN_POST_NMS_TOPK_TRAIN = 1000
_D.RPN_PRE_NMS_TOPK_TEST = 1000
_D.RPN_POST_NMS_TOPK_TEST = 1000
_D.RPN_BATCH_SIZE_PER_IMAGE = 256
_D.ROI_BATCH_SIZE_PER_IMAGE = 512
_D.DETECTIONS_PER_IMAGE = 100
_D.KD = CN()
_D.KD.WEIGHT = 1.0
_D.KD.T = 1.0
_D.DKD = CN()  # the DKD appendix's detection settings
_D.DKD.ALPHA = 1.0
_D.DKD.BETA = 0.25
_D.DKD.T = 1.0
_D.DINO = CN()  # KD++'s dino term (its code's "ND") on the 1024-d box-head features; DETECTION.ND still reads
_D.DINO.WEIGHT = 1.0
# Teacher class means (81 x 1024, background included): a JSON file in KD++'s layout (keys "0".."80", Detectron2's
# label order: 80 = background), or empty to collect them from the teacher over CLASS_MEANS_ITERS training
# iterations before the first step (KD++: 30,000), saved in the run directory and reused on resume.
_D.DINO.CLASS_MEANS_FILE = ""
_D.DINO.CLASS_MEANS_ITERS = 30000
_D.REVIEWKD = CN()  # ReviewKD's HCL on the five FPN levels
_D.REVIEWKD.WEIGHT = 1.0
# FitNet on the five FPN levels (imitation.py): a learned 1x1 conv per level on the student's map, MSE to the
# teacher's map, summed over the levels. Weight 1.0: HEAD's FPN FitNet (LutingWang/HEAD configs/kd/fitnet*.py); the
# code behind ReviewKD's / KD++'s detection FitNet row is not published.
_D.FITNET = CN()
_D.FITNET.WEIGHT = 1.0
# FGFI (Wang et al., CVPR 2019) on the five FPN levels: a learned 3x3 conv per level, squared error summed over the
# imitation mask's locations and channels / (2 x the mask's locations). Defaults are the original code's
# (twangnh/Distilling-Object-Detectors trainval_net_sup.py: --ilw 0.01; anchor_target_layer.py: IoU > 0.5 x max).
_D.FGFI = CN()
_D.FGFI.WEIGHT = 0.01
_D.FGFI.PSI = 0.5  # an anchor imitates where its IoU with a ground-truth box > PSI x that box's best anchor IoU

DETECTION_CFG = _D
