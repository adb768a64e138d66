"""Worker for tests/test_distributed.py, started by torchrun (several processes) or by python (one process).

    ddp_worker.py train STATE_DIR --cfg FILE [KEY VALUE ...]
        tools/train.py's own main(), plus a hook that saves this rank's learnable state (student, extra modules,
        CRD memory, ...) to STATE_DIR/rank<r>.pt when training ends, so a test can compare the ranks; with
        CRASH_AFTER_EPOCH=N in the environment every rank stops after epoch N; with INIT_STUDENT=PATH every rank's
        student starts from the weights in PATH (a student_*.pth file) instead of its random initialisation.
    ddp_worker.py steps OUT --steps N --cfg FILE [KEY VALUE ...]
        N updates through the configured Trainer's run_step in float64 with every BatchNorm of the student and of
        the method's modules in eval mode, at epoch 1 or, with STEP_EPOCHS=1,2,... in the environment, N at each of
        those epochs; rank 0 saves the learnable state before and after to OUT (the DDP == one process comparison).
    ddp_worker.py fail-on-rank R --cfg FILE [KEY VALUE ...]
        tools/train.py main() where rank R alone gets a teacher checkpoint path that does not exist (one node
        with a wrong path).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

import train as train_tool  # noqa: E402  (tools/train.py)
from mdistiller.config import load_config  # noqa: E402
from mdistiller.engine import HookBase, build_run  # noqa: E402
from mdistiller.engine import launch  # noqa: E402
from mdistiller.utils import distributed  # noqa: E402
from mdistiller.utils.checkpoint import load_weights  # noqa: E402
from mdistiller.utils.cli import run_cli  # noqa: E402
from test_engine import CrashAfterEpoch  # noqa: E402  (every rank stops after that epoch, as a killed job)


class SaveRankState(HookBase):
    def __init__(self, directory):
        self.directory = directory

    def after_train(self):
        os.makedirs(self.directory, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.trainer.distiller.learnable_state_dict().items()}
        torch.save(state, os.path.join(self.directory, f"rank{self.trainer.rank}.pt"))


class InitStudent(HookBase):
    """Loads a trained student's weights before the first step (every rank the same file, so the ranks agree)."""

    def __init__(self, path):
        self.path = path

    def before_train(self):
        load_weights(self.trainer.distiller.student, self.path, "the student")  # in place: DDP's own tensors


def train(state_dir, argv):
    original = launch.train_from_config
    crash = int(os.environ.get("CRASH_AFTER_EPOCH", 0))
    init = os.environ.get("INIT_STUDENT")

    def with_hook(cfg, resume=False, extra_hooks=()):
        hooks = [*extra_hooks, SaveRankState(state_dir)] + ([CrashAfterEpoch(crash)] if crash else [])
        hooks += [InitStudent(init)] if init else []
        return original(cfg, resume, hooks)

    train_tool.train_from_config = with_hook
    run_cli(train_tool.main, argv)


def steps(out, n, argv):
    cfg_file, opts = argv[1], argv[2:]
    cfg = load_config(cfg_file, opts)
    torch.set_default_dtype(torch.float64)  # built in float64, so DDP's gradient buckets are float64 too
    trainer = build_run(cfg).trainer
    trainer.distiller.double()  # the teacher checkpoint was float32
    initial = {k: v.detach().cpu().clone() for k, v in trainer.distiller.learnable_state_dict().items()}
    loader = trainer.train_loader
    for epoch in [int(e) for e in os.environ.get("STEP_EPOCHS", "1").split(",")]:
        loader.set_epoch(epoch - 1)
        for it, (images, labels, index) in enumerate(loader):
            if it == n:
                break
            trainer.distiller.train()
            for m in trainer.distiller.modules():  # the student's and any method module's (FT's paraphraser)
                if isinstance(m, _BatchNorm):
                    m.eval()
            trainer.set_lr(cfg.SOLVER.LR)
            trainer.run_step(images.double(), labels, index, epoch)
    if trainer.rank == 0:
        final = {k: v.detach().cpu() for k, v in trainer.distiller.learnable_state_dict().items()}
        torch.save({"initial": initial, "final": final}, out)
    distributed.teardown(synchronize=True)


def fail_on_rank(bad_rank, argv):
    if int(os.environ.get("RANK", 0)) == bad_rank:
        argv = argv + ["DISTILLER.TEACHER_CKPT", "/nonexistent/node/teacher.pth"]
    run_cli(train_tool.main, argv)


if __name__ == "__main__":
    mode, arg = sys.argv[1], sys.argv[2]
    rest = sys.argv[3:]
    if mode == "train":
        train(arg, rest)
    elif mode == "steps":
        assert rest[0] == "--steps"
        steps(arg, int(rest[1]), rest[2:])
    elif mode == "fail-on-rank":
        fail_on_rank(int(arg), rest)
    else:
        raise SystemExit(f"unknown mode {mode}")
