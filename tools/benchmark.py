"""Time real training steps of any config: ms per step and images/s, with and without data loading, where the
step's time goes, and (--baseline) a full epoch against a plain torchvision + PyTorch KD loop.

    python tools/benchmark.py --cfg configs/cifar100/kd/resnet32x4_resnet8x4.yaml --synthetic --random-teacher
    python tools/benchmark.py --cfg FILE --compare "SOLVER.UPDATE_RULE vanilla" "SOLVER.UPDATE_RULE dot" [-- KEY VALUE ...]
    python tools/benchmark.py --cfg configs/cifar100/kd/resnet32x4_resnet8x4.yaml --synthetic --random-teacher \\
        --compare configs/cifar100/kd/resnet32x4_resnet8x4.yaml configs/cifar100/dkd/resnet32x4_resnet8x4.yaml
    python tools/benchmark.py --cfg configs/cifar100/kd/resnet32x4_resnet8x4.yaml --synthetic --random-teacher \\
        --baseline torchvision --epoch-images 6400 [KEY VALUE ...]

Each variant is a full run built from the config by engine.build_run (the same distiller, update rule and
loop that tools/train.py uses); the steps timed are its Trainer's own `run_step`. "step" times repeat one batch
already on the device (the update alone); "with data" times iterate the real training loader (augmentation and
copies included). With --compare, the variants (extra KEY VALUE pairs each over --cfg, or another config file
first, then its KEY VALUE pairs; all on --cfg's dataset) are built in one process and timed in alternating
rounds, so drifts of a shared machine hit all of them alike; ratios are to the first variant.
KEY VALUE pairs after the options (or after `--`) apply to every variant, the baseline comparison included.

Breakdown (on unless --no-breakdown): the same update on the fixed batch, with a device sync at each phase
boundary (mdistiller/bench/phases.py): teacher forward, student forward, loss (the rest of train_forward),
backward (DOT: its two gradients), optimizer step; ms per step and % of their sum, median over rounds.

--baseline torchvision (CIFAR-100-shaped configs): one training epoch, data included, of the variant's real
Trainer.train_one_epoch and of the plain loop in mdistiller/bench/baseline.py (torchvision CIFAR100, per-sample
PIL transforms, DataLoader with --baseline-workers processes, same models, KD loss, torch SGD), alternated over
--epoch-rounds rounds in this process; speedup = the variant's images/s over the baseline's. --epoch-images
limits the epoch (default: the whole training split).

--synthetic serves random uint8 images of the dataset's shape and class count under its name (an in-memory
DatasetBundle passed to the builder, through the same loader CIFAR-100 uses), for machines without the dataset;
with --baseline the same images are written as CIFAR-100 files for torchvision to read. --random-teacher gives
each variant (and the baseline) a teacher with random weights, in memory (timings do not depend on the
weights). Peak memory: CUDA's allocator peak per variant (and for the baseline); on CPU the process's peak
resident size (shared by everything in the run).

--ops (mdistiller/bench/op_count.py): the aten operations one update dispatches (forward, backward, optimizer) and
the points where the host waits for the device (.item() and friends, data-dependent shapes, device-to-host
copies), for each variant and for a bare PyTorch loop of the same architectures, KD loss and torch SGD
(bench/baseline.BareKD) on the same batch: what launches and waits the framework adds to an update, on any device.

--roofline (mdistiller/bench/roofline.py): each variant's floating-point work per update (PyTorch's FLOP counter
over one more real step), the rate its ms/step achieves, and that rate against a large float32 matmul on the same
device: the float32 step time no implementation of these models and this batch can beat here.
"""

import argparse
import json
import os
import resource
import shlex
import tempfile

import _path  # noqa: F401
import torch

from mdistiller.bench.baseline import BareKD
from mdistiller.bench.device import peak_mb, reset_peak
from mdistiller.bench.op_count import count_ops
from mdistiller.engine.finite_guard import CHECK_EVERY
from mdistiller.bench.phases import PHASES
from mdistiller.bench.random_teacher import random_teacher_state
from mdistiller.bench.roofline import matmul_gflops, roofline, step_flops
from mdistiller.bench.synthetic import SHAPES, SyntheticDataset
from mdistiller.bench.variant import Variant, epoch_result
from mdistiller.config import load_config
from mdistiller.utils.cli import run_cli
from mdistiller.utils.errors import DataError, UserError

BASELINES = ("torchvision",)


def parse_variant(args, spec):
    """(label, config file, overrides) of one --compare entry: 'KEY VALUE ...' over --cfg, or 'FILE.yaml [KEY VALUE
    ...]' for another config (the common KEY VALUE pairs apply to both)."""
    words = shlex.split(spec)
    if words and words[0].endswith((".yaml", ".yml")):
        if not os.path.isfile(words[0]):
            raise UserError(f"--compare variant '{spec}': config file {words[0]} not found")
        return spec, words[0], list(args.opts) + words[1:]
    return spec, args.cfg, list(args.opts) + words


