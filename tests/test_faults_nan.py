"""Fault injection: non-finite losses stop a run with one message and leave the last good checkpoints alone;
non-finite or negative config values and unreadable config files are refused with one line naming the problem.

Runs are tiny (320 Fashion-MNIST training images, batch 32: 10 steps an epoch) with a random-weight resnet20
teacher: divergence does not need a good teacher. The expected step numbers come from the arithmetic of each
fault (a weight of 1e38 overflows the first gradient; a temperature of 1e20 makes T^2 = 1e40 overflow float32 and
multiply a KL of 0), not from a previous run's output.

Run as a script under torchrun (`test_faults_nan.py ddp-nan-on-rank R STEP --cfg ...`) it is the worker of the
two-process test: rank R alone poisons its batch at global step STEP.
"""

import hashlib
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mdistiller.bench.random_teacher import write_random_teacher  # noqa: E402
from mdistiller.config import get_cfg_defaults, load_config  # noqa: E402
from mdistiller.config.validate import loss_weight_keys  # noqa: E402
from mdistiller.engine import HookBase, build_run  # noqa: E402
from mdistiller.engine.finite_guard import FiniteGuard  # noqa: E402
from mdistiller.engine.launch import train_from_config  # noqa: E402
from mdistiller.engine.train_hooks import FiniteGuardHook  # noqa: E402
from mdistiller.utils.errors import ConfigError, TrainingDivergedError  # noqa: E402

FM = os.path.join(ROOT, "configs", "fashion_mnist")
KD_CFG = os.path.join(FM, "kd", "resnet20_resnet8.yaml")
TRAIN = os.path.join(ROOT, "tools", "train.py")
ITERS = 10  # 320 images / batch 32
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CHECKPOINTS = ("latest.pth", "best.pth", "student_last.pth", "student_best.pth", "ckpt_epoch_1.pth")


def small(prefix, name, teacher, *extra):
    return ["EXPERIMENT.DEVICE", "cpu", "LOG.PREFIX", str(prefix), "EXPERIMENT.NAME", name,
            "DATASET.TRAIN_SUBSET", "320", "DATASET.TEST_SUBSET", "100", "SOLVER.BATCH_SIZE", "32",
            "SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES", "[]", "LOG.TENSORBOARD_FREQ", "0",
            "LOG.SAVE_CHECKPOINT_FREQ", "1", "DISTILLER.TEACHER_CKPT", teacher, *extra]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return write_random_teacher(tmp_path_factory.mktemp("teacher") / "resnet20.pth", "resnet20", "fashion_mnist",
                                seed=1)


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=ROOT)


