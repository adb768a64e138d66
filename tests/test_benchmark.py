"""tools/benchmark.py and mdistiller/bench: each variant is a real run (engine.build_run), timed consistently; the
phase breakdown times the real step without changing it; the torchvision baseline reads the very images the
variant trains on. In-process variants train on in-memory synthetic data with an in-memory random teacher."""

import itertools
import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR100

from mdistiller.bench.baseline import TorchvisionKD
from mdistiller.bench.cifar_format import UncheckedCIFAR100, write_cifar100
from mdistiller.bench.phases import PHASES, PhaseClock, time_phases
from mdistiller.bench.random_teacher import random_teacher_state
from mdistiller.bench.roofline import matmul_gflops, roofline, step_flops
from mdistiller.bench.synthetic import SyntheticDataset
from mdistiller.bench.variant import Variant
from mdistiller.config import load_config
from mdistiller.data import build_dataloaders
from mdistiller.data.cifar100 import read_split
from mdistiller.distillers.losses import kd_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "tools", "benchmark.py")
KD_CFG = os.path.join(ROOT, "configs", "cifar100", "kd", "resnet32x4_resnet8x4.yaml")
TINY = ["SOLVER.BATCH_SIZE", "8", "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT", "resnet8"]
# Timings are never compared with each other or with a speed here (a shared, busy machine can stretch any of them):
# the tests check that they are measured (positive), that reported ratios are the ratios of the reported numbers,
# and, with a fake clock, which phase each interval goes to.


