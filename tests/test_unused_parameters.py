"""Which methods DDP must search for parameters without a gradient (`Distiller.unused_parameters`, turned into
find_unused_parameters by the builder): a method says so exactly when one of its steps leaves a learnable parameter
without a gradient. Observed here for every registered method and its "++" variant, one step in each of two epochs
(a staged method: one of its stage, one after it), on the survey's small config. A method that leaves a parameter
out without saying so stops at its second step under torchrun; one that says so without need costs DDP a graph
traversal every step."""

import pytest

from mdistiller.distillers import DISTILLER_REGISTRY
from mdistiller.engine import build_run
from test_method_survey import load_tool


@pytest.fixture(scope="module")
def survey():
    mp = pytest.MonkeyPatch()
    try:
        tool = load_tool(mp)
        yield tool, tool.teacher_state("resnet20")
    finally:
        mp.undo()


@pytest.mark.parametrize("method", sorted(DISTILLER_REGISTRY.names()))
def test_a_method_declares_unused_parameters_exactly_when_a_step_leaves_some(method, survey, tmp_path):
    tool, state = survey
    cfg = tool.survey_cfg(method, "resnet20", "resnet8")
    cfg.defrost()
    cfg.LOG.PREFIX = str(tmp_path)
    cfg.freeze()
    run = build_run(cfg, bundle=tool.DATA(cfg), teacher_state=state)
    params = {n: p for n, p in run.distiller.named_parameters() if p.requires_grad and not n.startswith("teacher.")}
    left_out = set()
    for epoch in (1, 2):
        run.trainer.train_loader.set_epoch(epoch - 1)
        images, labels, index = next(iter(run.trainer.train_loader))
        for p in params.values():
            p.grad = None
        run.distiller.train()
        run.trainer.run_step(images, labels, index, epoch)
        left_out |= {n for n, p in params.items() if p.grad is None}
    assert (run.distiller.unused_parameters() is not None) == bool(left_out), sorted(left_out)[:5]
