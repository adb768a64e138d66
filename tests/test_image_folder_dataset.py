"""DATASET.TYPE image_folder: a generated train/<class>/ + val/<class>/ tree of small JPEG/PNG files.

- the classes, sizes and transforms the loader gives, against PIL arithmetic written here;
- a teacher trained alone, then KD from it at the default teacher location through tools/train.py, then
  tools/eval.py on the student: same test images, same top-1 and loss as the run's last epoch;
- CRD on a subset (its memory bank needs the labels in dataset-index order);
- one DataError / ConfigError line for each malformed tree or bad setting.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mdistiller.config import load_config
from mdistiller.data import build_dataloaders
from mdistiller.engine.launch import train_from_config
from mdistiller.models.teacher_ckpt import build_teacher
from mdistiller.utils.errors import CheckpointError, ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "image_folder", "vanilla", "_recipe.yaml")
CLASSES = ("ant", "bee", "cat", "dog")  # sorted: label i is CLASSES[i]
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_tree(root, classes=CLASSES, train=TRAIN_PER_CLASS, val=VAL_PER_CLASS, size=40):
    """root/{train,val}/<class>/ with 40x40 images tinted per class; mixed formats and one greyscale image,
    as a user's folder would have, plus a non-image file that must be ignored."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for k, c in enumerate(classes):
            d = os.path.join(root, split, c)
            os.makedirs(d)
            for i in range(n):
                pixels = rng.integers(0, 128, (size, size, 3), dtype=np.uint8)
                pixels[..., k % 3] += 120
                image = Image.fromarray(pixels)
                if i == 0 and k == 1:
                    image.convert("L").save(os.path.join(d, f"{c}_{i}.png"))
                else:
                    image.save(os.path.join(d, f"{c}_{i}.{'JPEG' if i % 2 else 'jpg'}"), quality=95)
            with open(os.path.join(d, "notes.txt"), "w") as f:
                f.write("not an image\n")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("own") / "pets"
    write_tree(str(root))
    return str(root)


def overrides(root, prefix, *extra):
    return ["DATASET.ROOT", root, "IMAGE_FOLDER.IMAGE_SIZE", "32", "DATASET.NUM_WORKERS", "0",
            "EXPERIMENT.DEVICE", "cpu", "LOG.PREFIX", str(prefix), "SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES",
            "[1]", "SOLVER.BATCH_SIZE", "8", "DATASET.TEST.BATCH_SIZE", "5", "LOG.TENSORBOARD_FREQ", "0",
            "LOG.PRINT_FREQ", "0", *extra]


def expected_eval_tensor(path, size, mode, mean, std):
    """The published ImageNet evaluation transform, by hand with PIL: shorter side to floor(size * 256 / 224)
    (these images are square) and the central size x size; or the whole image resized to size x size."""
    image = Image.open(path).convert("RGB")
    if mode == "crop":
        short = size * 256 // 224
        image = image.resize((short, short), Image.BILINEAR)
        left = int(round((short - size) / 2.0))
        image = image.crop((left, left, left + size, left + size))
    else:
        image = image.resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@pytest.mark.parametrize("mode", ["crop", "resize"])
