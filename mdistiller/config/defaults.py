"""Every config key of mdistiller and its default, in one tree.

Config files (configs/<dataset>/<method>/<teacher>_<student>.yaml) override these, and `KEY VALUE` pairs on the
command line override both. A key that is not here is an error, so this file is the complete list of what a
config can say. Components declare their own section when they register (config/registry.py: a method's
hyper-parameters), which keeps "a new method is one file" true; `get_cfg_defaults()` adds every declared section to
the core tree here, the one place the tree is assembled. Importing any part of `mdistiller` runs the package's
`__init__`, which imports every component by its explicit list, so the tree is the same whatever was imported first.

The SOLVER defaults are the CIFAR-100 recipe of CRD/DKD/DOT (RepDistiller's and mdistiller's configs); the DATASET
default is Fashion-MNIST because it is the dataset that exists offline.
"""

from yacs.config import CfgNode as CN

from .registry import declared_sections

_C = CN()

# What is trained: a registered task, "classification" (image classifiers, the default) or "detection" (Faster
# R-CNN + FPN on COCO, mdistiller/detection, with its own section). Each task checks its own settings and supplies
# its data, models, evaluation and metrics to the one assembler (engine/build.py).
_C.TASK = "classification"

_C.EXPERIMENT = CN()
_C.EXPERIMENT.NAME = ""  # run directory name under LOG.PREFIX; empty = derived from dataset/method/models/seed
_C.EXPERIMENT.TAG = "default"
_C.EXPERIMENT.SEED = 0
_C.EXPERIMENT.DEVICE = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
_C.EXPERIMENT.DETERMINISTIC = True  # deterministic kernels: bit-exact resume on CPU, slower on GPU

_C.DATASET = CN()
_C.DATASET.TYPE = "fashion_mnist"  # cifar100, tiny_imagenet, imagenet, fashion_mnist
_C.DATASET.ROOT = "data"
_C.DATASET.DOWNLOAD = True  # try to download a missing dataset (CIFAR-100, Fashion-MNIST) when online
_C.DATASET.NUM_WORKERS = 2  # loader processes for folder datasets (in-memory datasets need none)
_C.DATASET.TRAIN_SUBSET = 0  # >0: a deterministic, class-balanced subset of this many training images
_C.DATASET.TEST_SUBSET = 0
_C.DATASET.TEST = CN()
_C.DATASET.TEST.BATCH_SIZE = 256

_C.DISTILLER = CN()
_C.DISTILLER.TYPE = "NONE"  # NONE trains DISTILLER.STUDENT alone (how teachers are made)
_C.DISTILLER.TEACHER = "resnet56"
_C.DISTILLER.STUDENT = "resnet8"
_C.DISTILLER.TEACHER_CKPT = ""  # empty = the published location for the teacher (see the model zoo)

# timm:<name> / torchvision:<name> models (models/external/): whether they start from their library's
# pretrained weights, read from the library's local cache (one clear error offline when the file is missing).
_C.MODEL = CN()
_C.MODEL.TEACHER_PRETRAINED = True  # a library teacher without DISTILLER.TEACHER_CKPT uses the library's weights
_C.MODEL.STUDENT_PRETRAINED = False  # a library student starts from the library's weights (a new classifier head)

_C.SOLVER = CN()
_C.SOLVER.UPDATE_RULE = "vanilla"  # how the losses become an update: vanilla (SGD on their sum) or dot (DOT)
_C.SOLVER.BATCH_SIZE = 64  # global batch, as in the papers
_C.SOLVER.EPOCHS = 240
_C.SOLVER.LR = 0.05
_C.SOLVER.LR_DECAY_STAGES = [150, 180, 210]
_C.SOLVER.LR_DECAY_RATE = 0.1
_C.SOLVER.WARMUP_EPOCHS = 0  # linear warm-up from ~0 to LR, per iteration, over this many epochs
_C.SOLVER.WEIGHT_DECAY = 5e-4
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.NESTEROV = False  # Nesterov momentum (the KD++ family's SGD); not defined for SOLVER.UPDATE_RULE dot
_C.SOLVER.DOT = CN()  # SOLVER.UPDATE_RULE dot: task momentum MOMENTUM - DELTA, distillation momentum MOMENTUM + DELTA
_C.SOLVER.DOT.DELTA = 0.075  # CIFAR-100 KD; CRD and DKD 0.05, Tiny-ImageNet 0.075, ImageNet 0.09 (DOT appendix A.6)
_C.SOLVER.DOT.GRAD_MODE = "two_pass"  # how the two gradients are computed: two_pass (two backwards) or batched
_C.SOLVER.DOT.LOG_COSINE = False  # log cos(v_task, v) and cos(v_distill, v) every step (DOT fig. 5); costs a pass
# A step whose loss or gradients are not finite stops the run, before the epoch's checkpoints are written
# (engine/finite_guard.py). Under SPEED.AMP fp16 the loss scale skips steps whose gradients overflowed and lowers
# the scale, which is routine: up to this many such steps in a row are tolerated, one more stops the run.
_C.SOLVER.MAX_SKIPPED_STEPS = 50

# Loss-weight ramp of the KD++ family (distillers/loss_ramp.py): the ramped terms are multiplied by
# min(1, e / EPOCHS), e the 0-based epoch, so the first epoch has none of them. Not an LR warm-up.
_C.LOSS_RAMP = CN()
_C.LOSS_RAMP.EPOCHS = 0  # 0 = off; KD++ recipes: 20 on CIFAR-100, 5 on ImageNet
_C.LOSS_RAMP.TERMS = []  # loss terms to ramp; empty = the method's own (KD: kd, DKD: dkd, DIST: dist, ...)

