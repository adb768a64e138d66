"""timm and torchvision models as teachers and students: the feature contract against the libraries' own forward
and feature APIs, training steps through build_run, pretrained weights from the libraries' cache layouts (placed
here by hand, random), and the one-line errors. Offline, CPU, random weights, 32x32 inputs."""

import hashlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data_fixtures as fx
from mdistiller.bench.synthetic import SyntheticDataset
from mdistiller.config import load_config
from mdistiller.engine import build_run
from mdistiller.engine.hooks import HookBase
from mdistiller.models import build_model
from mdistiller.models.teacher_ckpt import build_teacher, teacher_record
from mdistiller.utils.errors import CheckpointError, ConfigError

timm = pytest.importorskip("timm")
tvm = pytest.importorskip("torchvision.models")
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _contract_shapes(model, logits, features, num_classes):
    feats = features["feats"]
    assert [f.shape[1] for f in feats] == model.stage_channels()
    assert all(f.dim() == 4 and f.shape[0] == 2 for f in feats)
    assert features["preact_feats"] == feats  # no pre-activation taps in the libraries: the same tensors
    assert features["pooled_feat"].shape == (2, model.feat_dim)
    assert logits.shape == (2, num_classes)


def _plain_copy(create, model):
    """The library's own model (built by the library, not by us), with our model's weights loaded strictly: the
    keys must be the library's own."""
    plain = create().eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain


def test_timm_cnn_follows_the_contract_and_the_library():
    model = build_model("timm:resnet10t", num_classes=7, image_size=32).eval()
    logits, features = model(X)
    _contract_shapes(model, logits, features, 7)
    assert model.stage_channels() == [64, 64, 128, 256, 512] and model.feature_pyramid
    plain = _plain_copy(lambda: timm.create_model("resnet10t", num_classes=7), model)
    with torch.no_grad():
        assert torch.allclose(logits, plain(X), atol=1e-6)
        final, expected = plain.forward_intermediates(X, indices=5, output_fmt="NCHW")  # stem + 4 stages
        assert all(torch.equal(a, b) for a, b in zip(features["feats"], expected)) and len(expected) == 5
        # the pooled vector: global average of the last stage, the classifier's input
        assert torch.allclose(features["pooled_feat"], final.mean((2, 3)), atol=1e-6)
        assert torch.allclose(plain.fc(features["pooled_feat"]), logits, atol=1e-5)


def test_timm_vit_gives_five_evenly_spaced_blocks_as_nchw_maps():
    model = build_model("timm:vit_tiny_patch16_224", num_classes=5, image_size=32).eval()
    logits, features = model(X)
    _contract_shapes(model, logits, features, 5)
    assert model.stage_channels() == [192] * 5 and not model.feature_pyramid
    plain = _plain_copy(lambda: timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32), model)
    with torch.no_grad():
        assert torch.allclose(logits, plain(X), atol=1e-5)
        # blocks 0, 2, 5, 8, 11 by hand: patch tokens (after the class token) of 32/16 = 2x2 patches, as NCHW
        x = plain._pos_embed(plain.patch_embed(X))
        x = plain.norm_pre(plain.patch_drop(x))
        expected = []
        for i, block in enumerate(plain.blocks):
            x = block(x)
            if i in (0, 2, 5, 8, 11):
                expected.append(x[:, 1:].reshape(2, 2, 2, 192).permute(0, 3, 1, 2))
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(features["feats"], expected))
        assert torch.allclose(features["pooled_feat"], plain.norm(x)[:, 0], atol=1e-5)  # the class token


def test_torchvision_resnet_taps_are_its_stem_and_stages():
    model = build_model("torchvision:resnet18", num_classes=6, image_size=32).eval()
    logits, features = model(X)
    _contract_shapes(model, logits, features, 6)
    assert model.stage_channels() == [64, 64, 128, 256, 512]
    plain = _plain_copy(lambda: tvm.resnet18(num_classes=6), model)
    extractor = create_feature_extractor(plain, ["relu", "layer1", "layer2", "layer3", "layer4", "flatten"])
    with torch.no_grad():
        out = extractor(X)
        assert torch.allclose(logits, plain(X), atol=1e-6)
    assert [tuple(f.shape[-2:]) for f in features["feats"]] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    for ours, name in zip(features["feats"], ["relu", "layer1", "layer2", "layer3", "layer4"]):
        assert torch.equal(ours, out[name]), name
    assert torch.equal(features["pooled_feat"], out["flatten"])


