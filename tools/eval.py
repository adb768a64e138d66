"""Evaluate a checkpoint on a dataset's test split: ours (student_*.pth, latest.pth, best.pth) or published ones.

    python tools/eval.py -m resnet8 -c output/<run>/student_best.pth -d fashion_mnist [--json]
    python tools/eval.py -c output/<run>/student_best.pth --run-config output/<run>/config.yaml

--run-config takes the model (the run's DISTILLER.STUDENT; -m may name another), the dataset settings (root, test
subset, test batch size) and the evaluation fast paths (SPEED: channels-last layout, autocast, as resolved on this
device) of the run that wrote the checkpoint, so the number printed is the one the run reported. Without it the model is evaluated in plain float32.

--int8 (CPU) also evaluates the model as the int8 graph SPEED.TEACHER_INT8 would make of it (calibrated on the
first SPEED.TEACHER_INT8_CALIBRATION un-augmented training images, so the training split must be there), and
prints both accuracies, the share of test images whose argmax agrees and the relative L2 distance of the logits:
what a teacher loses before it is used in int8.
"""

import argparse
import json
import os
import sys

import _path  # noqa: F401
import torch

from mdistiller.config import load_config
from mdistiller.data import build_dataloaders
from mdistiller.engine import evaluate
from mdistiller.engine.speed import recorded_plan, resolve_speed
from mdistiller.models import build_model
from mdistiller.utils.checkpoint import load_file, load_weights
from mdistiller.utils.cli import run_cli
from mdistiller.utils.env import resolve_device, seed_everything
from mdistiller.utils.errors import CheckpointError, UserError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", help="model name, e.g. resnet32x4 (default: the run config's DISTILLER.STUDENT)")
    p.add_argument("-c", "--ckpt", required=True, help="checkpoint file")
    p.add_argument("-d", "--dataset", help="DATASET.TYPE (default: the run config's, else fashion_mnist)")
    p.add_argument("--run-config", help="config.yaml of the run that wrote the checkpoint")
    p.add_argument("--root", help="DATASET.ROOT")
    p.add_argument("--test-subset", type=int, help="DATASET.TEST_SUBSET (0 = the whole test split)")
    p.add_argument("-b", "--batch-size", type=int, help="DATASET.TEST.BATCH_SIZE")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--int8", action="store_true", help="also evaluate the model as an int8 teacher (CPU)")
    p.add_argument("--json", action="store_true", help="end with one JSON line {top1, top5, loss, num}")
    args = p.parse_args(argv)
    if args.model is None:
        if not args.run_config:
            raise UserError("name the model with -m MODEL (e.g. -m resnet8), or give --run-config "
                            "<run>/config.yaml, whose DISTILLER.STUDENT is the model")
        args.model = load_config(args.run_config, validate=False).DISTILLER.STUDENT

    overrides = ["DISTILLER.TYPE", "NONE", "DISTILLER.STUDENT", args.model, "EXPERIMENT.DEVICE", args.device]
    for key, value in (("DATASET.TYPE", args.dataset), ("DATASET.ROOT", args.root),
                       ("DATASET.TEST_SUBSET", args.test_subset), ("DATASET.TEST.BATCH_SIZE", args.batch_size)):
        if value is not None:
            overrides += [key, str(value)]
    if args.run_config:
        run_cfg = load_config(args.run_config, overrides, validate=False)
        if run_cfg.SPEED.AMP == "fp16" and resolve_device(run_cfg.EXPERIMENT.DEVICE).type != "cuda":
            # fp16 autocast exists on CUDA only; the checkpoint's weights are float32 either way
            print("note: the run trained with SPEED.AMP fp16, which only CUDA runs; evaluating in float32, so the "
                  "numbers may differ slightly from the run's", file=sys.stderr)
            overrides += ["SPEED.AMP", "off"]
    cfg = load_config(args.run_config, overrides)
    if args.run_config and cfg.DATASET.TYPE != (args.dataset or cfg.DATASET.TYPE):
        raise UserError("--dataset disagrees with --run-config")
    device = resolve_device(cfg.EXPERIMENT.DEVICE)
    seed_everything(cfg.EXPERIMENT.SEED, cfg.EXPERIMENT.DETERMINISTIC)
    _, test_loader, meta = build_dataloaders(cfg, device, only_test=True)
    model = build_model(args.model, num_classes=meta.num_classes, image_size=meta.image_size)
    saved = load_file(args.ckpt)
    if isinstance(saved, dict) and "method_state" in saved:
        model = method_model(saved, args, model, meta)
    else:
        load_weights(model, args.ckpt, args.model)
    model.to(device)
    speed = None
    if args.run_config:
        # the fast paths the run resolved (its summary.json), so that "auto" means here what it meant there
        speed = resolve_speed(cfg, device, recorded=recorded_plan(os.path.dirname(args.run_config)))
        if speed.channels_last:
            model.to(memory_format=torch.channels_last)
    result = evaluate(model, test_loader, speed=speed)
    print(f"{args.model} on {meta.name} test ({result['num']} images): top-1 {result['top1']:.2f}  "
          f"top-5 {result['top5']:.2f}")
    out = {"top1": result["top1"], "top5": result["top5"], "loss": result["loss"], "num": result["num"]}
    if args.int8:
        out["int8"] = evaluate_int8(model, cfg, device, test_loader, speed)
        i8 = out["int8"]
        print(f"int8 ({i8['calibration_images']} calibration images): top-1 {i8['top1']:.2f}  top-5 {i8['top5']:.2f}  "
              f"argmax agreement {100 * i8['argmax_agreement']:.2f}%  logits rel. L2 {i8['logits_rel_l2']:.4f}")
    if args.json:
        print(json.dumps(out))


def method_model(saved, args, student, meta):
    """The trained method of a student file whose predictions need the method's own modules (SimKD): the run's
    method built on `student` and an untrained teacher of the run's architecture (the file holds every weight its
    evaluation reads), loaded with the file's method_state."""
    from mdistiller.distillers import DISTILLER_REGISTRY

    if not args.run_config or args.int8:
        raise UserError(f"{args.ckpt} is the student of a {saved.get('method')} run, whose predictions go through the "
                        "method's own modules: evaluate it with --run-config <its run>/config.yaml"
                        f"{' (and without --int8)' if args.int8 else ''}")
    run_cfg = load_config(args.run_config, validate=False)
    if run_cfg.DISTILLER.STUDENT != args.model:
        raise UserError(f"{args.ckpt} holds a {run_cfg.DISTILLER.STUDENT} student of a {saved.get('method')} run; "
                        f"-m {args.model} cannot evaluate it (leave -m out)")
    method, _ = DISTILLER_REGISTRY.resolve(run_cfg.DISTILLER.TYPE, "DISTILLER.TYPE")
    teacher = build_model(run_cfg.DISTILLER.TEACHER, num_classes=meta.num_classes, image_size=meta.image_size)
    distiller = method.build(run_cfg, student, teacher, meta)
    try:
        distiller.load_learnable_state_dict(saved["method_state"])
    except RuntimeError as e:
        raise CheckpointError(f"{args.ckpt} does not fit the {run_cfg.DISTILLER.TYPE} method of "
                              f"{args.run_config}: {e}") from None
    return distiller


def evaluate_int8(model, cfg, device, test_loader, speed):
    if device.type != "cpu":
        raise UserError(f"--int8 evaluates the CPU's int8 kernels; use --device cpu (not {device})")
    from mdistiller.data.unaugmented import unaugmented_train_loader
    from mdistiller.engine.teacher_int8 import compare_outputs, quantize_int8

    n = cfg.SPEED.TEACHER_INT8_CALIBRATION
    int8 = quantize_int8(model, unaugmented_train_loader(cfg, device), n, name="model")
    result = evaluate(int8, test_loader, speed=speed)
    return {"top1": result["top1"], "top5": result["top5"], "loss": result["loss"], "calibration_images": n,
            **compare_outputs(model, int8, test_loader)}


if __name__ == "__main__":
    run_cli(main)
