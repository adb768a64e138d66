"""Facts about where a run happens: device choice, seeding, and the provenance recorded in summary.json."""

import os
import random
import subprocess

import numpy as np
import torch

from .errors import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resolve_device(spec):
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config key EXPERIMENT.DEVICE: '{spec}' asked for, but no CUDA GPU is available; use cpu or auto")
    return torch.device(spec)


def describe_device(device):
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def seed_everything(seed, deterministic=True):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Where an untracked file changes what runs: a new module, config or tool not yet added to git.
GIT_SOURCE_DIRS = ("mdistiller", "configs", "tools")


def git_info(root=None):
    """(sha, dirty) of the checkout the package runs from; ("unknown", None) without git or outside a checkout.

    dirty: a tracked file is modified anywhere, or an untracked (not ignored) file lies under GIT_SOURCE_DIRS."""
    root = root or REPO_ROOT

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)

    try:
        top = git("rev-parse", "--show-toplevel")
        # An installed copy of the package may sit inside some other repository: that one's state is not ours.
        if top.returncode or os.path.realpath(top.stdout.strip()) != os.path.realpath(root):
            return "unknown", None
        sha = git("rev-parse", "HEAD").stdout.strip()
        if not sha:
            return "unknown", None
        tracked = git("status", "--porcelain", "--untracked-files=no")
        untracked = git("status", "--porcelain", "--untracked-files=all", "--", *GIT_SOURCE_DIRS)
        if tracked.returncode or untracked.returncode:
            return sha, None
        return sha, bool(tracked.stdout.strip() or untracked.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
