"""Command-line details a user meets first (issue 16): the missing-teacher hint, tools/eval.py without -m, a
re-pickled CIFAR-100 file, and setup.py's version ranges.

The teacher hint is followed literally (its command run through tools/train.py, on a tiny subset) and the
checkpoint must then be where the student looks; the run directory expected is derived here from the README's
naming rule, not from the code under test.
"""

import importlib.util
import json
import os
import pickle
import re
import shlex
import sys

import pytest

from mdistiller.config import load_config
from mdistiller.models.teacher_ckpt import build_teacher, teacher_ckpt_path
from mdistiller.utils.cli import run_cli
from mdistiller.utils.errors import CheckpointError, DataError, UserError

import data_fixtures as fx
from cli_runs import KD_CFG, ROOT, SMALL, train_main as _train_main


def _tool_main(name):
    """tools/<name>.py's main(), loaded from the file as the command line runs it."""
    tools = os.path.join(ROOT, "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    spec = importlib.util.spec_from_file_location(f"{name}_tool", os.path.join(tools, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _one_line_error(main, argv, capsys):
    """(exit code, stderr) of main under the CLI wrapper, which turns user errors into one line."""
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return e.value.code, err


# 7 -----------------------------------------------------------------------------------------------------------

def test_following_the_missing_teacher_hint_puts_the_teacher_where_the_student_looks(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the hint's command is typed where the student was started
    prefix = tmp_path / "my runs"  # not the default output/, and with a space the command must quote
    student = ["LOG.PREFIX", str(prefix), *SMALL]
    with pytest.raises(CheckpointError) as e:
        _train_main()(["--cfg", KD_CFG, *student])
    msg = str(e.value)
    # README: a run lives in <LOG.PREFIX>/<dataset>_<method>_<models>_<TAG>_seed<SEED>; a teacher is a vanilla run
    expected = prefix / "fashion_mnist_none_resnet20_vanilla_seed0" / "student_best.pth"
    assert f"not found at {expected};" in msg and "\n" not in msg
    command = re.search(r"`(python [^`]*)`", msg).group(1)
    words = shlex.split(command)
    assert words[:2] == ["python", "tools/train.py"] and "LOG.PREFIX" in words
    _train_main()(words[2:] + SMALL)  # the hint as given, on the tiny subset
    assert expected.is_file()
    cfg = load_config(KD_CFG, student)  # the student now finds its teacher there, through the loading path
    assert teacher_ckpt_path(cfg) == str(expected)
    build_teacher(cfg, 10)


def test_teacher_hint_for_published_teachers_names_where_training_lands(tmp_path):
    cfg = load_config(None, ["DATASET.TYPE", "cifar100", "DISTILLER.TEACHER", "resnet56", "DISTILLER.STUDENT",
                             "resnet20", "LOG.PREFIX", str(tmp_path), "DATASET.ROOT", str(tmp_path / "d")],
                      validate=False)
    with pytest.raises(CheckpointError) as e:
        build_teacher(cfg, 100)
    msg = str(e.value)
    assert "download_ckpts.sh" in msg
    words = shlex.split(re.search(r"`(python [^`]*)`", msg).group(1))
    assert words[words.index("LOG.PREFIX") + 1] == str(tmp_path)
    assert words[words.index("DATASET.ROOT") + 1] == str(tmp_path / "d")  # the teacher trains on the same data
    # the published default path is not a run directory: the hint says which checkpoint to point the student at
    run_ckpt = os.path.join(str(tmp_path), "cifar100_none_resnet56_vanilla_seed0", "student_best.pth")
    assert f"set DISTILLER.TEACHER_CKPT {run_ckpt}" in msg


# 8 -----------------------------------------------------------------------------------------------------------

def test_eval_takes_the_model_from_the_run_config(tmp_path, capsys):
    _train_main()(["--cfg", os.path.join(ROOT, "configs", "fashion_mnist", "vanilla", "resnet8.yaml"),
                   "LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", "r8", *SMALL])
    run = tmp_path / "r8"
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    _tool_main("eval")(["-c", str(run / "student_best.pth"), "--run-config", str(run / "config.yaml"), "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("resnet8 on fashion_mnist test (160 images)")
    assert json.loads(out[-1])["top1"] == pytest.approx(summary["best_top1"], abs=1e-9)


def test_eval_without_model_or_run_config_is_one_line(tmp_path, capsys):
    code, err = _one_line_error(_tool_main("eval"), ["-c", str(tmp_path / "x.pth")], capsys)
    assert code == UserError.exit_code and "-m MODEL" in err and "--run-config" in err


def test_cifar_pickle_with_str_keys_is_one_clear_line(tmp_path, capsys):
    fx.write_cifar100(str(tmp_path), n_train=20, n_test=10)
    folder = tmp_path / "cifar-100-python"
    for split in ("train", "test"):  # the same content re-saved with str keys, as a decoding script would
        with open(folder / split, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        with open(folder / split, "wb") as f:
            pickle.dump({k.decode(): v for k, v in entry.items()}, f)
    from mdistiller.data.cifar100 import read_split

    with pytest.raises(DataError, match=r"has str keys \('data'\) where the CIFAR-100 python files have bytes keys"):
        read_split(str(folder / "test"))
    code, err = _one_line_error(_tool_main("eval"), ["-m", "resnet8", "-c", str(tmp_path / "x.pth"), "-d",
                                                     "cifar100", "--root", str(tmp_path)], capsys)
    assert code == DataError.exit_code and "str keys" in err and "download" in err and "KeyError" not in err


def test_cifar_pickle_that_is_not_a_dict_or_lacks_labels_is_one_line(tmp_path):
    from mdistiller.data.cifar100 import read_split

    path = tmp_path / "train"
    with open(path, "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(DataError, match="holds a list, not the dict"):
        read_split(str(path))
    with open(path, "wb") as f:
        pickle.dump({b"data": [[0] * 3072]}, f)
    with pytest.raises(DataError, match=r"has no b'fine_labels' entry \(its keys: b'data'\)"):
        read_split(str(path))


# 11 ----------------------------------------------------------------------------------------------------------

def _setup_kwargs(monkeypatch):
    """The keyword arguments setup.py passes to setuptools.setup, read by running it with setup() captured."""
    import runpy

    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    return captured


def test_setup_py_asks_for_ranges_the_pinned_builds_satisfy(monkeypatch):
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.version import Version

    kwargs = _setup_kwargs(monkeypatch)
    requires = {r.name: r for r in map(Requirement, kwargs["install_requires"])}
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        pins = {r.name: r for r in (Requirement(x.strip()) for x in f if x.strip() and not x.startswith("#"))}
    assert set(requires) == set(pins)  # the same packages; only torch, torchvision and timm are loosened
    for name in ("torch", "torchvision", "timm"):
        (pin,) = pins[name].specifier
        assert pin.operator == "==", f"requirements.txt keeps the exact {name} build"
        spec = requires[name].specifier
        assert all(s.operator == ">=" for s in spec) and len(spec) == 1, f"{name}: {spec} is not a minimum"
        installed = Version(metadata.version(name))  # e.g. 2.14.1+cu130: a local build of the pinned release
        assert spec.contains(installed) and spec.contains(pin.version), (name, spec, installed)
    # the minimums: torch.nn.utils.get_total_norm (engine/finite_guard.py) is new in torch 2.6, and
    # torchvision 0.21 is the release built for torch 2.6
    assert str(requires["torch"].specifier) == ">=2.6" and str(requires["torchvision"].specifier) == ">=0.21"
    import torch

    assert callable(torch.nn.utils.get_total_norm)
    assert str(requires["timm"].specifier) == ">=1.0.31"  # the tested release (forward_intermediates everywhere)
    for name in set(requires) - {"torch", "torchvision", "timm"}:
        assert requires[name].specifier == pins[name].specifier, name
    assert [str(Requirement(r)) for r in kwargs["extras_require"]["wandb"]] == ["wandb>=0.16"]