def digests(run_dir):
    out = {}
    for name in CHECKPOINTS:
        with open(os.path.join(run_dir, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


# --- divergence stops the run -----------------------------------------------------------------------------------
@pytest.mark.parametrize("trainer", ["vanilla", "dot"])
def test_lr_1e6_stops_in_the_first_epoch_and_writes_no_checkpoint(trainer, teacher, tmp_path):
    cfg = load_config(KD_CFG, small(tmp_path, "run", teacher, "SOLVER.LR", "1e6", "SOLVER.UPDATE_RULE", trainer))
    with pytest.raises(TrainingDivergedError) as e:
        train_from_config(cfg)
    message = str(e.value)
    assert "\n" not in message
    m = re.match(r"step (\d+) \(epoch 1, iteration (\d+)/10\): non-finite (loss|gradient)", message)
    assert m and m.group(1) == m.group(2), message
    # Step 1 starts from finite weights with a finite loss; an update with LR 1e6 is what breaks them.
    assert int(m.group(1)) >= 2
    assert "no checkpoint was written" in message and "lower SOLVER.LR" in message
    assert not any(os.path.exists(tmp_path / "run" / name) for name in CHECKPOINTS)
    assert e.value.exit_code == 5


def test_huge_loss_weight_overflows_the_first_gradient(teacher, tmp_path):
    """KD_WEIGHT 1e38 keeps the loss finite (1e38 x a KL below 3.4) but its gradient overflows float32."""
    cfg = load_config(KD_CFG, small(tmp_path, "run", teacher, "KD.LOSS.KD_WEIGHT", "1e38"))
    with pytest.raises(TrainingDivergedError) as e:
        train_from_config(cfg)
    message = str(e.value)
    assert message.startswith("step 1 (epoch 1, iteration 1/10): non-finite gradient (largest |g| "), message
    kd = float(re.search(r" kd=(\S+)", message).group(1))
    assert math.isfinite(kd) and kd > 1e36  # the finite loss of the failing step is reported as it was


def test_dot_names_the_distillation_gradient(teacher, tmp_path):
    cfg = load_config(KD_CFG, small(tmp_path, "run", teacher, "KD.LOSS.KD_WEIGHT", "1e38", "SOLVER.UPDATE_RULE", "dot"))
    with pytest.raises(TrainingDivergedError, match=r"^step 1 \(epoch 1, iteration 1/10\): non-finite gradient of "
                                                   r"the distillation loss \(largest \|g\| (nan|inf)\)"):
        train_from_config(cfg)


def test_temperature_1e20_through_the_cli(teacher, tmp_path):
    """T = 1e20: both softmaxes are uniform, KL = 0, and T^2 = 1e40 is inf in float32: kd = 0 x inf = nan."""
    proc = cli("--cfg", KD_CFG, *small(tmp_path, "run", teacher, "KD.TEMPERATURE", "1e20"))
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: step 1 (epoch 1, iteration 1/10): non-finite loss: ce="), lines[0]
    assert " kd=nan total=nan;" in lines[0]
    assert not (tmp_path / "run" / "latest.pth").exists()
    with open(tmp_path / "run" / "train.log") as f:
        assert "training stopped: step 1 (epoch 1" in f.read()


class StopAfterEpoch(HookBase):
    def __init__(self, epoch):
        self.epoch = epoch

    def after_epoch(self, record):
        if self.trainer.epoch == self.epoch:
            raise KeyboardInterrupt


def test_divergence_keeps_the_last_good_checkpoints_and_resume_stops_again(teacher, tmp_path):
    """LOSS_RAMP.EPOCHS 1 multiplies the kd term by 0 in epoch 1 and by 1 from epoch 2: with KD_WEIGHT 1e38 epoch 1
    trains normally and epoch 2's first step (global step 11) overflows."""
    args = small(tmp_path, "run", teacher, "KD.LOSS.KD_WEIGHT", "1e38", "LOSS_RAMP.EPOCHS", "1")
    cfg = load_config(KD_CFG, args)
    with pytest.raises(KeyboardInterrupt):
        train_from_config(cfg, extra_hooks=[StopAfterEpoch(1)])
    run = tmp_path / "run"
    before = digests(run)
    want = "error: step 11 (epoch 2, iteration 1/10): non-finite gradient (largest |g| "
    for attempt in range(2):  # the resumed run diverges at the same step, again without touching the files
        proc = cli("--cfg", KD_CFG, "--resume", *args)
        assert proc.returncode == 5, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(want), proc.stderr
        assert f"the last good checkpoint is {run / 'latest.pth'} (epoch 1), left untouched" in lines[0]
        assert digests(run) == before, attempt
    state = torch.load(run / "latest.pth", weights_only=False)
    assert state["epoch"] == 1 and state["global_step"] == ITERS
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    with open(run / "metrics.jsonl") as f:
        assert [yaml.safe_load(line)["epoch"] for line in f] == [1]
    assert not (run / "summary.json").exists()


def test_non_finite_weights_at_the_end_of_an_epoch_are_not_saved(teacher, tmp_path):
    """Finite loss and gradients, non-finite weights: the guard's end-of-epoch check of what would be saved."""
    cfg = load_config(KD_CFG, small(tmp_path, "run", teacher))
    trainer = build_run(cfg, run_dir=str(tmp_path / "run")).trainer
    step = trainer.run_step

    def poisoned(images, labels, index, epoch):
        out = step(images, labels, index, epoch)
        if trainer.global_step == ITERS - 1:  # the epoch's last update leaves an inf BatchNorm statistic behind
            trainer.distiller.student.bn1.running_var[0] = float("inf")
        return out

    trainer.run_step = poisoned
    with pytest.raises(TrainingDivergedError, match=r"^step 10 \(epoch 1, iteration 10/10\), the epoch's last: "
                                                   r"the updated state holds non-finite values in "
                                                   r"student\.bn1\.running_var; no checkpoint was written"):
        trainer.train()


# --- the fp16 skip counter (its logic on the CPU, with torch's GradScaler as SPEED.AMP fp16 installs on CUDA) ---
def bad(x):
    return {"total": torch.tensor(x)}


def test_guard_streak_limit_by_hand():
    guard = FiniteGuard("cpu", limit=2)
    guard.start_epoch(epoch=3, steps_done=20, iters=10)
    for x in (1.0, math.inf, math.nan, 2.0, math.nan, math.inf):  # steps 21..26: two streaks of 2, tolerated
        guard.observe(bad(x), {"all": torch.tensor(1.0)})
    guard.check("ok")
    assert guard.state_dict() == {"streak": 2, "streak_start": 25}
    guard.observe({"total": torch.tensor(3.0)}, {"all": torch.tensor(math.inf)})  # step 27: the third in a row
    guard.observe(bad(4.0), {"all": torch.tensor(1.0)})  # finite again, but the failure is already recorded
    with pytest.raises(TrainingDivergedError) as e:
        guard.check("no checkpoint was written")
    assert str(e.value).startswith(
        "step 27 (epoch 3, iteration 7/10): 3 consecutive bad steps since step 25, more than "
        "SOLVER.MAX_SKIPPED_STEPS=2 the fp16 loss scale may skip; the last: non-finite gradient (largest |g| inf); "
        "losses: total=3; no checkpoint was written; raise SOLVER.MAX_SKIPPED_STEPS"), str(e.value)

    strict = FiniteGuard("cpu")  # no loss scale: the first bad step stops the run, reported with its values
    strict.start_epoch(1, 0, 5)
    for x in (1.0, 2.0, math.nan, 4.0):
        strict.observe({"ce": torch.tensor(0.5), "kd": torch.tensor(x), "total": torch.tensor(x + 0.5)}, {})
    with pytest.raises(TrainingDivergedError, match=r"^step 3 \(epoch 1, iteration 3/5\): non-finite loss: "
                                                   r"ce=0\.5 kd=nan total=nan; x;"):
        strict.check("x")


def test_fp16_overflow_steps_are_skipped_until_the_limit(teacher, tmp_path):
    cfg = load_config(KD_CFG, small(tmp_path, "run", teacher, "SOLVER.MAX_SKIPPED_STEPS", "2"))
    run = build_run(cfg)
    trainer, rule = run.trainer, run.update_rule
    rule.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)  # what SPEED.AMP fp16 installs on CUDA
    (guard,) = [h for h in trainer.hooks if isinstance(h, FiniteGuardHook)]
    guard.max_skipped_steps = cfg.SOLVER.MAX_SKIPPED_STEPS  # as the builder sets it when a scaler is present
    guard.before_epoch(1, ITERS)  # sets the limit and starts the epoch's count at global step 0
    assert guard.guard.limit == 2
    weight = trainer.distiller.student.conv1.weight
    batches = iter(trainer.train_loader)

    def step(overflow):
        handle = weight.register_hook(lambda g: g * float("inf")) if overflow else None
        images, labels, index = next(batches)
        done = trainer.run_step(images, labels, index, 1)
        guard.guard.observe(done.losses, done.grad_max)
        if handle:
            handle.remove()

    step(False)
    for _ in range(2):  # two skipped steps in a row: tolerated, the weights untouched, the scale backed off twice
        before = weight.detach().clone()
        step(True)
        assert torch.equal(weight, before)
    assert rule.scaler.get_scale() == 2.0**10
    guard.check()
    step(False)  # a finite step ends the streak
    for _ in range(3):
        step(True)
    with pytest.raises(TrainingDivergedError, match=r"^step 7 \(epoch 1, iteration 7/10\): 3 consecutive bad steps "
                                                   r"since step 5, more than SOLVER.MAX_SKIPPED_STEPS=2"):
        guard.check()
    assert all(torch.isfinite(p).all() for p in trainer.distiller.learnable_state_dict().values())


# --- validation -------------------------------------------------------------------------------------------------
def float_keys(node, prefix=""):
    for name, value in node.items():
        if isinstance(value, dict):
            yield from float_keys(value, f"{prefix}{name}.")
        elif isinstance(value, float):
            yield f"{prefix}{name}"


FLOAT_KEYS = sorted(float_keys(get_cfg_defaults()))


def test_the_float_keys_include_every_section():
    assert {"SOLVER.LR", "SOLVER.DOT.DELTA", "DISTRIBUTED.TIMEOUT_MIN", "KD.TEMPERATURE", "DKD.BETA", "DINO.WEIGHT",
            "CRD.NCE_T", "AT.LOSS.FEAT_WEIGHT", "DIST.GAMMA", "REVIEWKD.LOSS.REVIEWKD_WEIGHT"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_every_float_key_rejects_non_finite_values_on_the_command_line(value):
    for key in FLOAT_KEYS:
        with pytest.raises(ConfigError) as e:
            load_config(KD_CFG, ["EXPERIMENT.DEVICE", "cpu", key, value])
        assert str(e.value) == f"config key {key}: must be a finite number, got {float(value)}", key


def test_non_finite_values_in_yaml_are_rejected(tmp_path):
    for text, key, shown in (("KD:\n  TEMPERATURE: .inf\n", "KD.TEMPERATURE", "inf"),
                             ("SOLVER:\n  LR: .nan\n", "SOLVER.LR", "nan"),
                             ("DKD:\n  ALPHA: -.inf\n", "DKD.ALPHA", "-inf")):
        path = tmp_path / "c.yaml"
        path.write_text(f"_BASE_: {KD_CFG}\n{text}")
        with pytest.raises(ConfigError, match=rf"^config key {re.escape(key)}: must be a finite number, got {shown}$"):
            load_config(str(path))


def test_negative_loss_weights_are_rejected():
    weights = [k for k in FLOAT_KEYS if k.endswith("WEIGHT")] + sorted(loss_weight_keys())
    assert {"KD.LOSS.KD_WEIGHT", "KD.LOSS.CE_WEIGHT", "DINO.WEIGHT", "CRD.LOSS.CE_WEIGHT", "DKD.ALPHA", "DKD.BETA",
            "DIST.BETA", "DIST.GAMMA", "DETECTION.DKD.ALPHA", "DETECTION.DKD.BETA"} <= set(weights)
    for key in weights:
        with pytest.raises(ConfigError, match=rf"^config key {re.escape(key)}: a loss weight must be >= 0 \(0 turns "
                                              r"the term off\), got -0.5$"):
            load_config(KD_CFG, ["EXPERIMENT.DEVICE", "cpu", key, "-0.5"])
        load_config(KD_CFG, ["EXPERIMENT.DEVICE", "cpu", key, "0"])  # zero switches a term off: allowed


@pytest.mark.parametrize("value", ["0", "-1"])
def test_distributed_timeout_must_be_positive(value):
    with pytest.raises(ConfigError, match=rf"^config key DISTRIBUTED.TIMEOUT_MIN: must be > 0 minutes, got "
                                          rf"{float(value)}$"):
        load_config(KD_CFG, ["DISTRIBUTED.TIMEOUT_MIN", value])


def test_max_skipped_steps_must_not_be_negative():
    with pytest.raises(ConfigError, match=r"^config key SOLVER.MAX_SKIPPED_STEPS: must be >= 0, got -1$"):
        load_config(KD_CFG, ["SOLVER.MAX_SKIPPED_STEPS", "-1"])


def test_cfg_naming_a_directory(tmp_path):
    with pytest.raises(ConfigError, match=rf"^config file {re.escape(str(tmp_path))} is a directory; pass a YAML "
                                          r"file inside it with --cfg$"):
        load_config(str(tmp_path))


def test_yaml_syntax_error_keeps_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    # Line 3 is indented by one space under a two-space mapping; a tab on line 5 of a second file.
    path.write_text("SOLVER:\n  LR: 0.1\n EPOCHS: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value).startswith(f"config file {path} is not valid YAML: line 3, column 2: "), str(e.value)
    path.write_text("KD:\n  TEMPERATURE: 4.0\n\nSOLVER:\n\tLR: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value).startswith(f"config file {path} is not valid YAML: line 5, column 1: found character '\\t'")
    assert "\n" not in str(e.value)


def test_cli_config_errors_are_one_line(tmp_path):
    for args, want in ((["--cfg", str(tmp_path)], f"error: config file {tmp_path} is a directory"),
                       (["--cfg", KD_CFG, "SOLVER.LR", "inf"], "error: config key SOLVER.LR: must be a finite number")):
        proc = cli(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith(want), proc.stderr


# --- several processes ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank_with_one_message(teacher, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "ddp-nan-on-rank", "1", "4", "--cfg", KD_CFG, *small(tmp_path, "run", teacher)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    # Rank 1's loss went non-finite at step 4; rank 0 received the averaged NaN gradient at the same step and is
    # not the one named.
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: rank 1: step 4 (epoch 1, iteration 4/10): non-finite loss: ce=nan"), lines[0]
    assert not (tmp_path / "run" / "latest.pth").exists()


def _ddp_worker(argv):
    """Rank R poisons its images at global step S (1-based), then tools/train.py's main() runs as usual."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import train as train_tool
    from mdistiller.engine.trainer import Trainer
    from mdistiller.utils import distributed
    from mdistiller.utils.cli import run_cli

    poisoned_rank, poisoned_step, rest = int(argv[0]), int(argv[1]), argv[2:]
    run_step = Trainer.run_step

    def run_step_with_fault(self, images, labels, index, epoch):
        if self.rank == poisoned_rank and self.global_step + 1 == poisoned_step:
            images = images * float("nan")
        return run_step(self, images, labels, index, epoch)

    Trainer.run_step = run_step_with_fault
    assert distributed.launched_by_torchrun()
    run_cli(train_tool.main, rest)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "ddp-nan-on-rank":
    _ddp_worker(sys.argv[2:])
