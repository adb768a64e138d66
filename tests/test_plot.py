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

from cli_runs import FM_CONFIGS, KD_CFG, ROOT, SMALL, train_main as _train_main

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
    for name in ("accuracy.png", "losses.png", "cosines.png", "logit_corr.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    data = json.loads((out / "plot_data.json").read_text())
    labels = ["student alone", "KD", "KD+DOT (delta 0.075)"]
    assert list(data["losses"]) == labels
    for label, key in zip(labels, ("alone", "kd", "dot")):
        rec = [json.loads(x) for x in open(os.path.join(runs[key], "metrics.jsonl"))][-1]
        curve = data["losses"][label]
        assert curve["task"] == [rec["monitor/ce"]] and curve["distill"] == [rec["monitor/kl"]]
        assert curve["weighted"] is False
        assert data["accuracy"][label] == {"epochs": [1], "test_top1": [rec["test_top1"]]}
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



def _blank_border(path):
    """Rows/columns of pure white at the top, bottom, left and right of a PNG (an empty margin)."""
    import matplotlib.image as mpimg

    white = (mpimg.imread(path)[..., :3] > 0.99).all(-1)

    def leading(flags):
        return next((i for i, f in enumerate(flags) if not f), len(flags))

    rows, cols = white.all(1), white.all(0)
    return leading(rows), leading(rows[::-1]), leading(cols), leading(cols[::-1])


def _fake_run(run_dir, method, test_top1):
    """A run directory as tools/train.py leaves it, as far as the figures read it: config.yaml and metrics.jsonl,
    here with a resumed run's repeated epoch 2 (its later record counts)."""
    from mdistiller.config import get_cfg_defaults

    run_dir.mkdir(parents=True)
    cfg = get_cfg_defaults()
    cfg.DISTILLER.TYPE = method
    (run_dir / "config.yaml").write_text(cfg.dump())
    lines = [{"epoch": e + 1, "test_top1": v, "monitor/ce": 1.0 / (e + 1)} for e, v in enumerate(test_top1)]
    lines.insert(1, {"epoch": 2, "test_top1": 1.0, "monitor/ce": 9.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def _pixels_near(path, hex_colour, tol=0.06):
    import matplotlib.image as mpimg
    from matplotlib.colors import to_rgb

    img = mpimg.imread(path)[..., :3]
    return int((np.abs(img - np.array(to_rgb(hex_colour))).max(-1) < tol).sum())


def test_accuracy_figure_is_test_top1_per_epoch(tmp_path, capsys):
    _fake_run(tmp_path / "a", "NONE", [40.0, 55.5, 61.25])
    _fake_run(tmp_path / "k", "KD", [45.0, 60.0, 58.0])
    out = tmp_path / "fig"
    _plot_main()([str(tmp_path / "a"), str(tmp_path / "k"), "--out", str(out)])
    png = out / "accuracy.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    data = json.loads((out / "plot_data.json").read_text())
    assert data["accuracy"] == {"student alone": {"epochs": [1, 2, 3], "test_top1": [40.0, 55.5, 61.25]},
                                "KD": {"epochs": [1, 2, 3], "test_top1": [45.0, 60.0, 58.0]}}
    printed = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(printed) if "best test top-1" in line)
    assert [line.split()[-2:] for line in printed[header + 1:header + 3]] == [["61.25", "61.25"], ["60.00", "58.00"]]
    # two curves in matplotlib's first two colours (one per run) and nothing left blank around the axes
    assert _pixels_near(png, "#1f77b4") > 200 and _pixels_near(png, "#ff7f0e") > 200
    assert max(_blank_border(png)) <= 12


def test_logit_corr_figure_has_no_empty_margins(tmp_path):
    plot_logit_corr = _plot_main().__globals__["plot_logit_corr"]  # tools/plot.py, loaded as the CLI runs it
    torch.manual_seed(0)
    for n in (1, 2, 3):
        diffs = {f"run {i}": torch.rand(10, 10, dtype=torch.float64) for i in range(n)}
        path = tmp_path / f"lc{n}.png"
        plot_logit_corr(diffs, str(path))
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert max(_blank_border(path)) <= 12, (n, _blank_border(path))
