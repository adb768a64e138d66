"""The builder and the loop as separate pieces: build_run wires a run from in-memory data and teacher weights exactly
as from files, and Trainer runs with no config at all."""

import os

import pytest
import torch
import torch.nn as nn

from mdistiller.bench.random_teacher import random_teacher_state, write_random_teacher
from mdistiller.bench.synthetic import SyntheticDataset
from mdistiller.config import load_config
from mdistiller.distillers import Distiller, StepOutput, ce_term
from mdistiller.engine import Trainer, build_run
from mdistiller.engine.hooks import HookBase
from mdistiller.engine.update_rule import SGDRule


def _cfg(*extra):
    return load_config(None, ["DISTILLER.TYPE", "KD++", "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT",
                              "resnet8", "EXPERIMENT.DEVICE", "cpu", "SOLVER.BATCH_SIZE", "16", "SOLVER.EPOCHS", "1",
                              "SOLVER.LR_DECAY_STAGES", "[1]", "DATASET.ROOT", "/nonexistent",
                              "LOG.PRINT_FREQ", "0", *extra])


def _train(run):
    run.trainer.train()
    return {k: v.clone() for k, v in run.distiller.student.state_dict().items()}


@pytest.mark.kernels
def test_in_memory_teacher_trains_exactly_as_its_checkpoint_file(tmp_path):
    """teacher_state builds the teacher the way a checkpoint is loaded (same construction, same RNG draws), so the
    two runs are bit-identical; the data comes from a bundle, no dataset file is read (DATASET.ROOT does not
    exist), and KD++'s class means are computed in memory without a cache file."""
    data = SyntheticDataset("fashion_mnist", 48, 16)
    state = random_teacher_state("resnet20", "fashion_mnist", seed=3)
    ckpt = write_random_teacher(tmp_path / "teacher.pth", "resnet20", "fashion_mnist", seed=3)
    cfg_mem, cfg_file = _cfg(), _cfg("DISTILLER.TEACHER_CKPT", ckpt)
    in_memory = _train(build_run(cfg_mem, bundle=data(cfg_mem), teacher_state=state))
    from_file = _train(build_run(cfg_file, bundle=data(cfg_file)))
    assert in_memory.keys() == from_file.keys()
    assert all(torch.equal(in_memory[k], from_file[k]) for k in in_memory)
    # the file run cached its class means next to the checkpoint; the in-memory run wrote nothing
    assert sorted(os.listdir(tmp_path))[0] == "teacher.pth" and len(os.listdir(tmp_path)) == 2


class _Tiny(nn.Module):
    """A model with the zoo's contract: (logits, {"pooled_feat": ...})."""

    feat_dim = 4

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        f = torch.relu(self.body(x))
        return self.head(f), {"pooled_feat": f}


class _Alone(Distiller):
    needs_teacher = False

    def forward_train(self, images, labels, epoch, index=None):
        logits, feats = self.student(images)
        return StepOutput(logits, {"ce": ce_term(logits, labels)}, feats)


class _Loader:
    """The loader contract the loop uses: set_epoch, len, and (images, labels, index) batches."""

    def __init__(self, x, y, batch):
        self.x, self.y, self.batch = x, y, batch

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.y) // self.batch

    def __iter__(self):
        for i in range(len(self)):
            s = slice(i * self.batch, (i + 1) * self.batch)
            yield self.x[s], self.y[s], torch.arange(s.start, s.stop)


class _Record(HookBase):
    def __init__(self):
        self.seen, self.epochs = [], []

    def before_step(self, epoch, it, iters):
        self.trainer.set_lr(0.1)

    def after_step(self, step):
        self.seen.append(float(step.losses["total"]))

    def end_of_epoch(self, record):
        record["test_top1"] = 0.0

    def after_epoch(self, record):
        self.epochs.append(record)


def test_the_loop_runs_without_any_config():
    """Trainer(distiller, model, loader, rule, hooks): plain objects in, the same update as torch's SGD out."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    student = _Tiny()
    reference = _Tiny()
    reference.load_state_dict(student.state_dict())
    distiller = _Alone(student=student)
    record = _Record()
    rule = SGDRule(params=distiller.learnable_parameters(), lr=0.1, momentum=0.9, weight_decay=0.0)
    trainer = Trainer(distiller, distiller.train_forward, _Loader(x, y, 4), rule, [record], max_epochs=2)
    trainer.train()
    # the same two epochs by hand with torch's SGD
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(2):
        for i in range(2):
            loss = nn.functional.cross_entropy(reference(x[4 * i:4 * i + 4])[0], y[4 * i:4 * i + 4])
            losses.append(float(loss.detach()))
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert record.seen == losses
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), reference.state_dict().values()))
    assert [r["epoch"] for r in record.epochs] == [1, 2] and trainer.global_step == 4
    assert record.epochs[0]["train_loss"] == pytest.approx(sum(losses[:2]) / 2, rel=1e-6)  # float32 sums
    assert record.epochs[0]["test_top1"] == 0.0


class _Counter(HookBase):
    """A hook with state: how many steps it saw."""

    state_key = "counter"

    def __init__(self):
        self.steps = 0

    def after_step(self, step):
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def _tiny_trainer(hooks):
    torch.manual_seed(0)
    distiller = _Alone(student=_Tiny())
    rule = SGDRule(params=distiller.learnable_parameters(), lr=0.1, momentum=0.9, weight_decay=0.0)
    return Trainer(distiller, distiller.train_forward, _Loader(torch.randn(8, 3), torch.tensor([0, 1] * 4), 4), rule,
                   hooks, max_epochs=1)


def test_hook_state_sits_under_hooks_and_the_flat_layout_still_loads():
    """A hook's state is the checkpoint's hooks[<state_key>], nothing at the top level; a checkpoint of the older
    flat layout (the hook's keys at the top level) restores it too."""
    trainer = _tiny_trainer([_Counter()])
    trainer.train()
    state = trainer.state_dict()
    assert state["hooks"] == {"counter": {"steps": 2}} and "steps" not in state
    fresh = _Counter()
    _tiny_trainer([fresh]).load_state_dict(state)
    assert fresh.steps == 2
    flat = {k: v for k, v in state.items() if k != "hooks"}
    flat["steps"] = 5
    older = _Counter()
    _tiny_trainer([older]).load_state_dict(flat)
    assert older.steps == 5
    with pytest.raises(RuntimeError, match="two hooks save their state under 'counter'"):
        _tiny_trainer([_Counter(), _Counter()]).state_dict()


def test_hooks_do_not_keep_their_trainer_alive():
    """Hooks reach the trainer through a weak reference: dropping the trainer frees it (no cycle to collect)."""
    import gc
    import weakref

    hook = _Counter()
    trainer = _tiny_trainer([hook])
    assert hook.trainer is trainer
    ref = weakref.ref(trainer)
    gc.disable()  # freed by reference counting alone, not by the cycle collector
    try:
        del trainer
        assert ref() is None and hook.trainer is None
    finally:
        gc.enable()
