"""FixMatch-style RandAugment + Cutout on uint8 image tensors, batched, with per-sample random magnitudes.

The strong view of MLKD (train views "weak_strong", views.py) follows `RandAugment(2, 10)` of the MLKD code
(mdistiller/dataset/cifar100.py of Jin-Ying/Multi-Level-Logit-Distillation, seen in the fork
peanutshu11/Multi-Level-Logit-Distillation), itself FixMatch's: two ops drawn with replacement from the 14 below,
each at a magnitude uniform in its range (the `m` argument is unused), then always `Cutout` of a square of side
random() * 0.5 * W at a uniform centre, filled with (125, 123, 114).

The published ops run on PIL images; here they run on a batch of uint8 tensors (B x C x H x W) on the device,
each sample with its own op and magnitude, so the in-memory loader needs no per-sample Python (a per-sample loop
of PIL or torchvision calls costs more than the step at 32x32). Every op is computed for the whole batch and
selected per sample. The formulas are PIL's own, in integer arithmetic where PIL uses it:

  exact as PIL: Identity, Posterize (int(v) bits kept, v in [4, 8) so 4..7), Solarize (pixels >= v inverted, v a
    float in [0, 256): v > 255 changes nothing, like PIL's LUT; torchvision's solarize refuses a threshold above
    255), AutoContrast (per channel, PIL's lut int(i * scale + offset)), Contrast's degenerate (the rounded mean of
    PIL's "L" image), Color's degenerate (PIL's fixed-point RGB -> L), Cutout (PIL's ImageDraw.rectangle: corners
    truncated to int, both ends inclusive, so the square is int(v) + 1 pixels wide unless clipped).
  PIL's rules, float rounding aside: the affine ops (Rotate, ShearX, ShearY, TranslateX, TranslateY) use PIL's
    inverse matrices (shear about the top-left corner, rotation about (W/2, H/2) counter-clockwise for v > 0,
    translation by v * W moving the content left / up), NEAREST as PIL: source pixel floor(M (x + 0.5, y + 0.5)),
    and fill 0 (black, PIL's default fillcolor) outside the image; PIL accumulates the coordinates incrementally
    and rounds the rotation matrix to 15 decimals, so a pixel whose source coordinate falls on an integer can differ.
    Brightness, Color, Contrast, Sharpness blend as PIL's Image.blend, degenerate + f * (image - degenerate)
    truncated, computed in float32 here. Sharpness's degenerate is PIL's SMOOTH filter (3x3, centre 5, /13) with
    the border pixels kept, rounded half up.
  torchvision's: Equalize (torchvision.transforms.v2.functional.equalize, per image and channel), which follows
    PIL's ImageOps.equalize histogram steps but is not guaranteed identical on every histogram.
"""

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

# (name, low, high) in the published order; the magnitude of a sample is low + (high - low) * U[0, 1)
OPS = (("AutoContrast", 0, 1), ("Brightness", 0.05, 0.95), ("Color", 0.05, 0.95), ("Contrast", 0.05, 0.95),
       ("Equalize", 0, 1), ("Identity", 0, 1), ("Posterize", 4, 8), ("Rotate", -30, 30),
       ("Sharpness", 0.05, 0.95), ("ShearX", -0.3, 0.3), ("ShearY", -0.3, 0.3), ("Solarize", 0, 256),
       ("TranslateX", -0.3, 0.3), ("TranslateY", -0.3, 0.3))
OP_INDEX = {name: i for i, (name, _, _) in enumerate(OPS)}
NUM_OPS = 2  # RandAugment(n=2)
CUTOUT_MAX = 0.5  # side <= 0.5 * W
CUTOUT_FILL = (125, 123, 114)


def draw_params(n, generator=None):
    """The random numbers of `n` samples' RandAugment, on the CPU: {"ops" (n, 2) int64, "unit" (n, 2) uniform,
    "cutout" (n, 3) uniform: side fraction, centre x, centre y}. `generator` None: torch's global one."""
    return {"ops": torch.randint(0, len(OPS), (n, NUM_OPS), generator=generator),
            "unit": torch.rand(n, NUM_OPS, generator=generator, dtype=torch.float64),
            "cutout": torch.rand(n, 3, generator=generator, dtype=torch.float64)}


