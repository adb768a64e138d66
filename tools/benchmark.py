"""Time real training steps of any config: ms per step and images/s, with and without data loading.

    python tools/benchmark.py --cfg configs/cifar100/kd/resnet32x4_resnet8x4.yaml --synthetic --random-teacher
    python tools/benchmark.py --cfg FILE --compare "SOLVER.TRAINER vanilla" "SOLVER.TRAINER dot" [-- KEY VALUE ...]

Each variant is a full Trainer built from the config (the same distiller, optimizer and run_step that
tools/train.py uses); the steps timed are its own `run_step`. "step" times repeat one batch already on the
device (the update alone); "with data" times iterate the real training loader (augmentation and copies
included). With --compare, the variants (extra KEY VALUE pairs each) are built in one process and timed in
alternating rounds, so drifts of a shared machine hit all of them alike; ratios are to the first variant.

--synthetic serves random uint8 images of the dataset's shape and class count under its name (through the
same in-memory loader CIFAR-100 uses), for machines without the dataset; --random-teacher writes a teacher
checkpoint with random weights (timings do not depend on the weights). Peak memory: CUDA's allocator peak per
variant; on CPU the process's peak resident size (shared by all variants of a --compare run).
"""

import argparse
import contextlib
import json
import os
import resource
import shlex
import statistics
import tempfile
import time

import _path  # noqa: F401
import torch

from mdistiller.config import load_config
from mdistiller.data import DATASET_REGISTRY
from mdistiller.data.bundle import DatasetBundle, TensorSplit
from mdistiller.engine import TRAINER_REGISTRY
from mdistiller.models import build_model
from mdistiller.utils.cli import run_cli

# DATASET.TYPE -> (classes, image size) of the synthetic stand-in
SHAPES = {"cifar100": (100, 32), "fashion_mnist": (10, 32), "tiny_imagenet": (200, 64), "imagenet": (1000, 224)}


def synthetic_loader(dataset, num_train, num_test=64):
    classes, size = SHAPES[dataset]

    def split(n, seed):
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        return TensorSplit(images, torch.arange(n) % classes)

    def load(cfg):
        return DatasetBundle(name=dataset, num_classes=classes, image_size=size, mean=(0.5,) * 3, std=(0.25,) * 3,
                             train=lambda: split(num_train, 0), test=lambda: split(num_test, 1))

    return load


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    def __init__(self, label, cfg):
        self.label, self.cfg = label, cfg
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.trainer = TRAINER_REGISTRY.get(cfg.SOLVER.TRAINER, "SOLVER.TRAINER")(cfg)
        self.trainer.distiller.train()
        self.trainer.set_lr(cfg.SOLVER.LR)
        loader = self.trainer.train_loader
        loader.set_epoch(0)
        self.batch = next(iter(loader))
        self.batch_size = int(self.batch[1].shape[0])
        self.step_times, self.data_times = [], []
        self.peak_cuda = 0

    def _step(self, batch):
        images, labels, index = batch
        self.trainer.run_step(images, labels, index, 1)

    def time_steps(self, steps):
        """Mean seconds per update on the fixed batch."""
        device = self.trainer.device
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            self._step(self.batch)
        sync(device)
        return (time.perf_counter() - start) / steps

    def time_with_data(self, steps):
        """Mean seconds per update while iterating the training loader (fresh epochs as needed)."""
        device = self.trainer.device
        loader, done, epoch = self.trainer.train_loader, 0, 1
        sync(device)
        start = time.perf_counter()
        while done < steps:
            loader.set_epoch(epoch)
            for batch in loader:
                self._step(batch)
                done += 1
                if done == steps:
                    break
            epoch += 1
        sync(device)
        return (time.perf_counter() - start) / steps

    def record_memory(self):
        if self.trainer.device.type == "cuda":
            self.peak_cuda = max(self.peak_cuda, torch.cuda.max_memory_allocated(self.trainer.device))

    def result(self):
        step = statistics.median(self.step_times)
        data = statistics.median(self.data_times) if self.data_times else None
        out = {"variant": self.label, "batch_size": self.batch_size, "ms_per_step": 1e3 * step,
               "images_per_s": self.batch_size / step, "rounds": len(self.step_times),
               "device": str(self.trainer.device), "threads": torch.get_num_threads()}
        if data is not None:
            out.update({"ms_per_step_with_data": 1e3 * data, "images_per_s_with_data": self.batch_size / data})
        if self.peak_cuda:
            out["peak_cuda_mb"] = self.peak_cuda / 2**20
        return out