def check_args(args, base):
    if args.synthetic and base.DATASET.TYPE not in SHAPES:
        raise UserError(f"--synthetic knows the shapes of {', '.join(sorted(SHAPES))}, not DATASET.TYPE "
                        f"'{base.DATASET.TYPE}'")
    if not args.baseline:
        return
    if base.DATASET.TYPE != "cifar100":
        raise UserError(f"--baseline torchvision is a CIFAR-100 loop; this config trains on '{base.DATASET.TYPE}'")
    if args.epoch_images and args.epoch_images < base.SOLVER.BATCH_SIZE:
        raise UserError(f"--epoch-images {args.epoch_images} is less than one batch of SOLVER.BATCH_SIZE "
                        f"{base.SOLVER.BATCH_SIZE}")
    if args.baseline_workers is not None and args.baseline_workers < 0:
        raise UserError("--baseline-workers must be >= 0")


def build_baseline(args, variant, synthetic, tmp):
    """The torchvision loop on the variant's images: the generated split written as CIFAR-100 files, or the real
    files under DATASET.ROOT (with the variant's DATASET.TRAIN_SUBSET selection)."""
    from mdistiller.bench.baseline import TorchvisionKD
    from mdistiller.bench.cifar_format import write_cifar100

    cfg, meta = variant.cfg, variant.run.data
    workers = cfg.DATASET.NUM_WORKERS if args.baseline_workers is None else args.baseline_workers
    common = dict(cfg=cfg, device=variant.device, workers=workers, mean=meta.mean, std=meta.std,
                  teacher_state=variant.teacher_state)
    if synthetic is not None:
        root = write_cifar100(os.path.join(tmp, "cifar"), synthetic.train_split, synthetic.test_split)
        return TorchvisionKD(root=root, verify_md5=False, **common)
    try:
        return TorchvisionKD(root=cfg.DATASET.ROOT, subset=cfg.DATASET.TRAIN_SUBSET, **common)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"torchvision's CIFAR100 rejects the copy in {cfg.DATASET.ROOT} ({e})") from None


def time_epochs(args, variants, baseline):
    """Alternating epoch rounds (the order flips every round); returns the baseline's summary."""
    runs, losses, peak = [], [], None
    for r in range(args.epoch_rounds):
        order = [*variants, None] if r % 2 == 0 else [None, *variants]
        for v in order:
            if v is not None:
                v.epoch_round(r + 1)
                continue
            reset_peak(baseline.device)
            n, seconds, step_losses = baseline.epoch()
            p = peak_mb(baseline.device)
            peak = p if peak is None else max(peak, p or 0.0)
            runs.append((n, seconds))
            losses.append(step_losses)
    out = {"name": args.baseline, "workers": baseline.workers, **epoch_result(runs)}
    all_losses = torch.cat(losses)
    out.update({"loss_first": float(all_losses[0]), "loss_last": float(all_losses[-1]),
                "loss_finite": bool(torch.isfinite(all_losses).all())})
    if peak is not None:
        out["peak_cuda_mb"] = peak
    return out


