"""Device syncs and peak memory: what every timing in the benchmark needs to measure work, not its launch."""

import torch


def sync(device):
    """Wait for the device's queued work (CUDA runs asynchronously; CPU work is done when the call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device):
    """The CUDA allocator's peak since the last reset_peak, in MiB; None off CUDA (the process's peak resident
    size is the CPU figure, and it cannot be reset per variant)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None