_C.DISTRIBUTED = CN()  # used when launched by torchrun (RANK / WORLD_SIZE set); ignored in one process
_C.DISTRIBUTED.SYNC_BN = False  # student BatchNorm statistics over the global batch (CUDA only)
_C.DISTRIBUTED.FIND_UNUSED_PARAMETERS = False  # DDP option; turned on for methods that say they need it
_C.DISTRIBUTED.TIMEOUT_MIN = 30.0  # a collective waiting longer than this ends the job

# Training fast paths (mdistiller/engine/speed.py). "auto" is resolved once, when the trainer is built, from the
# device; the resolved choice is logged ("fast paths: ...") and recorded in summary.json under "speed".
_C.SPEED = CN()
# Mixed precision: autocast around the training forward + losses and the evaluation forward. auto: bf16 on a CUDA
# GPU that supports it, else off (docs/speed.md has what each choice measured on the CPUs we have).
# fp16 (CUDA only) adds a dynamic loss scale (GradScaler; the DOT update scales both losses).
_C.SPEED.AMP = "auto"  # auto, off, bf16, fp16
# Student, teacher and distiller modules and every batch in channels-last memory format (NHWC). auto: on (CUDA
# tensor cores want NHWC; oneDNN's NHWC convolutions were faster on the CPU too, docs/speed.md).
_C.SPEED.CHANNELS_LAST = "auto"  # auto, on, off
_C.SPEED.COMPILE = False  # torch.compile the student's and teacher's forward (first steps compile: minutes on a CPU)
# Teacher forward under torch.inference_mode instead of no_grad; the same numbers.
_C.SPEED.TEACHER_INFERENCE_MODE = True
# Teacher weights and forward in half precision, its outputs cast back to float32 for the losses: bf16 on the CPU;
# on CUDA the AMP dtype (bf16 when AMP is off, fp16 on GPUs without bf16). auto: on when AMP is on, else off.
_C.SPEED.TEACHER_HALF = "auto"  # auto, on, off
# CPU only: the teacher as a post-training int8 model (engine/teacher_int8.py), calibrated on the first
# TEACHER_INT8_CALIBRATION un-augmented training images. Off by default: it changes the teacher's logits by the
# quantization error (docs/speed.md has the measured cost in accuracy and the gain in images/s).
_C.SPEED.TEACHER_INT8 = False
_C.SPEED.TEACHER_INT8_CALIBRATION = 512
# CUDA only: the whole update (teacher and student forward, backward, losses, update rule) recorded once as a CUDA
# graph and replayed for every batch of the same shape (engine/cuda_graph.py): one launch instead of hundreds.
# auto: on for a one-process CUDA run of a method that can be captured; a method that cannot runs eagerly, with
# one line in train.log saying why. on: the same, but a method that cannot be captured is an error.
_C.SPEED.CUDA_GRAPHS = "auto"  # auto, on, off
# CUDA only: the keys above left "auto" (AMP, CHANNELS_LAST, CUDA_GRAPHS) are decided by timing the run's own
# update under each combination, on copies of the method, for at most 5 seconds (engine/speed_probe.py); the times
# and the choice go to train.log and summary.json, and a resumed run keeps its recorded choice. False: the rules.
_C.SPEED.PROBE = True

_C.LOG = CN()
_C.LOG.PREFIX = "output"
_C.LOG.SAVE_CHECKPOINT_FREQ = 40  # also keep ckpt_epoch_<N>.pth every N epochs (0 = only the last epoch)
_C.LOG.TENSORBOARD_FREQ = 50  # iterations between TensorBoard training scalars (0 = off)
_C.LOG.PRINT_FREQ = 100  # without a terminal: a progress line (loss, lr, img/s, eta) every N iterations (0 = off)
# Every run logs monitor/ce (the unweighted training cross-entropy) and, when a teacher runs, monitor/kl
# (T^2 KL(teacher || student) at LOG.MONITOR_T, unweighted): losses comparable across methods and weights (DOT fig. 3).
_C.LOG.MONITOR_T = 4.0
_C.LOG.MONITOR_TEACHER = False  # student alone (DISTILLER.TYPE NONE): also run DISTILLER.TEACHER to log monitor/kl
# Weights & Biases beside TensorBoard (needs `pip install .[wandb]`): the same scalars and the config, one wandb run
# per run directory (its id is kept there, so --resume continues it); WANDB_MODE=offline etc. work as usual.
_C.LOG.WANDB = False
_C.LOG.WANDB_PROJECT = "mdistiller"


# Keys that were renamed: {old full key: new full key} (a section's own renames come with its registration). The
# old name keeps working in files, on the command line and in saved run configs, with a one-line notice.
_RENAMED = {"SOLVER.TRAINER": "SOLVER.UPDATE_RULE"}


def renamed_keys():
    """{old full key: new full key}: the core's and every registered section's."""
    out = dict(_RENAMED)
    for section, (_, _, renamed) in declared_sections().items():
        out.update({f"{section}.{old}": f"{section}.{new}" for old, new in renamed.items()})
    return out


def canonical_key(key, renamed=None):
    """`key` under today's names (a renamed key or section prefix replaced), and whether it was renamed."""
    renamed = renamed_keys() if renamed is None else renamed
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in renamed:
            return ".".join([renamed[head], *parts[i:]]), True
    return key, False


def get_cfg_defaults():
    """A fresh, mutable copy of the default tree: the core keys and every registered component's section."""
    cfg = _C.clone()
    for name, (node, _, _) in declared_sections().items():
        if name in _C:
            raise ValueError(f"config section {name} of a component already exists in the core defaults")
        cfg[name] = node.clone()
    return cfg
