"""Trains KD, DKD, CRD, ReviewKD, KD++ and KD+DOT, and detection KD, DKD, KD++, ReviewKD and ReviewKD++, briefly
with whichever mdistiller is first on PYTHONPATH.

tests/test_refactor_equivalence.py runs this once against the code of OLD_SHA (the last commit before the current
restructuring, architecture step 2) and once against the current tree, then compares what the runs left behind. It
uses only the API both keep (`load_config`, `train_from_config`) and each tree's own shipped configs, so it measures
the engine, not this script. Everything else here (collecting and comparing results, the teacher, the fixtures)
needs only torch.

    python tests/equivalence_driver.py OUT_DIR DATA_ROOT TEACHER_CKPT [COCO_ROOT DETECTION_TEACHER]
                                       # PYTHONPATH=<tree>: train the runs (the detection ones with the last two)
    python tests/equivalence_driver.py --write-fixtures                 # refresh tests/fixtures/refactor_equivalence
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

OLD_SHA = "a80dc13d85feb5a6f02cc77434fe84188317545f"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "refactor_equivalence")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

# run name -> config, relative to the tree's root
RUNS = {
    "kd": "configs/fashion_mnist/kd/resnet20_resnet8.yaml",
    "dkd": "configs/fashion_mnist/dkd/resnet20_resnet8.yaml",
    "crd": "configs/fashion_mnist/crd/resnet20_resnet8.yaml",
    "reviewkd": "configs/fashion_mnist/reviewkd/resnet20_resnet8.yaml",
    "kdpp": "configs/fashion_mnist/kdpp/resnet20_resnet8.yaml",
    "kd_dot": "configs/fashion_mnist/dot/kd_resnet20_resnet8.yaml",
}
# TASK detection: run name -> DISTILLER.TYPE over the generated sample's recipe, a random resnet18 teacher.
DETECTION_CONFIG = "configs/coco/sample/kdpp_resnet18_resnet18.yaml"
DETECTION_RUNS = {"det_kd": "KD", "det_dkd": "DKD", "det_kdpp": "KD++", "det_reviewkd": "REVIEWKD",
                  "det_reviewkdpp": "REVIEWKD++"}
# 2 epochs of 2 iterations at tiny sizes: warm-up and the LR step both reached, ND's class means collected.
SMALL_DETECTION = ["EXPERIMENT.DEVICE", "cpu", "SOLVER.EPOCHS", "2", "DETECTION.ITERS_PER_EPOCH", "2",
                   "DETECTION.WARMUP_ITERS", "2", "DETECTION.STEPS", "[3]", "DETECTION.TRAIN_SHORT_SIDES", "[48]",
                   "DETECTION.TEST_SHORT_SIDE", "48", "DETECTION.MAX_SIZE", "64", "DETECTION.ND.CLASS_MEANS_ITERS",
                   "2", "SOLVER.BATCH_SIZE", "2", "LOG.TENSORBOARD_FREQ", "0", "LOG.PRINT_FREQ", "0"]
COCO_SAMPLE = dict(num_train=6, num_val=3, width=64, height=48)
# metrics.jsonl keys OLD_SHA wrote under another name: the detection term "nd" is "dino", as in classification
RENAMED_METRICS = {"loss/nd": "loss/dino"}
# 2 epochs, the LR divided by 10 for the second (both LR phases and the decay step trained), seconds per run.
SMALL = ["EXPERIMENT.DEVICE", "cpu", "SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES", "[1]",
         "DATASET.TRAIN_SUBSET", "600", "DATASET.TEST_SUBSET", "200", "SOLVER.BATCH_SIZE", "32",
         "LOG.TENSORBOARD_FREQ", "0"]
# Intra-op threads can change how CPU kernels split their sums; fixed, so fixtures made on a bigger machine still apply.
THREADS = 2
TEACHER_SEED = 0


def train_all(out_dir, data_root, teacher_ckpt, coco_root=None, detection_teacher=None):
    """The runs under out_dir/<run name>, with the mdistiller (and configs) of the first PYTHONPATH entry; the
    detection ones when `coco_root` and `detection_teacher` are given."""
    torch.set_num_threads(THREADS)
    tree = os.path.realpath(os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or ".")
    import mdistiller
    from mdistiller.config import load_config
    from mdistiller.engine.launch import train_from_config

    where = os.path.realpath(mdistiller.__file__)
    if not where.startswith(tree + os.sep):
        sys.exit(f"mdistiller was imported from {where}, not from PYTHONPATH's first entry {tree}")
    for name, rel in RUNS.items():
        cfg = load_config(os.path.join(tree, rel), SMALL + [
            "DATASET.ROOT", data_root, "DISTILLER.TEACHER_CKPT", teacher_ckpt,
            "LOG.PREFIX", out_dir, "EXPERIMENT.NAME", name])
        if cfg.DISTILLER.TEACHER != "resnet20":
            sys.exit(f"{rel} names teacher {cfg.DISTILLER.TEACHER}; the shared checkpoint is a resnet20")
        train_from_config(cfg, resume=False)
    for name, method in (DETECTION_RUNS.items() if coco_root else ()):
        cfg = load_config(os.path.join(tree, DETECTION_CONFIG), SMALL_DETECTION + [
            "DISTILLER.TYPE", method, "DATASET.ROOT", coco_root, "DISTILLER.TEACHER_CKPT", detection_teacher,
            "LOG.PREFIX", out_dir, "EXPERIMENT.NAME", name])
        train_from_config(cfg, resume=False)


# ---- what a run leaves behind, and comparing two of them (torch and json only) ----

def is_timing_key(key):
    """Wall-clock metrics: differ between any two runs, so never compared."""
    return key.endswith("_time_s") or key.endswith("_per_s")


def collect(run_dir):
    """{"model": the student state dict, "metrics": records without timing, "momentum": [{name: tensor}] per
    parameter in the optimizer's order} of one finished run."""
    model = torch.load(os.path.join(run_dir, "student_last.pth"), map_location="cpu", weights_only=True)["model"]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [{k: v for k, v in json.loads(line).items() if not is_timing_key(k)} for line in f if line.strip()]
    opt = torch.load(os.path.join(run_dir, "latest.pth"), map_location="cpu", weights_only=False)["optimizer"]
    order = [i for group in opt["param_groups"] for i in group["params"]]
    momentum = [{k: v for k, v in opt["state"].get(i, {}).items() if torch.is_tensor(v) and v.dim() > 0}
                for i in order]
    return {"model": model, "metrics": metrics, "momentum": momentum}


ALL_RUNS = [*RUNS, *DETECTION_RUNS]


def collect_all(out_dir, names=ALL_RUNS):
    return {name: collect(os.path.join(out_dir, name)) for name in names}


def digests(result):
    """`result` with every tensor replaced by its state digest (tensor_sha256): what the fixtures keep of the
    detection runs, whose detectors are too large to store."""
    return {"model": {k: tensor_sha256(v) for k, v in result["model"].items()}, "metrics": result["metrics"],
            "momentum": [{k: tensor_sha256(v) for k, v in m.items()} for m in result["momentum"]]}


def _tensor_diff(where, a, b):
    """One line when tensors a (old) and b (new) are not bit-identical, else None. `a` may be a digest."""
    if isinstance(a, str):
        return None if a == tensor_sha256(b) else f"{where}: differs (the old side is a digest: no magnitude)"
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{where}: old {a.dtype} {tuple(a.shape)} vs new {b.dtype} {tuple(b.shape)}"
    if torch.equal(a, b):
        return None
    if a.is_floating_point():
        diff = (a.double() - b.double()).abs()
        return f"{where}: max abs difference {diff.max().item():.3e} ({int((diff > 0).sum())} of {a.numel()} differ)"
    return f"{where}: max abs difference {(a.long() - b.long()).abs().max().item()}"


def compare_run(name, old, new):
    """Every way run `name`'s new results differ from its old ones, one line each (empty: bit-identical)."""
    out = []
    om, nm = old["model"], new["model"]
    if set(om) != set(nm):
        out.append(f"{name} model: keys only old {sorted(set(om) - set(nm))}, only new {sorted(set(nm) - set(om))}")
    for k in sorted(set(om) & set(nm)):
        out.append(_tensor_diff(f"{name} model[{k!r}]", om[k], nm[k]))
    if len(old["metrics"]) != len(new["metrics"]):
        out.append(f"{name} metrics: {len(old['metrics'])} records old vs {len(new['metrics'])} new")
    for e, (a, b) in enumerate(zip(old["metrics"], new["metrics"]), 1):
        a = {RENAMED_METRICS.get(k, k): v for k, v in a.items()}
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{name} metrics record {e} [{k!r}]: only in {'old' if k in a else 'new'}")
            elif a[k] != b[k]:
                gap = (f"{abs(a[k] - b[k]):.3e}" if all(isinstance(v, (int, float)) for v in (a[k], b[k]))
                       else "n/a")
                out.append(f"{name} metrics record {e} [{k!r}]: old {a[k]!r} vs new {b[k]!r}, max abs difference {gap}")
    if len(old["momentum"]) != len(new["momentum"]):
        out.append(f"{name} optimizer: {len(old['momentum'])} parameters old vs {len(new['momentum'])} new")
    for i, (a, b) in enumerate(zip(old["momentum"], new["momentum"])):
        if set(a) != set(b):
            out.append(f"{name} optimizer param {i}: buffers old {sorted(a)} vs new {sorted(b)}")
        for k in sorted(set(a) & set(b)):
            out.append(_tensor_diff(f"{name} optimizer param {i} [{k!r}]", a[k], b[k]))
    return [line for line in out if line]


# ---- the trees, the teacher, the fixtures ----

def fashion_mnist_available(data_root):
    files = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    return any(all(os.path.isfile(os.path.join(d, f)) for f in files)
               for d in (DEBIAN_FASHION_MNIST, os.path.join(data_root, "FashionMNIST", "raw")))


def export_commit(sha, dest):
    """`git archive` of commit `sha` of ROOT's repository into dest; False when the commit is not there (a shallow
    clone, a source tarball, no git)."""
    try:
        if subprocess.run(["git", "-C", ROOT, "cat-file", "-e", f"{sha}^{{commit}}"], capture_output=True).returncode:
            return False
    except FileNotFoundError:
        return False
    os.makedirs(dest, exist_ok=True)
    archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", sha], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    return True


def save_detection_teacher(path):
    """A seeded random-weight resnet18 Faster R-CNN as {"model": state_dict}, built by PYTHONPATH's tree."""
    from mdistiller.detection.models import build_faster_rcnn

    torch.manual_seed(TEACHER_SEED)
    state = build_faster_rcnn("resnet18").state_dict()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"model": state}, path)


