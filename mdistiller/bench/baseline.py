"""The reference the engine's speed is judged against: KD written the way a plain PyTorch user writes it.

torchvision.datasets.CIFAR100 decoding one PIL image per sample through RandomCrop(32, padding=4),
RandomHorizontalFlip, ToTensor and Normalize; a torch DataLoader (shuffle, drop_last, the given worker
processes, no pinned memory); each batch copied to the device; the teacher under torch.no_grad in fp32; the student
in fp32, default (contiguous) memory format; CE_WEIGHT * CE + KD_WEIGHT * T^2 * KL(teacher || student) from the
config's KD section; torch.optim.SGD with the config's LR, momentum and weight decay, at a constant LR. The models
are the repo's own (the same student and teacher architectures and teacher weights as the mdistiller variant),
so the comparison is of everything around them. The loss is kept as a tensor rather than read with .item() every
step, which spares the baseline a device sync per step that many such scripts pay.
"""

import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import transforms
from torchvision.datasets import CIFAR100

from ..data.subset import balanced_subset
from ..models.teacher_ckpt import build_teacher
from ..models import build_model
from .cifar_format import UncheckedCIFAR100
from .device import sync

NUM_CLASSES = 100


def kd_update(student, teacher, optimizer, images, labels, temperature, ce_weight, kd_weight):
    """One KD update as plain PyTorch writes it; returns the loss (a detached tensor, no sync)."""
    with torch.no_grad():
        logits_t = teacher(images)[0]
    logits = student(images)[0]
    t = temperature
    kl = F.kl_div(F.log_softmax(logits / t, dim=1), F.softmax(logits_t / t, dim=1), reduction="batchmean")
    loss = ce_weight * F.cross_entropy(logits, labels) + kd_weight * t * t * kl
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


class BareKD:
    """A config's student and teacher architectures (fresh weights; `teacher_state` for the teacher's), its KD
    loss (the KD section's weights and temperature, whatever the method) and torch SGD, with nothing around them:
    what one update costs in plain PyTorch (tools/benchmark.py --ops)."""

    def __init__(self, cfg, num_classes, image_size, device, teacher_state=None):
        torch.manual_seed(cfg.EXPERIMENT.SEED)
        self.student = build_model(cfg.DISTILLER.STUDENT, num_classes=num_classes, image_size=image_size)
        self.teacher = build_model(cfg.DISTILLER.TEACHER, num_classes=num_classes, image_size=image_size)
        if teacher_state is not None:
            self.teacher.load_state_dict(teacher_state)
        self.student.to(device).train()
        self.teacher.to(device).eval()
        s, kd = cfg.SOLVER, cfg.KD
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=s.LR, momentum=s.MOMENTUM,
                                         weight_decay=s.WEIGHT_DECAY, nesterov=s.NESTEROV)
        self.temperature, self.ce_weight, self.kd_weight = kd.TEMPERATURE, kd.LOSS.CE_WEIGHT, kd.LOSS.KD_WEIGHT

    def step(self, images, labels):
        return kd_update(self.student, self.teacher, self.optimizer, images, labels, self.temperature,
                         self.ce_weight, self.kd_weight)


def cifar100_train_transform(mean, std):
    return transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(mean, std)])


class TorchvisionKD:
    """KD on CIFAR-100 in plain PyTorch. `root` holds cifar-100-python/; `verify_md5` False reads a generated copy
    (cifar_format.UncheckedCIFAR100); `subset` > 0 trains on the images DATASET.TRAIN_SUBSET = subset selects (the
    same class-balanced choice from the same file, so the same images as the mdistiller variant); `teacher_state`:
    the teacher's weights instead of DISTILLER.TEACHER_CKPT's file (the variant's in-memory random teacher)."""

    def __init__(self, cfg, root, device, workers, mean, std, verify_md5=True, subset=0, teacher_state=None):
        self.device = torch.device(device)
        torch.manual_seed(cfg.EXPERIMENT.SEED)
        dataset_cls = CIFAR100 if verify_md5 else UncheckedCIFAR100
        dataset = dataset_cls(root, train=True, download=False, transform=cifar100_train_transform(mean, std))
        if subset > 0:
            indices = balanced_subset(torch.as_tensor(dataset.targets), subset, NUM_CLASSES, "DATASET.TRAIN_SUBSET",
                                      "cifar100 train")
            dataset = Subset(dataset, indices.tolist())
        self.num_images = len(dataset)
        self.loader = DataLoader(dataset, batch_size=cfg.SOLVER.BATCH_SIZE, shuffle=True, drop_last=True,
                                 num_workers=workers)
        self.workers = workers
        self.student = build_model(cfg.DISTILLER.STUDENT, "cifar100", NUM_CLASSES).to(self.device)
        if teacher_state is None:
            teacher = build_teacher(cfg, NUM_CLASSES)
        else:
            teacher = build_model(cfg.DISTILLER.TEACHER, "cifar100", NUM_CLASSES)
            teacher.load_state_dict(teacher_state)
        self.teacher = teacher.to(self.device).eval()
        s, kd = cfg.SOLVER, cfg.KD
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=s.LR, momentum=s.MOMENTUM,
                                         weight_decay=s.WEIGHT_DECAY, nesterov=s.NESTEROV)
        self.temperature, self.ce_weight, self.kd_weight = kd.TEMPERATURE, kd.LOSS.CE_WEIGHT, kd.LOSS.KD_WEIGHT

    def step(self, images, labels):
        """One update on a CPU batch; returns the loss (a detached tensor, no sync)."""
        images, labels = images.to(self.device), labels.to(self.device)
        return kd_update(self.student, self.teacher, self.optimizer, images, labels, self.temperature,
                         self.ce_weight, self.kd_weight)

    def warmup(self, steps):
        """Untimed updates on one batch (allocator, kernels), as the variants get before their timings."""
        if steps <= 0:
            return
        self.student.train()
        images, labels = next(iter(self.loader))
        for _ in range(steps):
            self.step(images, labels)

    def epoch(self):
        """One pass over the loader: (images trained on, seconds, per-step losses). The time includes starting
        the loader's workers, which a plain loop pays every epoch."""
        self.student.train()
        losses, seen = [], 0
        sync(self.device)
        start = time.perf_counter()
        for images, labels in self.loader:
            losses.append(self.step(images, labels))
            seen += int(labels.shape[0])
        sync(self.device)
        return seen, time.perf_counter() - start, torch.stack(losses).cpu() if losses else torch.empty(0)
