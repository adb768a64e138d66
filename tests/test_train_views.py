"""Training batches with several views per image (data/views.py, data/randaugment.py).

- shapes from both loaders, labels and index as in plain batches, the test loader unchanged;
- weak_strong: view 0 is the plain loader's image; rotations4: each view rotated back is a padded crop of the source
  image, one flip per image for all four views;
- determinism for the same (seed, epoch), a new epoch differs, a fresh loader at epoch e (a resumed run) and two
  ranks see what one uninterrupted process sees;
- RandAugment ops on tiny hand-made images against hand-computed values, and against PIL (the published ops);
- the engine passes the method's `train_views`; an unknown recipe is a ConfigError.
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from mdistiller.config import load_config
from mdistiller.data import build_dataloaders
from mdistiller.data import randaugment as ra
from mdistiller.data.bundle import DatasetBundle, TensorSplit
from mdistiller.data.memory_loader import InMemoryLoader
from mdistiller.data.views import VIEW_RECIPES, view_recipe
from mdistiller.distillers import DISTILLER_REGISTRY, Distiller
from mdistiller.engine.classification import ClassificationTask
from mdistiller.utils.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 40
IDENTITY_MEAN, IDENTITY_STD = (0.0,) * 3, (1 / 255,) * 3  # normalisation that keeps the uint8 values


def split(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorSplit(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % 10)


def loader(views, seed=3, rank=0, world=1, batch=16, data=None):
    return InMemoryLoader(data or split(), IDENTITY_MEAN, IDENTITY_STD, "cpu", batch, True, seed, rank, world,
                          view_recipe(views))


def batches(ld, epoch=0):
    ld.set_epoch(epoch)
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in ld]


def as_uint8(x):
    return x.round().to(torch.uint8)


@pytest.mark.parametrize("name,v", [("weak_strong", 2), ("rotations4", 4)])
def test_shapes_and_view_0_is_the_plain_image(name, v):
    plain = batches(loader(None))
    viewed = batches(loader(name))
    assert len(plain) == len(viewed)
    for (x, y, i), (xp, yp, ip) in zip(viewed, plain):
        assert x.shape == (len(y), v, 3, 32, 32) and x.dtype == torch.float32
        assert torch.equal(y, yp) and torch.equal(i, ip)
        assert torch.equal(x[:, 0], xp)  # the recipe's draws come after the plain crop/flip draws
        assert not torch.equal(x[:, 1], x[:, 0])


def is_padded_crop(view, image, pad=4):
    """Whether uint8 C x H x W `view` is one of the (2 pad + 1)^2 crops of the zero-padded `image`."""
    c, h, w = image.shape
    crops = F.pad(image, (pad,) * 4).unfold(1, h, 1).unfold(2, w, 1)  # C x 9 x 9 x H x W
    return bool((crops == view[:, None, None]).flatten(3).all(3).all(0).any())


def test_rotations4_views_are_rotated_crops_of_one_flipped_image():
    data = split()
    for x, _, index in batches(loader("rotations4", data=data)):
        for b in range(len(index)):
            src = data.images[index[b]]
            backs = [torch.rot90(as_uint8(x[b, k]), -k, dims=(-2, -1)) for k in range(4)]
            # one flip for all four views: every view is a crop of the same (flipped or not) image
            assert any(all(is_padded_crop(v, src.flip(-1) if flip else src) for v in backs) for flip in (False, True))
            assert not all(torch.equal(backs[0], v) for v in backs[1:])  # each view its own crop


def test_rotation_direction_is_counter_clockwise_like_np_rot90():
    image = torch.arange(9, dtype=torch.uint8).view(1, 1, 3, 3).expand(1, 3, 3, 3).contiguous()
    views = VIEW_RECIPES["rotations4"].tensor_views(image, torch.full((1, 2), 0), torch.tensor([False]),
                                                     {"shifts": torch.zeros(1, 3, 2, dtype=torch.int64)}, pad=0)
    for k in range(4):
        expect = np.rot90(image[0].permute(1, 2, 0).numpy(), k).copy()  # H x W x C, as SSKD's dataset
        assert torch.equal(views[0, k].permute(1, 2, 0), torch.from_numpy(expect))


@pytest.mark.parametrize("name", ["weak_strong", "rotations4"])
def test_same_epoch_same_views_other_epoch_other_views(name):
    ld = loader(name)
    a, b = batches(ld, 2), batches(ld, 2)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    c = batches(ld, 3)
    assert not torch.equal(a[0][0], c[0][0])


@pytest.mark.parametrize("name", ["weak_strong", "rotations4"])
def test_a_resumed_loader_and_two_ranks_see_the_same_views(name):
    ld = loader(name)
    for epoch in range(3):
        run = batches(ld, epoch)
    resumed = batches(loader(name), 2)  # a fresh loader, as after a resume at epoch 3
    assert all(torch.equal(p[0], q[0]) for p, q in zip(run, resumed))
    ranks = [batches(loader(name, rank=r, world=2), 2) for r in range(2)]
    for step, (x, _, i) in enumerate(run):
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), x)
        assert torch.equal(torch.cat([ranks[0][step][2], ranks[1][step][2]]), i)


def op_index(name):
    return torch.tensor([ra.OP_INDEX[name]])


def unit_for(name, value):
    """The unit draw that gives `value` as the op's magnitude."""
    _, lo, hi = ra.OPS[ra.OP_INDEX[name]]
    return torch.tensor([(value - lo) / (hi - lo)], dtype=torch.float64)


