"""WKD-F (Lv, Yang, Li, NeurIPS 2024): the last stage's maps compared as diagonal Gaussians, by the closed-form
2-Wasserstein distance between them, instead of position by position (FitNet's MSE).

As the authors' code (JiamingLv/WKD, mdistiller/distillers/WKD.py, `wkd_feature_loss` and
`adaptive_avg_std_pool2d`) computes it: the student's map at HINT_LAYER (-1: the last stage; both networks the
same index) goes through a projector onto the teacher's; each map is split into SPATIAL_GRID x SPATIAL_GRID cells
as adaptive pooling splits it (cell a spans floor(a H / g) to ceil((a + 1) H / g)); in each cell and channel
mu = mean and sigma = sqrt(unbiased variance + EPS) over the positions;
    mean_loss = sum (mu_s - mu_t)^2 / (B g^2),  cov_loss = sum (sigma_s - sigma_t)^2 / (B g^2)
(the squared W2 between diagonal Gaussians, split into its two parts), and
    loss = CE_WEIGHT CE + w(epoch) (MEAN_COV_RATIO mean_loss + cov_loss),
w cosine-decayed after COSINE_DECAY_EPOCH as WKD-L's gamma (wkd.cosine_decayed).
Projectors: "conv1x1", mdistiller's ConvReg (FitNet's regressor: conv chosen from the two sizes, 1x1 for equal
ones, BN, ReLU), the CIFAR-100 configs'; "bottleneck", the authors' ConvRegBottleNeck for equal sizes: 1x1 conv
to 256 channels, 3x3 conv, 1x1 conv to the teacher's channels, BN, ReLU (their ImageNet configs).
The projector and the loss run in float32 outside any autocast, as the authors' do (after their autocast block).
WKDF.PROBE as FITNET.PROBE (published: the authors' `get_feat_shapes`, which moves both models' BN statistics once).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .base import Distiller
from .fitnet import HintRegressor, check_probe, hint_shapes
from .losses import StepOutput, ce_term, distill_loss
from .registry import DISTILLER_REGISTRY
from .wkd import check_decay, cosine_decayed

PROJECTORS = ("conv1x1", "bottleneck")

_cfg = CN()
_cfg.CE_WEIGHT = 1.0
_cfg.WEIGHT = 0.006  # w_F (the authors' resnet32x4 -> resnet8x4 CIFAR-100 config)
_cfg.MEAN_COV_RATIO = 4.0  # weight of the mean part against the standard-deviation part
_cfg.SPATIAL_GRID = 4  # g: Gaussians per g x g cells of the map
_cfg.HINT_LAYER = -1  # index into features["feats"]: -1 the last stage
_cfg.PROJECTOR = "conv1x1"  # conv1x1 (mdistiller's ConvReg) or bottleneck (1x1 -> 3x3 -> 1x1, 256 hidden)
_cfg.EPS = 1e-5  # added to the variance
_cfg.COSINE_DECAY_EPOCH = 0
_cfg.PROBE = "clean"  # as FITNET.PROBE: published = the authors' train-mode probe forward


class BottleneckProjector(nn.Module):
    """The authors' ConvRegBottleNeck for maps of equal size (their other branch cannot run: see docs)."""

    def __init__(self, s_shape, t_shape, hidden=256):
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape, t_shape
        if (s_h, s_w) != (t_h, t_w):
            raise ConfigError(f"config key WKDF.PROJECTOR: bottleneck needs maps of one size, the student's is "
                              f"{s_h}x{s_w} and the teacher's {t_h}x{t_w}; use conv1x1")
        self.conv1 = nn.Conv2d(s_c, hidden, kernel_size=1)
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size=3, stride=1, padding=1)
        self.conv3 = nn.Conv2d(hidden, t_c, kernel_size=1)
        self.bn = nn.BatchNorm2d(t_c)

    def forward(self, x):
        return F.relu(self.bn(self.conv3(self.conv2(self.conv1(x)))))


