"""Teachers: download_ckpts.sh against a local file:// mirror in the published archive format, and loading the
result through the path tools/train.py uses (engine.teacher.build_teacher), with one-line errors."""

import hashlib
import json
import os
import subprocess
import tarfile

import pytest
import torch

from mdistiller.config import load_config
from mdistiller.models import teacher_ckpt as teacher_mod
from mdistiller.models.teacher_ckpt import build_teacher
from mdistiller.utils.errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "download_ckpts.sh")
with open(os.path.join(ROOT, "tests", "fixtures", "published_checkpoint_layouts.json")) as f:
    LAYOUTS = json.load(f)
TEACHERS = ("resnet56", "resnet110")


def published_state(section, name, seed):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in LAYOUTS[section][name]["state_dict"].items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(240)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A cifar_teachers.tar laid out like the published one, with the fixture's shapes and random values."""
    root = tmp_path_factory.mktemp("mirror")
    staging = root / "staging"
    states = {}
    for i, name in enumerate(TEACHERS):
        d = staging / "cifar_teachers" / f"{name}_vanilla"
        d.mkdir(parents=True)
        states[name] = published_state("cifar100", name, i)
        torch.save({"model": states[name], "epoch": 240}, d / "ckpt_epoch_240.pth")
    archive = root / "cifar_teachers.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(staging / "cifar_teachers", arcname="cifar_teachers")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    return root, digest, states


def run_script(env_extra, *args):
    env = {**os.environ, **env_extra}
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600)


def test_download_verify_unpack_and_idempotent(mirror, tmp_path):
    root, digest, _ = mirror
    dest = tmp_path / "ckpts"
    env = {"MDISTILLER_CKPT_BASE_URL": f"file://{root}", "MDISTILLER_CKPT_DIR": str(dest),
           "MDISTILLER_CKPT_SHA256": digest}
    proc = run_script(env)
    assert proc.returncode == 0, proc.stderr
    assert "SHA-256 verified" in proc.stdout
    for name in TEACHERS:
        assert (dest / "cifar_teachers" / f"{name}_vanilla" / "ckpt_epoch_240.pth").is_file()
    assert not (dest / "cifar_teachers.tar").exists()
    # Second run: nothing is fetched (the mirror is gone and it still succeeds).
    proc = run_script({**env, "MDISTILLER_CKPT_BASE_URL": f"file://{tmp_path}/gone"})
    assert proc.returncode == 0 and "already" in proc.stdout, proc.stderr


def test_checksum_mismatch_is_refused(mirror, tmp_path):
    root, _, _ = mirror
    dest = tmp_path / "ckpts"
    proc = run_script({"MDISTILLER_CKPT_BASE_URL": f"file://{root}", "MDISTILLER_CKPT_DIR": str(dest),
                       "MDISTILLER_CKPT_SHA256": "0" * 64})
    assert proc.returncode != 0 and "checksum mismatch" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not (dest / "cifar_teachers").exists()


def test_offline_fails_clearly(tmp_path):
    proc = run_script({"MDISTILLER_CKPT_BASE_URL": f"file://{tmp_path}/nowhere", "MDISTILLER_CKPT_DIR": str(tmp_path)})
    assert proc.returncode != 0
    assert "could not download" in proc.stderr and "offline" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_help_says_what_it_downloads_and_exits_0(tmp_path):
    for flag in ("--help", "-h"):
        proc = run_script({"MDISTILLER_CKPT_DIR": str(tmp_path / "d"), "MDISTILLER_CKPT_BASE_URL": "file:///none"},
                          flag)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        for word in ("cifar_teachers.tar", "imagenet", "MDISTILLER_CKPT_BASE_URL", "MDISTILLER_CKPT_SHA256",
                     "MDISTILLER_CKPT_DIR", "TORCH_HOME"):
            assert word in proc.stdout, word
        assert not proc.stdout.startswith("#") and "set -euo" not in proc.stdout
        assert not (tmp_path / "d").exists()  # nothing fetched, nothing created
    proc = run_script({}, "cifarr")
    assert proc.returncode != 0 and "--help" in proc.stderr and proc.stderr.count("\n") == 1


def _closed_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_offline_is_one_line_naming_the_file_and_where_it_goes(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}"
    proc = run_script({"MDISTILLER_CKPT_BASE_URL": url, "MDISTILLER_CKPT_DIR": str(tmp_path)})
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"could not download {url}/cifar_teachers.tar" in proc.stderr
    assert f"put it at {tmp_path}/cifar_teachers.tar" in proc.stderr
    assert os.listdir(tmp_path) == []  # no .part or .err left behind


def test_a_retried_failure_is_reported_once(tmp_path):
    """curl retries a 503 twice; the user sees its last error once, not one per try plus the retry warnings."""
    import http.server
    import threading

    class Busy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.server.hits += 1
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Busy)
    server.hits = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proc = run_script({"MDISTILLER_CKPT_BASE_URL": f"http://127.0.0.1:{server.server_port}",
                           "MDISTILLER_CKPT_DIR": str(tmp_path)})
    finally:
        server.shutdown()
        server.server_close()
    assert server.hits == 3  # the first try and two retries
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.count("503") == 1 and "Warning" not in proc.stderr and "retry" not in proc.stderr.lower()


