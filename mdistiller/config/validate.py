"""Checks of config values that types alone cannot catch, each failing with the key and what is allowed."""

from ..utils.errors import ConfigError


def _check(ok, key, message):
    if not ok:
        raise ConfigError(f"config key {key}: {message}")


def validate_config(cfg):
    # Imported here: the registries fill up as the component packages are imported.
    from ..data import DATASET_REGISTRY
    from ..distillers import DISTILLER_REGISTRY
    from ..engine import TRAINER_REGISTRY
    from ..models import model_names

    s, d = cfg.SOLVER, cfg.DATASET
    _check(d.TYPE in DATASET_REGISTRY, "DATASET.TYPE",
           f"unknown dataset '{d.TYPE}'; allowed: {', '.join(DATASET_REGISTRY.names())}")
    _check(d.NUM_WORKERS >= 0, "DATASET.NUM_WORKERS", f"must be >= 0, got {d.NUM_WORKERS}")
    _check(d.TRAIN_SUBSET >= 0, "DATASET.TRAIN_SUBSET", f"must be >= 0 (0 = all), got {d.TRAIN_SUBSET}")
    _check(d.TEST_SUBSET >= 0, "DATASET.TEST_SUBSET", f"must be >= 0 (0 = all), got {d.TEST_SUBSET}")
    _check(d.TEST.BATCH_SIZE > 0, "DATASET.TEST.BATCH_SIZE", f"must be > 0, got {d.TEST.BATCH_SIZE}")

    _check(cfg.DISTILLER.TYPE in DISTILLER_REGISTRY, "DISTILLER.TYPE",
           f"unknown distiller '{cfg.DISTILLER.TYPE}'; allowed: {', '.join(DISTILLER_REGISTRY.names())}")
    roles = ["STUDENT"] + (["TEACHER"] if DISTILLER_REGISTRY.get(cfg.DISTILLER.TYPE).wants_teacher(cfg) else [])
    for role in roles:
        name, allowed = cfg.DISTILLER[role], model_names(d.TYPE)
        _check(name in allowed, f"DISTILLER.{role}",
               f"unknown model '{name}' for dataset {d.TYPE}; allowed: {', '.join(allowed)}")

    _check(s.TRAINER in TRAINER_REGISTRY, "SOLVER.TRAINER",
           f"unknown trainer '{s.TRAINER}'; allowed: {', '.join(TRAINER_REGISTRY.names())}")
    _check(s.BATCH_SIZE > 0, "SOLVER.BATCH_SIZE", f"must be > 0, got {s.BATCH_SIZE}")
    _check(s.EPOCHS > 0, "SOLVER.EPOCHS", f"must be > 0, got {s.EPOCHS}")
    _check(s.LR > 0, "SOLVER.LR", f"must be > 0, got {s.LR}")
    _check(0 < s.LR_DECAY_RATE <= 1, "SOLVER.LR_DECAY_RATE", f"must be in (0, 1], got {s.LR_DECAY_RATE}")
    stages = list(s.LR_DECAY_STAGES)
    _check(stages == sorted(stages), "SOLVER.LR_DECAY_STAGES", f"must be increasing, got {stages}")
    for e in stages:
        _check(0 < e <= s.EPOCHS, "SOLVER.LR_DECAY_STAGES",
               f"stage {e} is outside 1..SOLVER.EPOCHS ({s.EPOCHS}); lower it or raise SOLVER.EPOCHS")
    _check(0 <= s.WARMUP_EPOCHS < s.EPOCHS or s.WARMUP_EPOCHS == 0, "SOLVER.WARMUP_EPOCHS",
           f"must be in [0, SOLVER.EPOCHS) = [0, {s.EPOCHS}), got {s.WARMUP_EPOCHS}")
    _check(s.WEIGHT_DECAY >= 0, "SOLVER.WEIGHT_DECAY", f"must be >= 0, got {s.WEIGHT_DECAY}")
    _check(0 <= s.MOMENTUM < 1, "SOLVER.MOMENTUM", f"must be in [0, 1), got {s.MOMENTUM}")
    _check(not s.NESTEROV or s.MOMENTUM > 0, "SOLVER.NESTEROV", "needs SOLVER.MOMENTUM > 0")

    _check(cfg.LOG.SAVE_CHECKPOINT_FREQ >= 0, "LOG.SAVE_CHECKPOINT_FREQ", "must be >= 0 (0 = last epoch only)")
    _check(cfg.LOG.TENSORBOARD_FREQ >= 0, "LOG.TENSORBOARD_FREQ", "must be >= 0 (0 = off)")
    _check(cfg.LOG.MONITOR_T > 0, "LOG.MONITOR_T", f"must be > 0, got {cfg.LOG.MONITOR_T}")
    dev = cfg.EXPERIMENT.DEVICE
    _check(dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:"), "EXPERIMENT.DEVICE",
           f"must be auto, cpu, cuda or cuda:N, got '{dev}'")
    _check(cfg.EXPERIMENT.SEED >= 0, "EXPERIMENT.SEED", f"must be >= 0, got {cfg.EXPERIMENT.SEED}")
    _check("/" not in cfg.EXPERIMENT.NAME, "EXPERIMENT.NAME", "must be a plain directory name without '/'")

    from ..engine.speed import AMP_MODES, SWITCH_MODES

    sp = cfg.SPEED
    _check(sp.AMP in AMP_MODES, "SPEED.AMP", f"must be one of {', '.join(AMP_MODES)}, got '{sp.AMP}'")
    _check(not (sp.AMP == "fp16" and dev == "cpu"), "SPEED.AMP",
           "fp16 autocast is for CUDA GPUs; on the CPU use bf16 or off")
    for key in ("CHANNELS_LAST", "TEACHER_HALF"):
        _check(sp[key] in SWITCH_MODES, f"SPEED.{key}",
               f"must be one of {', '.join(SWITCH_MODES)}, got '{sp[key]}'")
    _check(not (sp.TEACHER_INT8 and dev.startswith("cuda")), "SPEED.TEACHER_INT8",
           "the int8 teacher runs on the CPU; on a GPU use SPEED.TEACHER_HALF")
    _check(not (sp.TEACHER_INT8 and sp.TEACHER_HALF == "on"), "SPEED.TEACHER_INT8",
           "and SPEED.TEACHER_HALF on: choose one teacher precision")
    _check(sp.TEACHER_INT8_CALIBRATION > 0, "SPEED.TEACHER_INT8_CALIBRATION",
           f"must be > 0 images, got {sp.TEACHER_INT8_CALIBRATION}")

    from ..distillers.loss_ramp import validate_loss_ramp

    method = DISTILLER_REGISTRY.get(cfg.DISTILLER.TYPE)
    validate_loss_ramp(cfg, method)
    # Each component may check its own section.
    method.validate_config(cfg)
    TRAINER_REGISTRY.get(s.TRAINER).validate_config(cfg)
