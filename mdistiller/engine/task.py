"""TASK: what a config trains. A task is the part of a run that depends on what is learnt (image classes, boxes):
its data, its student/teacher/method, what it prepares before the first step, the hooks that evaluate and report,
and how its result and its teacher are named. The assembler (build.py) and everything after it (loop, update rules,
checkpoints, run directory) are the same for every task and name none of its metrics or config keys.

"classification" is classification.py; "detection" registers itself in mdistiller/detection.
"""

from ..config.registry import TASK_REGISTRY


class Task:
    """One kind of run. Subclasses fill in every method; none keeps state (a task is built once per run)."""

    #: the test metric best.pth is chosen by (the epoch record's test_<metric>, higher is better), and its name in logs
    metric, metric_label = "top1", "top-1"
    #: the epoch record's keys that TensorBoard and W&B plot as epoch/<key>
    epoch_scalars = ("train_loss", "lr", "images_per_s")

    @classmethod
    def from_config(cls, cfg):
        """The task's keyword arguments (none by default: its parts are built from the config they are given)."""
        return {}

    def speed_plan(self, cfg, device, recorded_speed=None):
        """The run's fast paths (a SpeedPlan), decided before any data is read."""
        raise NotImplementedError

    def build_data(self, cfg, device, bundle=None):
        """(train loader, test loader, data record): loaders yield (inputs, targets, index) for this process;
        the record has name, num_train, num_test, classes and sources (summary.json)."""
        raise NotImplementedError

    def build_distiller(self, cfg, data, device, teacher_state=None):
        """(the method on `device`, a FrozenTeacher the loss monitor runs or None)."""
        raise NotImplementedError

    def prepare(self, cfg, distiller, data, device, *, speed, run_dir=None, bundle=None, teacher_state=None,
                monitor_teacher=None):
        """What must happen between building the method and building its optimizer (class means, fast paths);
        returns the plan the run trains with (a probe may decide `speed`'s "auto" keys), None for `speed`."""

    def hooks(self, cfg, distiller, test_loader, *, data, speed, device, run_dir=None, monitor_teacher=None):
        """(the hooks every run of this task has, in order; the one that evaluates, which knows best and last)."""
        raise NotImplementedError

    def teacher_record(self, cfg):
        """summary.json's "teacher": the file the run's teacher came from and its test `metric` when known."""
        raise NotImplementedError

    def result_line(self, summary):
        """One line of the finished run's result."""
        raise NotImplementedError


def build_task(cfg):
    """The task TASK names, built from the config."""
    cls = TASK_REGISTRY.get(cfg.TASK, "TASK")
    return cls(**cls.from_config(cfg))