def test_classes_sizes_and_transforms(tree, tmp_path, mode):
    cfg = load_config(RECIPE, overrides(tree, tmp_path, "IMAGE_FOLDER.TRANSFORM", mode,
                                        "IMAGE_FOLDER.MEAN", "[0.5, 0.4, 0.3]", "IMAGE_FOLDER.STD", "[0.2, 0.25, 0.3]"))
    train, test, meta = build_dataloaders(cfg, "cpu")
    assert meta.classes == CLASSES and meta.num_classes == 4 and meta.image_size == 32
    assert (meta.num_train, meta.num_test) == (4 * TRAIN_PER_CLASS, 4 * VAL_PER_CLASS)  # notes.txt is not a sample
    ds = test.loader.dataset.dataset
    seen = 0
    for x, y, i in test:
        for image, label, index in zip(x, y.tolist(), i.tolist()):
            path = ds.samples[index][0]
            assert CLASSES[label] == os.path.basename(os.path.dirname(path))
            want = expected_eval_tensor(path, 32, mode, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
            assert torch.allclose(image, want, atol=1e-5), path
            seen += 1
    assert seen == 12
    x, y, i = next(iter(train))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64


def test_subset_labels_in_index_order_for_crd(tree, tmp_path):
    cfg = load_config(RECIPE, overrides(tree, tmp_path, "DATASET.TRAIN_SUBSET", "20", "DATASET.TEST_SUBSET", "8"))
    train, test, meta = build_dataloaders(cfg, "cpu")
    assert (meta.num_train, meta.num_test) == (20, 8)
    assert torch.bincount(meta.train_targets, minlength=4).tolist() == [5, 5, 5, 5]  # class-balanced
    got = {}
    for _, y, i in train:
        got.update(zip(i.tolist(), y.tolist()))
    assert sorted(got) == list(range(20))
    assert [got[k] for k in range(20)] == meta.train_targets.tolist()


def test_teacher_then_kd_then_eval(tree, tmp_path):
    # The teacher alone, named as the default teacher location expects (tag vanilla, seed 0).
    teacher_cfg = load_config(RECIPE, overrides(tree, tmp_path, "DISTILLER.STUDENT", "resnet20",
                                                "EXPERIMENT.TAG", "vanilla"))
    teacher = train_from_config(teacher_cfg)
    assert teacher["classes"] == list(CLASSES) and teacher["num_test"] == 12 and teacher["num_train"] == 32
    teacher_dir = tmp_path / "image_folder_none_resnet20_vanilla_seed0"
    assert teacher["run_dir"] == str(teacher_dir)

    # KD from it through tools/train.py, DISTILLER.TEACHER_CKPT left empty, on class-balanced subsets.
    kd = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), "--cfg", RECIPE,
                         *overrides(tree, tmp_path, "DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "resnet20",
                                    "DISTILLER.STUDENT", "resnet8", "EXPERIMENT.NAME", "kd",
                                    "DATASET.TRAIN_SUBSET", "20", "DATASET.TEST_SUBSET", "8")],
                        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert kd.returncode == 0, kd.stderr[-3000:]
    run = tmp_path / "kd"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher"]["checkpoint"] == str(teacher_dir / "student_best.pth")
    assert summary["classes"] == list(CLASSES) and (summary["num_train"], summary["num_test"]) == (20, 8)
    assert summary["epochs"] == 2 and summary["dataset"] == "image_folder"
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]

    ev = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval.py"), "-c", str(run / "student_last.pth"),
                         "--run-config", str(run / "config.yaml"), "--json"],
                        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    assert result["num"] == 8
    assert result["top1"] == pytest.approx(summary["last_top1"], abs=1e-9)
    assert result["loss"] == pytest.approx(last["test_loss"], rel=1e-6)


def test_crd_on_a_subset(tree, tmp_path):
    teacher_ckpt = tmp_path / "t.pth"
    torch.manual_seed(0)
    from mdistiller.models import build_model

    torch.save({"model": build_model("resnet20", num_classes=4, image_size=32).state_dict()}, teacher_ckpt)
    cfg = load_config(RECIPE, overrides(tree, tmp_path, "DISTILLER.TYPE", "CRD", "DISTILLER.TEACHER", "resnet20",
                                        "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_CKPT", str(teacher_ckpt),
                                        "DATASET.TRAIN_SUBSET", "20", "EXPERIMENT.NAME", "crd", "SOLVER.EPOCHS", "1",
                                        "SOLVER.LR_DECAY_STAGES", "[]"))
    summary = train_from_config(cfg)
    assert summary["num_train"] == 20 and summary["epochs"] == 1
    assert np.isfinite(json.loads((tmp_path / "crd" / "metrics.jsonl").read_text().splitlines()[0])["train_loss"])


