"""Sort ImageNet's flat validation folder into one folder per class (val/<wnid>/), as DATASET.TYPE imagenet reads it.

    python tools/prepare_imagenet_val.py data/imagenet/val --labels LOC_val_solution.csv
    python tools/prepare_imagenet_val.py data/imagenet/val --labels ILSVRC2012_devkit_t12
    python tools/prepare_imagenet_val.py /mnt/ilsvrc/val --labels val_labels.txt --out data/imagenet/val --link

--labels is one of: Kaggle's LOC_val_solution.csv (ImageId,PredictionString; the first word of the prediction is
the class), a text file of "filename wnid" lines, or the unpacked ILSVRC2012_devkit_t12 folder (data/meta.mat and
data/ILSVRC2012_validation_ground_truth.txt; reading meta.mat needs scipy). Images are moved, or with --link
symbolically linked (the flat folder is left as it is), into --out (default: the flat folder itself). Every image
is checked to have a label and the split to be whole (50,000 images, 1,000 classes) before anything is touched;
--allow-partial sorts a subset. Safe to run again: images already in place are skipped. Problems are reported as
one line with exit code 2.
"""

import argparse
import csv
import os
import shutil
import sys

import _path  # noqa: F401

from mdistiller.utils.progress import preparation_bar

NUM_IMAGES, NUM_CLASSES = 50_000, 1_000
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


class PrepareError(Exception):
    pass


def stem(filename):
    """ILSVRC2012_val_00000001 of ILSVRC2012_val_00000001.JPEG: label files name images with or without it."""
    return os.path.splitext(filename)[0]


def _add(labels, key, wnid, where):
    if not key or not wnid or wnid in (".", "..") or "/" in wnid or os.sep in wnid:
        raise PrepareError(f"{where}: expected an image name and a class (wnid), got {key!r} {wnid!r}")
    if labels.setdefault(key, wnid) != wnid:
        raise PrepareError(f"{where}: {key} is labelled both {labels[key]} and {wnid}")


def read_kaggle_csv(path):
    """{image stem: wnid} from Kaggle's LOC_val_solution.csv (ImageId,PredictionString 'wnid x0 y0 x1 y1 ...')."""
    labels = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise PrepareError(f"{path}: expected the header ImageId,PredictionString (Kaggle's LOC_val_solution.csv)"
                               f", got {reader.fieldnames}")
        for row in reader:
            words = (row["PredictionString"] or "").split()
            _add(labels, stem(row["ImageId"] or ""), words[0] if words else "", f"{path}:{reader.line_num}")
    return labels


def read_pairs(path):
    """{image stem: wnid} from lines 'filename wnid' (blank lines and # comments skipped)."""
    labels = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            if len(words) != 2:
                raise PrepareError(f"{path}:{n}: expected 'filename wnid', got {line.strip()!r}")
            if words[1].isdigit():
                raise PrepareError(f"{path}:{n}: the class is a number ({words[1]}), not a wnid like n01440764 "
                                   "(a Caffe-style val.txt); use a 'filename wnid' file, the Kaggle CSV or the devkit")
            _add(labels, stem(words[0]), words[1], f"{path}:{n}")
    return labels


