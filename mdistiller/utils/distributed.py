"""Multi-process training under torchrun: process group, device per rank, and the few collectives the engine uses.

`torchrun --nproc_per_node=N tools/train.py ...` (or torchrun's multi-node rendezvous flags) sets RANK,
WORLD_SIZE and LOCAL_RANK; `setup()` reads them, picks NCCL with one GPU per process (cuda:LOCAL_RANK) when the
run is on CUDA and Gloo on the CPU, and joins the group. The same command without torchrun is one process and
none of this is used.

Failure handling: set-up steps that can fail on one rank only (a missing dataset on one node, an unreadable
checkpoint) run through `agree()`, which gathers every rank's outcome, so all ranks stop together with one
message naming the failing rank instead of the healthy ones waiting forever in their next collective. The
process group also gets a timeout (DISTRIBUTED.TIMEOUT_MIN), the last resort against a rank that dies silently
(torchrun itself stops the other workers of a job when one exits with an error).
"""

import datetime
import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError, UserError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device, timeout_min=30.0):
    """Join the process group torchrun describes (if any); returns (DistContext, device of this rank).

    `device` is the resolved EXPERIMENT.DEVICE: on CUDA each process takes cuda:LOCAL_RANK."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistContext(), device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs on this node; "
                              f"start at most that many processes per node (torchrun --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=float(timeout_min))
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                device_id=device if backend == "nccl" else None)
    return DistContext(rank, world, local_rank, backend), device


def teardown(synchronize=False):
    """Leave the process group. `synchronize` (after a run every rank finished): a barrier first, so that no rank
    destroys its group while a peer is still using the connection; gloo can then abort the early rank at exit
    ("terminate called without an active exception"). Never after a failure: a rank that failed alone would wait
    in the barrier for peers that are somewhere else."""
    if dist.is_available() and dist.is_initialized():
        # A finished trainer lives on in reference cycles (hooks <-> trainer) with its DDP reducer and the gloo
        # work it last ran; freed only at interpreter shutdown, that work's tensors take the GIL mid-finalisation
        # and abort the process. Collect them now, while the interpreter and the group are alive.
        gc.collect()
        if synchronize and active():
            dist.barrier()
        dist.destroy_process_group()


def active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    return dist.get_rank() if active() else 0


def world_size():
    return dist.get_world_size() if active() else 1


def _dtypes(tensors):
    """The dtypes present, in the same order on every rank (a set's order follows object hashes, which differ
    between processes: ranks would then send their groups in different orders)."""
    return sorted({t.dtype for t in tensors}, key=str)


def _all_reduce(tensor, op):
    """`op` across ranks (a new tensor; the input is left alone); identity in one process."""
    if not active():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_sum(tensor):
    """Sum across ranks (a new tensor; the input is left alone); identity in one process."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_min(tensor):
    """Elementwise minimum across ranks (a new tensor); identity in one process."""
    return _all_reduce(tensor, dist.ReduceOp.MIN)


def all_gather_objects(obj):
    """[every rank's `obj`] in rank order (picklable objects; for rare paths, it is slow); [obj] in one process."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _coalesced_(tensors, collective):
    """Run `collective` on one flat tensor per dtype holding all of `tensors`, then copy the result back into
    them in place: one message per dtype instead of one per tensor."""
    tensors = list(tensors)
    for dtype in _dtypes(tensors):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        collective(flat)
        offset = 0
        for t in group:
            t.data.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_(tensors, src=0):
    """Overwrite `tensors` in place with rank `src`'s values."""
    if active():
        _coalesced_(tensors, lambda flat: dist.broadcast(flat, src))


def broadcast_object(obj, src=0):
    """Rank `src`'s Python object on every rank (e.g. a loaded checkpoint, so ranks need no shared disk)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src)
    return box[0]


def mean_grads_(grads):
    """Average gradient tensors over ranks in place (None entries skipped)."""
    if not active():
        return
    world = world_size()

    def mean(flat):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)

    _coalesced_([g for g in grads if g is not None], mean)


def all_gather_rows(x):
    """x's rows from every rank concatenated in rank order; ranks may hold different numbers of rows (the
    last global batch of an epoch is split unevenly). Identity in one process."""
    world = world_size()
    if world == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def agree(fn, *args, **kwargs):
    """Run fn on every rank; if it raised a UserError on any rank, raise one on all of them, naming the rank.

    Without this, a rank that fails during set-up exits while the others block in their next collective."""
    error = None
    try:
        result = fn(*args, **kwargs)
    except UserError as e:
        result, error = None, e
    if not active():
        if error is not None:
            raise error
        return result
    messages = [None] * world_size()
    dist.all_gather_object(messages, None if error is None else str(error))
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, m = failed[0]
        more = f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
        raise_on_every_rank((type(error) if error is not None and r == rank() else UserError)(f"rank {r}{more}: {m}"))
    return result


def raise_on_every_rank(error):
    """Raise `error`, which every rank raises together, with one line for the user: rank 0 prints it, and no rank
    leaves before that line is out (a barrier), since a launcher such as torchrun kills the remaining ranks as soon
    as one exits, which could otherwise be rank 0 before it printed. The raised error is quiet (utils/cli.py prints
    nothing more). One process: raised as it is, for the caller to print."""
    if active():
        error.quiet = True
        if rank() == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        dist.barrier()
    raise error