def run(args):
    variants_spec = [parse_variant(args, c) for c in args.compare] or [("config", args.cfg, list(args.opts))]
    base = load_config(args.cfg, args.opts, validate=False)
    check_args(args, base)
    unvalidated = [load_config(cfg_file, opts, validate=False) for _, cfg_file, opts in variants_spec]
    for (label, _, _), cfg in zip(variants_spec, unvalidated):
        if cfg.DATASET.TYPE != base.DATASET.TYPE:
            raise UserError(f"--compare variant '{label}' trains on DATASET.TYPE '{cfg.DATASET.TYPE}', --cfg on "
                            f"'{base.DATASET.TYPE}': compared variants share one dataset")
    needed = max(cfg.SOLVER.BATCH_SIZE for cfg in unvalidated) * (args.steps + args.warmup + 2)
    baseline_summary = None
    with tempfile.TemporaryDirectory() as tmp:
        extra = ["LOG.PREFIX", tmp]
        teachers = {}  # random teacher weights, one per architecture the variants name
        if args.random_teacher:
            for name in dict.fromkeys(cfg.DISTILLER.TEACHER for cfg in unvalidated):
                teachers[name] = random_teacher_state(name, base.DATASET.TYPE)
        synthetic = None
        if args.synthetic:
            num_train = (args.epoch_images or SHAPES[base.DATASET.TYPE][2]) if args.baseline else needed
            synthetic = SyntheticDataset(base.DATASET.TYPE, num_train)
            extra += ["DATASET.TRAIN_SUBSET", "0", "DATASET.TEST_SUBSET", "0"]
        elif args.baseline and args.epoch_images:
            extra += ["DATASET.TRAIN_SUBSET", str(args.epoch_images)]
        variants = []
        for label, cfg_file, opts in variants_spec:
            cfg = load_config(cfg_file, opts + extra)
            variants.append(Variant(label, cfg, bundle=synthetic(cfg) if synthetic else None,
                                    teacher_state=teachers.get(cfg.DISTILLER.TEACHER)))
        baseline = build_baseline(args, variants[0], synthetic, tmp) if args.baseline else None
        for v in variants:  # warm-up: allocator, caches, lazily created optimizer state
            if args.warmup:
                v.time_steps(args.warmup)
        for _ in range(args.rounds):
            for v in variants:
                v.round(args.steps, with_data=not args.no_data, breakdown=not args.no_breakdown)
        if args.ops:  # after the timings: one more update of each variant, and of the bare loop, counted
            span = CHECK_EVERY  # one period of the finite guard's check: its sync is counted at its rate
            ops = {v.label: count_ops(lambda v=v: v.loop_steps(span), span) for v in variants}
            first = variants[0]
            bare = BareKD(first.cfg, first.run.data.num_classes, first.run.data.image_size, first.device,
                          teachers.get(first.cfg.DISTILLER.TEACHER))
            images, labels = first.batch[0], first.batch[1]
            bare.step(images, labels)  # lazily created optimizer state, as the variants' warm-up
            bare_ops = count_ops(lambda: [bare.step(images, labels) for _ in range(span)], span)
        if args.roofline:  # after the timings: the counted step is one more update of each variant
            flops = {v.label: step_flops(lambda v=v: v._step(v.batch)) for v in variants}
            matmul = matmul_gflops(variants[0].device)
        if baseline is not None:
            baseline.warmup(args.warmup)
            baseline_summary = time_epochs(args, variants, baseline)
    results = [v.result() for v in variants]
    for r in results:
        r["ratio_to_first"] = r["ms_per_step"] / results[0]["ms_per_step"]
        if args.ops:
            r["ops"] = {**ops[r["variant"]], "bare": bare_ops}
        if baseline_summary:
            r["speedup_vs_baseline"] = r["epoch"]["images_per_s"] / baseline_summary["images_per_s"]
        if args.roofline:
            r["roofline"] = roofline(flops[r["variant"]], r["ms_per_step"] / 1e3, r["batch_size"], matmul)
            r["roofline"]["matmul_gflops"] = matmul
            if baseline_summary:
                r["roofline"]["bound_vs_baseline"] = (r["roofline"]["bound_images_per_s"]
                                                      / baseline_summary["images_per_s"])
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    notes = [f"the baseline is KD; variant '{v.label}' runs DISTILLER.TYPE {v.cfg.DISTILLER.TYPE}"
             for v in variants if (baseline_summary or args.ops) and v.cfg.DISTILLER.TYPE != "KD"]
    return results, peak_rss_mb, baseline_summary, notes