def test_torchvision_mobilenet_v3_taps_block_outputs_and_the_last_linears_input():
    model = build_model("torchvision:mobilenet_v3_small", num_classes=4, image_size=32).eval()
    logits, features = model(X)
    _contract_shapes(model, logits, features, 4)
    plain = _plain_copy(lambda: tvm.mobilenet_v3_small(num_classes=4), model)
    with torch.no_grad():
        assert torch.allclose(logits, plain(X), atol=1e-6)
        # stem conv (stride 2), then the last block at 8x8, 4x4, 2x2 (block outputs, not their expansions) and the
        # body's end; the classifier's input is the hidden layer after pooling
        f = plain.features
        expected = [f[:1](X), f[:2](X), f[:4](X), f[:9](X), f(X)]
        pooled = plain.classifier[:3](plain.avgpool(f(X)).flatten(1))
    assert [e.shape[1] for e in expected] == [16, 16, 24, 48, 576]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(features["feats"], expected))
    assert torch.allclose(features["pooled_feat"], pooled, atol=1e-6) and model.feat_dim == 1024


def test_unknown_names_and_unsupported_models_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="unknown timm model 'resnet19'.*close: .*resnet18"):
        build_model("timm:resnet19", num_classes=10, image_size=32)
    with pytest.raises(ConfigError, match="unknown torchvision classification model 'resnet19'.*resnet18"):
        build_model("torchvision:resnet19", num_classes=10, image_size=32)
    with pytest.raises(ConfigError, match="no final nn.Linear classifier"):
        build_model("torchvision:squeezenet1_0", num_classes=10, image_size=32)
    with pytest.raises(ConfigError, match="does not run on 32x32"):
        build_model("torchvision:vit_b_16", num_classes=10, image_size=32)


def test_importing_mdistiller_does_not_import_timm():
    code = "import sys, mdistiller, mdistiller.models; print('timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- training through build_run -------------------------------------------------------------------------------

DATA = SyntheticDataset("fashion_mnist", 32, 16)


def _cfg(method, teacher, student, *extra):
    return load_config(None, ["DISTILLER.TYPE", method, "DISTILLER.TEACHER", teacher, "DISTILLER.STUDENT", student,
                              "EXPERIMENT.DEVICE", "cpu", "SOLVER.BATCH_SIZE", "16", "SOLVER.EPOCHS", "1",
                              "SOLVER.LR_DECAY_STAGES", "[1]", "DATASET.ROOT", "/nonexistent", "LOG.PRINT_FREQ", "0",
                              "LOG.MONITOR_TEACHER", "False", *extra])


def _teacher_state(name, seed=1):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(name, num_classes=10, image_size=32).state_dict()


TIMM_T, TIMM_S, VIT = "timm:resnet18", "timm:resnet10t", "timm:vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def timm_teacher_state():
    return _teacher_state(TIMM_T)


def _trains(cfg, teacher_state):
    """Two steps of the run; the student's weights moved and stayed finite, the method's own term was logged."""
    run = build_run(cfg, bundle=DATA(cfg), teacher_state=teacher_state)
    before = {k: v.clone() for k, v in run.distiller.student.state_dict().items()}
    seen = []
    run.trainer.register_hooks([_Losses(seen)])
    run.trainer.train()
    after = run.distiller.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert len(seen) == 2 and all(torch.isfinite(torch.tensor(list(s.values()))).all() for s in seen)
    return seen


class _Losses(HookBase):
    """Records each step's loss terms (as floats)."""

    def __init__(self, seen):
        self.seen = seen

    def after_step(self, step):
        self.seen.append({k: float(v) for k, v in step.losses.items()})


@pytest.mark.parametrize("method,term,extra", [("KD", "kd", []), ("DKD", "dkd", []), ("CRD", "crd", ["CRD.NCE_K", "8"]),
                                               ("KD++", "dino", []), ("AT", "at", [])])
def test_timm_teacher_and_student_train_a_step(method, term, extra, timm_teacher_state):
    seen = _trains(_cfg(method, TIMM_T, TIMM_S, *extra), timm_teacher_state)
    assert term in seen[0]


@pytest.mark.parametrize("method,term", [("KD", "kd"), ("KD++", "dino")])
def test_vit_teacher_teaches_our_cnn(method, term):
    seen = _trains(_cfg(method, VIT, "resnet8"), _teacher_state(VIT))
    assert term in seen[0]


def test_dot_trainer_with_library_models(timm_teacher_state):
    _trains(_cfg("KD", TIMM_T, TIMM_S, "SOLVER.UPDATE_RULE", "dot"), timm_teacher_state)


