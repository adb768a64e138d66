"""Optional Weights & Biases logging (LOG.WANDB True), beside TensorBoard, which stays the default.

The same scalars as the TensorBoard hook, under the same names and against the same x axis: train/<loss> and
train/lr every LOG.TENSORBOARD_FREQ iterations, epoch/<key> once per epoch, plotted against
`trainer/global_step` (logged with each row). wandb's own step only ever grows, so the rows a resumed run logs
again for iterations a crashed run had already logged are kept, not dropped. The resolved config is the wandb
run's config. One wandb run per run directory: its id is kept in <run>/wandb_run_id, so `--resume` continues the
same wandb run. The main process logs for the job (the hook is added on rank 0 only, as the TensorBoard one).
WANDB_MODE, WANDB_DIR, WANDB_ENTITY and the other wandb variables work as usual; without WANDB_DIR, wandb's files
go to <run>/wandb/.
"""

import os
import secrets

import yaml

from ..config.validate import WANDB_MISSING
from ..utils.errors import ConfigError
from ..utils import distributed
from ..utils.run_dir_io import writing
from .hooks import HookBase

#: the file in the run directory that holds the wandb run id
RUN_ID_FILE = "wandb_run_id"
STEP_KEY = "trainer/global_step"


def require_wandb():
    """The wandb module; LOG.WANDB True without the package is one ConfigError line naming the install."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"config key LOG.WANDB: {WANDB_MISSING}") from None
    return wandb


def run_id(run_dir):
    """The wandb run id of this run directory: the one kept there, else a new one, written before first use."""
    path = os.path.join(run_dir, RUN_ID_FILE)
    if os.path.isfile(path):
        with writing("read", path), open(path) as f:
            kept = f.read().strip()
        if kept:
            return kept
    new = secrets.token_hex(6)  # lower-case letters and digits, as wandb run ids are
    with writing("write", path):
        with open(path + ".tmp", "w") as f:
            f.write(new + "\n")
        os.replace(path + ".tmp", path)
    return new


class WandbHook(HookBase):
    def __init__(self, *, run_dir, project, freq, config, epoch_keys):
        """`freq`: steps between training scalars (LOG.TENSORBOARD_FREQ); `config`: the run's config as a dict;
        `epoch_keys`: the epoch record's keys to log (the task's epoch_scalars)."""
        self.wandb = require_wandb()
        self.run_dir, self.project, self.freq, self.config, self.run = run_dir, project, freq, config, None
        self.epoch_keys = tuple(epoch_keys)

    @classmethod
    def from_config(cls, cfg):
        return {"project": cfg.LOG.WANDB_PROJECT, "freq": cfg.LOG.TENSORBOARD_FREQ,
                "config": yaml.safe_load(cfg.dump())}

    def before_train(self):
        if distributed.rank() != 0:
            return
        self.run = self.wandb.init(
            project=self.project, name=os.path.basename(os.path.normpath(self.run_dir)),
            id=run_id(self.run_dir), resume="allow",
            dir=os.environ.get("WANDB_DIR") or self.run_dir,
            config=self.config, allow_val_change=True)
        self.run.define_metric(STEP_KEY)
        for pattern in ("train/*", "epoch/*"):
            self.run.define_metric(pattern, step_metric=STEP_KEY)

    def after_step(self, step):
        n = self.trainer.global_step
        if self.run is not None and self.freq and n % self.freq == 0:
            row = {f"train/{name}": float(value) for name, value in step.scalars().items()}
            row["train/lr"] = self.trainer.lr
            self.run.log({**row, STEP_KEY: n})

    def after_epoch(self, record):
        if self.run is None:
            return
        row = {f"epoch/{key}": record[key] for key in self.epoch_keys if key in record}
        self.run.log({**row, STEP_KEY: self.trainer.global_step})

    def after_train(self):
        if self.run is not None:
            self.run.finish()
            self.run = None