def rand_augment(images, ops, unit, cutout):
    """RandAugment(2) then Cutout of a uint8 batch B x C x H x W with draw_params' numbers (any device)."""
    for j in range(ops.shape[1]):
        images = apply_op(images, ops[:, j].to(images.device), unit[:, j].to(images.device))
    return apply_cutout(images, cutout.to(images.device))


def magnitude(op, unit):
    low = torch.tensor([o[1] for o in OPS], dtype=torch.float64, device=op.device)
    high = torch.tensor([o[2] for o in OPS], dtype=torch.float64, device=op.device)
    return low[op] + (high[op] - low[op]) * unit.double()


AFFINE = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def apply_op(x, op, unit):
    """Sample b of uint8 `x` through OPS[op[b]] at its magnitude from unit[b]. Every op is computed for the whole
    batch and selected per sample; on the CPU (the folder loader's one image) only the ops some sample drew."""
    v = magnitude(op, unit)
    drawn = {OPS[i][0] for i in op.tolist()} if op.device.type == "cpu" else {name for name, _, _ in OPS}
    if drawn & set(AFFINE):  # identity matrices where the op is not affine
        x = affine_nearest(x, affine_matrices(op, v, x.shape[-1], x.shape[-2]))
    f = v.float().view(-1, 1, 1, 1)
    pointwise = {"AutoContrast": lambda: autocontrast(x),
                 "Brightness": lambda: blend(x, torch.zeros_like(x), f),
                 "Color": lambda: blend(x, grayscale(x).expand_as(x), f),
                 "Contrast": lambda: blend(x, contrast_degenerate(x).expand_as(x), f),
                 "Equalize": lambda: TF.equalize(x),
                 "Posterize": lambda: posterize(x, v.floor().clamp(1, 8).long()),
                 "Sharpness": lambda: blend(x, smooth(x), f),
                 "Solarize": lambda: solarize(x, v)}
    out = x
    for name, compute in pointwise.items():
        if name in drawn:
            out = torch.where((op == OP_INDEX[name]).view(-1, 1, 1, 1), compute(), out)
    return out


def blend(image, degenerate, factor):
    """PIL's Image.blend(degenerate, image, factor): degenerate + factor * (image - degenerate), clipped, truncated."""
    d = degenerate.float()
    return (d + factor * (image.float() - d)).clamp(0, 255).to(torch.uint8)


def grayscale(x):
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 0x8000) >> 16, as B x 1 x H x W uint8; 1 channel: itself."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1].int(), x[:, 1:2].int(), x[:, 2:3].int()
    return ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16).to(torch.uint8)


def contrast_degenerate(x):
    """PIL's ImageEnhance.Contrast degenerate: the mean of the L image rounded, int(mean + 0.5), everywhere."""
    mean = grayscale(x).double().mean(dim=(-2, -1), keepdim=True)
    return (mean + 0.5).floor().to(torch.uint8).expand(-1, 1, x.shape[-2], x.shape[-1])


def smooth(x):
    """PIL's ImageFilter.SMOOTH (3x3 ones with centre 5, divided by 13), border pixels unchanged."""
    c = x.shape[1]
    if min(x.shape[-2:]) < 3:  # no inner pixel: all border
        return x
    kernel = torch.ones(3, 3, dtype=torch.float32, device=x.device)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(c, 1, 3, 3)
    inner = F.conv2d(x.float(), kernel, groups=c)
    out = x.clone()
    out[..., 1:-1, 1:-1] = (inner + 0.5).floor().clamp(0, 255).to(torch.uint8)
    return out


def autocontrast(x):
    """PIL's ImageOps.autocontrast(cutoff=0) per channel: lut[i] = int(i * scale + offset), scale = 255 / (hi - lo),
    offset = -lo * scale, identity where hi <= lo."""
    lo = x.amin(dim=(-2, -1), keepdim=True).double()
    hi = x.amax(dim=(-2, -1), keepdim=True).double()
    flat = hi <= lo
    # a tensor numerator: `255.0 / t` is computed as 255 * (1 / t), which rounds differently from PIL's division
    scale = torch.where(flat, 1.0, torch.full_like(lo, 255.0) / torch.where(flat, 1.0, hi - lo))
    offset = torch.where(flat, torch.zeros_like(lo), -lo * scale)
    return (x.double() * scale + offset).clamp(0, 255).floor().to(torch.uint8)


