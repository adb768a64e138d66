"""A restructuring must leave every run bit-identical on one machine (issue 17's engine refactor was checked
against ab3f573; architecture step 2, issue 28, against a80dc13, the OLD_SHA now).

tests/equivalence_driver.py trains KD, DKD, CRD, ReviewKD, KD++ and KD+DOT (Fashion-MNIST subset, 2 epochs, one
seeded random resnet20 teacher) and detection KD, DKD, KD++, ReviewKD and ReviewKD++ (the generated COCO sample,
2 epochs of 2 iterations, one seeded random resnet18 Faster R-CNN teacher) with the code of OLD_SHA and with this
checkout, and the test compares: the students' `student_last.pth` tensors, the metrics.jsonl records without
their wall-clock keys, and latest.pth's optimizer buffers, all exactly.

The old code's results come from tests/fixtures/refactor_equivalence/ where they apply: they hold its results
from one machine and apply only where the kernels are the same (hardware.kernel_identity: torch's version, CPU
vendor, family and model, the ISA flags oneDNN and MKL dispatch on, ATen's capability, the environment variables
overriding them). Elsewhere the old code is trained again, from `git archive OLD_SHA` when this clone has the
commit; without it the test is skipped with the command that fetches it.
Regenerate them (on a machine whose clone has OLD_SHA) with

    .venv/bin/python tests/equivalence_driver.py --write-fixtures

MDISTILLER_EQUIV_TREE=<source tree> compares that tree instead of this checkout (a scratch copy, an exported commit).
"""

import json
import os

import pytest
import torch

import equivalence_driver as drv


