"""Which distillation methods run with which model families: one short run of every method on each teacher ->
student family pair, printed as the README's table (methods that run; methods refused, with their one line).

    python tools/method_survey.py                     # every registered method, the four pairs below
    python tools/method_survey.py --methods KD FSP    # some methods only
    python tools/method_survey.py --pairs ours vit    # some family pairs only
    python tools/method_survey.py --out survey.md     # also write the table as markdown

Random weights and synthetic 32x32 images (nothing is downloaded): this checks that the method can be built and
takes two update steps on the pair (one epoch of each stage where the method has an initialisation stage), not
that it distils well. The "++" variants are left out (each adds the same term to its base method;
tests/test_train_every_method.py trains them).
"""

import argparse
import sys
import tempfile
import traceback

import _path  # noqa: F401
import torch

from mdistiller.bench.synthetic import SyntheticDataset
from mdistiller.config import load_config
from mdistiller.distillers import DISTILLER_REGISTRY
from mdistiller.engine import build_run
from mdistiller.models import build_model
from mdistiller.utils.errors import UserError

# --pairs name -> (the table's row label, teacher, student), the models tests/test_external_models.py uses
PAIRS = {"ours": ("ours -> ours", "resnet20", "resnet8"),
         "timm": ("timm CNN -> timm CNN", "timm:resnet18", "timm:resnet10t"),
         "torchvision": ("torchvision CNN -> torchvision CNN", "torchvision:resnet18",
                         "torchvision:mobilenet_v3_small"),
         "vit": ("timm ViT -> our CNN", "timm:vit_tiny_patch16_224", "resnet8")}
# keys that keep a survey run small: CRD's memory bank of 8 negatives instead of 16384 (a method whose recipe starts
# with an initialisation stage runs two steps of that stage)
SMALL_KEYS = {"CRD": ["CRD.NCE_K", "8"]}
DATA = SyntheticDataset("fashion_mnist", 32, 16)


def survey_cfg(method, teacher, student):
    """Two epochs of one step; a method with an initialisation stage (a section key INIT_EPOCHS) gets one epoch of
    it and one of distillation."""
    keys = ["DISTILLER.TYPE", method, "DISTILLER.TEACHER", teacher, "DISTILLER.STUDENT", student,
            "EXPERIMENT.DEVICE", "cpu", "SOLVER.BATCH_SIZE", "16", "SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES",
            "[2]", "DATASET.ROOT", "/nonexistent", "LOG.PRINT_FREQ", "0", "LOG.MONITOR_TEACHER", "False",
            "LOG.TENSORBOARD_FREQ", "0", *SMALL_KEYS.get(method, [])]
    section = load_config(None, keys[:2]).get(method.rstrip("+"))
    if section is not None and "INIT_EPOCHS" in section:
        keys += [f"{method.rstrip('+')}.INIT_EPOCHS", "1"]
    return load_config(None, keys)


def teacher_state(name):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return build_model(name, num_classes=10, image_size=32).state_dict()


def try_method(method, teacher, student, state, run_dir):
    """None if two steps of the method train on the pair, else the one line that refuses it."""
    try:
        cfg = survey_cfg(method, teacher, student)
        cfg.defrost()
        cfg.LOG.PREFIX = run_dir
        cfg.freeze()
        run = build_run(cfg, bundle=DATA(cfg), teacher_state=state)
        run.trainer.train()
        return None
    except UserError as e:
        return str(e).splitlines()[0]
    except Exception as e:  # a crash is a finding too: show where
        return f"CRASH {type(e).__name__}: {e} ({traceback.extract_tb(e.__traceback__)[-1].name})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="*", help="DISTILLER.TYPE names (default: every registered method)")
    parser.add_argument("--pairs", nargs="*", choices=sorted(PAIRS), default=list(PAIRS),
                        help="family pairs to survey (default: all four)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    methods = args.methods or [m for m in DISTILLER_REGISTRY.names() if not m.endswith("++") and m != "NONE"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair, teacher, student in (PAIRS[name] for name in args.pairs):
            state = teacher_state(teacher)
            runs, refused = [], []
            for method in methods:
                why = try_method(method, teacher, student, state, tmp)
                print(f"{pair:36s} {method:10s} {'runs' if why is None else why}", file=sys.stderr, flush=True)
                (runs if why is None else refused).append(method if why is None else f"{method} ({why})")
            rows.append(f"| {pair} | {', '.join(runs) or '-'} | {'; '.join(refused) or '-'} |")
    table = "\n".join(["| teacher -> student | methods that run | refused, with the line saying why |",
                       "|---|---|---|", *rows])
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