def test_reviewkd_refuses_a_vit_and_ofd_a_library_teacher(timm_teacher_state):
    cfg = _cfg("REVIEWKD", VIT, "resnet8")
    with pytest.raises(ConfigError, match="DISTILLER.TEACHER: REVIEWKD fuses a feature pyramid.*vit_tiny"):
        build_run(cfg, bundle=DATA(cfg), teacher_state=_teacher_state(VIT))
    cfg = _cfg("OFD", TIMM_T, TIMM_S)
    with pytest.raises(ConfigError, match="OFD needs the teacher's BatchNorm.*timm:resnet18 is a library model"):
        build_run(cfg, bundle=DATA(cfg), teacher_state=timm_teacher_state)


# ---- pretrained weights from the libraries' caches ------------------------------------------------------------

@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches for this test only."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def _place_timm_weights(home, repo, state):
    """A state dict where huggingface_hub keeps a downloaded model.safetensors: refs/main names a snapshot."""
    from safetensors.torch import save_file

    folder = os.path.join(home, "hf", "hub", "models--" + repo.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    os.makedirs(os.path.join(folder, "refs"))
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write(revision)
    path = os.path.join(folder, "snapshots", revision, "model.safetensors")
    os.makedirs(os.path.dirname(path))
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def _place_torchvision_weights(home, filename, state):
    path = os.path.join(home, "torch", "hub", "checkpoints", filename)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)
    return path


def _random_state(create, seed):
    torch.manual_seed(seed)
    return create().state_dict()


def test_timm_weights_load_from_the_hub_cache_with_a_new_head_for_other_classes(caches):
    state = _random_state(lambda: timm.create_model("resnet10t"), seed=5)  # 1000 classes, as timm's weights
    _place_timm_weights(caches, "timm/resnet10t.c3_in1k", state)
    same = build_model("timm:resnet10t", num_classes=1000, image_size=32, pretrained=True).state_dict()
    assert same.keys() == state.keys() and all(torch.equal(same[k], state[k]) for k in state)
    student = build_model("timm:resnet10t", num_classes=10, image_size=32, pretrained=True).state_dict()
    assert student["fc.weight"].shape == (10, 512)
    assert all(torch.equal(student[k], state[k]) for k in state if not k.startswith("fc."))


def test_torchvision_weights_load_from_the_hub_checkpoints_dir(caches):
    state = _random_state(lambda: tvm.resnet18(), seed=6)
    _place_torchvision_weights(caches, "resnet18-f37072fd.pth", state)
    same = build_model("torchvision:resnet18", num_classes=1000, image_size=32, pretrained=True).state_dict()
    assert all(torch.equal(same[k], state[k]) for k in state) and same.keys() == state.keys()
    student = build_model("torchvision:resnet18", num_classes=10, image_size=32, pretrained=True).state_dict()
    assert student["fc.weight"].shape == (10, 512)
    assert all(torch.equal(student[k], state[k]) for k in state if not k.startswith("fc."))


def test_missing_weights_are_one_line_naming_file_place_and_command(caches):
    with pytest.raises(CheckpointError) as e:
        build_model("timm:resnet10t", num_classes=10, image_size=32, pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg and "timm:resnet10t" in msg and "MODEL.STUDENT_PRETRAINED False" in msg
    assert os.path.join(str(caches), "hf", "hub", "models--timm--resnet10t.c3_in1k") in msg
    assert "model.safetensors" in msg and "timm.create_model('resnet10t', pretrained=True)" in msg
    with pytest.raises(CheckpointError) as e:
        build_model("torchvision:resnet18", num_classes=10, image_size=32, pretrained=True)
    msg = str(e.value)
    assert os.path.join(str(caches), "torch", "hub", "checkpoints", "resnet18-f37072fd.pth") in msg
    assert "get_model('resnet18', weights='DEFAULT')" in msg and "\n" not in msg


def test_a_pretrained_library_teacher_is_recorded_by_its_file_and_must_fit_the_classes(caches):
    state = _random_state(lambda: tvm.resnet18(), seed=7)
    path = _place_torchvision_weights(caches, "resnet18-f37072fd.pth", state)
    cfg = _cfg("KD", "torchvision:resnet18", "resnet8", "DATASET.TYPE", "imagenet")
    teacher = build_teacher(cfg, 1000, 32).state_dict()
    assert all(torch.equal(teacher[k], state[k]) for k in state)
    record = teacher_record(cfg)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert record["checkpoint"] == os.path.abspath(path) and record["sha256"] == digest and record["top1"] is None
    with pytest.raises(CheckpointError, match="classify 1000 classes and this dataset has 10: fine-tune the "
                                              "teacher.*DISTILLER.TYPE NONE.*MODEL.STUDENT_PRETRAINED True.*"
                                              "DISTILLER.TEACHER_CKPT"):
        build_teacher(cfg, 10, 32)
    cfg.defrost()
    cfg.DISTILLER.TEACHER = "timm:resnet10t"
    with pytest.raises(CheckpointError, match="MODEL.TEACHER_PRETRAINED False"):
        build_teacher(cfg, 1000, 32)


VANILLA_CFG = os.path.join(ROOT, "configs", "fashion_mnist", "vanilla", "_recipe.yaml")
SMALL = ["DATASET.TYPE", "fashion_mnist", "DATASET.TRAIN_SUBSET", "40", "DATASET.TEST_SUBSET", "20",
         "EXPERIMENT.DEVICE", "cpu", "SOLVER.EPOCHS", "1",
         "SOLVER.LR_DECAY_STAGES", "[1]", "SOLVER.BATCH_SIZE", "20", "LOG.TENSORBOARD_FREQ", "0",
         "LOG.MONITOR_TEACHER", "False"]


def test_train_tool_exits_2_with_the_line_when_pretrained_weights_are_missing(caches):
    fx.write_fashion_mnist(str(caches / "data" / "FashionMNIST" / "raw"), compress=False)
    env = {**os.environ, "HF_HOME": str(caches / "hf"), "TORCH_HOME": str(caches / "torch")}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), "--cfg", VANILLA_CFG,
                          "DISTILLER.STUDENT", TIMM_S, "MODEL.STUDENT_PRETRAINED", "True", "DATASET.ROOT",
                          str(caches / "data"), "LOG.PREFIX", str(caches / "out"), *SMALL],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    lines = [line for line in (out.stderr + out.stdout).splitlines() if "pretrained weights of timm:resnet10t" in line]
    assert len(lines) == 1 and "MODEL.STUDENT_PRETRAINED False" in lines[0] and "pretrained=True" in lines[0]


