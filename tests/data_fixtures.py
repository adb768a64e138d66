"""Small datasets written in the real on-disk formats, for tests/test_data.py.

Writing the real formats (CIFAR pickles, gzip'd IDX, JPEG trees) tests the parsers against what users have on
disk rather than against the loaders' own in-memory structures.
"""

import gzip
import os
import pickle
import struct
import tarfile

import numpy as np


def labels_round_robin(n, num_classes):
    return [i % num_classes for i in range(n)]


def write_cifar100(root, n_train=60, n_test=30, seed=0, images=None):
    """<root>/cifar-100-python/{train,test,meta}; returns {split: (uint8 N x 3 x 32 x 32, labels)}."""
    rng = np.random.default_rng(seed)
    d = os.path.join(root, "cifar-100-python")
    os.makedirs(d, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8) if images is None else images[split]
        fine = labels_round_robin(n, 100)
        entry = {b"filenames": [f"img_{i}.png".encode() for i in range(n)], b"batch_label": f"{split} batch".encode(),
                 b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine], b"data": data.reshape(n, -1)}
        with open(os.path.join(d, split), "wb") as f:
            pickle.dump(entry, f)
        out[split] = (data, np.asarray(fine))
    with open(os.path.join(d, "meta"), "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}, f)
    return out


def make_cifar100_tarball(dest_dir, src_root):
    """cifar-100-python.tar.gz of an existing <src_root>/cifar-100-python; returns its path."""
    path = os.path.join(dest_dir, "cifar-100-python.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(os.path.join(src_root, "cifar-100-python"), arcname="cifar-100-python")
    return path


def write_idx(path, array, magic_type=0x08, compress=True):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, magic_type, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.tobytes()
    if compress:
        raw = gzip.compress(raw)
    with open(path, "wb") as f:
        f.write(raw)


def write_fashion_mnist(directory, n_train=40, n_test=20, seed=0, compress=True):
    """The four Fashion-MNIST IDX files in `directory`; returns {split: (uint8 N x 28 x 28, labels)}."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    ext = ".gz" if compress else ""
    out = {}
    for prefix, split, n in (("train", "train", n_train), ("t10k", "test", n_test)):
        images = rng.integers(1, 256, (n, 28, 28), dtype=np.uint8)  # no zeros: padding is recognisable
        labels = np.asarray(labels_round_robin(n, 10), dtype=np.uint8)
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{ext}"), images, compress=compress)
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{ext}"), labels, compress=compress)
        out[split] = (images, labels.astype(np.int64))
    return out


def _jpeg(path, size, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=95)


def write_tiny_imagenet(root, wnids=("n01443537", "n01629819", "n01641577"), train_per_class=4, val_per_class=2):
    """An unprepared <root>/tiny-imagenet-200 (flat val/); returns {val filename: wnid}."""
    base = os.path.join(root, "tiny-imagenet-200")
    seed = 0
    for w in wnids:
        d = os.path.join(base, "train", w, "images")
        os.makedirs(d)
        with open(os.path.join(base, "train", w, f"{w}_boxes.txt"), "w") as f:
            for i in range(train_per_class):
                _jpeg(os.path.join(d, f"{w}_{i}.JPEG"), 64, seed)
                seed += 1
                f.write(f"{w}_{i}.JPEG\t0\t0\t63\t63\n")
    vdir = os.path.join(base, "val", "images")
    os.makedirs(vdir)
    truth, lines = {}, []
    k = 0
    for i in range(val_per_class):
        for w in reversed(wnids):  # annotation order differs from class order on purpose
            name = f"val_{k}.JPEG"
            _jpeg(os.path.join(vdir, name), 64, 1000 + k)
            truth[name] = w
            lines.append(f"{name}\t{w}\t1\t2\t60\t61\n")
            k += 1
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        f.writelines(lines)
    return truth


def write_image_folder_tree(root, classes=("n0001", "n0002"), train_per_class=3, val_per_class=2, size=40):
    """<root>/imagenet/{train,val}/<wnid>/*.JPEG."""
    seed = 0
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in classes:
            d = os.path.join(root, "imagenet", split, c)
            os.makedirs(d)
            for i in range(n):
                _jpeg(os.path.join(d, f"{c}_{i}.JPEG"), size, seed)
                seed += 1