def test_not_a_teacher_archive(tmp_path):
    mirror = tmp_path / "m"
    (mirror / "junk").mkdir(parents=True)
    (mirror / "junk" / "a.txt").write_text("x")
    with tarfile.open(mirror / "cifar_teachers.tar", "w") as tar:
        tar.add(mirror / "junk", arcname="junk")
    proc = run_script({"MDISTILLER_CKPT_BASE_URL": f"file://{mirror}", "MDISTILLER_CKPT_DIR": str(tmp_path / "d"),
                       "MDISTILLER_CKPT_SHA256": ""})
    assert proc.returncode != 0 and "is it the teacher archive" in proc.stderr


def test_imagenet_weights_are_checked_against_their_hash_prefix(tmp_path):
    mirror = tmp_path / "tv"
    mirror.mkdir()
    for name in ("resnet34-b627a593.pth", "resnet50-0676ba61.pth", "resnet18-f37072fd.pth"):
        (mirror / name).write_bytes(b"not the real weights")
    proc = run_script({"MDISTILLER_TORCHVISION_BASE_URL": f"file://{mirror}", "TORCH_HOME": str(tmp_path / "th")},
                      "imagenet")
    assert proc.returncode != 0 and "checksum mismatch for resnet34-b627a593.pth" in proc.stderr


def teacher_cfg(*overrides):
    return load_config(None, ["DATASET.TYPE", "cifar100", "DISTILLER.STUDENT", "resnet8",
                              "DISTILLER.TEACHER", "resnet56", *overrides])


def test_teacher_loads_through_the_training_path(mirror, tmp_path, monkeypatch):
    root, digest, states = mirror
    dest = tmp_path / "ckpts"
    assert run_script({"MDISTILLER_CKPT_BASE_URL": f"file://{root}", "MDISTILLER_CKPT_DIR": str(dest),
                       "MDISTILLER_CKPT_SHA256": digest}).returncode == 0
    monkeypatch.setenv("MDISTILLER_CKPT_DIR", str(dest))
    for name in TEACHERS:
        model = build_teacher(teacher_cfg("DISTILLER.TEACHER", name), 100)  # default TEACHER_CKPT location
        for key, value in model.state_dict().items():
            assert torch.equal(value, states[name][key]), key


def test_teacher_errors_are_one_clear_line(mirror, tmp_path, monkeypatch):
    root, digest, _ = mirror
    monkeypatch.setenv("MDISTILLER_CKPT_DIR", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError) as e:
        build_teacher(teacher_cfg(), 100)
    msg = str(e.value)
    assert "\n" not in msg and "resnet56" in msg and "not found" in msg and "download_ckpts.sh" in msg
    assert str(tmp_path / "empty" / "cifar_teachers" / "resnet56_vanilla" / "ckpt_epoch_240.pth") in msg

    # A checkpoint of another architecture.
    other = tmp_path / "r110.pth"
    torch.save({"model": published_state("cifar100", "resnet110", 0)}, other)
    with pytest.raises(CheckpointError) as e:
        build_teacher(teacher_cfg("DISTILLER.TEACHER_CKPT", str(other)), 100)
    msg = str(e.value)
    assert "\n" not in msg and str(other) in msg and "does not fit model resnet56" in msg
    assert "unexpected keys" in msg and "download_ckpts.sh" in msg

    # Same architecture, one key missing and one renamed.
    state = published_state("cifar100", "resnet56", 0)
    state["fc.weights"] = state.pop("fc.weight")
    broken = tmp_path / "broken.pth"
    torch.save({"model": state}, broken)
    with pytest.raises(CheckpointError, match=r"1 missing keys \(e\.g\. fc\.weight\); 1 unexpected keys"):
        build_teacher(teacher_cfg("DISTILLER.TEACHER_CKPT", str(broken)), 100)

    # Shape mismatch: a 10-class head into a 100-class teacher.
    state = published_state("cifar100", "resnet56", 0)
    state["fc.weight"], state["fc.bias"] = torch.zeros(10, 64), torch.zeros(10)
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": state}, wrong)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(e\.g\. fc\.weight \(10, 64\) vs \(100, 64\)"):
        build_teacher(teacher_cfg("DISTILLER.TEACHER_CKPT", str(wrong)), 100)


def test_imagenet_teacher_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setitem(teacher_mod.TORCHVISION_WEIGHTS, "ResNet34", f"file://{tmp_path}/nowhere/resnet34-b627a593.pth")
    cfg = load_config(None, ["DATASET.TYPE", "imagenet", "DISTILLER.STUDENT", "ResNet18", "DISTILLER.TEACHER",
                             "ResNet34"], validate=False)
    with pytest.raises(CheckpointError) as e:
        build_teacher(cfg, 1000)
    assert "resnet34-b627a593.pth" in str(e.value) and "download_ckpts.sh imagenet" in str(e.value)


def test_fashion_mnist_teacher_defaults_to_our_vanilla_run(tmp_path):
    cfg = load_config(None, ["LOG.PREFIX", str(tmp_path), "DISTILLER.TEACHER", "resnet20"], validate=False)
    assert teacher_mod.default_teacher_ckpt(cfg) == os.path.join(
        str(tmp_path), "fashion_mnist_none_resnet20_vanilla_seed0", "student_best.pth")
