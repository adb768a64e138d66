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
                "SOLVER.UPDATE_RULE", "SOLVER.BATCH_SIZE", "SOLVER.EPOCHS", "SOLVER.LR", "SOLVER.LR_DECAY_STAGES",
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
    ("", ["SOLVER.UPDATE_RULE", "adam"], ["SOLVER.UPDATE_RULE", "unknown update rule 'adam'", "vanilla"]),
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


# Modules a user or a tool may import first; each starts the package's __init__ at a different point of its
# explicit component list, and none may change what the defaults are.
FIRST_IMPORTS = ["mdistiller.config", "mdistiller.config.defaults", "mdistiller.config.registry",
                 "mdistiller.distillers.dkd", "mdistiller.distillers.plus_plus", "mdistiller.detection.config",
                 "mdistiller.engine.launch", "mdistiller.models.cifar.resnet", "mdistiller.data.image_folder_dataset",
                 "mdistiller.reproduce.plan", "mdistiller"]


def test_defaults_are_the_same_whatever_is_imported_first():
    """Fresh interpreters import one module first, then dump the defaults: the same text every time, with every
    component's section (a method's, the dino term's, a dataset's, a task's)."""
    script = ("import importlib, sys; importlib.import_module(sys.argv[1]); "
              "from mdistiller.config.defaults import get_cfg_defaults; print(get_cfg_defaults().dump(), end='')")
    dumps = {}
    for first in FIRST_IMPORTS:
        proc = subprocess.run([sys.executable, "-c", script, first], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        dumps[first] = proc.stdout
    assert len(set(dumps.values())) == 1, [k for k, v in dumps.items() if v != dumps["mdistiller"]]
    top = {line.split(":")[0] for line in dumps["mdistiller"].splitlines() if line and not line[0].isspace()}
    assert {"DKD", "DINO", "DETECTION", "IMAGE_FOLDER", "CRD", "REVIEWKD"} <= top
    assert dumps["mdistiller"] == get_cfg_defaults().dump()  # this process (the whole suite imported) agrees


def test_registering_declares_a_section_and_touches_no_default(tmp_path):
    """A component's section is part of the defaults while it is registered and gone with it; a registry made for a
    test (no config key) never adds to the tree; two components may not declare one section."""
    from yacs.config import CfgNode as CN

    from mdistiller.config.registry import Registry
    from mdistiller.distillers import DISTILLER_REGISTRY, Distiller

    before = get_cfg_defaults().dump()
    section = CN()
    section.WEIGHT = 1.0
    section.GAIN = 2.0

    class Mine(Distiller):
        pass

    DISTILLER_REGISTRY.register("MINE_TEST", config=section, loss_weights=("GAIN",))(Mine)
    try:
        assert get_cfg_defaults().MINE_TEST.GAIN == 2.0
        with pytest.raises(ConfigError, match="MINE_TEST.GAIN: a loss weight must be >= 0"):
            load_config(None, ["MINE_TEST.GAIN", "-1"])
        other = CN()
        other.X = 0
        DISTILLER_REGISTRY.register("MINE_TEST_2", config=other, section="MINE_TEST")(Mine)
        with pytest.raises(ValueError, match="config section MINE_TEST is declared by"):
            get_cfg_defaults()
        DISTILLER_REGISTRY.unregister("MINE_TEST_2")
    finally:
        DISTILLER_REGISTRY.unregister("MINE_TEST")
    assert get_cfg_defaults().dump() == before
    Registry("toy").register("TOY", config=section, section="TOY")(Mine)
    assert get_cfg_defaults().dump() == before


def test_a_renamed_key_still_reads_with_one_notice(tmp_path, caplog):
    """SOLVER.TRAINER is SOLVER.UPDATE_RULE now: in a file, on the command line and in a saved run config it is
    read as the new key, with one line saying so."""
    from mdistiller.config.flat import saved_values

    with caplog.at_level("WARNING", logger="mdistiller"):
        from_file = load_config(write(tmp_path, "SOLVER:\n  TRAINER: dot\n"))
        from_cli = load_config(None, ["SOLVER.TRAINER", "dot"])
    assert from_file.SOLVER.UPDATE_RULE == from_cli.SOLVER.UPDATE_RULE == "dot"
    assert "TRAINER" not in from_file.SOLVER
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 2 and all("\n" not in n for n in notices)
    assert notices[0].startswith("config key SOLVER.TRAINER in ") and "is now SOLVER.UPDATE_RULE" in notices[0]
    assert notices[1] == ("config key SOLVER.TRAINER in the command line is now SOLVER.UPDATE_RULE: read as that "
                          "(rename it to silence this)")
    assert saved_values({"SOLVER": {"TRAINER": "dot", "LR": 0.1}}) == {"SOLVER.UPDATE_RULE": "dot", "SOLVER.LR": 0.1}
