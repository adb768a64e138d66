"""Worker for tests/test_detection_train.py, started by torchrun (2 gloo processes) or by python (one process).

    detection_ddp_worker.py steps OUT --steps N --cfg FILE [KEY VALUE ...]
        N updates of the configured detection run through Trainer.run_step, in float64; rank 0 saves the learnable
        state before and after to OUT (the DDP == one process comparison).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from mdistiller.config import load_config  # noqa: E402
from mdistiller.engine.build import build_run  # noqa: E402
from mdistiller.utils import distributed  # noqa: E402


def steps(out, n, cfg_file, opts):
    cfg = load_config(cfg_file, opts)
    torch.set_default_dtype(torch.float64)
    run = build_run(cfg)
    trainer = run.trainer
    trainer.distiller.double()
    initial = {k: v.detach().cpu().clone() for k, v in trainer.distiller.learnable_state_dict().items()}
    loader = trainer.train_loader
    loader.set_epoch(0)
    for it, (images, targets, index) in enumerate(loader):
        if it == n:
            break
        trainer.distiller.train()
        trainer.set_lr(cfg.SOLVER.LR)
        trainer.run_step([im.double() for im in images], targets, index, 1)
    if trainer.rank == 0:
        final = {k: v.detach().cpu() for k, v in trainer.distiller.learnable_state_dict().items()}
        torch.save({"initial": initial, "final": final}, out)
    distributed.teardown(synchronize=True)


if __name__ == "__main__":
    assert sys.argv[1] == "steps" and sys.argv[3] == "--steps" and sys.argv[5] == "--cfg"
    steps(sys.argv[2], int(sys.argv[4]), sys.argv[6], sys.argv[7:])