def write_coco_sample(root):
    """The generated COCO sample the detection runs read (this checkout's generator: both trees read the same)."""
    from mdistiller.detection.sample import write_sample_coco

    return write_sample_coco(root, **COCO_SAMPLE)


def save_teacher(path):
    """A seeded random-weight resnet20 for fashion_mnist as {"model": state_dict}, built by PYTHONPATH's tree."""
    from mdistiller.models import build_model

    torch.manual_seed(TEACHER_SEED)
    state = build_model("resnet20", "fashion_mnist").state_dict()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"model": state}, path)


def write_teacher(tree, path, detection=False):
    """save_teacher (save_detection_teacher) with `tree`'s model code, in a subprocess; returns the weights'
    state_sha256."""
    _driver(tree, ["--detection-teacher" if detection else "--teacher", path], timeout=300)
    return state_sha256(torch.load(path, map_location="cpu", weights_only=True)["model"])


def state_sha256(state):
    """A digest of a state dict's names, dtypes, shapes and bits (torch.save's bytes differ between saves)."""
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        h.update(tensor_sha256(v).encode())
    return h.hexdigest()


def tensor_sha256(v):
    """A digest of one tensor's dtype, shape and bits."""
    h = hashlib.sha256(f"{v.dtype} {tuple(v.shape)}".encode())
    h.update(v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def teacher_copy(teacher, dest_dir):
    """The teacher in a directory of its own: KD++ caches class means next to the checkpoint it reads."""
    os.makedirs(dest_dir, exist_ok=True)
    return shutil.copy(teacher, os.path.join(dest_dir, "teacher.pth"))


def run_tree(tree, out_dir, data_root, teacher_ckpt, coco_root=None, detection_teacher=None, timeout=1500):
    """This script's runs with `tree`'s mdistiller (the detection ones when coco_root is given)."""
    _driver(tree, [out_dir, data_root, teacher_ckpt] + ([coco_root, detection_teacher] if coco_root else []),
            timeout)


def _driver(tree, args, timeout):
    """This script with `tree` first on PYTHONPATH; raises with the tail of its output if it fails."""
    # Passive: OpenMP threads that spin while waiting made these runs several times slower on a busy machine.
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": str(THREADS), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args],
                          env=env, cwd=tree, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"the driver failed on {tree} (rc {proc.returncode}):\n{tail}")