def posterize(x, bits):
    """Keep the top `bits` (per sample, 1..8) bits of every value."""
    mask = (~((1 << (8 - bits)) - 1)) & 0xFF
    return x & mask.to(torch.uint8).view(-1, 1, 1, 1)


def solarize(x, threshold):
    """Invert the values >= threshold (per sample, a float: PIL's LUT `i < threshold` keeps i)."""
    return torch.where(x.double() >= threshold.view(-1, 1, 1, 1), 255 - x, x)


def affine_matrices(op, v, width, height):
    """(B, 6) float64 PIL AFFINE data (a, b, c, d, e, f): the source of output pixel (x, y) is (a x + b y + c,
    d x + e y + f); identity for samples whose op is not affine."""
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    m = [one, zero, zero, zero, one, zero]

    def put(name, values):
        sel = op == OP_INDEX[name]
        for k, value in enumerate(values):
            m[k] = torch.where(sel, value, m[k])

    put("ShearX", (one, v, zero, zero, one, zero))
    put("ShearY", (one, zero, zero, v, one, zero))
    put("TranslateX", (one, zero, v * width, zero, one, zero))
    put("TranslateY", (one, zero, zero, zero, one, v * height))
    # Image.rotate(v): a = -radians(v), matrix (cos a, sin a, ., -sin a, cos a, .) about the centre (W/2, H/2)
    a = -torch.deg2rad(torch.remainder(v, 360.0))
    cos, sin = torch.cos(a), torch.sin(a)
    cx, cy = width / 2, height / 2
    put("Rotate", (cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy))
    return torch.stack(m, dim=1)


def affine_nearest(x, m):
    """PIL's NEAREST affine transform of uint8 B x C x H x W with per-sample (B, 6) matrices, fill 0 outside."""
    b, c, h, w = x.shape
    xs = torch.arange(w, dtype=torch.float64, device=x.device) + 0.5
    ys = torch.arange(h, dtype=torch.float64, device=x.device) + 0.5
    m = m.to(x.device, torch.float64)[:, :, None, None]
    ux = (m[:, 0] * xs + m[:, 1] * ys[:, None] + m[:, 2]).floor()  # B x H x W
    uy = (m[:, 3] * xs + m[:, 4] * ys[:, None] + m[:, 5]).floor()
    inside = (ux >= 0) & (ux < w) & (uy >= 0) & (uy < h)
    src = (uy.clamp(0, h - 1) * w + ux.clamp(0, w - 1)).long().view(b, 1, h * w).expand(-1, c, -1)
    out = x.reshape(b, c, h * w).gather(2, src).view(b, c, h, w)
    return torch.where(inside[:, None], out, torch.zeros_like(out))


def apply_cutout(x, params):
    """FixMatch's Cutout(v = u0 * 0.5) -> CutoutAbs(v * W): centre (u1 W, u2 H); x0 = int(max(0, cx - s / 2)),
    x1 = min(W, x0 + s) (y likewise), then ImageDraw.rectangle((x0, y0, x1, y1)): columns x0..int(x1) and rows
    y0..int(y1), inclusive, filled with CUTOUT_FILL. Side 0 (u0 == 0) draws nothing."""
    b, c, h, w = x.shape
    side = params[:, 0] * CUTOUT_MAX * w
    x0 = (params[:, 1] * w - side / 2).clamp(min=0).floor()
    y0 = (params[:, 2] * h - side / 2).clamp(min=0).floor()
    x1 = torch.minimum(x0 + side, torch.full_like(x0, w)).floor()
    y1 = torch.minimum(y0 + side, torch.full_like(y0, h)).floor()
    cols = torch.arange(w, device=x.device, dtype=torch.float64)
    rows = torch.arange(h, device=x.device, dtype=torch.float64)
    in_x = (cols >= x0[:, None]) & (cols <= x1[:, None])
    in_y = (rows >= y0[:, None]) & (rows <= y1[:, None])
    box = (in_y[:, :, None] & in_x[:, None, :] & (side > 0)[:, None, None])[:, None]  # B x 1 x H x W
    fill = torch.tensor(CUTOUT_FILL[:c] if c <= len(CUTOUT_FILL) else CUTOUT_FILL[:1] * c, dtype=torch.uint8,
                        device=x.device).view(1, c, 1, 1)
    return torch.where(box, fill, x)

