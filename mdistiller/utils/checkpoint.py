"""Writing checkpoints without ever leaving a half-written file, and reading weights from any of the formats
users arrive with (ours, the published `{"model": state_dict}`, a bare state dict, DataParallel's `module.`)."""

import os
import secrets

import torch

from .errors import CheckpointError
from .run_dir_io import writing


class _RecordingWriter:
    """A binary file whose write errors are remembered: torch.save reports a failed write (disk full) as a
    RuntimeError from its zip writer, and the OSError underneath is what names the cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        self.f.flush()


def atomic_save(obj, path):
    """torch.save into a temporary file in the same directory, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a truncated checkpoint (a kill leaves
    at most a `.tmp-*.pth`, removed when the run starts again). A failed write (disk full, read-only file
    system) removes the temporary file and raises RunDirError (an OSError) naming `path` and the cause. The file
    gets the permissions of any other file the process creates (0666 less the umask), not mkstemp's 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{os.path.basename(path)}")
    if not tmp.endswith(".pth"):
        tmp += ".pth"
    writer = None
    try:
        with writing("write checkpoint", path):
            os.makedirs(directory, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as f:
                writer = _RecordingWriter(f)
                try:
                    torch.save(obj, writer)
                except RuntimeError:
                    if writer.error is not None:  # the zip writer's report of a failed write
                        raise writer.error from None
                    raise
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def remove_stale_caches(keep, ckpt_path, kind, tag):
    """Remove the caches of older contents of `ckpt_path` (`<checkpoint>.<kind>.<tag>.<hash>.pt` beside it) once
    `keep` is written: the hash in the name is what tells a stale cache, so only one per checkpoint and data tag
    stays. A file that cannot be removed is left; it costs disk, never a wrong reuse."""
    prefix = f"{os.path.basename(ckpt_path)}.{kind}.{tag}."
    folder = os.path.dirname(os.path.abspath(keep))
    for name in os.listdir(folder):
        full = os.path.join(folder, name)
        if name.startswith(prefix) and name.endswith(".pt") and full != os.path.abspath(keep):
            try:
                os.remove(full)
            except OSError:
                pass


def load_file(path, what="checkpoint", hint=""):
    """torch.load on CPU with a clear error for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path} does not exist{'; ' + hint if hint else ''}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        pass
    try:
        # Older published checkpoints pickle plain Python/numpy objects next to the weights.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{what} {path} cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def extract_state_dict(obj, path):
    """The model weights inside a loaded checkpoint of any supported format."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "student"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict (expected a dict of tensors, or one under 'model')")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_weights(model, path, model_name, hint=""):
    """Load `path` into `model` strictly; any mismatch is one line naming the file, the model and the fix."""
    obj = load_file(path, "checkpoint", hint)
    if isinstance(obj, dict) and "method_state" in obj:
        raise CheckpointError(
            f"checkpoint {path} is the student of a {obj.get('method')} run, whose predictions go through the "
            f"method's own modules (method_state), not the student's classifier: it is not a model's weights (it "
            f"cannot be a teacher); evaluate it with tools/eval.py -c {path} --run-config <its run>/config.yaml")
    state = extract_state_dict(obj, path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:2])}, checkpoint vs model)")
        raise CheckpointError(
            f"checkpoint {path} does not fit model {model_name}: {'; '.join(parts)}"
            f"{' - is it a checkpoint of another architecture? ' + hint if hint else ''}"
        )
    model.load_state_dict(state, strict=True)
    return model


# Keys under which checkpoints record a test top-1, most specific first, with what the number means:
# ours ("test_top1" in student_*.pth / ckpt_epoch_*.pth; the evaluation hook's "last" in the training format of
# latest.pth / best.pth, under "hooks" or, in the older flat layout, at the top level),
# RepDistiller's teacher script ("accuracy" in ckpt_epoch_N.pth: that epoch's; "best_acc" in <model>_best.pth),
# mdistiller's trainer ("best_acc" in its full state: the best of its run so far, not necessarily these weights).
_TOP1_KEYS = (
    ("test_top1", "checkpoint key test_top1 (these weights' test top-1)"),
    ("accuracy", "checkpoint key accuracy (test top-1 of the epoch saved)"),
    ("best_acc", "checkpoint key best_acc (best test top-1 of the run that saved it)"),
)


def _number(value):
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def checkpoint_top1(obj):
    """(top-1 in percent, where it came from) recorded inside a loaded checkpoint, or (None, None)."""
    if not isinstance(obj, dict):
        return None, None
    hooks = obj.get("hooks")
    last = (hooks.get("evaluation") or {}).get("last") if isinstance(hooks, dict) else obj.get("last")
    where = "hooks.evaluation.last.top1" if isinstance(hooks, dict) else "last.top1"
    if isinstance(last, dict) and _number(last.get("top1")) is not None:
        return _number(last["top1"]), f"checkpoint key {where} (test top-1 of the epoch saved)"
    for key, source in _TOP1_KEYS:
        if _number(obj.get(key)) is not None:
            return _number(obj[key]), source
    return None, None
