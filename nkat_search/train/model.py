"""The NKAT vision transformer.

Reads top to bottom like timm's ``vision_transformer.py``: the pure attention filters
(``topk_mask``, ``nucleus_mask``), the small layers (``ColorLayerNorm``, ``ConvStem``,
``NKATAttention``, ``Mlp``, ``Block``), then the model ``NKAT``, then ``build_model`` and named
presets. Every option is a field of ``ModelConfig``; nothing here reads globals. The NKAT
attention cores that GPU training uses for long rows live in ``train/attention.py`` (fused) and
``train/attention_kernel.py`` (Triton kernel).

Inputs are float tensors (B, in_chans, 32, 32), already normalised by the data loader; 28x28
datasets are padded to 32x32 there, so one architecture serves all four datasets and lambda differs
only by ``in_chans`` and ``num_classes``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nkat_search.config import ModelConfig
from nkat_search.train.attention import (FUSED_MAX_LEVELS, filter_levels, fused_attention,
                                         nucleus_on)
from nkat_search.train.attention_kernel import (
    KERNEL_MAX_HEAD_DIM,
    KERNEL_MAX_LEVELS,
    kernel_available,
    kernel_attention,
)

# Token channels are viewed as 4 groups by split-head attention (R, G, B, shared) and by the
# channel shuffle; 4 always divides embed_dim because embed_dim % num_heads == 0 with 8 heads.
CHANNEL_GROUPS = 4


# Up to this many tokens the attention filters compare every pair of entries in a row instead of
# calling topk / sort + cumsum. On an H100 profile of the baseline (17 tokens, batch 512) the scan
# kernel of cumsum and the topk kernel took 26 % and 13 % of the step's GPU time for rows of 17
# values; the pairwise form is a few fused elementwise ops. Above the limit the pairwise tensor
# (rows x n x n) grows too large and the sort-based form is used.
PAIRWISE_MAX_TOKENS = 32

# Rows at least this long take the fused attention core (``train/attention.py``) on a GPU under
# torch.compile. Below it the explicit path's pairwise filters are a few fused elementwise ops
# already; ``benchmarks/attention_speed.py`` times both at 17 tokens, so this is where to change it.
FUSED_MIN_TOKENS = PAIRWISE_MAX_TOKENS + 1

# Rows at least this long take the Triton kernel (``train/attention_kernel.py``) on a GPU, eager or
# compiled. Session 12's H100 (``benchmarks/attention_speed.py``, whole model step compiled, batch
# 512; results/attention_speed_kernel.json): at 65 tokens kernel 25,669 images/s against the fused
# core's 21,059 (SDPA with the filters off 31,645), at 257 tokens 6,083 against 4,242 (SDPA
# 7,966). 17 tokens stay on the explicit path's few fused elementwise ops (FUSED_MIN_TOKENS).
KERNEL_MIN_TOKENS = 65
# Whether ``auto`` takes the kernel at all. On since session 8: the kernel passed its agreement
# check on an H100 (``benchmarks/attention_kernel_check.py``: 17, 65 and 257 tokens, float32 and
# bf16, ties, dropout, both backward modes) and one layer ran 1.42x faster than the fused core.
# Its 40-epoch accuracy beside the explicit path (``benchmarks/attention_accuracy.py``) is still
# to be measured.
KERNEL_BY_DEFAULT = True

# What ``NKATAttention(path=...)`` takes: "auto" (the rule in ``NKATAttention.settle``), or one
# forced (tests and benchmarks): "sdpa" (every filter off only), "explicit", "fused", "kernel".
ATTENTION_PATHS = ("auto", "sdpa", "explicit", "fused", "kernel")


def topk_mask(logits: Tensor, k: int) -> Tensor:
    """Boolean mask (True = keep) of the ``k`` largest entries of each last-dim row.

    An entry is kept iff fewer than ``k`` entries are strictly larger, which equals thresholding
    at the k-th largest value: exact ties with the k-th value are all kept. Shapes never depend on
    data (``torch.compile`` friendly). ``k <= 0`` or ``k >= n`` keeps everything.
    """
    n = logits.shape[-1]
    if k <= 0 or k >= n:
        return torch.ones_like(logits, dtype=torch.bool)
    logits = logits.detach()
    if n <= PAIRWISE_MAX_TOKENS:
        larger = (logits.unsqueeze(-2) > logits.unsqueeze(-1)).sum(dim=-1)
        return larger < k
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits >= kth


def nucleus_mask(probs: Tensor, p: float | Tensor) -> Tensor:
    """Boolean mask (True = keep) of the nucleus of each last-dim row of probabilities.

    The nucleus is the smallest prefix, by descending probability, whose cumulative sum reaches
    ``p``: an entry is kept iff the probability mass strictly above it is below ``p``. The top
    entry is always kept, so a row can never become empty. Tied entries are kept or dropped
    together. ``p >= 1`` keeps everything; a 0-dim tensor ``p`` is taken as below 1
    (``attention.nucleus_on``).
    """
    if not nucleus_on(p):
        return torch.ones_like(probs, dtype=torch.bool)
    probs = probs.detach()
    if probs.shape[-1] <= PAIRWISE_MAX_TOKENS:
        above = probs.unsqueeze(-2) > probs.unsqueeze(-1)  # [..., j, i]: p_i > p_j
        mass_above = (above * probs.unsqueeze(-2)).sum(dim=-1)
        return mass_above < p
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # Tied entries: the mass strictly above them is the mass before the first of them. Mass
    # before only grows along the sorted row, so a running max of it at each tie group's first
    # entry carries that value across the group.
    first = torch.ones_like(sorted_probs, dtype=torch.bool)
    first[..., 1:] = sorted_probs[..., 1:] != sorted_probs[..., :-1]
    mass_before = torch.where(first, mass_before, 0).cummax(dim=-1).values
    keep_sorted = mass_before < p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def topk_nucleus_mask(logits: Tensor, k: int, p: float | Tensor) -> Tensor:
    """``topk_mask`` then ``nucleus_mask`` on the softmax of the kept logits, for long rows.

    Same definition as the two filters in sequence: keep the entries with fewer than ``k`` larger
    logits, then those whose kept probability mass strictly above them is below ``p`` (exact ties
    are kept or dropped together; the top entry is always kept). Only the ``k`` largest logits can
    carry mass, so the nucleus is decided on them (a k x k comparison) and becomes a logit
    threshold, instead of sorting every row: rows of 257 logits (ConvStem off, patch 2) made the
    sort, its int64 indices and the scatter back the bulk of that model's step.
    """
    n = logits.shape[-1]
    if k <= 0 or k >= n:
        return nucleus_mask(logits.softmax(dim=-1), p) if nucleus_on(p) else topk_mask(logits, k)
    if not nucleus_on(p):
        return topk_mask(logits, k)
    logits = logits.detach()
    top = logits.topk(k, dim=-1).values  # descending
    keep_topk = logits >= top[..., -1:]
    # Softmax over the kept entries: the k listed ones plus any further ties with the k-th.
    top32 = top.float()
    shifted = (top32 - top32[..., :1]).exp()
    extra_ties = keep_topk.sum(dim=-1, keepdim=True) - k
    total = shifted.sum(dim=-1, keepdim=True) + extra_ties * shifted[..., -1:]
    probs = shifted / total
    above = top.unsqueeze(-2) > top.unsqueeze(-1)  # [..., i, j]: v_j > v_i
    mass_above = (above * probs.unsqueeze(-2)).sum(dim=-1)
    # Mass above falls as the value rises, so the kept values are the largest ones down to the
    # smallest value still under p.
    threshold = torch.where(mass_above < p, top, torch.full_like(top, float("inf")))
    return logits >= threshold.amin(dim=-1, keepdim=True)


class ColorLayerNorm(nn.Module):
    """Learnable LayerNorm over the colour channels at every pixel; identity for grayscale.

    Off by default (``ModelConfig.color_norm``): normalising 3 values per pixel to zero mean and
    unit variance removes each pixel's brightness (a grey pixel becomes 0), and on an H100 it cost
    16 points of CIFAR-10 accuracy after 10 epochs (40.8 % on, 57.0 % off;
    results/gpu/ablation.txt). Computed with channel reductions on NCHW rather than
    ``nn.LayerNorm`` on a permuted tensor, whose row-wise kernel took 18 % of the step's GPU time
    for rows of 3 values.
    """

    def __init__(self, in_chans: int, enabled: bool = True, eps: float = 1e-5):
        super().__init__()
        self.enabled = enabled and in_chans == 3
        self.eps = eps
        if self.enabled:
            self.weight = nn.Parameter(torch.ones(in_chans))
            self.bias = nn.Parameter(torch.zeros(in_chans))

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, unbiased=False, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def _conv_bn_gelu(in_chans: int, out_chans: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_chans),
        nn.GELU(),
    ]


# How much each ConvStem kind shrinks the image side (off: 32x32 stays; tiny, small: to 8x8).
STEM_DOWNSAMPLE = {"off": 1, "tiny": 4, "small": 4}


def tokens_per_image(conv_stem: str, patch_size: int, image_size: int = 32) -> int:
    """The attention's row length: the patch grid after the stem, plus the CLS token (on
    CIFAR-10: 257 for stem off and patch 2, 65 off/4, 17 tiny|small/2, 5 tiny|small/4)."""
    grid = image_size // STEM_DOWNSAMPLE[conv_stem] // patch_size
    return grid * grid + 1


class ConvStem(nn.Module):
    """Convolutional stem before the patch embedding: ``off``, ``tiny`` or ``small``.

    off: identity (the patch embedding sees the 32x32 image). tiny: two stride-2 3x3 convs
    (C -> 32 -> 64), 32x32 -> 8x8. small: 64, 128 (stride 2 each) then 128 (stride 1), also 8x8.
    Local texture is what 7x7 patches threw away on CIFAR-10; the stem keeps it cheaply.
    """

    def __init__(self, kind: str, in_chans: int):
        super().__init__()
        if kind == "off":
            layers: list[nn.Module] = []
            self.out_channels = in_chans
        elif kind == "tiny":
            layers = _conv_bn_gelu(in_chans, 32, 2) + _conv_bn_gelu(32, 64, 2)
            self.out_channels = 64
        elif kind == "small":
            layers = (_conv_bn_gelu(in_chans, 64, 2) + _conv_bn_gelu(64, 128, 2)
                      + _conv_bn_gelu(128, 128, 1))
            self.out_channels = 128
        else:
            raise ValueError(f"conv_stem: unknown kind {kind!r}")
        self.downsample = STEM_DOWNSAMPLE[kind]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class NKATAttention(nn.Module):
    """Multi-head self-attention with the NKAT filters and modulation, or the fused SDPA kernel.

    NKAT path, in this order: logits / temperature; keep the ``top_k`` largest logits per query
    row; nucleus (``top_p``) on the softmax of those logits; softmax; attention dropout; then each
    query row i is multiplied by ``1 + s_l * (alpha * tanh(m_i) + beta * sigmoid(v_i))``, where
    m_i, v_i are the mean and population variance over channels of query token i's (layer-normed)
    input and ``s_l = nkat_strength * nkat_decay ** layer_index``. When every filter is off
    (``not cfg.uses_nkat_attention``) the same computation is ``F.scaled_dot_product_attention``.
    The NKAT path has two implementations, tested to agree: ``attend`` (explicit: topk / pairwise
    masks and a masked softmax; the reference and the CPU path), ``fused_attention``
    (``train/attention.py``: one per-row threshold, a fused kernel per direction under
    torch.compile) and ``kernel_attention`` (``train/attention_kernel.py``: one Triton kernel per
    direction that never writes the N x N scores). Which one runs is chosen once, by ``settle``
    when the model is on its device (``build_model`` calls it), as timm's ``fused_attn``; what is
    left to each call is only whether it runs under torch.compile (``nkat_path``).

    Split heads (``cfg.split_heads``, 8 heads): the D token channels are viewed as 4 groups of D/4.
    Heads 0-1 (R), 2-3 (G), 4-5 (B) take q, k, v from their own channel group only (one D/4 -> 3D/4
    projection per group); heads 6-7 (shared) take them from all D channels. The model adds a
    per-colour patch projection of the image into the first three groups, so the colour heads see
    colour-specific content. The grouped projections have 21/16 D^2 weights instead of 3 D^2, so
    this costs fewer attention FLOPs than full heads; filters and modulation apply unchanged.
    """

    def __init__(self, dim: int, num_heads: int, layer_index: int, cfg: ModelConfig,
                 tokens: int | None = None, path: str = "auto"):
        super().__init__()
        if path not in ATTENTION_PATHS:
            raise ValueError(f"attention path: expected one of {ATTENTION_PATHS}, got {path!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.temperature = cfg.temperature
        self.top_k = cfg.top_k
        self.top_p = cfg.top_p
        # Whether the nucleus and the attention dropout are on, as bools: forward reads these, not
        # the float values, which Dynamo would guard on (a recompile for every other value).
        self.nucleus = cfg.top_p < 1.0
        self.attn_dropout = cfg.dropout_attn > 0
        self.uses_nkat = cfg.uses_nkat_attention
        self.tokens = tokens  # the row length, which "auto" needs on a GPU
        self.requested = path
        self.path = self.settle("cpu")
        self.split_heads = cfg.split_heads
        if self.split_heads:
            group = dim // CHANNEL_GROUPS
            self.qkv_colour = nn.ModuleList(nn.Linear(group, 3 * group) for _ in range(3))
            self.qkv_shared = nn.Linear(dim, 3 * group)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop_p = cfg.dropout_attn
        self.attn_drop = RateDropout(cfg.dropout_attn)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = RateDropout(cfg.dropout_attn)
        # Buffers, not Python floats: torch.compile specializes on float attributes, so a float
        # strength would give every block its own graph (regional compilation, one Block graph
        # for all blocks, ``TrainOptions.compile_scope``, could not share it), and a float scale,
        # top_p or dropout rate would make the graph one trial's: as buffers they are inputs, and
        # trials of the same shapes and top_k reuse it from Inductor's cache. Not persistent: they
        # follow from the config, and checkpoints stay as they were. Whether a filter is on stays
        # a Python bool (``self.nucleus``, ``self.attn_dropout``): it changes the graph anyway.
        self.register_buffer(
            "strength", torch.tensor(cfg.nkat_strength * cfg.nkat_decay ** layer_index),
            persistent=False)
        self.register_buffer("scale", torch.tensor(self.head_dim ** -0.5 / cfg.temperature),
                             persistent=False)
        self.register_buffer("top_p_value", torch.tensor(cfg.top_p), persistent=False)
        self.register_buffer("attn_drop_value", torch.tensor(cfg.dropout_attn), persistent=False)
        # alpha and beta exist only when the modulation is on, so a strength-0 model's parameter
        # count (lambda) contains nothing it never uses.
        if cfg.nkat_strength > 0:
            self.alpha = nn.Parameter(torch.ones(()))
            self.beta = nn.Parameter(torch.ones(()))
        else:
            self.alpha = None
            self.beta = None

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as (B, heads, N, head_dim)."""
        B, N, D = x.shape
        if self.split_heads:
            groups = x.view(B, N, CHANNEL_GROUPS, D // CHANNEL_GROUPS).unbind(dim=2)
            parts = [proj(g) for proj, g in zip(self.qkv_colour, groups)]
            parts.append(self.qkv_shared(x))
            heads_per_group = self.num_heads // CHANNEL_GROUPS
            qkv = torch.cat(
                [p.view(B, N, 3, heads_per_group, self.head_dim) for p in parts], dim=3
            )
        else:
            qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def modulation(self, x: Tensor) -> Tensor:
        """Per-query-row factor (B, 1, N, 1): ``1 + s_l * (alpha tanh(mean) + beta sigmoid(var))``."""
        mean = x.mean(dim=-1)
        var = x.var(dim=-1, unbiased=False)
        factor = 1 + self.strength * (self.alpha * torch.tanh(mean) + self.beta * torch.sigmoid(var))
        return factor[:, None, :, None]

    def settle(self, device_type: str) -> str:
        """The path for this layer on ``device_type``, set as ``self.path`` and returned.

        A forced path is kept. ``auto``: SDPA when every filter is off; on the CPU the explicit
        path (the reference); on a GPU (once ``KERNEL_BY_DEFAULT``) the kernel, eager or
        compiled, for rows of at least
        ``KERNEL_MIN_TOKENS`` whose head dim and threshold search it takes (Triton installed, head
        dim <= ``KERNEL_MAX_HEAD_DIM``, at most ``KERNEL_MAX_LEVELS`` levels); else the fused
        core for rows of at least ``FUSED_MIN_TOKENS`` and at most ``FUSED_MAX_LEVELS`` levels,
        under torch.compile only (eager, its level loop runs op by op, several passes over the
        N x N logits per level: ``fused_if_compiled``); else explicit.
        """
        self.path = self.requested
        if self.path != "auto":
            return self.path
        n = self.tokens or 0
        levels = filter_levels(self.top_k, self.top_p, n) if n else 0
        kernel_fits = kernel_available() and self.head_dim <= KERNEL_MAX_HEAD_DIM
        if not self.uses_nkat:
            self.path = "sdpa"
        elif device_type != "cuda":
            self.path = "explicit"
        elif (KERNEL_BY_DEFAULT and kernel_fits and n >= KERNEL_MIN_TOKENS
              and levels <= KERNEL_MAX_LEVELS):
            self.path = "kernel"
        elif n >= FUSED_MIN_TOKENS and levels <= FUSED_MAX_LEVELS:
            self.path = "fused_if_compiled"
        else:
            self.path = "explicit"
        return self.path

    def nkat_path(self) -> str:
        """The path this call runs: the settled one, with ``fused_if_compiled`` decided."""
        if self.path == "fused_if_compiled":
            return "fused" if torch.compiler.is_compiling() else "explicit"
        return self.path

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        q, k, v = self._qkv(x)
        if (path := self.nkat_path()) == "sdpa":
            # SDPA takes floats only; this path has every filter off, none of the searched space.
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop_p if self.training else 0.0,
                scale=self.head_dim ** -0.5 / self.temperature
            )
        elif path != "explicit":
            core = kernel_attention if path == "kernel" else fused_attention
            out = core(q, k, v, self.scale, self.top_k, self.nucleus_p(), self.dropout_p())
            if self.alpha is not None:
                # The row factor on the output rows equals it on the weights, and its gradient
                # is then a sum over heads x head_dim values instead of heads x N weights.
                out = out * self.modulation(x)
        else:
            out = self.attend(q, k, v, x)
        out = out.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(out))

    def nucleus_p(self) -> float | Tensor:
        """top_p for the cores: the buffer when the nucleus is on, else the float 1.0 (off)."""
        return self.top_p_value if self.nucleus else 1.0

    def dropout_p(self) -> float | Tensor:
        """The attention dropout rate for the cores: the buffer while training with dropout on,
        else the float 0.0 (off)."""
        return self.attn_drop_value if self.training and self.attn_dropout else 0.0

    def attend(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor) -> Tensor:
        """The explicit NKAT path from q, k, v (B, heads, N, head_dim) to ``weights @ v``; ``x``
        modulates. The reference for the fused path, and the CPU path."""
        N = q.shape[-2]
        logits = q @ k.transpose(-2, -1)
        # Scaled in float32 and rounded once, as a Python float scale was: a bf16 product with
        # the float32 buffer would round the scale to bf16 first (up to 0.4 % of the temperature).
        logits = (logits.float() * self.scale).to(logits.dtype)
        if N > PAIRWISE_MAX_TOKENS and self.top_k > 0 and self.nucleus:
            logits = logits.masked_fill(~topk_nucleus_mask(logits, self.top_k, self.nucleus_p()),
                                        float("-inf"))
        else:
            if self.top_k > 0:
                logits = logits.masked_fill(~topk_mask(logits, self.top_k), float("-inf"))
            if self.nucleus:
                keep = nucleus_mask(logits.softmax(dim=-1), self.nucleus_p())
                logits = logits.masked_fill(~keep, float("-inf"))
        weights = self.attn_drop(logits.softmax(dim=-1))
        if self.alpha is not None:
            weights = weights * self.modulation(x)
        return weights.to(v.dtype) @ v


