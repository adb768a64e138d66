"""Sort Tiny-ImageNet's flat validation folder into one folder per class, so it loads like the training split.

    python tools/prepare_tiny_imagenet.py data/tiny-imagenet-200

Moves val/images/X.JPEG to val/<wnid>/X.JPEG as listed in val/val_annotations.txt, then removes the emptied
val/images/. The annotation file is kept (it also holds the boxes). Safe to run again: a sorted folder is left
as it is. Problems are reported as one line with exit code 2.
"""

import argparse
import os
import sys

import _path  # noqa: F401

from mdistiller.utils.progress import preparation_bar


class PrepareError(Exception):
    pass


def read_annotations(path):
    """[(filename, wnid)] from the tab-separated val_annotations.txt (filename, wnid, x0, y0, x1, y1)."""
    pairs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2 or not fields[0] or not fields[1]:
                raise PrepareError(f"{path}:{n}: expected 'filename<TAB>wnid<TAB>...', got {line.strip()!r}")
            pairs.append((fields[0], fields[1]))
    return pairs


def prepare(root):
    """Returns a one-line report; raises PrepareError for anything the user must fix."""
    if not os.path.isdir(root):
        raise PrepareError(f"{root} is not a directory (expected the unzipped tiny-imagenet-200 folder)")
    val = os.path.join(root, "val")
    images = os.path.join(val, "images")
    if not os.path.isdir(images):
        if os.path.isdir(val) and any(e.is_dir() for e in os.scandir(val)):
            return f"{val} is already sorted into class folders; nothing to do"
        raise PrepareError(f"{images} not found: is {root} the unzipped tiny-imagenet-200 folder?")
    ann = os.path.join(val, "val_annotations.txt")
    if not os.path.isfile(ann):
        raise PrepareError(f"{ann} not found; re-extract tiny-imagenet-200.zip")
    moved = 0
    for filename, wnid in preparation_bar(read_annotations(ann), desc="sorting val images"):
        src = os.path.join(images, filename)
        dst_dir = os.path.join(val, wnid)
        dst = os.path.join(dst_dir, filename)
        if not os.path.exists(src):
            if os.path.exists(dst):  # moved by an interrupted earlier run
                continue
            raise PrepareError(f"{src} is listed in {ann} but missing")
        os.makedirs(dst_dir, exist_ok=True)
        os.replace(src, dst)
        moved += 1
    left = os.listdir(images)
    if left:
        raise PrepareError(f"{len(left)} files in {images} are not in {ann} (e.g. {sorted(left)[0]}); "
                           "left them in place")
    os.rmdir(images)
    return f"moved {moved} validation images into class folders under {val}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("root", help="the tiny-imagenet-200 folder (with train/ and val/)")
    args = p.parse_args(argv)
    try:
        print(prepare(args.root))
    except (PrepareError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
