"""SPEED "auto" follows the hardware: bf16 autocast where the CPU computes bf16 natively, float32 where it would be
emulated; the decision and its reason are recorded, and a resumed run keeps the plan it was started with."""

import json

import pytest
import torch

from mdistiller.config import load_config
from mdistiller.engine.launch import train_from_config
from mdistiller.engine.speed import resolve_speed
from mdistiller.utils import hardware
from mdistiller.utils.errors import ConfigError
from test_engine import CrashAfterEpoch, read_metrics, small_cfg, without_timing

CPU = torch.device("cpu")


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given torch capability answers and /proc/cpuinfo flags (env override off)."""
    monkeypatch.delenv(hardware.ENV_OVERRIDE, raising=False)

    def set_(amx=None, avx512_bf16=None, flags=(), model="Test CPU"):
        for name, value in (("_is_amx_tile_supported", amx), ("_is_avx512_bf16_supported", avx512_bf16)):
            if value is None:
                monkeypatch.delattr(torch.cpu, name, raising=False)  # an older torch without the check
            else:
                monkeypatch.setattr(torch.cpu, name, lambda v=value: v, raising=False)
        monkeypatch.setattr(hardware, "_cpuinfo", lambda: (model, set(flags)))
    return set_


@pytest.mark.parametrize("amx,avx,flags,native,units", [
    (True, False, (), True, ["amx_bf16"]),                      # Intel Sapphire Rapids and later
    (False, True, (), True, ["avx512_bf16"]),                   # AMD Zen 4+, Intel Cooper Lake
    (False, False, ("avx2", "avx512f"), False, []),             # AVX-512 without bf16: emulated
    (None, None, ("avx2", "avx512_bf16"), True, ["avx512_bf16"]),  # torch without the checks: /proc/cpuinfo
    (None, None, ("avx2", "fma"), False, []),
])
def test_native_bf16_is_detected_from_torch_or_cpuinfo(cpu, amx, avx, flags, native, units):
    cpu(amx=amx, avx512_bf16=avx, flags=flags)
    assert hardware.native_bf16_units() == units
    got, why = hardware.cpu_bf16_decision()
    assert got is native and (units[0] in why if units else "emulated" in why)


def test_auto_is_bf16_with_native_bf16_and_float32_without(cpu):
    cfg = load_config(None, ["EXPERIMENT.DEVICE", "cpu"])  # SPEED defaults: AMP, CHANNELS_LAST, TEACHER_HALF auto
    cpu(amx=False, avx512_bf16=True)
    plan = resolve_speed(cfg, CPU)
    assert plan.amp == torch.bfloat16 and plan.teacher_dtype == torch.bfloat16  # the teacher follows autocast
    assert plan.notes == ("SPEED.AMP auto -> bf16: the CPU computes bf16 natively (avx512_bf16)",)
    cpu(amx=False, avx512_bf16=False)
    plan = resolve_speed(cfg, CPU)
    assert plan.amp is None and plan.teacher_dtype is None
    assert plan.notes[0].startswith("SPEED.AMP auto -> off: the CPU has no native bf16")
    # an explicit choice is not "auto": no decision to explain
    assert resolve_speed(load_config(None, ["SPEED.AMP", "bf16"]), CPU).notes == ()


def test_environment_override_pins_the_decision(cpu, monkeypatch):
    cpu(amx=True, avx512_bf16=True)
    monkeypatch.setenv(hardware.ENV_OVERRIDE, "0")
    assert hardware.cpu_bf16_decision() == (False, "MDISTILLER_CPU_BF16=0 in the environment")
    monkeypatch.setenv(hardware.ENV_OVERRIDE, "1")
    cpu(amx=False, avx512_bf16=False)
    monkeypatch.setenv(hardware.ENV_OVERRIDE, "1")
    assert hardware.cpu_bf16_decision()[0] is True
    monkeypatch.setenv(hardware.ENV_OVERRIDE, "yes")  # not silently ignored: one line naming the variable
    with pytest.raises(ConfigError, match="MDISTILLER_CPU_BF16='yes': must be 0 .* or 1"):
        resolve_speed(load_config(None, []), CPU)


def test_recorded_plan_is_kept_where_the_device_can_run_it(cpu):
    cfg = load_config(None, ["EXPERIMENT.DEVICE", "cpu"])
    cpu(amx=False, avx512_bf16=False)  # this machine would choose float32
    recorded = {"amp": "bf16", "channels_last": False, "teacher_half": "bf16"}
    plan = resolve_speed(cfg, CPU, recorded)
    assert plan.amp == torch.bfloat16 and plan.teacher_dtype == torch.bfloat16 and not plan.channels_last
    assert "SPEED.AMP auto: kept the run's recorded bf16 (this machine would choose off)" in plan.notes
    assert "SPEED.CHANNELS_LAST auto: kept the run's recorded False (this machine would choose True)" in plan.notes
    # fp16 autocast (a run started on a GPU) cannot run on the CPU: the CPU's own choice, said so
    plan = resolve_speed(cfg, CPU, {"amp": "fp16", "channels_last": True, "teacher_half": "fp16"})
    assert plan.amp is None and plan.teacher_dtype is None
    assert "SPEED.AMP auto: the run recorded fp16, which this device cannot run; using off" in plan.notes


@pytest.mark.parametrize("native", [True, False], ids=["bf16-present", "bf16-absent"])
def test_run_records_cpu_kind_and_decision(cpu, tmp_path, native):
    # The capability is forced either way, so each case checks one decision whatever CPU runs the test.
    flags = ("avx2", "avx512f", "avx512_bf16") if native else ("avx2", "avx512f")
    cpu(amx=False, avx512_bf16=native, flags=flags, model="AMD EPYC 9999")
    summary = train_from_config(small_cfg(tmp_path, "SPEED.AMP", "auto", "SOLVER.EPOCHS", "1",
                                          "SOLVER.LR_DECAY_STAGES", "[1]", "SOLVER.WARMUP_EPOCHS", "0"))
    amp = "bf16" if native else "off"
    # the (monitor) teacher follows the student's autocast: SPEED.TEACHER_HALF auto
    assert summary["speed"]["amp"] == amp and summary["speed"]["teacher_half"] == amp
    why = ("the CPU computes bf16 natively (avx512_bf16)" if native else
           "the CPU has no native bf16 (no AMX, no AVX512-BF16): bf16 would be emulated, slower than float32")
    assert summary["speed_decisions"] == [f"SPEED.AMP auto -> {amp}: {why}"]
    assert summary["cpu"]["model"] == "AMD EPYC 9999"
    assert summary["cpu"]["native_bf16"] == (["avx512_bf16"] if native else [])
    assert summary["cpu"]["flags"] == list(flags)
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"fast paths: amp {amp}" in log and f"SPEED.AMP auto -> {amp}: {why}" in log


def test_resume_on_a_machine_that_decides_otherwise_keeps_the_plan(cpu, tmp_path):
    # Started where "auto" means bf16, killed after epoch 1, resumed where it means float32: the run goes on in
    # bf16 (one line says so) and ends bit-identical to the same run done in one go.
    auto = ["SPEED.AMP", "auto"]
    cpu(amx=True, avx512_bf16=True)
    straight = train_from_config(small_cfg(tmp_path, *auto, name="straight"))
    with pytest.raises(KeyboardInterrupt):
        train_from_config(small_cfg(tmp_path, *auto, name="moved"), extra_hooks=[CrashAfterEpoch(1)])
    saved = torch.load(tmp_path / "moved" / "latest.pth", weights_only=False)
    assert saved["hooks"]["speed_plan"]["speed"]["amp"] == "bf16"
    cpu(amx=False, avx512_bf16=False)
    resumed = train_from_config(small_cfg(tmp_path, *auto, name="moved"), resume=True)
    assert resumed["speed"]["amp"] == "bf16"
    assert "SPEED.AMP auto: kept the run's recorded bf16 (this machine would choose off)" in resumed["speed_decisions"]
    log = (tmp_path / "moved" / "train.log").read_text()
    assert "kept the run's recorded bf16" in log
    a = torch.load(tmp_path / "straight" / "latest.pth", weights_only=False)
    b = torch.load(tmp_path / "moved" / "latest.pth", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [without_timing(r) for r in read_metrics(tmp_path / "straight")] == \
        [without_timing(r) for r in read_metrics(tmp_path / "moved")]
    assert json.loads((tmp_path / "moved" / "summary.json").read_text())["last_top1"] == straight["last_top1"]