def tiny():
    return torch.tensor([[[0, 100], [128, 255]]] * 3, dtype=torch.uint8)[None]  # 1 x 3 x 2 x 2


def test_identity_solarize_posterize_by_hand():
    x = tiny()
    assert torch.equal(ra.apply_op(x, op_index("Identity"), torch.tensor([0.3], dtype=torch.float64)), x)
    # Solarize(128): values >= 128 inverted (PIL's LUT keeps i < threshold)
    out = ra.apply_op(x, op_index("Solarize"), unit_for("Solarize", 128.0))
    assert out[0, 0].tolist() == [[0, 100], [127, 0]]
    # a threshold above 255 changes nothing (PIL's LUT; torchvision's solarize would refuse it)
    assert torch.equal(ra.apply_op(x, op_index("Solarize"), unit_for("Solarize", 255.5)), x)
    # Posterize(4.7): int -> 4 bits kept: & 0xF0
    out = ra.apply_op(x, op_index("Posterize"), unit_for("Posterize", 4.7))
    assert out[0, 0].tolist() == [[0, 96], [128, 240]]


def test_cutout_fill_and_inclusive_corners_by_hand():
    x = torch.zeros(1, 3, 10, 10, dtype=torch.uint8)
    # side 0.4 * 0.5 * 10 = 2, centre (5, 3): x0 = int(5 - 1) = 4, x1 = min(10, 6) = 6; y0 = 2, y1 = 4 -> PIL's
    # rectangle fills columns 4..6 and rows 2..4, inclusive: 3 x 3 pixels
    out = ra.apply_cutout(x, torch.tensor([[0.4, 0.5, 0.3]], dtype=torch.float64))
    box = torch.zeros(10, 10, dtype=torch.bool)
    box[2:5, 4:7] = True
    for c, fill in enumerate(ra.CUTOUT_FILL):
        assert torch.equal(out[0, c] == fill, box)
    assert torch.equal(ra.apply_cutout(x, torch.tensor([[0.0, 0.5, 0.5]], dtype=torch.float64)), x)  # side 0


def test_translate_fill_and_direction_by_hand():
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).expand(1, 3, 4, 4).contiguous() + 1
    # TranslateX(0.25) on width 4: source column x + 1 -> content moves left by one, black (0) on the right
    out = ra.apply_op(x, op_index("TranslateX"), unit_for("TranslateX", 0.25))
    assert out[0, 0].tolist() == [[2, 3, 4, 0], [6, 7, 8, 0], [10, 11, 12, 0], [14, 15, 16, 0]]


def pil_op(img, name, v):
    """The published ops (MLKD's cifar100.py, FixMatch's RandAugment)."""
    affine = {"ShearX": (1, v, 0, 0, 1, 0), "ShearY": (1, 0, 0, v, 1, 0),
              "TranslateX": (1, 0, v * img.size[0], 0, 1, 0),
              "TranslateY": (1, 0, 0, 0, 1, v * img.size[1])}
    if name in affine:
        return img.transform(img.size, Image.AFFINE, affine[name])
    enhance = {"Brightness": ImageEnhance.Brightness, "Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
               "Sharpness": ImageEnhance.Sharpness}
    if name in enhance:
        return enhance[name](img).enhance(v)
    return {"AutoContrast": lambda: ImageOps.autocontrast(img), "Equalize": lambda: ImageOps.equalize(img),
            "Identity": lambda: img, "Posterize": lambda: ImageOps.posterize(img, max(1, int(v))),
            "Solarize": lambda: ImageOps.solarize(img, v), "Rotate": lambda: img.rotate(v)}[name]()