def machine():
    """What decides the bits on a CPU besides the code (torch's build, the CPU and the ISA features its kernels
    dispatch on, the overriding environment variables), with the thread count the runs use."""
    from mdistiller.utils.hardware import kernel_identity  # this checkout's, as the test process imports it

    return kernel_identity(threads=THREADS)


def train_tree(tree, tmp, data_root, teachers=None):
    """Every run with `tree`'s code under tmp/<tree's name>; `teachers`: (classification, detection) files to use,
    else `tree` writes them. Returns (collected results, the teachers, the COCO sample's root)."""
    name = os.path.basename(tree)
    if teachers is None:
        teachers = (os.path.join(tmp, "teacher.pth"), os.path.join(tmp, "detection_teacher.pth"))
        write_teacher(tree, teachers[0])
        write_teacher(tree, teachers[1], detection=True)
    coco = os.path.join(tmp, "coco_sample")
    if not os.path.isdir(coco):
        write_coco_sample(coco)
    out = os.path.join(tmp, f"runs_{name}")
    run_tree(tree, out, data_root, teacher_copy(teachers[0], os.path.join(tmp, f"t_{name}")), coco, teachers[1])
    return collect_all(out), teachers, coco


def write_fixtures(dest=FIXTURES, data_root=os.path.join(ROOT, "data")):
    """Train every run with OLD_SHA's code on this machine and keep their results in `dest` (the detection runs'
    tensors as digests)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "old")
        if not export_commit(OLD_SHA, tree):
            sys.exit(f"commit {OLD_SHA} is not in {ROOT}'s history (a shallow clone?): fetch it first")
        results, teachers, _ = train_tree(tree, tmp, data_root)
        shas = [state_sha256(torch.load(t, map_location="cpu", weights_only=True)["model"]) for t in teachers]
        os.makedirs(dest, exist_ok=True)
        for old in os.listdir(dest):
            if old.endswith(".pt"):
                os.remove(os.path.join(dest, old))
        for name, result in results.items():
            torch.save(digests(result) if name in DETECTION_RUNS else result, os.path.join(dest, f"{name}.pt"))
    with open(os.path.join(dest, "manifest.json"), "w") as f:
        json.dump({"sha": OLD_SHA, **machine(), "teacher_sha256": shas[0], "detection_teacher_sha256": shas[1],
                   "overrides": SMALL, "detection_overrides": SMALL_DETECTION, "runs": RUNS,
                   "detection_runs": DETECTION_RUNS, "coco_sample": COCO_SAMPLE}, f, indent=1)
        f.write("\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write-fixtures", action="store_true", help=f"refresh {os.path.relpath(FIXTURES, ROOT)}")
    p.add_argument("--teacher", metavar="PATH", help="write the shared random teacher (PYTHONPATH's model code)")
    p.add_argument("--detection-teacher", metavar="PATH", help="write the shared random detection teacher")
    p.add_argument("paths", nargs="*", metavar="OUT_DIR DATA_ROOT TEACHER_CKPT [COCO_ROOT DETECTION_TEACHER]")
    args = p.parse_args(argv)
    if args.write_fixtures:
        write_fixtures()
    elif args.teacher:
        save_teacher(args.teacher)
    elif args.detection_teacher:
        save_detection_teacher(args.detection_teacher)
    elif len(args.paths) in (3, 5):
        train_all(*args.paths)
    else:
        p.error("give OUT_DIR DATA_ROOT TEACHER_CKPT [COCO_ROOT DETECTION_TEACHER], or --write-fixtures")


if __name__ == "__main__":
    main()
