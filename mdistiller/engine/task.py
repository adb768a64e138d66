"""TASK: what a config trains. Each task says how its runs are built, which teacher file a run records and how
its result reads; launch.py does the rest (run directory, resume, hooks that write files) the same for all.

"classification" is built here (build.py); "detection" registers itself in mdistiller/detection.
"""

from ..config.registry import TASK_REGISTRY
from ..models.teacher_ckpt import teacher_record
from .build import build_run


class Task:
    @staticmethod
    def build_run(cfg, device=None, run_dir=None, recorded_speed=None):
        """The run's objects (build.Run)."""
        raise NotImplementedError

    @staticmethod
    def teacher_record(cfg):
        """summary.json's "teacher": the file the run's teacher came from."""
        raise NotImplementedError

    @staticmethod
    def result_line(summary):
        """One line of the finished run's result."""
        raise NotImplementedError


@TASK_REGISTRY.register("classification")
class ClassificationTask(Task):
    build_run = staticmethod(build_run)
    teacher_record = staticmethod(teacher_record)

    @staticmethod
    def result_line(summary):
        return (f"best top-1 {summary['best_top1']:.2f} (epoch {summary['best_epoch']})  "
                f"last top-1 {summary['last_top1']:.2f}")