@pytest.fixture(autouse=True)
def one_thread():
    """Tests run beside other work: two spinning threads of one process would mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bench_json(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, BENCH, "--cfg", KD_CFG, "--synthetic", "--random-teacher", "--json",
                           *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout


@pytest.fixture(scope="module")
def teacher_state():
    """The random resnet20 teacher of the tiny KD config, in memory."""
    return random_teacher_state("resnet20", "cifar100")


def tiny_cfg(tmp_path, *extra):
    """KD resnet20 -> resnet8, batch 8, on the CPU (its random teacher: the teacher_state fixture)."""
    return load_config(KD_CFG, ["LOG.PREFIX", str(tmp_path), "EXPERIMENT.DEVICE", "cpu", *TINY, *extra])


def tiny_variant(label, tmp_path, teacher_state, *extra, num_train=64):
    """A Variant of the tiny config on `num_train` synthetic CIFAR-100 images (engine.build_run's bundle)."""
    cfg = tiny_cfg(tmp_path, *extra)
    return Variant(label, cfg, bundle=SyntheticDataset("cifar100", num_train)(cfg), teacher_state=teacher_state)


def test_benchmark_compare_reports_every_variant_and_the_baseline_speedup():
    out, stdout = bench_json("--steps", "2", "--warmup", "1", "--rounds", "3", "--baseline", "torchvision",
                             "--epoch-images", "64", "--baseline-workers", "1",
                             "--compare", "SOLVER.UPDATE_RULE vanilla", "SOLVER.UPDATE_RULE dot", "--", *TINY)
    first, dot = out["results"]
    assert (first["variant"], dot["variant"]) == ("SOLVER.UPDATE_RULE vanilla", "SOLVER.UPDATE_RULE dot")
    assert first["ratio_to_first"] == 1.0 and first["batch_size"] == 8
    for r in out["results"]:
        assert r["images_per_s"] == pytest.approx(r["batch_size"] / (r["ms_per_step"] / 1e3))
        assert r["images_per_s_with_data"] > 0
        # breakdown: every phase, non-negative, shares of their sum (how close the sum comes to a plain step, timed
        # in other repetitions, depends on the machine's load and is not checked)
        assert set(r["breakdown"]) == set(PHASES)
        assert all(p["ms"] >= 0 for p in r["breakdown"].values())
        assert sum(p["ms"] for p in r["breakdown"].values()) == pytest.approx(r["breakdown_sum_ms"])
        assert sum(p["pct"] for p in r["breakdown"].values()) == pytest.approx(100.0)
        assert r["breakdown"]["teacher"]["ms"] > 0 and r["breakdown"]["backward"]["ms"] > 0
        assert r["ms_per_step"] > 0 and r["breakdown_sum_ms"] > 0
        # the epoch comparison: 64 images = 8 full batches on both sides
        assert r["epoch"]["images"] == 64
        assert r["speedup_vs_baseline"] == pytest.approx(r["epoch"]["images_per_s"] / out["baseline"]["images_per_s"])
    assert dot["ratio_to_first"] == pytest.approx(dot["ms_per_step"] / first["ms_per_step"])
    base = out["baseline"]
    assert (base["name"], base["workers"], base["images"]) == ("torchvision", 1, 64) and base["loss_finite"]
    assert "where a step goes" in stdout and "torchvision baseline (1 workers)" in stdout


def hook_count(module):
    return len(module._forward_hooks) + len(module._forward_pre_hooks)


def test_phase_clock_times_the_real_step_and_leaves_no_trace(tmp_path, teacher_state):
    """An instrumented update is bit-identical to a plain one from the same state (vanilla and DOT, whose own
    gradient code runs inside), its phases are measured and lie within its wall time, and nothing stays installed.
    Which interval goes to which phase is checked with a fake clock: a real one only says the phases happened."""
    for trainer_name in ("vanilla", "dot"):
        timed = tiny_variant("timed", tmp_path, teacher_state, "SOLVER.UPDATE_RULE", trainer_name)
        # same initial weights
        plain = tiny_variant("plain", tmp_path, teacher_state, "SOLVER.UPDATE_RULE", trainer_name)
        distiller, optimizer = timed.trainer.distiller, timed.trainer.optimizer
        hooks_before = hook_count(distiller.student), hook_count(distiller.teacher)
        start = time.perf_counter()
        with PhaseClock(timed.trainer) as clock:
            timed.trainer.run_step(*timed.batch[:3], 1)
        wall = time.perf_counter() - start
        plain.trainer.run_step(*plain.batch[:3], 1)
        a, b = timed.trainer.distiller.state_dict(), plain.trainer.distiller.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), trainer_name
        (step,) = clock.steps
        assert set(step) == set(PHASES) and step["loss"] >= 0  # loss: the forward less the two models, clamped at 0
        assert all(step[p] > 0 for p in ("teacher", "student", "backward", "optimizer"))
        assert sum(step.values()) <= wall  # disjoint intervals inside the timed call, read from the same clock
        assert "step" not in vars(optimizer) and "step_with_grads" not in vars(optimizer)
        assert (hook_count(distiller.student), hook_count(distiller.teacher)) == hooks_before
        assert not timed.trainer.model._forward_hooks and not timed.trainer.model._forward_pre_hooks
        # A second clock on the restored trainer, reading a fake clock that advances by 1 per reading: one
        # teacher call and one student call are 1 each, forward_train spans 5 ticks (two readings in each
        # model, then its end), so loss = 5 - 1 - 1 = 3; backward and optimizer are 1 each. A forward whose update
        # never comes (an fp16 overflow skips it) is dropped, not added to the next step's teacher and student.
        with PhaseClock(timed.trainer) as clock:
            ticks = itertools.count()
            clock._now = lambda: float(next(ticks))
            images, labels, index = timed.batch
            timed.trainer.model(images, labels, 1, index)
            timed.trainer.run_step(images, labels, index, 1)
        assert clock.steps == [{"teacher": 1.0, "student": 1.0, "loss": 3.0, "backward": 1.0, "optimizer": 1.0}]