def read_devkit(path):
    """{image stem: wnid} from ILSVRC2012_devkit_t12: meta.mat's synsets map ILSVRC2012_ID -> WNID, and line i of
    the ground truth is the ILSVRC2012_ID of ILSVRC2012_val_<i, 8 digits>."""
    meta = os.path.join(path, "data", "meta.mat")
    truth = os.path.join(path, "data", "ILSVRC2012_validation_ground_truth.txt")
    for f in (meta, truth):
        if not os.path.isfile(f):
            raise PrepareError(f"{f} not found: --labels must be the unpacked ILSVRC2012_devkit_t12 folder")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise PrepareError("reading the devkit's meta.mat needs scipy: `pip install scipy`, or pass Kaggle's "
                           "LOC_val_solution.csv or a 'filename wnid' text file as --labels") from None
    try:
        synsets = loadmat(meta, squeeze_me=True)["synsets"]
        id_to_wnid = {int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"], synsets["WNID"])}
    except (KeyError, ValueError, TypeError, OSError) as e:
        raise PrepareError(f"{meta}: not the devkit's synset table ({type(e).__name__}: {e})") from None
    labels = {}
    with open(truth) as f:
        for n, line in enumerate(f, 1):
            word = line.strip()
            if not word.isdigit() or int(word) not in id_to_wnid:
                raise PrepareError(f"{truth}:{n}: expected an ILSVRC2012_ID of {meta}, got {word!r}")
            _add(labels, f"ILSVRC2012_val_{n:08d}", id_to_wnid[int(word)], f"{truth}:{n}")
    return labels


def read_labels(path):
    if os.path.isdir(path):
        return read_devkit(path)
    if not os.path.isfile(path):
        raise PrepareError(f"--labels {path} not found")
    if path.endswith((".tar", ".tar.gz", ".tgz")):
        raise PrepareError(f"{path} is an archive: unpack it (`tar xf {path}`) and pass the ILSVRC2012_devkit_t12 "
                           "folder")
    return read_kaggle_csv(path) if path.lower().endswith(".csv") else read_pairs(path)


def plan(val, out, labels):
    """(to do: [(src, dst)], stems already in place); a PrepareError before anything moves if an image has no
    label."""
    todo, placed, unlabelled = [], set(), []
    for e in sorted(os.scandir(val), key=lambda e: e.name):
        if not e.is_file() or not e.name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        wnid = labels.get(stem(e.name))
        if wnid is None:
            unlabelled.append(e.name)
            continue
        dst = os.path.join(out, wnid, e.name)
        if os.path.lexists(dst):
            placed.add(stem(e.name))
        else:
            todo.append((e.path, dst))
    if unlabelled:
        raise PrepareError(f"{len(unlabelled)} images in {val} have no label in --labels (e.g. {unlabelled[0]}); "
                           "nothing was moved")
    for wnid in set(labels.values()):  # sorted by an earlier run
        d = os.path.join(out, wnid)
        if os.path.isdir(d):
            placed.update(s for s in map(stem, os.listdir(d)) if labels.get(s) == wnid)
    return todo, placed


def prepare(val, labels_path, out=None, link=False, allow_partial=False):
    """Returns a one-line report; raises PrepareError for anything the user must fix."""
    if not os.path.isdir(val):
        raise PrepareError(f"{val} is not a directory (expected ImageNet's flat validation folder)")
    out = out or val
    labels = read_labels(labels_path)
    classes = len(set(labels.values()))
    if not allow_partial and (len(labels) != NUM_IMAGES or classes != NUM_CLASSES):
        raise PrepareError(f"{labels_path} labels {len(labels)} images of {classes} classes, not ImageNet's "
                           f"{NUM_IMAGES} of {NUM_CLASSES}; pass --allow-partial to sort a subset")
    todo, placed = plan(val, out, labels)
    found = len(placed) + len(todo)
    if not allow_partial and found != NUM_IMAGES:
        missing = sorted(set(labels) - placed - {stem(os.path.basename(s)) for s, _ in todo})
        raise PrepareError(f"found {found} of the {NUM_IMAGES} validation images in {val} and {out} (e.g. "
                           f"{missing[0] if missing else '?'} is missing); pass --allow-partial to sort what is there")
    if not todo:
        return f"{out} already has its {found} validation images in class folders; nothing to do"
    same = os.path.abspath(out) == os.path.abspath(val)
    for src, dst in preparation_bar(todo, desc="sorting val images"):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if link:  # relative inside the folder itself, so the tree can move as one; absolute into another tree
            os.symlink(os.path.join("..", os.path.basename(src)) if same else os.path.abspath(src), dst)
        elif same:
            os.replace(src, dst)
        else:
            shutil.move(src, dst)
    used = len({os.path.basename(os.path.dirname(d)) for _, d in todo} | {labels[s] for s in placed})
    return (f"{'linked' if link else 'moved'} {len(todo)} validation images into class folders under {out} "
            f"({found} images of {used} classes sorted in all)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("val", help="the folder holding ILSVRC2012_val_00000001.JPEG ...")
    p.add_argument("--labels", required=True,
                   help="LOC_val_solution.csv, a 'filename wnid' text file, or the ILSVRC2012_devkit_t12 folder")
    p.add_argument("--out", help="where val/<wnid>/ goes (default: the flat folder itself)")
    p.add_argument("--link", action="store_true", help="symlink the images instead of moving them")
    p.add_argument("--allow-partial", action="store_true",
                   help=f"sort a subset instead of requiring all {NUM_IMAGES} images of {NUM_CLASSES} classes")
    args = p.parse_args(argv)
    try:
        print(prepare(args.val, args.labels, args.out, args.link, args.allow_partial))
    except (PrepareError, OSError, UnicodeDecodeError, csv.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
