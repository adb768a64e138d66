"""Batch-wise augmentation and normalisation of uint8 image tensors, on whatever device they live on.

Small datasets (CIFAR, Fashion-MNIST) are augmented on the device in one vectorised gather per batch instead of
per-sample PIL transforms in worker processes: at 32x32 the Python overhead of the latter, not the GPU, would
bound training speed. The random numbers are passed in (drawn on the CPU by the caller), so the result is the
same on CPU and GPU.
"""

import torch
import torch.nn.functional as F


def crop_flip(images, shifts, flips, pad=4):
    """Random-crop-with-zero-padding and horizontal flip of a uint8 batch B x C x H x W.

    `shifts` (B x 2, int64 in [0, 2*pad]) is the (dy, dx) offset of each crop in the padded image, `flips`
    (B, bool) whether to mirror it; a shift of (pad, pad) without flip returns the image unchanged."""
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = shifts[:, 0, None] + torch.arange(h, device=images.device)  # B x H
    cols = shifts[:, 1, None] + torch.arange(w, device=images.device)  # B x W
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    chan = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


class Normalizer:
    """uint8 -> float32 in one fused multiply-add: (x / 255 - mean) / std."""

    def __init__(self, mean, std, device):
        mean = torch.tensor(mean, dtype=torch.float32)
        std = torch.tensor(std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1).to(device)
        self.shift = (-mean / std).view(1, -1, 1, 1).to(device)

    def __call__(self, images):
        return torch.addcmul(self.shift, images.float(), self.scale)