def _train_main():
    """tools/train.py's own main(), loaded from the file (the CLI's code path, in this process)."""
    tools = os.path.join(ROOT, "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)  # train.py imports its sibling _path.py, as when run as a script
    spec = importlib.util.spec_from_file_location("train_tool", os.path.join(tools, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_a_library_teacher_loads_our_own_runs_student_best(caches):
    """A timm student trained alone (DISTILLER.TYPE NONE) by tools/train.py; its student_best.pth is then the
    teacher's DISTILLER.TEACHER_CKPT, loaded strictly and recorded by that file."""
    fx.write_fashion_mnist(str(caches / "data" / "FashionMNIST" / "raw"), compress=False)
    _train_main()(["--cfg", VANILLA_CFG, "DISTILLER.STUDENT", TIMM_S, "DATASET.ROOT", str(caches / "data"),
                   "LOG.PREFIX", str(caches / "out"), "EXPERIMENT.NAME", "t", *SMALL])
    ckpt = str(caches / "out" / "t" / "student_best.pth")
    cfg = _cfg("KD", TIMM_S, "resnet8", "DISTILLER.TEACHER_CKPT", ckpt)
    teacher = build_teacher(cfg, 10, 32).state_dict()
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    assert teacher.keys() == saved.keys() and all(torch.equal(teacher[k], saved[k]) for k in saved)
    assert teacher_record(cfg)["checkpoint"] == os.path.abspath(ckpt)
    # the KD run's teacher forward on it is the library's forward with those weights
    plain = timm.create_model("resnet10t", num_classes=10).eval()
    plain.load_state_dict(saved)
    model = build_teacher(cfg, 10, 32).eval()
    with torch.no_grad():
        assert torch.allclose(F.softmax(model(X)[0], 1), F.softmax(plain(X), 1), atol=1e-6)


def test_a_library_teacher_is_looked_for_where_its_own_run_lands(tmp_path):
    # The teacher trained alone (DISTILLER.TYPE NONE, TAG vanilla) lands in a folder named after the model with the
    # library prefix made portable; a distillation run without TEACHER_CKPT (pretrained off) looks exactly there.
    from mdistiller.config import load_config
    from mdistiller.engine.launch import run_dir_for
    from mdistiller.models.teacher_ckpt import default_teacher_ckpt

    teacher_run = load_config(None, ["DISTILLER.TYPE", "NONE", "DISTILLER.STUDENT", "timm:resnet10t",
                                     "EXPERIMENT.TAG", "vanilla", "LOG.PREFIX", str(tmp_path)])
    kd = load_config(None, ["DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "timm:resnet10t", "DISTILLER.STUDENT",
                            "resnet8", "MODEL.TEACHER_PRETRAINED", "False", "LOG.PREFIX", str(tmp_path)])
    assert default_teacher_ckpt(kd) == os.path.join(run_dir_for(teacher_run), "student_best.pth")
    assert ":" not in os.path.basename(run_dir_for(teacher_run))