def channel_shuffle(x: Tensor, groups: int = CHANNEL_GROUPS) -> Tensor:
    """ShuffleNet channel shuffle of token channels: (B, N, g, D/g) -> (B, N, D/g, g) -> flat.

    After a shuffle every channel group holds channels from all groups, so split colour heads in
    the next block see features that the other groups produced. No parameters.
    """
    B, N, D = x.shape
    return x.view(B, N, groups, D // groups).transpose(2, 3).reshape(B, N, D)


class RateDropout(nn.Module):
    """``nn.Dropout`` with its rate in a buffer, so a compiled graph takes the rate as an input and
    trials with other rates share it (see ``NKATAttention``'s buffers). Rate 0 is the identity."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {p}")
        self.on = p > 0
        self.register_buffer("p", torch.tensor(float(p)), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.on):
            return x
        # The draw and the scaling in float32 whatever x is: in bf16 the draw would round the
        # rate and the factor 1 / (1 - p) (by up to 0.2 %).
        keep = torch.rand_like(x, dtype=torch.float32) >= self.p
        return torch.where(keep, x.float() / (1 - self.p), 0.0).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p.item():g}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = RateDropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = RateDropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block; optional channel shuffle after the attention residual."""

    def __init__(self, dim: int, layer_index: int, cfg: ModelConfig, tokens: int | None = None,
                 attention_path: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = NKATAttention(dim, cfg.num_heads, layer_index, cfg, tokens, attention_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.dropout_embed)
        self.shuffle = cfg.channel_shuffle

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        if self.shuffle:
            x = channel_shuffle(x)
        return x + self.mlp(self.norm2(x))


class NKAT(nn.Module):
    """Colour LayerNorm -> ConvStem -> patch embedding (+ CLS, position) -> blocks -> CLS head."""

    def __init__(self, cfg: ModelConfig, in_chans: int, num_classes: int, image_size: int = 32,
                 attention_path: str = "auto"):
        super().__init__()
        dim = cfg.embed_dim
        self.cfg = cfg
        self.color_norm = ColorLayerNorm(in_chans, cfg.color_norm)
        self.stem = ConvStem(cfg.conv_stem, in_chans)
        self.patch_embed = nn.Conv2d(
            self.stem.out_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        num_patches = tokens_per_image(cfg.conv_stem, cfg.patch_size, image_size) - 1
        if cfg.split_heads:
            # One filter bank per colour channel (groups=in_chans), written into the R, G, B
            # channel groups; for grayscale the single channel feeds all three groups.
            # It reads the loader-normalised image, not the colour-normed one, because the colour
            # LayerNorm mixes channels (it subtracts the per-pixel mean over R, G, B).
            down = self.stem.downsample * cfg.patch_size
            self.colour_embed = nn.Conv2d(
                in_chans, 3 * dim // CHANNEL_GROUPS, kernel_size=down, stride=down, groups=in_chans
            )
        else:
            self.colour_embed = None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.pos_drop = RateDropout(cfg.dropout_embed)
        self.blocks = nn.Sequential(*(Block(dim, i, cfg, num_patches + 1, attention_path)
                                      for i in range(cfg.depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(self.stem(self.color_norm(x))).flatten(2).transpose(1, 2)
        if self.colour_embed is not None:
            colour = self.colour_embed(x).flatten(2).transpose(1, 2)
            tokens = tokens + F.pad(colour, (0, tokens.shape[-1] - colour.shape[-1]))
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = self.pos_drop(torch.cat([cls, tokens], dim=1) + self.pos_embed)
        return self.norm(self.blocks(tokens))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x)[:, 0])

    def settle_attention(self, device_type: str) -> NKAT:
        """Choose every layer's attention path for ``device_type`` (``NKATAttention.settle``)."""
        for block in self.blocks:
            block.attn.settle(device_type)
        return self


def build_model(cfg: ModelConfig, in_chans: int, num_classes: int,
                device: str | torch.device | None = None, attention_path: str = "auto") -> NKAT:
    """Validate ``cfg`` and build the 32x32 NKAT model for this dataset's channels and classes,
    on ``device``, its attention path chosen for it (``attention_path`` forces one). A model
    moved with ``.to()`` afterwards keeps the path chosen here (``settle_attention`` redoes it)."""
    cfg.validate()
    model = NKAT(cfg, in_chans, num_classes, attention_path=attention_path)
    if device is not None:  # None: where torch builds it (the CPU, or a ``torch.device`` context)
        model = model.to(device)
    return model.settle_attention(model.head.weight.device.type)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (``requires_grad``); lambda = count_parameters(model) / 1e6."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# Named presets: the user's baseline, and the same network with every NKAT filter off (fused SDPA).
PRESETS: dict[str, ModelConfig] = {
    "baseline": ModelConfig(),
    "baseline_sdpa": ModelConfig(top_k=0, top_p=1.0, nkat_strength=0.0),
}


def preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset config."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset '{name}'; known: {', '.join(PRESETS)}")
    return ModelConfig(**vars(PRESETS[name]))
