"""The data layer: on-disk formats, the batch contract (index, determinism, sharding) and augmentation."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data_fixtures as fx
from mdistiller.config.defaults import get_cfg_defaults
from mdistiller.data import DATASET_REGISTRY, DatasetMeta, build_dataloaders
from mdistiller.data import fashion_mnist
from mdistiller.data.augment import crop_flip
from mdistiller.data.schedule import eval_slices, train_slices
from mdistiller.data.subset import balanced_subset
from mdistiller.utils.errors import DataError

CPU = torch.device("cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "prepare_tiny_imagenet.py")


def make_cfg(dataset, root, batch=8, test_batch=7, seed=0, download=False, **dataset_keys):
    cfg = get_cfg_defaults()
    cfg.DATASET.TYPE = dataset
    cfg.DATASET.ROOT = str(root)
    cfg.DATASET.DOWNLOAD = download
    cfg.DATASET.NUM_WORKERS = 0
    cfg.DATASET.TEST.BATCH_SIZE = test_batch
    cfg.SOLVER.BATCH_SIZE = batch
    cfg.EXPERIMENT.SEED = seed
    for k, v in dataset_keys.items():
        cfg.DATASET[k] = v
    return cfg


def collect(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    return [tuple(t.clone() for t in batch) for batch in loader]


def normalise(uint8_images, mean, std):
    x = torch.as_tensor(uint8_images).float() / 255
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def unnormalise(images, meta):
    x = images * torch.tensor(meta.std).view(1, -1, 1, 1) + torch.tensor(meta.mean).view(1, -1, 1, 1)
    return torch.round(x * 255)


@pytest.fixture
def cifar(tmp_path):
    arrays = fx.write_cifar100(tmp_path, n_train=250, n_test=30)
    return tmp_path, arrays


@pytest.fixture
def fmnist(tmp_path, monkeypatch):
    deb = tmp_path / "debian"
    arrays = fx.write_fashion_mnist(deb, n_train=40, n_test=20)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST_DIR", str(deb))
    return tmp_path / "root", arrays


# --- registry and API ---------------------------------------------------------------------------------------

def test_registry_has_all_datasets():
    assert {"cifar100", "tiny_imagenet", "imagenet", "fashion_mnist"} <= set(DATASET_REGISTRY.names())


# --- schedule: sharding and the last-batch rule --------------------------------------------------------------

def test_last_partial_batch_kept_when_every_rank_gets_two():
    assert train_slices(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert train_slices(9, 4) == [(0, 4), (4, 8)]  # a final batch of 1 is dropped
    # world size 2: final global batch of 3 -> shares 1 and 2 -> dropped on both ranks
    assert train_slices(11, 4, 0, 2) == [(0, 2), (4, 6)]
    assert train_slices(11, 4, 1, 2) == [(2, 4), (6, 8)]
    # final global batch of 4 with per-rank 4 -> shares 2 and 2 -> kept
    assert train_slices(12, 8, 0, 2) == [(0, 4), (8, 10)]
    assert train_slices(12, 8, 1, 2) == [(4, 8), (10, 12)]


def test_test_slices_cover_every_sample_once():
    for n in (0, 1, 7, 10, 31):
        for w in (1, 2, 3):
            seen = [i for r in range(w) for a, b in eval_slices(n, 4, r, w) for i in range(a, b)]
            assert seen == list(range(n))
            sizes = [sum(b - a for a, b in eval_slices(n, 4, r, w)) for r in range(w)]
            assert max(sizes) - min(sizes) <= 1


# --- subsets -------------------------------------------------------------------------------------------------

def test_balanced_subset_counts_and_determinism():
    targets = torch.arange(1000) % 10
    idx = balanced_subset(targets, 23, 10, "DATASET.TRAIN_SUBSET", "x")
    counts = torch.bincount(targets[idx], minlength=10).tolist()
    assert counts == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert torch.equal(idx, torch.sort(idx).values) and idx.unique().numel() == 23
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(idx, balanced_subset(targets, 23, 10, "DATASET.TRAIN_SUBSET", "x"))


def test_subset_shortfall_is_filled_from_other_classes():
    targets = torch.tensor([0] * 2 + [1] * 10 + [2] * 10)
    idx = balanced_subset(targets, 12, 3, "K", "x")
    assert torch.bincount(targets[idx], minlength=3).tolist() == [2, 5, 5]


def test_subset_too_large_names_key_and_size(cifar):
    root, _ = cifar
    with pytest.raises(DataError, match=r"DATASET.TRAIN_SUBSET=251.*250"):
        build_dataloaders(make_cfg("cifar100", root, TRAIN_SUBSET=251), CPU)


def test_subset_through_loaders_is_seed_independent(cifar):
    root, _ = cifar
    metas = [build_dataloaders(make_cfg("cifar100", root, seed=s, TRAIN_SUBSET=120, TEST_SUBSET=10), CPU)[2]
             for s in (0, 1)]
    assert metas[0].num_train == 120 and metas[0].num_test == 10
    assert torch.equal(metas[0].train_targets, metas[1].train_targets)
    counts = torch.bincount(metas[0].train_targets, minlength=100)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 120


# --- CIFAR-100 -----------------------------------------------------------------------------------------------

def test_cifar_batches_and_index(cifar):
    root, arrays = cifar
    train, test, meta = build_dataloaders(make_cfg("cifar100", root), CPU)
    assert isinstance(meta, DatasetMeta)
    assert (meta.name, meta.num_classes, meta.image_size) == ("cifar100", 100, 32)
    assert (meta.num_train, meta.num_test) == (250, 30)
    assert meta.train_targets.dtype == torch.int64 and meta.train_targets.device == CPU
    assert meta.train_targets.tolist() == arrays["train"][1].tolist()
    assert meta.classes == tuple(f"class{i}" for i in range(100))  # the archive's meta file, label order
    assert len(train) == 32 and len(test) == 5  # 250/8 -> 31 full + a final batch of 2; 30/7 -> 5
    images, labels, index = next(iter(train))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and images.device == CPU
    assert labels.dtype == torch.int64 and index.dtype == torch.int64
    assert torch.equal(labels, torch.as_tensor(arrays["train"][1])[index])
    seen = []
    for images, labels, index in test:
        expect = normalise(arrays["test"][0][index.numpy()], meta.mean, meta.std)
        assert torch.allclose(images, expect, atol=1e-5)
        assert labels.tolist() == arrays["test"][1][index.numpy()].tolist()
        seen += index.tolist()
    assert seen == list(range(30))


def test_cifar_test_index_with_subset(cifar):
    root, arrays = cifar
    _, test, meta = build_dataloaders(make_cfg("cifar100", root, TEST_SUBSET=12), CPU)
    chosen = balanced_subset(torch.as_tensor(arrays["test"][1]), 12, 100, "k", "x")
    got = torch.cat([i for _, _, i in test])
    assert got.tolist() == list(range(12))
    images = torch.cat([x for x, _, _ in test])
    assert torch.allclose(images, normalise(arrays["test"][0][chosen.numpy()], meta.mean, meta.std), atol=1e-5)


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(DataError, match="cifar-100-python"):
        build_dataloaders(make_cfg("cifar100", tmp_path / "nothing"), CPU)


def test_cifar_download_from_local_mirror(tmp_path, monkeypatch):
    import torchvision
    from torchvision.datasets.utils import calculate_md5

    src = tmp_path / "src"
    arrays = fx.write_cifar100(src, n_train=20, n_test=10)
    tarball = fx.make_cifar100_tarball(str(tmp_path), str(src))
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "url", "file://" + tarball)
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "tgz_md5", calculate_md5(tarball))
    root = tmp_path / "root"
    _, test, meta = build_dataloaders(make_cfg("cifar100", root, download=True), CPU)
    assert meta.num_train == 20 and meta.num_test == 10
    assert (root / "cifar-100-python" / "train").is_file()
    assert torch.cat([y for _, y, _ in test]).tolist() == arrays["test"][1].tolist()


def test_cifar_download_failure_is_data_error(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets.CIFAR100, "url", "file://" + str(tmp_path / "absent.tar.gz"))
    root = tmp_path / "root"
    with pytest.raises(DataError, match=str(root / "cifar-100-python")):
        build_dataloaders(make_cfg("cifar100", root, download=True), CPU)


# --- determinism, augmentation, distribution (in-memory) ------------------------------------------------------

def test_train_order_depends_only_on_seed_and_epoch(cifar):
    root, _ = cifar
    train, _, _ = build_dataloaders(make_cfg("cifar100", root), CPU)
    torch.manual_seed(1)
    a = collect(train, 3)
    torch.manual_seed(999)
    torch.rand(17)
    train2, _, _ = build_dataloaders(make_cfg("cifar100", root), CPU)
    b = collect(train2, 3)
    assert all(torch.equal(x, y) for ba, bb in zip(a, b) for x, y in zip(ba, bb))
    c = collect(train, 4)
    assert not torch.equal(torch.cat([i for _, _, i in a]), torch.cat([i for _, _, i in c]))
    assert sorted(torch.cat([i for _, _, i in c]).tolist()) == list(range(250))  # a permutation, none dropped
    train3, _, _ = build_dataloaders(make_cfg("cifar100", root, seed=5), CPU)
    d = collect(train3, 3)
    assert not torch.equal(torch.cat([i for _, _, i in a]), torch.cat([i for _, _, i in d]))


def test_crop_flip_matches_per_sample_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 5, 7), generator=g, dtype=torch.uint8)
    shifts = torch.tensor([[0, 0], [8, 8], [4, 4], [4, 4], [1, 7], [6, 2]])
    flips = torch.tensor([False, True, False, True, True, False])
    out = crop_flip(images, shifts, flips, pad=4)
    for k in range(6):
        padded = torch.zeros(3, 13, 15, dtype=torch.uint8)
        padded[:, 4:9, 4:11] = images[k]
        ref = padded[:, shifts[k, 0]:shifts[k, 0] + 5, shifts[k, 1]:shifts[k, 1] + 7]
        if flips[k]:
            ref = ref.flip(-1)
        assert torch.equal(out[k], ref)
    assert torch.equal(out[2], images[2])


def test_augmentation_crops_and_flips_a_known_pattern(tmp_path):
    # every image: 255 in the left half, 1 in the right half -> a flip moves the bright half, a crop adds 0 rows
    img = np.full((3, 32, 32), 1, np.uint8)
    img[:, :, :16] = 255
    imgs = {"train": np.repeat(img[None], 200, 0), "test": np.repeat(img[None], 10, 0)}
    fx.write_cifar100(tmp_path, n_train=200, n_test=10, images=imgs)
    train, test, meta = build_dataloaders(make_cfg("cifar100", tmp_path, batch=50), CPU)
    x = torch.cat([unnormalise(b[0], meta) for b in collect(train, 0)])
    assert set(x.unique().tolist()) <= {0.0, 1.0, 255.0}
    zero_rows = (x[:, 0] == 0).all(dim=2).sum(dim=1)  # rows of padding per image
    zero_cols = (x[:, 0] == 0).all(dim=1).sum(dim=1)
    assert (zero_rows <= 4).all() and (zero_cols <= 4).all()
    assert (zero_rows > 0).float().mean() > 0.5 and (zero_cols > 0).float().mean() > 0.5
    middle = x[:, 0, 16]
    flipped = middle[:, 31 - 4] == 255  # the bright half on the right
    assert 0.3 < flipped.float().mean() < 0.7
    t = torch.cat([unnormalise(b[0], meta) for b in test])
    assert torch.equal(t, torch.as_tensor(imgs["test"]).float())  # test: untouched


@pytest.mark.kernels
def test_two_ranks_equal_one_process(cifar):
    root, _ = cifar
    cfg = make_cfg("cifar100", root, batch=8, TRAIN_SUBSET=244)  # final global batch 4: 2 per rank, kept
    single = build_dataloaders(cfg, CPU)[0]
    ranks = [build_dataloaders(cfg, CPU, rank=r, world_size=2) for r in (0, 1)]
    whole = collect(single, 2)
    parts = [collect(r[0], 2) for r in ranks]
    assert len(ranks[0][0]) == len(ranks[1][0]) == len(single) == 31
    assert [b[0].shape[0] for b in parts[0]][-1] == 2
    for g, p0, p1 in zip(whole, *parts):
        assert not set(p0[2].tolist()) & set(p1[2].tolist())
        for k in range(3):
            assert torch.equal(torch.cat([p0[k], p1[k]]), g[k])
    test_idx = [torch.cat([i for _, _, i in r[1]]).tolist() for r in ranks]
    assert sorted(test_idx[0] + test_idx[1]) == list(range(30))
    assert abs(len(test_idx[0]) - len(test_idx[1])) <= 1


def test_last_batch_rule_through_loader(cifar):
    root, _ = cifar
    # 250 images, global batch 8, 2 ranks: final global batch of 2 -> 1 per rank -> dropped
    loaders = [build_dataloaders(make_cfg("cifar100", root, batch=8), CPU, r, 2)[0] for r in (0, 1)]
    assert [len(l) for l in loaders] == [31, 31]
    seen = sum(i.numel() for l in loaders for _, _, i in l)
    assert seen == 248
    single = build_dataloaders(make_cfg("cifar100", root, batch=8), CPU)[0]
    assert [b[0].shape[0] for b in single][-1] == 2  # one process keeps the final 2


# --- Fashion-MNIST -------------------------------------------------------------------------------------------

def test_fashion_mnist_from_debian_dir(fmnist):
    root, arrays = fmnist
    train, test, meta = build_dataloaders(make_cfg("fashion_mnist", root, batch=10), CPU)
    assert (meta.num_classes, meta.image_size, meta.num_train, meta.num_test) == (10, 32, 40, 20)
    assert meta.mean == (0.2190,) * 3 and meta.std == (0.3318,) * 3
    # the dataset's published label names (github.com/zalandoresearch/fashion-mnist), in label order
    assert meta.classes == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                            "Bag", "Ankle boot")
    x, y, i = next(iter(test))
    assert x.shape == (7, 3, 32, 32)
    raw = unnormalise(x, meta)
    assert torch.equal(raw[:, 0], raw[:, 1]) and torch.equal(raw[:, 0], raw[:, 2])
    assert torch.equal(raw[:, 0, 2:30, 2:30], torch.as_tensor(arrays["test"][0][i.numpy()]).float())
    assert (raw[:, :, :2] == 0).all() and (raw[:, :, :, 30:] == 0).all()
    assert y.tolist() == arrays["test"][1][i.numpy()].tolist()
    assert next(iter(train))[0].shape == (10, 3, 32, 32)


def test_fashion_mnist_from_torchvision_layout_unpacked(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    fx.write_fashion_mnist(tmp_path / "FashionMNIST" / "raw", compress=False)
    _, _, meta = build_dataloaders(make_cfg("fashion_mnist", tmp_path), CPU)
    assert meta.num_train == 40


def test_fashion_mnist_corrupt_magic(fmnist):
    root, _ = fmnist
    deb = fashion_mnist.DEBIAN_FASHION_MNIST_DIR
    fx.write_idx(os.path.join(deb, "t10k-images-idx3-ubyte.gz"), np.zeros((2, 28, 28)), magic_type=0x42)
    with pytest.raises(DataError, match="magic"):
        build_dataloaders(make_cfg("fashion_mnist", root), CPU)


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(DataError) as e:
        build_dataloaders(make_cfg("fashion_mnist", tmp_path / "root"), CPU)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and str(tmp_path / "absent") in msg
    assert os.path.join(str(tmp_path / "root"), "FashionMNIST", "raw") in msg


@pytest.mark.skipif(not os.path.isfile(os.path.join(fashion_mnist.DEBIAN_FASHION_MNIST_DIR,
                                                    "train-images-idx3-ubyte.gz")),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_statistics_of_real_files():
    split = fashion_mnist.read_split(*fashion_mnist.find_files(make_cfg("fashion_mnist", "unused"))["train"])
    assert len(split) == 60000
    x = split.images[:, 0].double() / 255
    assert abs(x.mean().item() - fashion_mnist.MEAN[0]) < 5e-5
    assert abs(x.std().item() - fashion_mnist.STD[0]) < 5e-5


# --- Tiny-ImageNet and the preparation tool -------------------------------------------------------------------

def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=REPO)


def test_tiny_imagenet_prepare_and_load(tmp_path):
    truth = fx.write_tiny_imagenet(tmp_path)
    base = tmp_path / "tiny-imagenet-200"
    cfg = make_cfg("tiny_imagenet", tmp_path, batch=4, test_batch=4)
    with pytest.raises(DataError, match="prepare_tiny_imagenet.py"):
        build_dataloaders(cfg, CPU)

    r = run_tool(str(base))
    assert r.returncode == 0, r.stderr
    for name, wnid in truth.items():
        assert (base / "val" / wnid / name).is_file()
    assert not (base / "val" / "images").exists() and (base / "val" / "val_annotations.txt").is_file()
    r = run_tool(str(base))
    assert r.returncode == 0 and "already sorted" in r.stdout

    train, test, meta = build_dataloaders(cfg, CPU)
    assert (meta.num_classes, meta.image_size, meta.num_train, meta.num_test) == (3, 64, 12, 6)
    classes = sorted(set(truth.values()))
    ds = test.loader.dataset.dataset
    for x, y, i in test:
        assert x.shape[1:] == (3, 64, 64) and x.dtype == torch.float32
        for label, idx in zip(y.tolist(), i.tolist()):
            name = os.path.basename(ds.samples[idx][0])
            assert classes[label] == truth[name]
    x, y, i = next(iter(train))
    assert x.shape == (4, 3, 64, 64) and y.dtype == torch.int64


def test_prepare_tool_errors(tmp_path):
    r = run_tool(str(tmp_path / "missing"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    fx.write_tiny_imagenet(tmp_path)
    os.remove(tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt")
    r = run_tool(str(tmp_path / "tiny-imagenet-200"))
    assert r.returncode == 2 and "val_annotations.txt" in r.stderr and "Traceback" not in r.stderr


# --- ImageNet-style folders -----------------------------------------------------------------------------------

def test_imagenet_folder(tmp_path):
    from PIL import Image
    from mdistiller.data.imagenet import transforms_for

    fx.write_image_folder_tree(tmp_path)
    cfg = make_cfg("imagenet", tmp_path, batch=4, test_batch=3)
    train, test, meta = build_dataloaders(cfg, CPU)
    assert (meta.num_classes, meta.image_size, meta.num_train, meta.num_test) == (2, 224, 6, 4)
    assert len(train) == 2  # 4 + a final 2
    a = collect(train, 1)
    assert a[0][0].shape == (4, 3, 224, 224) and a[0][2].dtype == torch.int64
    assert sorted(torch.cat([b[2] for b in a]).tolist()) == list(range(6))
    state = torch.get_rng_state()
    b = collect(train, 1)
    assert torch.equal(state, torch.get_rng_state())  # per-sample seeding leaves the global RNG alone
    assert all(torch.equal(p, q) for ba, bb in zip(a, b) for p, q in zip(ba, bb))
    c = collect(train, 2)
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))
    ds = test.loader.dataset.dataset
    for x, y, i in test:
        for img, label, idx in zip(x, y.tolist(), i.tolist()):
            path, target = ds.samples[idx]
            assert label == target
            assert torch.allclose(img, transforms_for(False)(Image.open(path).convert("RGB")), atol=1e-6)


def test_folder_augmentation_independent_of_workers(tmp_path):
    fx.write_image_folder_tree(tmp_path)
    cfg = make_cfg("imagenet", tmp_path, batch=4)
    a = collect(build_dataloaders(cfg, CPU)[0], 3)
    cfg.DATASET.NUM_WORKERS = 2
    loader = build_dataloaders(cfg, CPU)[0]
    collect(loader, 0)  # persistent workers carry state from epoch 0 into epoch 3
    b = collect(loader, 3)
    assert all(torch.equal(p, q) for ba, bb in zip(a, b) for p, q in zip(ba, bb))


def test_imagenet_missing(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "imagenet" / "train")):
        build_dataloaders(make_cfg("imagenet", tmp_path), CPU)


def test_only_test(cifar):
    root, _ = cifar
    train, test, meta = build_dataloaders(make_cfg("cifar100", root), CPU, only_test=True)
    assert train is None and meta.num_test == 30 and meta.num_train == 0