def test_cifar100_files_hold_the_synthetic_images_in_torchvisions_format(tmp_path):
    synthetic = SyntheticDataset("cifar100", 300, num_test=50)
    train, test = synthetic.train_split, synthetic.test_split
    root = write_cifar100(str(tmp_path), train, test)
    folder = tmp_path / "cifar-100-python"
    # the published layout, as torchvision unpickles it (latin1: the keys are Python 2 str)
    with open(folder / "train", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    assert raw["data"].dtype == np.uint8 and raw["data"].shape == (300, 3072)
    for i, c, y, x in ((0, 0, 0, 0), (7, 1, 5, 30), (299, 2, 31, 31)):  # row = R plane, G plane, B plane
        assert raw["data"][i, c * 1024 + y * 32 + x] == train.images[i, c, y, x]
    assert raw["fine_labels"] == [i % 100 for i in range(300)] and raw["coarse_labels"][7] == 1
    assert len(raw["filenames"]) == 300 and isinstance(raw["filenames"][0], str)
    # the stock reader refuses the copy only for its MD5; the subclass reads it with torchvision's own code
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        CIFAR100(root, train=True, download=False)
    ds = UncheckedCIFAR100(root, train=True, download=False)
    assert ds.data.shape == (300, 32, 32, 3) and ds.targets == train.targets.tolist() and len(ds.classes) == 100
    for i in (0, 123, 299):
        image, label = ds[i]  # a PIL image, HWC
        assert np.array_equal(np.asarray(image), train.images[i].permute(1, 2, 0).numpy()) and label == i % 100
    ds_test = UncheckedCIFAR100(root, train=False)
    assert np.array_equal(ds_test.data[49], test.images[49].permute(1, 2, 0).numpy())
    # and mdistiller's own reader (encoding="bytes") gets back the same tensors
    again = read_split(str(folder / "train"))
    assert torch.equal(again.images, train.images) and torch.equal(again.targets, train.targets)


def test_torchvision_baseline_trains_kd_on_the_variants_images(tmp_path, teacher_state):
    synthetic = SyntheticDataset("cifar100", 250)
    root = write_cifar100(str(tmp_path / "data"), synthetic.train_split, synthetic.test_split)
    cfg = tiny_cfg(tmp_path, "DATASET.ROOT", root, "SOLVER.BATCH_SIZE", "32")
    baseline = TorchvisionKD(cfg, root, "cpu", workers=0, mean=(0.5,) * 3, std=(0.25,) * 3, verify_md5=False,
                             teacher_state=teacher_state)
    # the teacher is the variant's: the given weights, frozen in eval mode
    assert not baseline.teacher.training
    assert all(torch.equal(v, teacher_state[k]) for k, v in baseline.teacher.state_dict().items())
    # its loss is mdistiller's KD objective: 0.1 CE + 0.9 T^2 KL at T = 4, computed here with the repo's kd_loss
    images, labels = next(iter(baseline.loader))
    baseline.student.train()
    with torch.no_grad():
        logits, logits_t = baseline.student(images)[0], baseline.teacher(images)[0]
        expected = 0.1 * F.cross_entropy(logits, labels) + 0.9 * kd_loss(logits, logits_t, 4.0)
    student0 = [p.detach().clone() for p in baseline.student.parameters()]
    teacher0 = [p.detach().clone() for p in baseline.teacher.parameters()]
    assert float(baseline.step(images, labels)) == pytest.approx(float(expected), rel=1e-5)
    seen, seconds, losses = baseline.epoch()
    assert seen == 224 and losses.shape == (7,) and seconds > 0  # 250 images, drop_last: 7 batches of 32
    assert torch.isfinite(losses).all()
    assert any(not torch.equal(p, q) for p, q in zip(baseline.student.parameters(), student0))
    assert all(torch.equal(p, q) for p, q in zip(baseline.teacher.parameters(), teacher0))
    # a DATASET.TRAIN_SUBSET run: the baseline picks exactly the images mdistiller's loader trains on
    subset_cfg = tiny_cfg(tmp_path, "DATASET.ROOT", root, "DATASET.TRAIN_SUBSET", "100")
    sub = TorchvisionKD(subset_cfg, root, "cpu", workers=0, mean=(0.5,) * 3, std=(0.25,) * 3, verify_md5=False,
                        subset=100, teacher_state=teacher_state)
    train_loader, _, _ = build_dataloaders(subset_cfg, "cpu")
    picked = torch.from_numpy(sub.loader.dataset.dataset.data[sub.loader.dataset.indices]).permute(0, 3, 1, 2)
    assert sub.num_images == 100 and torch.equal(picked, train_loader.images.cpu())


def test_baseline_needs_a_cifar100_config():
    cfg = os.path.join(ROOT, "configs", "fashion_mnist", "kd", "resnet20_resnet8.yaml")
    proc = subprocess.run([sys.executable, BENCH, "--cfg", cfg, "--synthetic", "--baseline", "torchvision"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --baseline torchvision is a CIFAR-100 loop")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_dataset_without_synthetic_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, BENCH, "--cfg", KD_CFG, "DATASET.ROOT", str(tmp_path),
                           "DATASET.DOWNLOAD", "False"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


def test_roofline_counts_the_whole_real_step(tmp_path, teacher_state):
    # A matmul by hand: 2 * m * k * n.
    assert step_flops(lambda: torch.randn(64, 32) @ torch.randn(32, 16)) == 2 * 64 * 32 * 16
    # A KD update = teacher forward + student forward + student backward. The backward of a convolution or a
    # linear layer is twice its forward (input and weight gradients), except the first convolution, whose input
    # (the images) needs no gradient.
    v = tiny_variant("kd", tmp_path, teacher_state)
    images = v.batch[0]

    def forward_flops(model):
        return step_flops(lambda: model(images))

    student, teacher = v.trainer.distiller.student, v.trainer.distiller.teacher
    with torch.no_grad():
        f_student, f_teacher = forward_flops(student), forward_flops(teacher)
        f_stem = forward_flops(student.conv1)
    assert step_flops(lambda: v._step(v.batch)) == f_teacher + 3 * f_student - f_stem


def test_roofline_arithmetic_and_matmul_rate():
    r = roofline(2e9, 0.5, 64, 8.0)  # 2 GFLOP in 0.5 s on an 8 GFLOP/s device
    assert r == pytest.approx({"gflop_per_step": 2.0, "achieved_gflops": 4.0, "pct_of_matmul": 50.0,
                               "bound_ms_per_step": 250.0, "bound_images_per_s": 256.0})
    assert 0 < matmul_gflops(torch.device("cpu"), n=256, repeats=3) < 1e5  # measured; how fast is the machine's affair


def test_compare_takes_other_config_files_each_with_its_random_teacher():
    dkd = os.path.join(ROOT, "configs", "cifar100", "dkd", "resnet32x4_resnet8x4.yaml")
    out, stdout = bench_json("--steps", "1", "--warmup", "0", "--rounds", "1", "--no-data", "--no-breakdown",
                             "--compare", KD_CFG, f"{dkd} DISTILLER.TEACHER resnet32", "--",
                             "SOLVER.BATCH_SIZE", "8", "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT", "resnet8")
    kd, dkd_result = out["results"]
    assert kd["variant"] == KD_CFG and dkd_result["variant"].startswith(dkd)
    assert kd["ms_per_step"] > 0 and dkd_result["ms_per_step"] > 0 and kd["batch_size"] == 8


def test_compare_rejects_a_variant_on_another_dataset():
    other = os.path.join(ROOT, "configs", "fashion_mnist", "kd", "resnet20_resnet8.yaml")
    proc = subprocess.run([sys.executable, BENCH, "--cfg", KD_CFG, "--synthetic", "--compare", other],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "trains on DATASET.TYPE 'fashion_mnist', --cfg on 'cifar100'" in proc.stderr


def test_op_counter_counts_calls_and_host_waits_exactly():
    """Hand-made steps with known aten calls: every call counted once, the ones that make a CUDA host wait
    (a value read, a data-dependent shape) counted as syncs, nothing else."""
    from mdistiller.bench.op_count import count_ops

    a, b = torch.randn(4, 3), torch.randn(4, 3)
    assert count_ops(lambda: a + b) == {"aten_ops": 1, "syncs": 0, "sync_ops": {}, "top_ops": {"add": 1}}
    read = count_ops(lambda: (a * b).sum().item())
    assert read["aten_ops"] == 3 and read["syncs"] == 1 and read["sync_ops"] == {"_local_scalar_dense": 1}
    shaped = count_ops(lambda: [(a > 0).nonzero() for _ in range(2)], 2)  # per update: gt, nonzero (a CUDA sync)
    assert shaped["aten_ops"] == 2 and shaped["sync_ops"] == {"nonzero": 1}
    assert count_ops(lambda: float(a.max()))["syncs"] == 1  # Python's float() reads the value too
    masked = count_ops(lambda: a[a > 0])  # a boolean index: positions from a hidden nonzero
    assert masked["sync_ops"] == {"index": 1} and count_ops(lambda: a[:, 1:])["syncs"] == 0


def test_ops_compares_the_update_with_a_bare_loop():
    """--ops: per update, the aten calls and host waits of the run's loop step (hooks included, over one period of
    the finite guard's check) and of a bare PyTorch KD loop of the same models. The KD step waits on the host only
    for the guard's check, once per period; the bare loop never does."""
    from mdistiller.engine.finite_guard import CHECK_EVERY

    out, stdout = bench_json("--steps", "1", "--warmup", "1", "--rounds", "1", "--no-data", "--no-breakdown", "--ops",
                             "--compare", "SOLVER.UPDATE_RULE vanilla", "SOLVER.UPDATE_RULE dot",
                             "--", *TINY, "SPEED.AMP", "off")
    for r in out["results"]:
        ops, bare = r["ops"], r["ops"]["bare"]
        assert bare["syncs"] == 0 and bare["aten_ops"] > 0
        assert ops["syncs"] == 1 / CHECK_EVERY and ops["sync_ops"] == {"_local_scalar_dense": 1 / CHECK_EVERY}
        assert ops["aten_ops"] >= bare["aten_ops"] * 0.5 and sum(ops["top_ops"].values()) <= ops["aten_ops"]
    assert "operations per update" in stdout
