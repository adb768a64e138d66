"""tools/prepare_imagenet_val.py on generated flat validation folders and label files in the published formats
(Kaggle's LOC_val_solution.csv, 'filename wnid' lines, the ILSVRC2012 devkit when scipy is installed)."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from mdistiller.config import load_config
from mdistiller.data import build_dataloaders
from mdistiller.utils.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "prepare_imagenet_val.py")
WNIDS = ("n01440764", "n01443537", "n01484850")
N = 7  # ILSVRC2012_val_00000001 .. 07; image i has class WNIDS[TRUTH[i - 1]]
TRUTH = (2, 0, 1, 1, 0, 2, 0)


def name(i):
    return f"ILSVRC2012_val_{i:08d}.JPEG"


def write_flat(val, n=N):
    from PIL import Image

    os.makedirs(val)
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(os.path.join(val, name(i)))
    with open(os.path.join(val, "README.txt"), "w") as f:  # not an image: left where it is
        f.write("ImageNet val\n")


def expected(val):
    return {os.path.join(val, WNIDS[c], name(i)) for i, c in enumerate(TRUTH, 1)}


def sorted_files(val):
    return {os.path.join(dp, f) for dp, _, fs in os.walk(val) if dp != str(val) for f in fs}


def write_csv(path, rows=None):
    with open(path, "w") as f:
        f.write("ImageId,PredictionString\n")
        for i, c in rows or enumerate(TRUTH, 1):  # the published file: the class then its boxes, repeated per box
            w = WNIDS[c]
            f.write(f"{name(i)[:-5]},{w} 10 20 100 200 {w} 5 5 50 60 \n")


def write_pairs(path):
    with open(path, "w") as f:
        f.write("# filename wnid\n\n")
        for i, c in enumerate(TRUTH, 1):
            f.write(f"{name(i) if i % 2 else name(i)[:-5]}\t{WNIDS[c]}\n")  # with and without the extension


def write_devkit(root):
    """ILSVRC2012_devkit_t12/data/{meta.mat, ILSVRC2012_validation_ground_truth.txt}: synsets as a MATLAB struct
    array (ILSVRC2012_ID 1.. for the leaves, a parent node after them), ground truth one ID per line."""
    sio = pytest.importorskip("scipy.io", reason="scipy is not installed: `pip install -e '.[imagenet]'` "
                                                 "(tools/setup_env.sh --test installs it)")
    data = os.path.join(root, "ILSVRC2012_devkit_t12", "data")
    os.makedirs(data)
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    ids = {1: "n01484850", 2: "n01440764", 3: "n01443537", 4: "n00000001"}  # IDs deliberately not in WNIDS' order
    synsets = np.zeros((len(ids), 1), dtype=[(f, "O") for f in fields])
    for row, (k, w) in enumerate(ids.items()):
        leaf = k < 4
        synsets[row, 0] = (np.array([[k]], dtype=np.uint16), w, f"words {k}", "gloss", 0 if leaf else 3,
                           np.zeros((1, 0)) if leaf else np.array([[1, 2, 3]]), 0, 1300 if leaf else 0)
    sio.savemat(os.path.join(data, "meta.mat"), {"synsets": synsets})
    id_of = {w: k for k, w in ids.items()}
    with open(os.path.join(data, "ILSVRC2012_validation_ground_truth.txt"), "w") as f:
        f.writelines(f"{id_of[WNIDS[c]]}\n" for c in TRUTH)
    return os.path.join(root, "ILSVRC2012_devkit_t12")


@pytest.fixture(scope="module")
def tool():
    if os.path.dirname(TOOL) not in sys.path:
        sys.path.insert(0, os.path.dirname(TOOL))  # its `import _path`, as when run as a script
    spec = importlib.util.spec_from_file_location("prepare_imagenet_val", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run(tool, capsys):
    """The tool's command line in this process (a new interpreter per call would mostly time `import torch`)."""

    def call(*args):
        code = tool.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return call


