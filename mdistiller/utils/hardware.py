"""What this CPU is and whether it computes bf16 natively: the input of SPEED.AMP "auto" (engine/speed.py).

bf16 matrix and convolution kernels run natively on CPUs with AMX (Intel Sapphire Rapids and later) or AVX512-BF16
(Intel Cooper Lake, AMD Zen 4 and later); elsewhere oneDNN emulates bf16 with float32 arithmetic plus conversions,
which is slower than float32 itself (docs/bench). The decision is read from torch's own CPU capability checks,
falling back to /proc/cpuinfo's flags, so it is the same every time on one machine.

MDISTILLER_CPU_BF16=0 / 1 in the environment overrides the detection (the test suite pins 0 so that no test
depends on the CPU kind; a user can pin it to reproduce one machine's "auto" on another).
"""

import functools
import os
import platform

import torch

from .errors import ConfigError

ENV_OVERRIDE = "MDISTILLER_CPU_BF16"
# /proc/cpuinfo flags that matter for the fast paths, in the order they are reported
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni")


@functools.lru_cache(maxsize=1)
def _first_processor():
    """{key: value} of /proc/cpuinfo's first processor block; {} where there is none (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the end of the first processor's block
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _cpuinfo():
    """(model name, set of flags) from /proc/cpuinfo; ("", set()) where there is none."""
    fields = _first_processor()
    return fields.get("model name", ""), set(fields.get("flags", "").split())


# Flags that select oneDNN's and MKL's kernels (and so the rounding of convolutions and matrix products).
KERNEL_FLAGS = ("fma", "f16c", "avx", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
# Environment variables that change which kernels run, or how they round.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE",
              "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE")


def kernel_identity(threads=None):
    """Everything besides the code that decides the bits of a CPU computation: torch's build, the CPU (vendor,
    family, model) and the ISA features oneDNN, MKL and ATen dispatch on, the environment variables that override
    that dispatch, and the intra-op thread count (kernels split their sums by thread). Two machines with equal
    identities take the same kernels; results saved on one apply bit for bit on the other only then."""
    model, flags = _cpuinfo()
    fields = _first_processor()
    return {
        "torch": torch.__version__,
        "cpu_vendor": fields.get("vendor_id") or platform.processor() or platform.machine(),
        "cpu_family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
        "cpu_model_name": model,
        "cpu_flags": [f for f in KERNEL_FLAGS if f in flags],
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "kernel_env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ},
        "threads": torch.get_num_threads() if threads is None else threads,
    }


def _torch_check(name):
    fn = getattr(torch.cpu, name, None)  # private helpers of torch.cpu (torch >= 2.3)
    try:
        return bool(fn()) if fn is not None else None
    except Exception:
        return None


def native_bf16_units():
    """The CPU's native bf16 units found ("amx_bf16", "avx512_bf16"), from torch's checks, else /proc/cpuinfo."""
    _, flags = _cpuinfo()
    found = []
    amx = _torch_check("_is_amx_tile_supported")
    if amx or (amx is None and "amx_bf16" in flags):
        found.append("amx_bf16")
    avx = _torch_check("_is_avx512_bf16_supported")
    if avx or (avx is None and "avx512_bf16" in flags):
        found.append("avx512_bf16")
    return found


def cpu_bf16_decision():
    """(native bf16: bool, why: one phrase) for SPEED.AMP auto on the CPU."""
    override = os.environ.get(ENV_OVERRIDE, "").strip()
    if override in ("0", "1"):
        return override == "1", f"{ENV_OVERRIDE}={override} in the environment"
    if override:
        raise ConfigError(f"environment variable {ENV_OVERRIDE}={override!r}: must be 0 (float32 on this CPU) or 1 "
                          "(bf16), or unset to detect the CPU's native bf16")
    units = native_bf16_units()
    if units:
        return True, f"the CPU computes bf16 natively ({', '.join(units)})"
    return False, "the CPU has no native bf16 (no AMX, no AVX512-BF16): bf16 would be emulated, slower than float32"


def cpu_kind():
    """A JSON-friendly description of this CPU, recorded in every run's summary.json."""
    model, flags = _cpuinfo()
    return {"model": model or platform.processor() or platform.machine(), "machine": platform.machine(),
            "flags": [f for f in FLAGS if f in flags], "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": native_bf16_units()}
