"""SPEED.TEACHER_INT8: the frozen teacher as a post-training int8 model, for CPUs.

On a CPU without AMX or AVX512-BF16 the float32 convolutions already run close to the FMA units' peak, and
half precision is slower, not faster (config/defaults.py); the teacher's forward is most of a KD step (60% for
resnet32x4 -> resnet8x4, tools/benchmark.py). Integer convolutions (PyTorch's x86 / FBGEMM kernels) do the
same forward in about half the time. The price is the teacher's own numbers: its logits move by the
quantization error, so this is opt-in and measured (README, "Speed").

How: FX graph-mode static quantization with PyTorch's default x86 recipe (per-channel int8 weights,
histogram-calibrated uint8 activations; conv + BN + ReLU fused). Calibration feeds the first
SPEED.TEACHER_INT8_CALIBRATION images of the un-augmented training split (data/unaugmented.py), in index order,
so the quantized teacher is a function of the teacher checkpoint, the data and the config alone: every rank of a
DDP run, and a resumed run, computes the same one.

The quantized graph replaces only the teacher's `forward`, as SPEED.COMPILE does: the module object, its
forward hooks (KD++ registers some) and its float32 parameters stay, and the quantized copy is not a submodule,
so no state_dict changes.

torch.ao.quantization carries a deprecation notice upstream (its successor is the separate torchao package);
the pinned torch has it, and a torch without it gets a ConfigError naming the switch, not an ImportError.
"""

import copy
import logging
import warnings

import torch
import torch.nn as nn

from ..utils.errors import ConfigError
from ..utils.progress import bar

logger = logging.getLogger(__name__)

#: the quantization backend of the recipe; "x86" dispatches to FBGEMM or oneDNN per operator
BACKEND = "x86"


def _calibration_images(batches, max_images):
    """Up to `max_images` images from an iterable of (images, ...) batches, as float32 NCHW CPU tensors."""
    seen = 0
    for batch in batches:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        images = images[: max_images - seen].float().contiguous().cpu()
        if images.shape[0] == 0:
            break
        yield images
        seen += images.shape[0]
        if seen >= max_images:
            break


def _fx_quantization():
    """(get_default_qconfig_mapping, prepare_fx, convert_fx), or a ConfigError on a torch without them."""
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    except ImportError as e:
        raise ConfigError(f"config key SPEED.TEACHER_INT8: this torch {torch.__version__} has no FX graph-mode "
                          f"quantization ({e}); set SPEED.TEACHER_INT8 False") from None
    return get_default_qconfig_mapping, prepare_fx, convert_fx


def quantize_int8(model, batches, max_images, name="teacher"):
    """An int8 copy of float `model` (an Int8Model, CPU) calibrated on up to `max_images` images of `batches`.

    Raises ConfigError when the model's forward cannot be traced into a graph (data-dependent control flow) or
    when no calibration image arrives."""
    images = list(_calibration_images(batches, max_images))
    if not images:
        raise ConfigError("config key SPEED.TEACHER_INT8: no training images to calibrate the int8 teacher on "
                          "(SPEED.TEACHER_INT8_CALIBRATION must be > 0 and the training split not empty)")
    float_model = copy.deepcopy(model).float().eval().to(memory_format=torch.contiguous_format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the upstream deprecation notice and observer chatter, once per run
        qconfig_mapping, prepare_fx, convert_fx = _fx_quantization()
        try:
            prepared = prepare_fx(float_model, qconfig_mapping(BACKEND), (images[0],))
        except Exception as e:  # torch.fx raises TraceError, TypeError, ... for untraceable Python
            raise ConfigError(f"config key SPEED.TEACHER_INT8: the {name} ({type(model).__name__}) cannot be traced "
                              f"into a graph for int8 quantization ({type(e).__name__}: {e}); set "
                              "SPEED.TEACHER_INT8 False") from None
        with torch.no_grad():
            for batch in bar(images, desc=f"int8 {name} calibration", unit="batch"):
                prepared(batch)
        quantized = Int8Model(convert_fx(prepared))
    count = sum(batch.shape[0] for batch in images)
    logger.info("int8 %s: %s calibrated on %d training images (%s backend)", name, type(model).__name__, count,
                BACKEND)
    return quantized


class Int8Model(nn.Module):
    """A converted int8 graph, run with torch.use_deterministic_algorithms lifted around it.

    EXPERIMENT.DETERMINISTIC turns the mode on (warn_only), and every quantized convolution then alerts about
    `quantized_resize_cpu_`: a resize of its output buffer, which the kernel overwrites in full. The integer
    arithmetic itself is deterministic (tests/test_teacher_int8.py: two calibrations, bit-identical outputs), so
    the alert is noise, once per layer per step."""

    def __init__(self, graph):
        super().__init__()
        self.graph = graph

    def forward(self, *args, **kwargs):
        if not torch.are_deterministic_algorithms_enabled():
            return self.graph(*args, **kwargs)
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(False)
        try:
            return self.graph(*args, **kwargs)
        finally:
            torch.use_deterministic_algorithms(True, warn_only=warn_only)


def install_int8_forward(module, batches, max_images, name="teacher"):
    """Replace `module.forward` by its int8 graph's (see the module docstring); returns the Int8Model."""
    quantized = quantize_int8(module, batches, max_images, name)
    # Both outside nn.Module.__setattr__, which would register the Int8Model as a child (and its tensors in the
    # state_dict): forward is a bound method, int8_graph goes into the instance dict directly.
    module.forward = quantized.forward
    module.__dict__["int8_graph"] = quantized.graph
    return quantized


def compare_outputs(float_model, int8_forward, loader):
    """How far an int8 forward is from its float model over a loader's images: the share of argmax agreement
    and the relative L2 distance of all logits (what tools/eval.py --int8 reports beside both accuracies)."""
    agree = count = 0
    diff_sq = ref_sq = 0.0
    was_training = float_model.training
    float_model.eval()
    with torch.inference_mode():
        for images, *_ in loader:
            want = float_model(images)[0].float()
            got = int8_forward(images)[0].float()
            agree += int((want.argmax(1) == got.argmax(1)).sum())
            count += want.shape[0]
            diff_sq += float((got - want).pow(2).sum())
            ref_sq += float(want.pow(2).sum())
    float_model.train(was_training)
    return {"argmax_agreement": agree / count if count else None,
            "logits_rel_l2": (diff_sq / ref_sq) ** 0.5 if ref_sq else None}