def random_teacher(cfg, directory):
    torch.manual_seed(0)
    path = os.path.join(directory, f"random_{cfg.DISTILLER.TEACHER}.pth")
    torch.save({"model": build_model(cfg.DISTILLER.TEACHER, cfg.DATASET.TYPE).state_dict()}, path)
    return path


def run(args):
    variants_opts = [(c, list(args.opts) + shlex.split(c)) for c in args.compare] or [("config", list(args.opts))]
    base = load_config(args.cfg, args.opts, validate=False)
    needed = base.SOLVER.BATCH_SIZE * (args.steps + args.warmup + 2)
    with tempfile.TemporaryDirectory() as tmp:
        extra = ["LOG.PREFIX", tmp]
        if args.random_teacher:
            extra += ["DISTILLER.TEACHER_CKPT", random_teacher(base, tmp)]
        loader = synthetic_loader(base.DATASET.TYPE, needed) if args.synthetic else None
        if loader:
            extra += ["DATASET.TRAIN_SUBSET", "0", "DATASET.TEST_SUBSET", "0"]
        ctx = DATASET_REGISTRY.override(base.DATASET.TYPE, loader) if loader else contextlib.nullcontext()
        with ctx:
            variants = [Variant(label, load_config(args.cfg, opts + extra)) for label, opts in variants_opts]
            for v in variants:  # warm-up: allocator, caches, lazily created optimizer state
                v.time_steps(args.warmup)
            for _ in range(args.rounds):
                for v in variants:
                    v.step_times.append(v.time_steps(args.steps))
                    if not args.no_data:
                        v.data_times.append(v.time_with_data(args.steps))
                    v.record_memory()
    results = [v.result() for v in variants]
    for r in results:
        r["ratio_to_first"] = r["ms_per_step"] / results[0]["ms_per_step"]
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results, peak_rss_mb


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True)
    p.add_argument("--steps", type=int, default=10, help="updates per timed round")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates per variant first")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median round is reported")
    p.add_argument("--compare", nargs="+", default=[], metavar="'KEY VALUE ...'",
                   help="variants: extra KEY VALUE pairs each, timed alternately in one process")
    p.add_argument("--synthetic", action="store_true", help="random images of the dataset's shape")
    p.add_argument("--random-teacher", action="store_true", help="a teacher with random weights")
    p.add_argument("--no-data", action="store_true", help="skip the timing through the training loader")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs for every variant")
    args = p.parse_args(argv)
    if args.opts[:1] == ["--"]:  # `--compare A B -- KEY VALUE`: the -- ends the variant list
        args.opts = args.opts[1:]
    results, peak_rss_mb = run(args)
    print(f"{'variant':32s} {'ms/step':>9s} {'img/s':>8s} {'ms/step+data':>13s} {'img/s+data':>11s} {'ratio':>6s}")
    for r in results:
        with_data = (f"{r['ms_per_step_with_data']:13.1f} {r['images_per_s_with_data']:11.1f}"
                     if "ms_per_step_with_data" in r else f"{'':13s} {'':11s}")
        print(f"{r['variant'][:32]:32s} {r['ms_per_step']:9.1f} {r['images_per_s']:8.1f} {with_data} "
              f"{r['ratio_to_first']:6.3f}")
    print(f"batch {results[0]['batch_size']}, device {results[0]['device']}, {results[0]['threads']} threads, "
          f"peak RSS {peak_rss_mb:.0f} MB")
    if args.json:
        print(json.dumps({"results": results, "peak_rss_mb": peak_rss_mb}))


if __name__ == "__main__":
    run_cli(main)
