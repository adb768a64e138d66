"""Train a student (alone, or distilled from a teacher) from a config.

    python tools/train.py --cfg configs/fashion_mnist/vanilla/resnet8.yaml [--resume] [KEY VALUE ...] [--resume]
    torchrun --nproc_per_node=4 tools/train.py --cfg ...      # DistributedDataParallel, SOLVER.BATCH_SIZE global

Writes <LOG.PREFIX>/<run name>/ with config.yaml, train.log, metrics.jsonl, summary.json, TensorBoard events and
checkpoints; --resume continues an interrupted run exactly where its last checkpoint left it. --resume with a
larger SOLVER.EPOCHS extends a finished run: training continues from latest.pth as if the run had been started
with that many epochs, provided the epochs already trained keep their learning rates (decay stages may be added
past them) and no other key changes; anything else is refused with the key named.

    python tools/train.py --cfg configs/fashion_mnist/vanilla/resnet8.yaml --resume SOLVER.EPOCHS 8

Your own method (loss term, update rule, dataset) in a file of its own is imported with --import before the config
is read, and is then selectable like the package's:

    python tools/train.py --import my_fitnet.py --cfg configs/fashion_mnist/kd/resnet20_resnet8.yaml \
        DISTILLER.TYPE MYFITNET

Several seeds, each run exactly as its lone command `--cfg FILE EXPERIMENT.SEED s ...` (same run directory,
checkpoints and numbers), 2 at a time as child processes sharing this machine's CPU threads or GPU
(mdistiller/engine/multi_run.py):

    python tools/train.py --seeds 0 1 2 3 4 --runs-per-device 2 --cfg configs/fashion_mnist/kd/resnet20_resnet8.yaml
"""

import argparse

import _path  # noqa: F401

from mdistiller.config import load_config
from mdistiller.utils import distributed
from mdistiller.engine.launch import train_from_config
from mdistiller.engine.multi_run import train_seeds
from mdistiller.engine.task import build_task
from mdistiller.utils.cli import import_components, parse_args_anywhere, run_cli
from mdistiller.utils.errors import UserError


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="config file (YAML) over the package defaults")
    parser.add_argument("--resume", action="store_true", help="continue the run from its latest.pth (with a larger SOLVER.EPOCHS: extend it)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="import a module (dotted name) or a .py file first: the components it registers (your "
                             "method, loss term, update rule, dataset) become selectable; repeatable")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help="train one run per seed, each as `EXPERIMENT.SEED s` alone would (give it before --cfg)")
    parser.add_argument("--runs-per-device", type=int, metavar="N",
                        help="with --seeds: N runs at a time, child processes on one device, CPU threads divided "
                             "among them (default 1)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs overriding the config")
    args = parse_args_anywhere(parser, argv)  # --resume also after the KEY VALUE pairs
    import_components(args.imports)
    if args.seeds is not None:
        return train_seeds(args.cfg, args.seeds, args.opts, resume=args.resume, imports=args.imports,
                           runs_per_device=args.runs_per_device)
    if args.runs_per_device is not None:
        raise UserError("--runs-per-device: only with --seeds")
    cfg = load_config(args.cfg, args.opts)
    finished = False
    try:
        summary = train_from_config(cfg, resume=args.resume)
        if distributed.rank() == 0:
            print(f"{build_task(cfg).result_line(summary)}  run {summary['run_dir']}")
        finished = True
    finally:
        distributed.teardown(synchronize=finished)


if __name__ == "__main__":
    run_cli(main)