def one_line_error(r, *words):
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("fmt", ["csv", "pairs", "devkit"])
def test_sorts_by_each_label_source_and_rerun_is_a_no_op(tmp_path, fmt, run):
    val = tmp_path / "imagenet" / "val"
    write_flat(str(val))
    if fmt == "devkit":
        labels = write_devkit(str(tmp_path))
    else:
        labels = tmp_path / ("LOC_val_solution.csv" if fmt == "csv" else "val.txt")
        (write_csv if fmt == "csv" else write_pairs)(labels)
    r = run(val, "--labels", labels, "--allow-partial")
    assert r.returncode == 0, r.stderr
    assert "moved 7" in r.stdout and "3 classes" in r.stdout
    assert sorted_files(val) == expected(str(val))
    assert sorted(os.listdir(val)) == ["README.txt", *WNIDS]  # the flat images are gone, other files stay
    r = run(val, "--labels", labels, "--allow-partial")
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stderr
    assert sorted_files(val) == expected(str(val))


def test_sorted_folder_loads_as_imagenet_val(tmp_path, run):
    val = tmp_path / "imagenet" / "val"
    write_flat(str(val))
    write_csv(tmp_path / "s.csv")
    for c in WNIDS:  # a train split with the same classes
        os.makedirs(tmp_path / "imagenet" / "train" / c)
        (tmp_path / "imagenet" / "train" / c / "x.JPEG").write_bytes((val / name(1)).read_bytes())
    cfg = load_config(None, ["DATASET.TYPE", "imagenet", "DATASET.ROOT", str(tmp_path), "DATASET.NUM_WORKERS", "0",
                             "DATASET.TEST.BATCH_SIZE", "4"])
    with pytest.raises(DataError, match=f"{val} has no class folders.*prepare_imagenet_val.py {val} --labels"):
        build_dataloaders(cfg, "cpu", only_test=True)
    assert run(val, "--labels", tmp_path / "s.csv", "--allow-partial").returncode == 0
    _, test, meta = build_dataloaders(cfg, "cpu", only_test=True)
    assert meta.num_test == N and meta.classes == WNIDS
    ds = test.loader.dataset.dataset
    labels = {os.path.basename(ds.samples[i][0]): y for _, ys, idx in test for y, i in zip(ys.tolist(), idx.tolist())}
    assert labels == {name(i): c for i, c in enumerate(TRUTH, 1)}


def test_link_into_another_folder_leaves_the_flat_folder(tmp_path, run):
    flat, out = tmp_path / "flat", tmp_path / "imagenet" / "val"
    write_flat(str(flat))
    before = sorted(os.listdir(flat))
    write_pairs(tmp_path / "val.txt")
    r = run(flat, "--labels", tmp_path / "val.txt", "--out", out, "--link", "--allow-partial")
    assert r.returncode == 0 and "linked 7" in r.stdout, r.stderr
    assert sorted(os.listdir(flat)) == before
    assert sorted_files(out) == expected(str(out))
    for f in expected(str(out)):
        assert os.path.islink(f) and os.path.samefile(f, flat / os.path.basename(f))
    assert "nothing to do" in run(flat, "--labels", tmp_path / "val.txt", "--out", out, "--link",
                                  "--allow-partial").stdout


def test_link_in_place_uses_relative_links(tmp_path, run):
    val = tmp_path / "val"
    write_flat(str(val))
    write_csv(tmp_path / "s.csv")
    assert run(val, "--labels", tmp_path / "s.csv", "--link", "--allow-partial").returncode == 0
    link = val / WNIDS[TRUTH[0]] / name(1)
    assert os.readlink(link) == os.path.join("..", name(1)) and (val / name(1)).is_file()
    os.rename(tmp_path / "val", tmp_path / "moved")  # the tree moves as one
    assert (tmp_path / "moved" / WNIDS[TRUTH[0]] / name(1)).read_bytes() == (tmp_path / "moved" / name(1)).read_bytes()


def test_interrupted_run_finishes(tmp_path, tool):
    val = tmp_path / "val"
    write_flat(str(val))
    write_csv(tmp_path / "s.csv")
    os.makedirs(val / WNIDS[TRUTH[0]])
    os.replace(val / name(1), val / WNIDS[TRUTH[0]] / name(1))  # what a run stopped after one image left
    report = tool.prepare(str(val), str(tmp_path / "s.csv"), allow_partial=True)
    assert report.startswith("moved 6 ") and "7 images of 3 classes" in report
    assert sorted_files(val) == expected(str(val))