def test_missing_teacher_names_the_command_with_the_same_inputs(tree, tmp_path):
    cfg = load_config(RECIPE, overrides(tree, tmp_path, "DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "resnet20",
                                        "IMAGE_FOLDER.TRANSFORM", "resize"))
    with pytest.raises(CheckpointError) as e:
        build_teacher(cfg, 4, 32)
    msg = str(e.value)
    assert "configs/image_folder/vanilla/_recipe.yaml" in msg and os.path.isfile(RECIPE)
    for words in ("DISTILLER.STUDENT resnet20", "EXPERIMENT.TAG vanilla", f"DATASET.ROOT {tree}",
                  "IMAGE_FOLDER.IMAGE_SIZE 32", "IMAGE_FOLDER.TRANSFORM resize",
                  os.path.join(str(tmp_path), "image_folder_none_resnet20_vanilla_seed0", "student_best.pth")):
        assert words in msg, words
    assert "IMAGE_FOLDER.MEAN" not in msg  # left at its default


# --- errors -----------------------------------------------------------------------------------------------

def _build(root, tmp_path):
    return build_dataloaders(load_config(RECIPE, overrides(str(root), tmp_path)), "cpu")


def _one_line(match, err):
    text = str(err.value)
    assert "\n" not in text
    for m in match:
        assert m in text, (m, text)


def test_missing_folders(tmp_path):
    with pytest.raises(DataError) as e:
        _build(tmp_path / "nowhere", tmp_path)
    _one_line([str(tmp_path / "nowhere"), "DATASET.ROOT"], e)
    write_tree(str(tmp_path / "a"), train=1, val=1)
    os.rename(tmp_path / "a" / "val", tmp_path / "a" / "validation")
    with pytest.raises(DataError) as e:
        _build(tmp_path / "a", tmp_path)
    _one_line([str(tmp_path / "a" / "val"), "val/<class>"], e)
    os.makedirs(tmp_path / "b" / "train")
    os.makedirs(tmp_path / "b" / "val")
    with pytest.raises(DataError) as e:
        _build(tmp_path / "b", tmp_path)
    _one_line([str(tmp_path / "b" / "train"), "no class folders"], e)


def test_empty_class_folder(tmp_path):
    write_tree(str(tmp_path / "a"), train=1, val=1)
    for f in os.listdir(tmp_path / "a" / "val" / "cat"):
        if not f.endswith(".txt"):
            os.remove(tmp_path / "a" / "val" / "cat" / f)
    with pytest.raises(DataError) as e:
        _build(tmp_path / "a", tmp_path)
    _one_line([str(tmp_path / "a" / "val" / "cat"), "no image file", "remove class cat"], e)


def test_val_class_missing_through_the_tool(tmp_path):
    write_tree(str(tmp_path / "a"), train=1, val=1)
    os.rename(tmp_path / "a" / "val" / "dog", tmp_path / "a" / "dog_elsewhere")
    with pytest.raises(DataError) as e:
        _build(tmp_path / "a", tmp_path)
    _one_line([str(tmp_path / "a" / "val"), "missing ['dog']", "one folder (with images) per class"], e)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), "--cfg", RECIPE,
                        *overrides(str(tmp_path / "a"), tmp_path)], capture_output=True, text=True, env=ENV,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "missing ['dog']" in r.stderr
    assert os.listdir(tmp_path) == ["a"]  # a run that cannot start leaves no run directory behind


@pytest.mark.parametrize("key, value, words", [
    ("IMAGE_FOLDER.TRANSFORM", "stretch", "crop, resize"),
    ("IMAGE_FOLDER.STD", "[0.2, 0.0, 0.2]", "> 0"),
    ("IMAGE_FOLDER.MEAN", "[0.5, 0.5]", "3 values"),
    ("IMAGE_FOLDER.IMAGE_SIZE", "0", "> 0"),
])
def test_bad_settings(tmp_path, key, value, words):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        load_config(RECIPE, overrides(str(tmp_path), tmp_path, key, value))
    assert words in str(e.value)