def _fixtures_apply_here():
    """Whether the fixtures hold OLD_SHA's results made with this machine's torch and kernels."""
    path = os.path.join(drv.FIXTURES, "manifest.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        manifest = json.load(f)
    return manifest.get("sha") == drv.OLD_SHA and all(manifest.get(k) == v for k, v in drv.machine().items())


def _old_from_fixtures(new_tree, tmp_path):
    """The fixtures' results, when they were made with this machine's torch and kernels; else skip."""
    path = os.path.join(drv.FIXTURES, "manifest.json")
    if not os.path.isfile(path):
        pytest.skip(f"commit {drv.OLD_SHA[:7]} is not in this clone's history and {drv.FIXTURES} has no manifest")
    with open(path) as f:
        manifest = json.load(f)
    assert manifest["sha"] == drv.OLD_SHA, "the fixtures are of another commit: regenerate them (module docstring)"
    here = drv.machine()
    differ = {k: (manifest.get(k), here[k]) for k in here if manifest.get(k) != here[k]}
    if differ:
        pytest.skip(f"commit {drv.OLD_SHA[:7]} is not in this clone (for the exact comparison on this machine: "
                    f"`git fetch --unshallow` or `git fetch origin {drv.OLD_SHA}`), and the fixtures come from other "
                    f"kernels (fixtures vs here: {differ})")
    teachers = (os.path.join(tmp_path, "teacher.pth"), os.path.join(tmp_path, "detection_teacher.pth"))
    for path, detection, key in ((teachers[0], False, "teacher_sha256"),
                                 (teachers[1], True, "detection_teacher_sha256")):
        assert drv.write_teacher(new_tree, path, detection) == manifest[key], (
            f"the seeded random teacher ({key}) differs from the one the fixtures were trained with: model code or "
            "initialisation changed")
    return teachers, {name: torch.load(os.path.join(drv.FIXTURES, f"{name}.pt"), weights_only=True)
                      for name in drv.ALL_RUNS}


@pytest.mark.slow
def test_runs_are_bit_identical_to_the_code_before_the_restructuring(tmp_path):
    data_root = os.path.join(drv.ROOT, "data")
    if not drv.fashion_mnist_available(data_root):
        pytest.skip("Fashion-MNIST is not installed: run tools/fetch_data.sh")
    new_tree = os.path.abspath(os.environ.get("MDISTILLER_EQUIV_TREE") or drv.ROOT)
    old_tree = str(tmp_path / "old")
    # The fixtures are OLD_SHA's results on these very kernels when they apply here: as exact as training the old
    # code again, at half the time. Elsewhere the old code trains, from git.
    if not _fixtures_apply_here() and drv.export_commit(drv.OLD_SHA, old_tree):
        old, teachers, _ = drv.train_tree(old_tree, str(tmp_path), data_root)
    else:
        teachers, old = _old_from_fixtures(new_tree, str(tmp_path))
    new, _, _ = drv.train_tree(new_tree, str(tmp_path), data_root, teachers)
    report = _report(old, new)
    if report:
        pytest.fail(f"runs differ from {drv.OLD_SHA[:7]}'s (old) on this machine:\n{report}", pytrace=False)


def _report(old, new, per_kind=3):
    """Which runs differ and how: up to `per_kind` lines each for the weights, the metrics and the optimizer
    buffers; empty when all are bit-identical."""
    out = []
    for name in drv.ALL_RUNS:
        lines = drv.compare_run(name, old[name], new[name])
        if lines:
            out.append(f"{name}: {len(lines)} differences")
            for kind in ("model", "metrics", "optimizer"):
                of_kind = [line for line in lines if line.startswith(f"{name} {kind}")]
                out += [f"  {line}" for line in of_kind[:per_kind]]
                if len(of_kind) > per_kind:
                    out.append(f"  ... {len(of_kind) - per_kind} more {kind} differences")
    return "\n".join(out)


# ---- the comparison itself, on hand-made results ----

def _result(w=0.5, lr=0.05, buf=0.25):
    return {"model": {"fc.weight": torch.full((2, 3), w), "bn.num_batches_tracked": torch.tensor(7)},
            "metrics": [{"epoch": 1, "lr": lr, "train_loss": 1.5}],
            "momentum": [{"momentum_buffer": torch.full((2, 3), buf)}]}


def test_identical_results_have_no_mismatch():
    assert drv.compare_run("kd", _result(), _result()) == []


def test_one_ulp_in_a_weight_names_run_key_and_difference():
    new = _result()
    new["model"]["fc.weight"][1, 2] = torch.nextafter(torch.tensor(0.5), torch.tensor(1.0))
    (line,) = drv.compare_run("dkd", _result(), new)
    assert line.startswith("dkd model['fc.weight']: max abs difference 5.960e-08")  # 2**-24, one ulp above 0.5
    assert "(1 of 6 differ)" in line


def test_metric_and_momentum_differences_are_reported():
    (m, b) = drv.compare_run("crd", _result(), _result(lr=0.005, buf=0.125))
    assert m.startswith("crd metrics record 1 ['lr']: old 0.05 vs new 0.005, max abs difference 4.500e-02")
    assert b == "crd optimizer param 0 ['momentum_buffer']: max abs difference 1.250e-01 (6 of 6 differ)"


def test_changed_layout_is_reported_not_crashed_on():
    new = _result()
    new["model"]["fc.bias"] = new["model"].pop("bn.num_batches_tracked")
    new["momentum"] = [{"task_buffer": torch.zeros(2, 3), "distill_buffer": torch.zeros(2, 3)}]
    lines = drv.compare_run("kd_dot", _result(), new)
    assert lines == ["kd_dot model: keys only old ['bn.num_batches_tracked'], only new ['fc.bias']",
                     "kd_dot optimizer param 0: buffers old ['momentum_buffer'] vs new ['distill_buffer', "
                     "'task_buffer']"]


def test_fixtures_are_of_the_old_commit_and_complete():
    with open(os.path.join(drv.FIXTURES, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["sha"] == drv.OLD_SHA and manifest["overrides"] == drv.SMALL and manifest["runs"] == drv.RUNS
    assert manifest["detection_overrides"] == drv.SMALL_DETECTION
    assert manifest["detection_runs"] == drv.DETECTION_RUNS and manifest["coco_sample"] == drv.COCO_SAMPLE
    # the fixtures carry the whole identity of the kernels that made them, so a foreign machine skips, not fails
    assert set(drv.machine()) <= set(manifest), sorted(set(drv.machine()) - set(manifest))
    for name in drv.ALL_RUNS:
        result = torch.load(os.path.join(drv.FIXTURES, f"{name}.pt"), weights_only=True)
        assert len(result["metrics"]) == 2 and result["model"] and result["momentum"], name


def test_timing_keys_are_dropped_from_metrics():
    assert drv.is_timing_key("epoch_time_s") and drv.is_timing_key("images_per_s")
    assert not any(drv.is_timing_key(k) for k in ("test_top1", "lr", "loss/kd", "monitor/kl", "best_top1"))


@pytest.mark.parametrize("key,foreign", [("cpu_vendor", "GenuineIntel"), ("cpu_flags", ["avx2", "amx_bf16"]),
                                         ("kernel_env", {"ONEDNN_MAX_CPU_ISA": "AVX2"}), ("torch", "2.99.0")])
def test_fixtures_from_other_kernels_skip_with_the_way_to_the_exact_comparison(key, foreign, tmp_path, monkeypatch):
    """A machine whose kernels differ from the fixtures' in any part of the identity skips, in one line naming the
    difference and how to get the exact comparison there (fetch the old commit); it never compares and fails."""
    with open(os.path.join(drv.FIXTURES, "manifest.json")) as f:
        manifest = json.load(f)
    manifest[key] = foreign
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(drv, "FIXTURES", str(tmp_path))
    with pytest.raises(pytest.skip.Exception) as skipped:
        _old_from_fixtures(drv.ROOT, str(tmp_path))
    message = str(skipped.value)
    assert "\n" not in message and f"git fetch origin {drv.OLD_SHA}" in message and repr(key) in message


def test_a_digest_on_the_old_side_compares_by_bits():
    """The fixtures keep the detection runs' tensors as digests: equal bits pass, one ulp is reported."""
    old = drv.digests(_result())
    assert drv.compare_run("det_kd", old, _result()) == []
    new = _result()
    new["momentum"][0]["momentum_buffer"][0, 0] = torch.nextafter(torch.tensor(0.25), torch.tensor(1.0))
    assert drv.compare_run("det_kd", old, new) == [
        "det_kd optimizer param 0 ['momentum_buffer']: differs (the old side is a digest: no magnitude)"]