def test_whole_split_is_required_unless_partial(tmp_path, run):
    val = tmp_path / "val"
    write_flat(str(val))
    write_csv(tmp_path / "s.csv")
    one_line_error(run(val, "--labels", tmp_path / "s.csv"), "50000", "1000", "--allow-partial")
    assert sorted_files(val) == set()  # nothing touched


def test_the_full_split_passes_the_checks(tmp_path, tool):
    """50,000 images of 1,000 classes (empty files: the tool never decodes them), one missing, then all."""
    val = tmp_path / "val"
    os.makedirs(val)
    wnid = [f"n{k:08d}" for k in range(1000)]
    with open(tmp_path / "val.txt", "w") as f:
        f.writelines(f"{name(i)} {wnid[i % 1000]}\n" for i in range(1, 50_001))
    for i in range(2, 50_001):
        open(val / name(i), "wb").close()
    with pytest.raises(tool.PrepareError, match=f"found 49999 of the 50000 .*{name(1)[:-5]} is missing"):
        tool.prepare(str(val), str(tmp_path / "val.txt"))
    open(val / name(1), "wb").close()
    assert tool.prepare(str(val), str(tmp_path / "val.txt")).startswith("moved 50000 ")
    assert len(os.listdir(val)) == 1000 and sorted(os.listdir(val / wnid[7])) == [name(7 + 1000 * k) for k in range(50)]
    assert "nothing to do" in tool.prepare(str(val), str(tmp_path / "val.txt"))


def test_errors(tmp_path, run):
    one_line_error(run(tmp_path / "nowhere", "--labels", tmp_path / "x.csv"), str(tmp_path / "nowhere"))
    val = tmp_path / "val"
    write_flat(str(val))
    one_line_error(run(val, "--labels", tmp_path / "x.csv"), "x.csv not found")
    # an image the labels do not name: nothing moves
    write_csv(tmp_path / "short.csv", rows=list(enumerate(TRUTH, 1))[:-1])
    one_line_error(run(val, "--labels", tmp_path / "short.csv", "--allow-partial"), "1 images", name(7),
                   "nothing was moved")
    assert sorted_files(val) == set()
    (tmp_path / "bad.csv").write_text("id,label\nILSVRC2012_val_00000001,n01440764\n")
    one_line_error(run(val, "--labels", tmp_path / "bad.csv"), "ImageId,PredictionString")
    (tmp_path / "caffe.txt").write_text("ILSVRC2012_val_00000001.JPEG 65\n")
    one_line_error(run(val, "--labels", tmp_path / "caffe.txt"), "caffe.txt:1", "wnid")
    (tmp_path / "clash.txt").write_text(f"{name(1)} n01440764\n{name(1)[:-5]} n01443537\n")
    one_line_error(run(val, "--labels", tmp_path / "clash.txt"), "clash.txt:2", "labelled both")
    (tmp_path / "devkit.tar.gz").write_bytes(b"")
    one_line_error(run(val, "--labels", tmp_path / "devkit.tar.gz"), "unpack it")
    os.makedirs(tmp_path / "devkit" / "data")
    one_line_error(run(val, "--labels", tmp_path / "devkit"), "meta.mat not found")


def test_devkit_without_scipy_says_what_to_do(tmp_path, tool, monkeypatch):
    kit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    os.makedirs(kit)
    (kit / "meta.mat").write_bytes(b"")
    (kit / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n")
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # import scipy.io now raises ImportError
    write_flat(str(tmp_path / "val"))
    with pytest.raises(tool.PrepareError, match="pip install scipy.*LOC_val_solution.csv"):
        tool.prepare(str(tmp_path / "val"), str(tmp_path / "ILSVRC2012_devkit_t12"))


def test_command_line(tmp_path):
    """As a user runs it: a new interpreter, the report on stdout, an error as one line and exit code 2."""
    val = tmp_path / "val"
    write_flat(str(val))
    write_csv(tmp_path / "s.csv")
    cmd = [sys.executable, TOOL, str(val), "--labels", str(tmp_path / "s.csv")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    one_line_error(r, "--allow-partial")
    r = subprocess.run(cmd + ["--allow-partial"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0 and r.stdout.startswith("moved 7 ") and r.stderr == "", r.stderr
    assert sorted_files(val) == expected(str(val))
