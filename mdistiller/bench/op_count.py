"""What one update asks of the device: the aten operations it dispatches and the points where the host waits for
the device (a synchronisation), counted with a TorchDispatchMode over a real step.

On a GPU a small model's update is launch-bound: its time is the number of kernels launched and the number of
times Python waits for a result, not their arithmetic. Both are properties of the code, so they are counted on any
device: every aten call the step dispatches (forward, the autograd engine's backward, the optimizer), and among
them the ones that make the host wait on a CUDA device:
- reading a value to the host (`.item()`, `float()`, `bool()`, `.tolist()`: aten._local_scalar_dense),
- operations whose output size depends on the data (nonzero, masked_select, unique, repeat_interleave without
  output_size, indexing with a boolean mask),
- a copy from a CUDA tensor to the CPU (seen only when the step runs on CUDA).
`torch.cuda.synchronize()` and a CUDA event's wait are not aten calls and are not seen.
"""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten overload packets that make the host wait for the device's result
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
                      "unique_consecutive", "unique_dim_consecutive", "equal"})


def _is_device_to_host(func, args, kwargs):
    """A copy from a CUDA tensor to the CPU (`.cpu()`, `.to("cpu")`, `copy_` into a CPU tensor)."""
    name = func.overloadpacket.__name__
    if name == "_to_copy":
        source, device = args[0], kwargs.get("device")
        return source.device.type == "cuda" and device is not None and torch.device(device).type == "cpu"
    if name == "copy_":
        dest, source = args[0], args[1]
        return (isinstance(source, torch.Tensor) and source.device.type == "cuda" and dest.device.type == "cpu")
    return False


def _bool_index(args):
    """Whether an index op's indices hold a boolean mask (turned into positions by a hidden nonzero)."""
    indices = args[1] if len(args) > 1 else None
    return isinstance(indices, (list, tuple)) and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _is_sync(func, args, kwargs):
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return True
    if name in ("index", "index_put", "index_put_", "_index_put_impl_") and _bool_index(args):
        return True
    if name == "repeat_interleave" and kwargs.get("output_size") is None:
        return isinstance(args[0], torch.Tensor) and args[0].dtype in (torch.int32, torch.int64) and len(args) == 1
    return _is_device_to_host(func, args, kwargs)


class OpCounter(TorchDispatchMode):
    """Counts every aten call dispatched while it is active, and the synchronising ones."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if _is_sync(func, args, kwargs):
            self.syncs[name] += 1
        return func(*args, **kwargs)

    def result(self, steps=1):
        """{"aten_ops", "syncs": per update; "sync_ops": {op: count per update}; "top_ops": the 10 most called}."""
        return {"aten_ops": sum(self.ops.values()) / steps, "syncs": sum(self.syncs.values()) / steps,
                "sync_ops": {k: v / steps for k, v in sorted(self.syncs.items())},
                "top_ops": {k: v / steps for k, v in self.ops.most_common(10)}}


def count_ops(run, updates=1):
    """Run `run()` once under an OpCounter; its counts per update, `run` taking `updates` updates."""
    counter = OpCounter()
    with counter:
        run()
    return counter.result(updates)