def grid_cells(size, grid):
    """[(start, end)] of adaptive pooling's `grid` cells over `size` positions (they may overlap)."""
    return [((a * size) // grid, -((-(a + 1) * size) // grid)) for a in range(grid)]


def gaussian_stats(feat, grid, eps):
    """(mu, sigma), each (B, C, grid, grid): per cell and channel, the mean and sqrt(unbiased var + eps)."""
    rows, cols = grid_cells(feat.shape[2], grid), grid_cells(feat.shape[3], grid)
    cells = [feat[:, :, r0:r1, c0:c1].flatten(2) for r0, r1 in rows for c0, c1 in cols]
    mu = torch.stack([c.mean(-1) for c in cells], -1)
    sigma = torch.stack([torch.sqrt(c.var(-1) + eps) for c in cells], -1)
    return mu.unflatten(-1, (grid, grid)), sigma.unflatten(-1, (grid, grid))


def wkd_feature_loss(f_s, f_t, grid=1, eps=1e-5):
    """(mean_loss, cov_loss) of `wkd_feature_loss`: summed squared differences of the cells' means and standard
    deviations, divided by batch x grid^2."""
    mu_s, sigma_s = gaussian_stats(f_s, grid, eps)
    mu_t, sigma_t = gaussian_stats(f_t, grid, eps)
    scale = f_s.shape[0] * grid**2
    return F.mse_loss(mu_s, mu_t, reduction="sum") / scale, F.mse_loss(sigma_s, sigma_t, reduction="sum") / scale


def check_grid(grid, t_shape):
    """Every cell must hold two positions at least: a one-position cell has no unbiased variance (NaN)."""
    _, t_h, t_w = t_shape
    sizes = [(r1 - r0) * (c1 - c0) for r0, r1 in grid_cells(t_h, grid) for c0, c1 in grid_cells(t_w, grid)]
    if min(sizes) < 2:
        raise ConfigError(f"config key WKDF.SPATIAL_GRID: a {grid}x{grid} grid on the teacher's {t_h}x{t_w} map "
                          f"leaves cells of one position, whose variance is undefined; use a smaller grid")


@DISTILLER_REGISTRY.register("WKDF", config=_cfg)
class WKDF(Distiller):
    ramped_terms = ("wkd_feat",)

    def __init__(self, *, student, teacher, epochs, image_size=32, ce_weight=1.0, weight=0.006, mean_cov_ratio=4.0,
                 spatial_grid=4, hint_layer=-1, projector="conv1x1", eps=1e-5, decay_start=0, probe="clean"):
        super().__init__(student=student, teacher=teacher)
        check_probe("WKDF", probe)
        check_projector(projector)
        n = min(len(student.stage_channels()), len(self.teacher.stage_channels()))
        if not -n <= hint_layer < n:
            raise ConfigError(f"config key WKDF.HINT_LAYER: {hint_layer} is not a stage of both networks (the "
                              f"shallower has {n} feature maps); use -{n}..{n - 1} (-1: the last)")
        self.ce_weight, self.weight, self.mean_cov_ratio, self.grid = ce_weight, weight, mean_cov_ratio, spatial_grid
        self.hint_layer, self.eps, self.decay_start, self.epochs = hint_layer, eps, decay_start, epochs
        s_shape, t_shape = hint_shapes("WKDF", probe, student, self.teacher.model, hint_layer, image_size)
        check_grid(spatial_grid, t_shape)
        self.projector = make_projector(projector, s_shape, t_shape)

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.WKDF
        return {"epochs": cfg.SOLVER.EPOCHS, "image_size": data.image_size if data is not None else 32,
                "ce_weight": c.CE_WEIGHT, "weight": c.WEIGHT, "mean_cov_ratio": c.MEAN_COV_RATIO,
                "spatial_grid": c.SPATIAL_GRID, "hint_layer": c.HINT_LAYER, "projector": c.PROJECTOR, "eps": c.EPS,
                "decay_start": c.COSINE_DECAY_EPOCH, "probe": c.PROBE}

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.WKDF
        check_decay("WKDF", cfg)
        check_probe("WKDF", c.PROBE)
        check_projector(c.PROJECTOR)
        if c.SPATIAL_GRID < 1:
            raise ConfigError(f"config key WKDF.SPATIAL_GRID: must be >= 1 (1: one Gaussian per channel), got "
                              f"{c.SPATIAL_GRID}")
        if c.EPS < 0:
            raise ConfigError(f"config key WKDF.EPS: must be >= 0 (the authors' 1e-5), got {c.EPS}")
        if c.MEAN_COV_RATIO < 0:
            raise ConfigError(f"config key WKDF.MEAN_COV_RATIO: must be >= 0, got {c.MEAN_COV_RATIO}")

    def forward_train(self, images, labels, epoch, index=None):
        logits, feats = self.student(images)
        logits_t, feats_t = self.teacher(images)
        with torch.autocast(images.device.type, enabled=False):
            f_s = self.projector(feats["feats"][self.hint_layer].float())
            mean_loss, cov_loss = wkd_feature_loss(f_s, feats_t["feats"][self.hint_layer].float(), self.grid,
                                                   self.eps)
        weight = cosine_decayed(self.weight, epoch, self.decay_start, self.epochs)
        return StepOutput(logits, {
            "ce": ce_term(logits, labels, self.ce_weight),
            "wkd_feat": distill_loss(weight * (self.mean_cov_ratio * mean_loss + cov_loss)),
        }, feats, logits_t, feats_t)


def make_projector(name, s_shape, t_shape):
    if name == "bottleneck":
        return BottleneckProjector(s_shape, t_shape)
    try:
        return HintRegressor(s_shape, t_shape)
    except ConfigError as e:  # its message names FITNET.HINT_LAYER
        raise ConfigError(f"config key WKDF.HINT_LAYER: {str(e).partition(': ')[2]}") from None


def check_projector(name):
    if name not in PROJECTORS:
        raise ConfigError(f"config key WKDF.PROJECTOR: one of {', '.join(PROJECTORS)} (conv1x1: mdistiller's ConvReg, "
                          f"the CIFAR-100 configs'; bottleneck: 1x1 -> 3x3 -> 1x1 convs, equal map sizes), got "
                          f"{name!r}")
