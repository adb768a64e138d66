"""How close a step is to the hardware: the floating-point work of one real update against the device's
attainable float32 matrix-multiply rate.

A KD step on a CPU is mostly convolutions, which oneDNN runs as blocked matrix products; a large sgemm's rate is
what such kernels can reach on this machine. FLOPs are PyTorch's own count (torch.utils.flop_counter: convolution,
matmul and linear layers, their backward included; elementwise work such as BN and ReLU counts zero, and int8
kernels are not counted at all, so an int8-teacher variant reports only its float work). The ratio
FLOPs / sgemm rate is then the float32 time a step cannot beat, and images/s at that time the ceiling any
float32 implementation of the same models and batch can reach here.
"""

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from .device import sync


def step_flops(step):
    """FLOPs counted while `step()` runs (one real update)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def matmul_gflops(device, n=2048, repeats=7):
    """Median float32 GFLOP/s of an n x n x n matrix product on `device` (after two untimed products)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def roofline(flops, seconds_per_step, batch_size, peak_gflops):
    """Achieved rate of a step and its float32 ceiling at the matmul rate."""
    achieved = flops / seconds_per_step / 1e9
    bound_s = flops / (peak_gflops * 1e9)
    return {"gflop_per_step": flops / 1e9, "achieved_gflops": achieved, "pct_of_matmul": 100 * achieved / peak_gflops,
            "bound_ms_per_step": 1e3 * bound_s, "bound_images_per_s": batch_size / bound_s if bound_s else None}
