"""tools/plot.py and the logit-correlation measure of DOT fig. 7.

The correlation is checked against numpy's corrcoef and against its invariances (a positive scale or shift of one
class's logit changes nothing); the tool is run on three real one-epoch runs (student alone with a monitored
teacher, KD, KD+DOT with per-step cosines) and its figures and numbers are checked against the runs' own logs.
"""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch

from mdistiller.bench.random_teacher import write_random_teacher
from mdistiller.analysis.logit_corr import correlation_difference, logit_correlation
from mdistiller.utils.errors import UserError

from test_train_every_method import FM_CONFIGS, KD_CFG, ROOT, SMALL, _train_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_logit_correlation_is_pearson_over_images():
    torch.manual_seed(0)
    logits = torch.randn(500, 7) @ torch.randn(7, 7)  # correlated columns
    assert torch.allclose(logit_correlation(logits), torch.from_numpy(np.corrcoef(logits.double().numpy().T)),
                          atol=1e-12)


def test_correlation_difference_ignores_scale_and_shift_per_class():
    torch.manual_seed(1)
    t = torch.randn(300, 5, dtype=torch.float64)  # float64 end to end: the identity is checked to 1e-12
    s = t * torch.tensor([0.5, 2.0, 1.0, 3.0, 0.1], dtype=torch.float64) + torch.tensor([1.0, -2.0, 0.0, 5.0, 0.3],
                                                                                          dtype=torch.float64)
    assert correlation_difference(s, t).abs().max() < 1e-12
    other = torch.randn(300, 5)
    d = correlation_difference(other, t)
    assert d.shape == (5, 5) and d.diagonal().abs().max() < 1e-12 and d.mean() > 0.01
    with pytest.raises(ValueError, match="logit shapes differ"):
        correlation_difference(torch.randn(3, 5), torch.randn(4, 5))


def _plot_main():
    tools = os.path.join(ROOT, "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    spec = importlib.util.spec_from_file_location("plot_tool", os.path.join(tools, "plot.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("runs")
    teacher = write_random_teacher(prefix / "teacher.pth", "resnet20", "fashion_mnist")
    common = ["LOG.PREFIX", str(prefix), "DISTILLER.TEACHER_CKPT", str(teacher), *SMALL, "LOG.TENSORBOARD_FREQ", "1"]
    runs = {}
    for name, cfg, extra in (
            ("alone", os.path.join(FM_CONFIGS, "vanilla", "resnet8.yaml"), []),
            ("kd", KD_CFG, []),
            ("dot", os.path.join(FM_CONFIGS, "dot", "kd_resnet20_resnet8.yaml"), [])):
        _train_main()(["--cfg", cfg, "EXPERIMENT.NAME", name, *common, *extra])
        runs[name] = str(prefix / name)
    return runs


def test_plot_tool_draws_the_figures_from_the_run_logs(three_runs, tmp_path):
    runs = three_runs
    out = tmp_path / "fig"
    _plot_main()([runs["alone"], runs["kd"], runs["dot"], "--out", str(out), "--logit-corr"])
    for name in ("losses.png", "cosines.png", "logit_corr.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    data = json.loads((out / "plot_data.json").read_text())
    labels = ["student alone", "KD", "KD+DOT (delta 0.075)"]
    assert list(data["losses"]) == labels
    for label, key in zip(labels, ("alone", "kd", "dot")):
        rec = [json.loads(x) for x in open(os.path.join(runs[key], "metrics.jsonl"))][-1]
        curve = data["losses"][label]
        assert curve["task"] == [rec["monitor/ce"]] and curve["distill"] == [rec["monitor/kl"]]
        assert curve["weighted"] is False
    # cosines: only the DOT run logged them, one point per step (320 images / batch 32 = 10 steps)
    assert list(data["cosines"]) == ["KD+DOT (delta 0.075)"]
    cos = data["cosines"]["KD+DOT (delta 0.075)"]
    assert cos["per"] == "step" and [s for s, _ in cos["cos_task"]] == list(range(1, 11))
    assert all(-1 <= v <= 1 for _, v in cos["cos_task"] + cos["cos_distill"])
    # fig. 7: the two distillation runs, not the student alone
    corr = data["logit_corr_mean_abs_diff"]
    assert sorted(corr) == ["KD", "KD+DOT (delta 0.075)"] and all(0 < v < 2 for v in corr.values())


def test_plot_tool_errors_are_one_line(three_runs, tmp_path):
    with pytest.raises(UserError, match="is not a run directory"):
        _plot_main()([str(tmp_path)])
    with pytest.raises(UserError, match="--labels has 1 names for 2 run directories"):
        _plot_main()([three_runs["kd"], three_runs["dot"], "--labels", "x"])
    with pytest.raises(UserError, match="share a legend label"):
        _plot_main()([three_runs["kd"], three_runs["kd"], "--out", str(tmp_path)])
