"""The optional Weights & Biases hook, in wandb's offline mode (nothing leaves the machine).

What wandb recorded is read back from the offline run's .wandb file with a small reader written here from the
file format (a 7-byte header, then 32 KiB blocks of records framed as in LevelDB's log: crc32, length, type;
each record a wandb Record protobuf), and compared with what the TensorBoard hook wrote for the same run: the
same tags, steps and values. A resumed run must continue the same wandb run id.
"""

import glob
import json
import os
import struct
import sys

import pytest

from mdistiller.config import load_config
from mdistiller.utils.errors import ConfigError

from cli_runs import FM_CONFIGS, SMALL

STUDENT_CFG = os.path.join(FM_CONFIGS, "vanilla", "resnet8.yaml")


def _wandb():
    return pytest.importorskip("wandb", reason="wandb is not installed (pip install .[wandb]); the optional "
                                               "Weights & Biases logger is not tested")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for key, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path / "wandb_dir")),
                       ("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off")):
        monkeypatch.setenv(key, value)
    (tmp_path / "wandb_dir").mkdir()
    return tmp_path / "wandb_dir"


def read_wandb_file(path):
    """[(kind, payload)] of an offline .wandb file: ("run", (id, project, config dict)), ("history", {key: value})."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        if kind == 0 and length == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            which = record.WhichOneof("record_type")
            if which == "run":
                config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
                out.append(("run", (record.run.run_id, record.run.project, config)))
            elif which == "exit":
                out.append(("exit", record.exit.exit_code))
            elif which == "history":
                out.append(("history", {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                        for i in record.history.item}))
    return out


def finished(path, timeout_s=300):
    """`path` once wandb's writer (a separate process) has written the run's exit record: the signal that the file
    is complete. `timeout_s` only guards against a writer that never finishes (a busy machine may take long)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not any(kind == "exit" for kind, _ in read_wandb_file(path)):
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout_s} s"
        time.sleep(0.2)
    return path


def wandb_scalars(path):
    """{tag: {global step: value}} of the rows our hook logged (wandb's own _step/_runtime left out)."""
    out = {}
    for kind, row in read_wandb_file(finished(path)):
        if kind == "history":
            step = row["trainer/global_step"]
            for key, value in row.items():
                if not key.startswith("_") and key != "trainer/global_step":
                    out.setdefault(key, {})[step] = value
    return out


def tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _train(prefix, *extra, resume=False):
    """A run with LOG.WANDB True: launch.py adds the WandbHook itself."""
    from mdistiller.engine.launch import train_from_config

    cfg = load_config(STUDENT_CFG, ["LOG.PREFIX", str(prefix), "EXPERIMENT.NAME", "wb", *SMALL,
                                    "LOG.TENSORBOARD_FREQ", "3", "LOG.WANDB", "True", *extra])
    return train_from_config(cfg, resume=resume)


def test_wandb_logs_what_tensorboard_logs_and_resume_continues_the_run(tmp_path, offline):
    _wandb()
    _train(tmp_path)
    run = tmp_path / "wb"
    run_id = (run / "wandb_run_id").read_text().strip()
    (first,) = glob.glob(str(offline / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))
    records = read_wandb_file(finished(first))
    (rid, project, config) = next(p for k, p in records if k == "run")
    assert rid == run_id and project == "mdistiller"
    assert config["SOLVER"]["EPOCHS"] == 1 and config["DATASET"]["TRAIN_SUBSET"] == 320  # the resolved config
    assert config["LOG"]["WANDB"] is True
    tb = tensorboard_scalars(run / "tensorboard")
    wb = wandb_scalars(first)
    assert set(wb) == set(tb) and "epoch/test_top1" in wb and "train/total" in wb and "train/lr" in wb
    for tag in tb:
        assert sorted(wb[tag]) == sorted(tb[tag]), tag  # the same steps: 3, 6, 9 and the epoch's last step
        for step, value in tb[tag].items():
            assert wb[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)  # TensorBoard keeps float32
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert wb["epoch/test_top1"] == {10: record["test_top1"]}  # 320 images / batch 32 = 10 steps

    # a second epoch by --resume: the same wandb run id, continued from step 10
    _train(tmp_path, "SOLVER.EPOCHS", "2", resume=True)
    assert (run / "wandb_run_id").read_text().strip() == run_id
    files = sorted(glob.glob(str(offline / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files)
    second = wandb_scalars(next(f for f in files if f != first))
    assert sorted(second["epoch/test_top1"]) == [20] and min(second["train/total"]) == 12


def test_hook_on_other_ranks_logs_nothing(tmp_path, offline, monkeypatch):
    _wandb()
    import torch

    from mdistiller.distillers.losses import StepOutput
    from mdistiller.engine.trainer import Step
    from mdistiller.engine.wandb_hook import WandbHook
    from mdistiller.utils import distributed

    cfg = load_config(STUDENT_CFG, ["LOG.WANDB", "True", "LOG.TENSORBOARD_FREQ", "1"])  # a row every step on rank 0
    hook = WandbHook(run_dir=str(tmp_path), epoch_keys=("test_top1",), **WandbHook.from_config(cfg))
    monkeypatch.setattr(distributed, "rank", lambda: 1)  # the hook asks the process group which rank it runs on
    trainer = type("Rank1", (), {"global_step": 3, "lr": 0.1})()  # held here: hooks keep a weak reference
    hook.trainer = trainer
    hook.before_train()
    logits = torch.zeros(1, 10)
    hook.after_step(Step({"total": torch.tensor(1.0)}, {}, StepOutput(logits, {}), torch.zeros(1, 3, 32, 32),
                         torch.zeros(1, dtype=torch.long)))
    hook.after_epoch({"test_top1": 50.0})
    hook.after_train()
    assert os.listdir(offline) == [] and not (tmp_path / "wandb_run_id").exists()


def test_missing_wandb_is_one_config_error(monkeypatch):
    from mdistiller.config.validate import validate_config
    from mdistiller.engine.wandb_hook import WandbHook

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ImportError
    cfg = load_config(STUDENT_CFG, ["LOG.WANDB", "True"], validate=False)
    attempts = (lambda: load_config(STUDENT_CFG, ["LOG.WANDB", "True"]),  # validation: before anything is written
                lambda: validate_config(cfg), lambda: WandbHook(run_dir="unused", epoch_keys=(), **WandbHook.from_config(cfg)))
    for attempt in attempts:
        with pytest.raises(ConfigError) as e:
            attempt()
        assert "LOG.WANDB" in str(e.value) and "pip install .[wandb]" in str(e.value) and "\n" not in str(e.value)
    validate_config(load_config(STUDENT_CFG, []))  # off by default: nothing needed
