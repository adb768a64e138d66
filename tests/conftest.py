import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# SPEED.AMP auto follows the CPU's native bf16 (utils/hardware.py); the suite pins the answer "no" so that no test
# depends on the CPU kind it runs on (subprocesses inherit it). Tests of the decision itself set it themselves.
os.environ["MDISTILLER_CPU_BF16"] = "0"
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Under pytest-xdist (tools/run_tests.sh) the workers share the cores: each takes its share of intra-op threads, and
# the runs it starts in subprocesses inherit the same count, instead of every worker spinning a thread per core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs that take tens of seconds")
    config.addinivalue_line("markers", "kernels: compares numbers across runs, processes or machines (resume, DDP, "
                                       "refactor equivalence, fixtures); tools/run_tests.sh runs these a second time "
                                       "on another CPU kernel set")


@pytest.fixture
def full_float32():
    """float32 means float32 in the CUDA tests: TF32 convolutions (PyTorch's CUDA default) would round at 1e-3."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="session")
def small_teacher_ckpt(tmp_path_factory):
    """One resnet20 teacher, trained once per session for the tests that distil from a real (if weak) checkpoint."""
    from cli_runs import train_small_teacher

    return train_small_teacher(tmp_path_factory.mktemp("small_teacher"))
