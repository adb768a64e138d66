"""Config loading: files over defaults, command line over files, and one clear error per kind of mistake."""

import os
import subprocess
import sys

import pytest

from mdistiller.config import get_cfg_defaults, load_config
from mdistiller.utils.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_have_the_documented_sections():
    cfg = get_cfg_defaults()
    for key in ("EXPERIMENT.NAME", "EXPERIMENT.TAG", "EXPERIMENT.SEED", "DATASET.TYPE", "DATASET.ROOT",
                "DATASET.NUM_WORKERS", "DATASET.TRAIN_SUBSET", "DATASET.TEST_SUBSET", "DATASET.TEST.BATCH_SIZE",
                "DISTILLER.TYPE", "DISTILLER.TEACHER", "DISTILLER.STUDENT", "DISTILLER.TEACHER_CKPT",
                "SOLVER.TRAINER", "SOLVER.BATCH_SIZE", "SOLVER.EPOCHS", "SOLVER.LR", "SOLVER.LR_DECAY_STAGES",
                "SOLVER.LR_DECAY_RATE", "SOLVER.WARMUP_EPOCHS", "SOLVER.WEIGHT_DECAY", "SOLVER.MOMENTUM",
                "SOLVER.DOT.DELTA", "LOG.PREFIX", "LOG.SAVE_CHECKPOINT_FREQ", "LOG.TENSORBOARD_FREQ"):
        node = cfg
        for part in key.split("."):
            node = node[part]


def test_file_overrides_defaults_and_command_line_overrides_file(tmp_path):
    path = write(tmp_path, "SOLVER:\n  LR: 0.1\n  EPOCHS: 30\n  LR_DECAY_STAGES: [10, 20]\n")
    cfg = load_config(path, ["SOLVER.LR", "0.2", "EXPERIMENT.TAG", "x"])
    assert cfg.SOLVER.LR == 0.2 and cfg.SOLVER.EPOCHS == 30 and cfg.EXPERIMENT.TAG == "x"
    assert list(cfg.SOLVER.LR_DECAY_STAGES) == [10, 20]
    assert cfg.SOLVER.MOMENTUM == 0.9  # untouched default
    assert cfg.is_frozen()


def test_everyday_spellings_are_coerced(tmp_path):
    # PyYAML reads 5e-4 as a string and an int for a float key would fail in plain YACS.
    path = write(tmp_path, "SOLVER:\n  WEIGHT_DECAY: 5e-4\n  LR: 1\n")
    cfg = load_config(path, ["SOLVER.MOMENTUM", "0", "EXPERIMENT.DETERMINISTIC", "false",
                             "SOLVER.LR_DECAY_STAGES", "[100, 200]"])
    assert cfg.SOLVER.WEIGHT_DECAY == 5e-4 and isinstance(cfg.SOLVER.LR, float) and cfg.SOLVER.LR == 1.0
    assert cfg.SOLVER.MOMENTUM == 0.0 and cfg.EXPERIMENT.DETERMINISTIC is False


def test_base_chain(tmp_path):
    write(tmp_path, "SOLVER:\n  LR: 0.3\n  EPOCHS: 50\n  LR_DECAY_STAGES: [40]\n", "base.yaml")
    child = write(tmp_path, "_BASE_: base.yaml\nSOLVER:\n  EPOCHS: 60\n")
    cfg = load_config(child)
    assert cfg.SOLVER.LR == 0.3 and cfg.SOLVER.EPOCHS == 60


@pytest.mark.parametrize("text,overrides,fragments", [
    ("SOLVER:\n  LRR: 0.1\n", [], ["unknown config key SOLVER.LRR", "did you mean SOLVER.LR", "LR_DECAY_RATE"]),
    ("", ["SOLVR.LR", "0.1"], ["unknown config key SOLVR", "SOLVER"]),
    ("SOLVER:\n  LR: fast\n", [], ["SOLVER.LR", "expected a number", "fast"]),
    ("SOLVER:\n  EPOCHS: 1.5\n", [], ["SOLVER.EPOCHS", "expected an integer"]),
    ("EXPERIMENT:\n  DETERMINISTIC: maybe\n", [], ["EXPERIMENT.DETERMINISTIC", "true or false"]),
    ("SOLVER: 3\n", [], ["SOLVER is a section"]),
    ("", ["SOLVER.LR", "-0.1"], ["SOLVER.LR", "must be > 0"]),
    ("", ["SOLVER.EPOCHS", "100"], ["SOLVER.LR_DECAY_STAGES", "150", "SOLVER.EPOCHS (100)"]),
    ("", ["SOLVER.MOMENTUM", "1.0"], ["SOLVER.MOMENTUM", "[0, 1)"]),
    ("", ["DATASET.TYPE", "mnist"], ["DATASET.TYPE", "unknown dataset 'mnist'", "cifar100", "fashion_mnist"]),
    ("", ["DISTILLER.STUDENT", "resnet9"], ["DISTILLER.STUDENT", "unknown model 'resnet9'", "resnet8x4"]),
    ("", ["DISTILLER.TYPE", "NOPE"], ["DISTILLER.TYPE", "unknown distiller 'NOPE'", "NONE"]),
    ("", ["SOLVER.TRAINER", "adam"], ["SOLVER.TRAINER", "unknown trainer 'adam'", "vanilla"]),
    ("", ["DATASET.TRAIN_SUBSET", "-1"], ["DATASET.TRAIN_SUBSET", ">= 0"]),
    ("", ["SOLVER.LR"], ["KEY VALUE pairs", "SOLVER.LR"]),
])
def test_bad_input_is_one_clear_config_error(tmp_path, text, overrides, fragments):
    path = write(tmp_path, text or "{}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    message = str(e.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "SOLVER: [\n"))


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = write(tmp_path, "SOLVER:\n  LRR: 0.1\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), "--cfg", path],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: unknown config key SOLVER.LRR")
    assert "Traceback" not in proc.stderr