@pytest.mark.parametrize("name", [o[0] for o in ra.OPS])
def test_ops_match_pil(name):
    """Every op on 12 random images equals PIL's; Rotate up to pixels whose source lies on a pixel border (PIL
    accumulates its coordinates incrementally): at most 0.1% of the values."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (12, 3, 16, 16), generator=g, dtype=torch.uint8)
    x[6:] = x[6:] // 3 + 40  # low-contrast images: AutoContrast and Equalize stretch them
    unit = torch.rand(12, generator=g, dtype=torch.float64)
    op = torch.full((12,), ra.OP_INDEX[name])
    out, v = ra.apply_op(x, op, unit), ra.magnitude(op, unit)
    differ = 0
    for b in range(12):
        ref = pil_op(Image.fromarray(x[b].permute(1, 2, 0).numpy()), name, float(v[b]))
        differ += int((torch.from_numpy(np.array(ref)).permute(2, 0, 1) != out[b]).sum())
    assert differ <= (x.numel() // 1000 if name == "Rotate" else 0)


def test_cutout_matches_pil_rectangle():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (30, 3, 16, 16), generator=g, dtype=torch.uint8)
    params = torch.rand(30, 3, generator=g, dtype=torch.float64)
    out = ra.apply_cutout(x, params)
    for b in range(30):
        img = Image.fromarray(x[b].permute(1, 2, 0).numpy())
        w, h = img.size
        v = float(params[b, 0]) * 0.5 * w
        x0, y0 = int(max(0, float(params[b, 1]) * w - v / 2)), int(max(0, float(params[b, 2]) * h - v / 2))
        ImageDraw.Draw(img).rectangle((x0, y0, min(w, x0 + v), min(h, y0 + v)), ra.CUTOUT_FILL)
        assert torch.equal(torch.from_numpy(np.array(img)).permute(2, 0, 1), out[b])


def tiny_kd_run():
    """The Fashion-MNIST KD config with batches of 8 over a 24-image in-memory set (train = test)."""
    cfg = load_config(os.path.join(ROOT, "configs", "fashion_mnist", "kd", "resnet20_resnet8.yaml"),
                      ["SOLVER.BATCH_SIZE", "8", "DATASET.TEST.BATCH_SIZE", "8", "DATASET.TRAIN_SUBSET", "0",
                       "DATASET.TEST_SUBSET", "0"])
    data = split(24)
    return cfg, DatasetBundle(name="tiny", num_classes=10, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3,
                              train=lambda: data, test=lambda: data)


def test_build_dataloaders_takes_views_for_the_training_loader_only():
    cfg, bundle = tiny_kd_run()
    train, test, _ = build_dataloaders(cfg, "cpu", bundle=bundle, train_views="weak_strong")
    assert next(iter(train))[0].shape == (8, 2, 3, 32, 32)
    assert next(iter(test))[0].shape == (8, 3, 32, 32)
    with pytest.raises(ConfigError, match="not a view recipe"):
        build_dataloaders(cfg, "cpu", bundle=bundle, train_views="sideways")


def test_the_engine_passes_the_method_views_and_plus_plus_keeps_them():
    class Viewed(Distiller):
        train_views = "rotations4"

    cfg, bundle = tiny_kd_run()
    assert Distiller.train_views is None
    with DISTILLER_REGISTRY.override("VIEWED_TEST", Viewed):
        for name in ("VIEWED_TEST", "VIEWED_TEST++"):
            cfg.defrost()
            cfg.DISTILLER.TYPE = name
            train, _, _ = ClassificationTask().build_data(cfg, "cpu", bundle=bundle)
            assert next(iter(train))[0].shape == (8, 4, 3, 32, 32)


def write_folder(root, n_per_class=4, size=40):
    rng = np.random.default_rng(0)
    for split_name in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(os.path.join(root, split_name, c))
            for i in range(n_per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    os.path.join(root, split_name, c, f"{i}.png"))


@pytest.mark.parametrize("name,v", [("weak_strong", 2), ("rotations4", 4)])
def test_folder_loader_views(tmp_path, name, v):
    write_folder(str(tmp_path))
    cfg = load_config(os.path.join(ROOT, "configs", "image_folder", "vanilla", "_recipe.yaml"),
                      ["DATASET.ROOT", str(tmp_path), "IMAGE_FOLDER.IMAGE_SIZE", "32", "DATASET.NUM_WORKERS", "0",
                       "SOLVER.BATCH_SIZE", "4", "DATASET.TEST.BATCH_SIZE", "4"])
    plain, test, _ = build_dataloaders(cfg, "cpu")
    train, _, _ = build_dataloaders(cfg, "cpu", train_views=name)
    first = batches(train, 1)
    assert first[0][0].shape == (4, v, 3, 32, 32) and next(iter(test))[0].shape == (4, 3, 32, 32)
    again = batches(train, 1)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(first, again))
    assert not torch.equal(batches(train, 2)[0][0], first[0][0])
    if name == "weak_strong":  # the weak view is the transform drawn first from the sample's seed: the plain image
        assert all(torch.equal(p[0][:, 0], q[0]) for p, q in zip(first, batches(plain, 1)))
    else:
        x = first[0][0]
        for k in range(4):  # square crops: rotating back gives a crop's shape; views differ in crop and rotation
            assert torch.rot90(x[:, k], -k, dims=(-2, -1)).shape == (4, 3, 32, 32)
