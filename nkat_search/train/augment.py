"""Batched augmentation on the device, with per-sample randomness and no per-image Python loop.

One call of ``GpuAugment`` turns a uint8 batch into normalised float32 images and soft targets:

    random crop (zero padding) + horizontal flip (CIFAR-10 only)    one gather on the uint8 batch
    RandAugment(N, M) on float [0, 1]       per round: one grid_sample for every geometric op,
                                            masked tensor math for the photometric ops
    normalise, then Cutout                  the hole is 0 after normalisation (= the mean colour)
    Mixup or CutMix with a random partner   per-sample choice and lambda; targets mixed alike

Every random draw comes from the generator passed in, so a batch is reproducible from the
generator state alone. Draws are made on the generator's device; give it a generator on the data's
device to keep the loop free of host-device copies.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor

from nkat_search.config import TrainConfig
from nkat_search.train.data import DatasetInfo, DeviceData

# RandAugment's op set (Cubuk et al. 2020, as in torchvision.transforms.RandAugment). Each sample
# draws N of them uniformly, with replacement. The geometric ops come last so that one comparison
# (op >= _FIRST_GEOMETRIC) tells them apart.
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
OPS = (
    "Identity", "AutoContrast", "Equalize", "Solarize", "Color", "Posterize", "Contrast",
    "Brightness", "Sharpness", *_GEOMETRIC,
)
_FIRST_GEOMETRIC = OPS.index(_GEOMETRIC[0])
MAX_MAGNITUDE = 30


def soft_targets(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """Label-smoothed one-hot targets: ``1 - smoothing + smoothing / K`` on the label, ``smoothing / K`` elsewhere."""
    off = smoothing / num_classes
    targets = torch.full((len(labels), num_classes), off, dtype=torch.float32, device=labels.device)
    return targets.scatter_(1, labels.long()[:, None], 1.0 - smoothing + off)


class GpuAugment:
    """The training-time augmentation of one dataset, configured from a ``TrainConfig``.

    ``data`` provides the normalisation (``data.mean`` / ``data.std``); ``info`` says whether flips are
    allowed and how many classes the targets have.
    """

    def __init__(self, cfg: TrainConfig, info: DatasetInfo, data: DeviceData,
                 compile: bool = False) -> None:
        self.crop_padding = cfg.crop_padding
        self.hflip = info.hflip
        self.num_ops, self.magnitude = cfg.randaugment
        self.cutout = cfg.cutout
        self.mixup = cfg.mixup
        self.cutmix = cfg.cutmix
        self.label_smoothing = cfg.label_smoothing
        self.num_classes = info.num_classes
        self.mean = data.mean[:, None, None]
        self.std = data.std[:, None, None]
        # Eager, one RandAugment round is about 200 small kernels, launched one by one from Python:
        # 4.98 ms per batch of 512 on an H100, 1.61 ms compiled (results/gpu/session3/
        # profile_log.txt). The random draws stay eager, so the generator stream is the same
        # compiled or not; only the pure tensor math after them is compiled, into a few kernels.
        self._round = _compiled(_apply_round) if compile else _apply_round
        self._mix_with = _compiled(_apply_mix) if compile else _apply_mix

    def __call__(self, images_uint8: Tensor, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        rng = _Draws(generator, images_uint8.device)
        x = self._crop_flip(images_uint8, rng).to(torch.float32).div_(255.0)
        for _ in range(self.num_ops):
            x = self._round(x, *_round_draws(x.shape[0], rng), self.magnitude / MAX_MAGNITUDE)
        # The same arithmetic as DeviceData.normalize, so evaluation sees identical inputs.
        x = x.sub_(self.mean).div_(self.std)
        if self.cutout > 0:
            x = x.masked_fill_(_cutout_mask(x.shape, self.cutout, rng), 0.0)
        targets = soft_targets(labels, self.num_classes, self.label_smoothing)
        if self.mixup > 0 or self.cutmix > 0:
            x, targets = self._mix(x, targets, rng)
        return x, targets

    def _crop_flip(self, images: Tensor, rng: _Draws) -> Tensor:
        """Random crop from the zero-padded image plus optional flip, as one gather."""
        batch, _, height, width = images.shape
        pad = self.crop_padding
        if pad == 0 and not self.hflip:
            return images
        padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
        dy = rng.randint(0, 2 * pad + 1, batch)
        dx = rng.randint(0, 2 * pad + 1, batch)
        rows = dy[:, None] + torch.arange(height, device=images.device)
        cols = torch.arange(width, device=images.device).expand(batch, width)
        if self.hflip:
            flip = rng.uniform(batch) < 0.5
            cols = torch.where(flip[:, None], cols.flip(1), cols)
        cols = cols + dx[:, None]
        index_b = torch.arange(batch, device=images.device)[:, None, None, None]
        index_c = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        return padded[index_b, index_c, rows[:, None, :, None], cols[:, None, None, :]]

    def _mix(self, x: Tensor, targets: Tensor, rng: _Draws) -> tuple[Tensor, Tensor]:
        """Mix every sample with a random partner: CutMix with probability ``cutmix``, else Mixup.

        ``weight`` is the share of the sample itself, in image and target alike; for CutMix it is
        the area actually kept after the box is clipped to the image.
        """
        batch = x.shape[0]
        partner = rng.permutation(batch)
        use_cutmix = rng.uniform(batch) < self.cutmix
        if self.mixup > 0:
            lam = rng.beta(self.mixup, batch).to(x.dtype)
        else:
            lam = torch.ones(batch, device=x.device, dtype=x.dtype)
        # CutMix box: side ratio sqrt(1 - lambda) with lambda ~ Beta(1, 1) = U(0, 1).
        box_draws = (rng.uniform(batch), rng.uniform(batch), rng.uniform(batch))
        return self._mix_with(x, targets, partner, use_cutmix, lam, *box_draws)


def _apply_mix(x: Tensor, targets: Tensor, partner: Tensor, use_cutmix: Tensor, lam: Tensor,
               area_draw: Tensor, cy_draw: Tensor, cx_draw: Tensor) -> tuple[Tensor, Tensor]:
    """The arithmetic of ``GpuAugment._mix`` once its random draws are made."""
    _, _, height, width = x.shape
    ratio = (1.0 - area_draw).sqrt()
    cut_h, cut_w = (ratio * height).floor(), (ratio * width).floor()
    cy, cx = cy_draw * height, cx_draw * width
    y0 = (cy - cut_h / 2).floor().clamp(0, height)
    y1 = (cy + cut_h / 2).floor().clamp(0, height)
    x0 = (cx - cut_w / 2).floor().clamp(0, width)
    x1 = (cx + cut_w / 2).floor().clamp(0, width)
    ys = torch.arange(height, device=x.device, dtype=x.dtype)[None, :, None]
    xs = torch.arange(width, device=x.device, dtype=x.dtype)[None, None, :]
    box = ((ys >= y0[:, None, None]) & (ys < y1[:, None, None])
           & (xs >= x0[:, None, None]) & (xs < x1[:, None, None]) & use_cutmix[:, None, None])
    kept = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)

    weight = torch.where(use_cutmix, kept, lam)
    other = x[partner]
    mixed = torch.where(use_cutmix[:, None, None, None], x, weight[:, None, None, None] * x
                        + (1 - weight[:, None, None, None]) * other)
    mixed = torch.where(box[:, None], other, mixed)
    targets = weight[:, None] * targets + (1 - weight[:, None]) * targets[partner]
    return mixed, targets


def _compiled(fn):
    """``torch.compile`` for one fixed batch shape (the loop's batches all have the same size)."""
    return torch.compile(fn, dynamic=False)


class _Draws:
    """All random draws of one batch, from one generator, moved to the data's device."""

    def __init__(self, generator: torch.Generator, device: torch.device) -> None:
        self.generator = generator
        self.device = device

    def uniform(self, n: int) -> Tensor:
        return torch.rand(n, generator=self.generator, device=self.generator.device).to(self.device)

    def randint(self, low: int, high: int, n: int) -> Tensor:
        draw = torch.randint(low, high, (n,), generator=self.generator, device=self.generator.device)
        return draw.to(self.device)

    def permutation(self, n: int) -> Tensor:
        return torch.randperm(n, generator=self.generator, device=self.generator.device).to(self.device)

    def beta(self, alpha: float, n: int) -> Tensor:
        """Symmetric Beta(alpha, alpha) as G1 / (G1 + G2) with Gamma draws from the generator.

        float64 because Gamma(0.1) underflows float32 about once in 6,000 draws.
        """
        concentration = torch.full((2, n), alpha, dtype=torch.float64, device=self.generator.device)
        gamma = torch._standard_gamma(concentration, generator=self.generator)
        lam = gamma[0] / (gamma[0] + gamma[1])
        return lam.nan_to_num(0.5).float().to(self.device)


def _round_draws(batch: int, rng: _Draws) -> tuple[Tensor, Tensor]:
    """One round's draws: each sample's op, and its sign (+1 or -1) for the signed ops."""
    op = rng.randint(0, len(OPS), batch)
    negative = rng.uniform(batch) < 0.5
    return op, negative


def _apply_round(x: Tensor, op: Tensor, negative: Tensor, m: float) -> Tensor:
    """One RandAugment op per sample (each its own op) on float images in [0, 1], once drawn.

    Signed ops (geometry, Color, Contrast, Brightness, Sharpness) get the sample's sign.
    Magnitudes follow torchvision's RandAugment with 31 bins: ``m`` = M / 30.
    """
    sign = torch.where(negative, -1.0, 1.0).to(x.dtype)

    def chosen(name: str) -> Tensor:
        return (op == OPS.index(name))[:, None, None, None]

    x = _geometric(x, op, sign, m)
    factor = 1.0 + 0.9 * m * sign  # Color, Contrast, Brightness, Sharpness: enhance factor
    x = torch.where(chosen("AutoContrast"), _autocontrast(x), x)
    x = torch.where(chosen("Equalize"), _equalize(x), x)
    x = torch.where(chosen("Solarize"), _solarize(x, 1.0 - m), x)
    x = torch.where(chosen("Color"), _color(x, factor), x)
    x = torch.where(chosen("Posterize"), _posterize(x, 8 - round(4 * m)), x)
    x = torch.where(chosen("Contrast"), _contrast(x, factor), x)
    x = torch.where(chosen("Brightness"), (x * factor[:, None, None, None]).clamp_(0, 1), x)
    x = torch.where(chosen("Sharpness"), _sharpness(x, factor), x)
    return x


def _geometric(x: Tensor, op: Tensor, sign: Tensor, m: float) -> Tensor:
    """Rotate / ShearX / ShearY / TranslateX / TranslateY in one batched affine warp.

    Each sample gets its own 2x3 matrix (identity when its op is photometric); uncovered pixels
    are filled with black, as torchvision does. ``theta`` maps output to input coordinates in
    [-1, 1] units; the images are square, so angles need no aspect correction.
    """
    batch, _, height, width = x.shape
    index = {name: OPS.index(name) for name in _GEOMETRIC}
    angle = torch.where(op == index["Rotate"], sign * math.radians(30.0 * m), 0.0)
    shear_x = torch.where(op == index["ShearX"], sign * 0.3 * m, 0.0)
    shear_y = torch.where(op == index["ShearY"], sign * 0.3 * m, 0.0)
    # 150/331 of the image side at full magnitude, as in torchvision; in [-1, 1] units that is x2/side.
    shift_x = torch.where(op == index["TranslateX"], sign * (150 / 331) * 2 * m, 0.0)
    shift_y = torch.where(op == index["TranslateY"], sign * (150 / 331) * 2 * m, 0.0)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([
        torch.stack([cos, -sin + shear_x, -shift_x], dim=1),
        torch.stack([sin + shear_y, cos, -shift_y], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    is_geometric = op >= _FIRST_GEOMETRIC
    return torch.where(is_geometric[:, None, None, None], warped, x)


def _grayscale(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b)[:, None]


def _blend(x: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """PIL's ImageEnhance: ``degenerate + factor * (x - degenerate)``, clipped to [0, 1]."""
    return (degenerate + factor[:, None, None, None] * (x - degenerate)).clamp_(0, 1)


def _autocontrast(x: Tensor) -> Tensor:
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    spread = high - low
    return torch.where(spread > 0, (x - low) / spread.clamp_min(1e-6), x)


def _equalize(x: Tensor) -> Tensor:
    """Histogram equalisation per sample and channel, PIL's lookup table computed batched.

    Exact on the 256 levels of the image quantised to uint8 (the op sees 8-bit values, as in PIL).
    """
    batch, channels, height, width = x.shape
    levels = (x * 255).round_().long().view(batch * channels, -1)
    hist = torch.zeros(batch * channels, 256, device=x.device).scatter_add_(
        1, levels, torch.ones_like(levels, dtype=torch.float32))
    # PIL: step = (pixels - count of the last non-empty level) // 255; identity when step is 0.
    last_level = (torch.arange(256, device=x.device) * (hist > 0)).argmax(dim=1, keepdim=True)
    step = ((height * width - hist.gather(1, last_level)) / 255).floor()
    cdf = hist.cumsum(dim=1)
    lut = ((cdf - hist + (step / 2).floor()) / step.clamp_min(1)).floor().clamp_(0, 255)
    equalized = lut.gather(1, levels) / 255
    same = (step == 0).expand_as(equalized)
    out = torch.where(same, levels / 255, equalized)
    return out.view(batch, channels, height, width).to(x.dtype)


def _solarize(x: Tensor, threshold: float) -> Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


def _color(x: Tensor, factor: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x  # saturation has no meaning for one channel
    return _blend(x, _grayscale(x), factor)


def _posterize(x: Tensor, bits: int) -> Tensor:
    if bits >= 8:
        return x
    step = 2 ** (8 - bits)
    return ((x * 255).round_() / step).floor_() * step / 255


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean.expand_as(x), factor)


def _sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with PIL's SMOOTH-filtered image; the 1-px border keeps its original values."""
    channels = x.shape[1]
    kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(channels, 1, 3, 3)
    smooth = F.conv2d(x, kernel, groups=channels)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(x, degenerate, factor)


def _cutout_mask(shape: torch.Size, size: int, rng: _Draws) -> Tensor:
    """A square hole of side ``size`` per sample, centre anywhere in the image (clipped at edges)."""
    batch, _, height, width = shape
    cy = rng.randint(0, height, batch)
    cx = rng.randint(0, width, batch)
    y0, x0 = cy - size // 2, cx - size // 2
    ys = torch.arange(height, device=cy.device)[None, :, None]
    xs = torch.arange(width, device=cx.device)[None, None, :]
    hole = ((ys >= y0[:, None, None]) & (ys < y0[:, None, None] + size)
            & (xs >= x0[:, None, None]) & (xs < x0[:, None, None] + size))
    return hole[:, None]