def print_report(args, results, peak_rss_mb, baseline, notes):
    w = max([32] + [len(r["variant"]) for r in results])  # whole labels: "... dot" must not be cut off
    print(f"{'variant':{w}s} {'ms/step':>9s} {'img/s':>8s} {'ms/step+data':>13s} {'img/s+data':>11s} {'ratio':>6s}")
    for r in results:
        with_data = (f"{r['ms_per_step_with_data']:13.1f} {r['images_per_s_with_data']:11.1f}"
                     if "ms_per_step_with_data" in r else f"{'':13s} {'':11s}")
        print(f"{r['variant']:{w}s} {r['ms_per_step']:9.1f} {r['images_per_s']:8.1f} {with_data} "
              f"{r['ratio_to_first']:6.3f}")
    if "breakdown" in results[0]:
        print(f"\nwhere a step goes: ms and % of the phases' sum (median of {args.rounds} rounds of {args.steps} "
              "steps, device synced at each phase boundary)")
        print(f"{'variant':{w}s} " + " ".join(f"{p:>14s}" for p in PHASES) + f" {'sum ms':>8s} {'peak MB':>8s}")
        for r in results:
            cells = " ".join(f"{r['breakdown'][p]['ms']:8.1f} {r['breakdown'][p]['pct']:4.0f}%" for p in PHASES)
            peak = f"{r['peak_cuda_mb']:8.0f}" if "peak_cuda_mb" in r else f"{'-':>8s}"
            print(f"{r['variant']:{w}s} {cells} {r['breakdown_sum_ms']:8.1f} {peak}")
    if baseline:
        print(f"\nepoch, data included: {baseline['images']} images per epoch, median of {baseline['rounds']} "
              "alternating round(s)")
        e = w + 18
        print(f"{'':{e}s} {'img/s':>9s} {'speedup':>8s}")
        for r in results:
            print(f"{'mdistiller epoch: ' + r['variant']:{e}s} {r['epoch']['images_per_s']:9.1f} "
                  f"{r['speedup_vs_baseline']:8.2f}")
        label = f"{baseline['name']} baseline ({baseline['workers']} workers)"
        print(f"{label:{e}s} {baseline['images_per_s']:9.1f} {1.0:8.2f}")
    if "ops" in results[0]:
        bare = results[0]["ops"]["bare"]
        print(f"\noperations per update (aten calls dispatched; host waits for the device) against a bare PyTorch "
              f"KD loop of the same models and torch SGD: {bare['aten_ops']:.0f} ops, {bare['syncs']:.0f} syncs")
        print(f"{'variant':{w}s} {'aten ops':>9s} {'x bare':>7s} {'syncs':>6s}  where the syncs are")
        for r in results:
            o = r["ops"]
            where = ", ".join(f"{k} {v:g}" for k, v in o["sync_ops"].items()) or "-"
            print(f"{r['variant']:{w}s} {o['aten_ops']:9.0f} {o['aten_ops'] / bare['aten_ops']:7.2f} "
                  f"{o['syncs']:6.2f}  {where}")
    if "roofline" in results[0]:
        rl = results[0]["roofline"]
        print(f"\nroofline: float work of one step (torch.utils.flop_counter; int8 kernels and elementwise ops count "
              f"0) against a 2048^3 float32 matmul at {rl['matmul_gflops']:.1f} GFLOP/s")
        vs = "bound/baseline" if "bound_vs_baseline" in rl else ""
        print(f"{'variant':{w}s} {'GFLOP/step':>10s} {'GFLOP/s':>8s} {'% matmul':>9s} {'bound ms':>9s} "
              f"{'bound img/s':>11s} {vs:>14s}")
        for r in results:
            rl = r["roofline"]
            bound = f"{rl['bound_images_per_s']:11.1f}" if rl["bound_images_per_s"] else f"{'-':>11s}"
            tail = f" {rl['bound_vs_baseline']:14.2f}" if "bound_vs_baseline" in rl else ""
            print(f"{r['variant']:{w}s} {rl['gflop_per_step']:10.1f} {rl['achieved_gflops']:8.1f} "
                  f"{rl['pct_of_matmul']:8.0f}% {rl['bound_ms_per_step']:9.1f} {bound}{tail}")
    for note in notes:
        print(f"note: {note}")
    print(f"batch {results[0]['batch_size']}, device {results[0]['device']}, {results[0]['threads']} threads, "
          f"peak RSS {peak_rss_mb:.0f} MB")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True)
    p.add_argument("--steps", type=int, default=10, help="updates per timed round")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates per variant first")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median round is reported")
    p.add_argument("--compare", nargs="+", default=[], metavar="'KEY VALUE ...'",
                   help="variants: extra KEY VALUE pairs each (or a config file first), timed alternately")
    p.add_argument("--synthetic", action="store_true", help="random images of the dataset's shape")
    p.add_argument("--random-teacher", action="store_true", help="a teacher with random weights")
    p.add_argument("--no-data", action="store_true", help="skip the timing through the training loader")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-phase timing of the step")
    p.add_argument("--baseline", choices=BASELINES, help="also time one epoch of this plain loop and of each variant")
    p.add_argument("--baseline-workers", type=int, default=None,
                   help="DataLoader processes of the baseline (default DATASET.NUM_WORKERS)")
    p.add_argument("--epoch-images", type=int, default=0,
                   help="images per timed epoch (default 0: the whole training split)")
    p.add_argument("--epoch-rounds", type=int, default=1, help="epochs timed per variant and for the baseline")
    p.add_argument("--roofline", action="store_true",
                   help="count each variant's FLOPs per step and compare with the device's float32 matmul rate")
    p.add_argument("--ops", action="store_true",
                   help="count the aten operations and host synchronisations of one update, and a bare loop's")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs for every variant")
    args = p.parse_args(argv)
    if args.opts[:1] == ["--"]:  # `--compare A B -- KEY VALUE`: the -- ends the variant list
        args.opts = args.opts[1:]
    for name in ("steps", "rounds", "epoch_rounds"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.epoch_images < 0:
        raise UserError("--warmup and --epoch-images must be >= 0")
    results, peak_rss_mb, baseline, notes = run(args)
    print_report(args, results, peak_rss_mb, baseline, notes)
    if args.json:
        out = {"results": results, "peak_rss_mb": peak_rss_mb}
        if baseline:
            out["baseline"] = baseline
        print(json.dumps(out))


if __name__ == "__main__":
    run_cli(main)
