"""nkat_search.train.model: the pure filters, the attention paths, shapes, gradients, counts."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from nkat_search.config import ModelConfig
from nkat_search.train.model import (
    NKAT,
    ColorLayerNorm,
    NKATAttention,
    build_model,
    channel_shuffle,
    count_parameters,
    nucleus_mask,
    preset,
    tokens_per_image,
    topk_mask,
)

torch.set_num_threads(2)


def small_cfg(**overrides) -> ModelConfig:
    values = dict(embed_dim=64, depth=1)
    values.update(overrides)
    cfg = ModelConfig(**values)
    cfg.validate()
    return cfg


FILTERS_OFF = dict(top_k=0, top_p=1.0, nkat_strength=0.0)


# --- pure filters -------------------------------------------------------------------------------

def test_topk_keeps_exactly_k_per_row():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 17, 17, generator=gen)
    for k in (1, 2, 6, 16):
        mask = topk_mask(logits, k)
        assert mask.dtype == torch.bool
        assert (mask.sum(-1) == k).all()
        # The kept entries are the k largest: every kept value beats every dropped one.
        kept_min = logits.masked_fill(~mask, float("inf")).amin(-1)
        dropped_max = logits.masked_fill(mask, float("-inf")).amax(-1)
        assert (kept_min > dropped_max).all()


def test_topk_off_keeps_all():
    logits = torch.randn(2, 5)
    assert topk_mask(logits, 0).all()
    assert topk_mask(logits, 5).all()
    assert topk_mask(logits, 9).all()


def test_nucleus_hand_example():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    # Cumulative mass: 0.5, 0.8, 0.95, 1.0. p=0.8 is reached after two entries, p=0.81 after three.
    assert nucleus_mask(probs, 0.8).tolist() == [[True, True, False, False]]
    assert nucleus_mask(probs, 0.81).tolist() == [[True, True, True, False]]
    assert nucleus_mask(probs, 0.5).tolist() == [[True, False, False, False]]
    assert nucleus_mask(probs, 1.0).all()


def test_nucleus_unsorted_rows_map_back_to_original_order():
    probs = torch.tensor([[0.05, 0.3, 0.15, 0.5], [0.15, 0.05, 0.5, 0.3]])
    assert nucleus_mask(probs, 0.81).tolist() == [
        [False, True, True, True],
        [True, False, True, True],
    ]


def test_nucleus_always_keeps_top_entry():
    probs = torch.softmax(torch.randn(3, 7, 11), dim=-1)
    for p in (1e-9, 1e-3, 0.2):
        mask = nucleus_mask(probs, p)
        top = probs.argmax(-1, keepdim=True)
        assert mask.gather(-1, top).all()
        assert (mask.sum(-1) >= 1).all()
    assert (nucleus_mask(probs, 1e-9).sum(-1) == 1).all()


def test_channel_shuffle_interleaves_groups():
    x = torch.arange(8.0).view(1, 1, 8)
    # Groups [0,1] [2,3] [4,5] [6,7] -> take one channel from each group in turn.
    assert channel_shuffle(x).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


# --- attention ----------------------------------------------------------------------------------

def test_modulation_hand_example():
    cfg = small_cfg(embed_dim=8, top_k=0, top_p=1.0, nkat_strength=0.5, nkat_decay=0.5)
    attn = NKATAttention(8, 2, layer_index=1, cfg=cfg)
    with torch.no_grad():
        attn.alpha.fill_(2.0)
        attn.beta.fill_(0.5)
    x = torch.tensor([[[1.0, 2, 3, 4, 1, 2, 3, 4], [0.0] * 8]])
    factor = attn.modulation(x).flatten().tolist()
    # s_1 = 0.5 * 0.5**1 = 0.25.
    # Token 0: mean 2.5, population variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25.
    expected0 = 1 + 0.25 * (2.0 * math.tanh(2.5) + 0.5 * (1 / (1 + math.exp(-1.25))))
    # Token 1: mean 0, variance 0 -> 1 + 0.25 * (0 + 0.5 * 0.5) = 1.0625.
    expected1 = 1 + 0.25 * (2.0 * 0.0 + 0.5 * 0.5)
    assert factor == pytest.approx([expected0, expected1], abs=1e-6)
    assert expected1 == 1.0625


def reference_attention(attn: NKATAttention, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The NKAT path written out step by step (eval mode, no dropout) from the module's weights."""
    B, N, D = x.shape
    h, hd = attn.num_heads, D // attn.num_heads
    q, k, v = attn.qkv(x).view(B, N, 3, h, hd).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) * hd ** -0.5
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        logits = logits.masked_fill(~topk_mask(logits, cfg.top_k), float("-inf"))
    if cfg.top_p < 1:
        logits = logits.masked_fill(~nucleus_mask(logits.softmax(-1), cfg.top_p), float("-inf"))
    weights = logits.softmax(-1)
    if cfg.nkat_strength > 0:
        weights = weights * attn.modulation(x)
    out = (weights @ v).transpose(1, 2).reshape(B, N, D)
    return attn.proj(out)


@pytest.mark.parametrize("filters", [
    dict(top_k=0, top_p=1.0, nkat_strength=0.3),
    dict(top_k=3, top_p=1.0, nkat_strength=0.0),
    dict(top_k=0, top_p=0.6, nkat_strength=0.0),
    dict(top_k=4, top_p=0.7, nkat_strength=0.3),
])
def test_nkat_path_matches_step_by_step_reference(filters):
    torch.manual_seed(0)
    cfg = small_cfg(embed_dim=32, num_heads=4, temperature=0.65, **filters)
    attn = NKATAttention(32, 4, layer_index=2, cfg=cfg).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        assert (attn(x) - reference_attention(attn, x, cfg)).abs().max() < 1e-5


@pytest.mark.parametrize("split_heads", [False, True])
def test_fused_and_explicit_paths_agree(split_heads):
    torch.manual_seed(0)
    cfg = small_cfg(embed_dim=64, depth=2, temperature=0.7, split_heads=split_heads, **FILTERS_OFF)
    model = build_model(cfg, in_chans=3, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        explicit_model = build_model(cfg, in_chans=3, num_classes=10, attention_path="explicit")
        explicit_model.load_state_dict(model.state_dict())
        explicit = explicit_model.eval()(x)
    assert (fused - explicit).abs().max() < 1e-5


def count_sdpa_calls(monkeypatch, cfg: ModelConfig) -> int:
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    model = build_model(cfg, in_chans=3, num_classes=10).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    return len(calls)


def test_filters_off_takes_fused_kernel(monkeypatch):
    assert count_sdpa_calls(monkeypatch, small_cfg(depth=2, **FILTERS_OFF)) == 2


def test_baseline_filters_take_explicit_path(monkeypatch):
    assert count_sdpa_calls(monkeypatch, small_cfg(depth=2)) == 0


@pytest.mark.parametrize("stem, patch, tokens",
                         [("off", 2, 257), ("off", 4, 65), ("tiny", 2, 17), ("small", 4, 5)])
def test_tokens_per_image_is_the_models_row_length(stem, patch, tokens):
    model = build_model(small_cfg(conv_stem=stem, patch_size=patch), in_chans=3, num_classes=10)
    assert tokens_per_image(stem, patch) == tokens == model.pos_embed.shape[1]
    rows = model.blocks[0](torch.zeros(2, tokens, 64))
    assert rows.shape == (2, tokens, 64)


def test_modulation_parameters_exist_only_when_on():
    with_mod = build_model(small_cfg(), 3, 10)
    without = build_model(small_cfg(nkat_strength=0.0), 3, 10)
    assert with_mod.blocks[0].attn.alpha is not None
    assert without.blocks[0].attn.alpha is None
    assert count_parameters(with_mod) - count_parameters(without) == 2  # alpha + beta, depth 1


# --- the whole model ----------------------------------------------------------------------------

COMBINATIONS = list(itertools.product(("off", "tiny", "small"), (2, 4), (False, True), (False, True)))


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("conv_stem,patch_size,split_heads,channel_shuffle", COMBINATIONS)
def test_forward_backward_every_combination(conv_stem, patch_size, split_heads, channel_shuffle,
                                            in_chans):
    torch.manual_seed(0)
    cfg = small_cfg(conv_stem=conv_stem, patch_size=patch_size, split_heads=split_heads,
                    channel_shuffle=channel_shuffle)
    model = build_model(cfg, in_chans=in_chans, num_classes=7).train()
    # A 28x28 grayscale image arrives padded to 32x32 by the loader.
    x = torch.randn(2, in_chans, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


def test_fused_path_trains():
    model = build_model(small_cfg(split_heads=True, **FILTERS_OFF), 3, 10).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_split_heads_colour_groups_see_only_their_colour():
    torch.manual_seed(0)
    cfg = small_cfg(conv_stem="off", patch_size=4, split_heads=True, color_norm=False, **FILTERS_OFF)
    model = build_model(cfg, 3, 10).eval()
    x = torch.zeros(1, 3, 32, 32, requires_grad=True)
    colour = model.colour_embed(x)  # (1, 3 * 64 / 4, 8, 8): 16 channels per colour group
    colour[:, :16].sum().backward()  # the R group
    assert x.grad[:, 0].abs().sum() > 0
    assert x.grad[:, 1:].abs().sum() == 0


def test_count_parameters_counts_trainable_only():
    model = build_model(small_cfg(), 3, 10)
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == total
    model.head.weight.requires_grad_(False)
    assert count_parameters(model) == total - model.head.weight.numel()


def test_stem_parameter_deltas_for_baseline():
    def params(stem: str) -> int:
        return count_parameters(build_model(ModelConfig(conv_stem=stem), 3, 10))

    dim = 384
    # off: Conv2d(3 -> 384, 2x2) on 32x32 -> 16x16 = 256 tokens; tiny/small: 8x8 -> 4x4 = 16.
    pos_embed_change = ((4 * 4 + 1) - (16 * 16 + 1)) * dim  # -92,160
    tiny = (
        3 * 32 * 9 + 2 * 32          # conv 3x3 (3 -> 32, no bias) + BatchNorm
        + 32 * 64 * 9 + 2 * 64       # conv 3x3 (32 -> 64, no bias) + BatchNorm
        + (64 - 3) * dim * 2 * 2     # patch embedding now reads 64 channels instead of 3
        + pos_embed_change
    )
    small = (
        3 * 64 * 9 + 2 * 64
        + 64 * 128 * 9 + 2 * 128
        + 128 * 128 * 9 + 2 * 128
        + (128 - 3) * dim * 2 * 2
        + pos_embed_change
    )
    assert tiny == 21_024
    assert small == 323_392
    off = params("off")
    assert params("tiny") - off == tiny
    assert params("small") - off == small


def test_baseline_lambda_depends_only_on_channels_and_classes():
    counts = {(c, n): count_parameters(build_model(ModelConfig(), c, n))
              for c, n in ((3, 10), (1, 10), (1, 26), (1, 47))}
    # The colour LayerNorm is off by default: RGB differs only by the first conv's 2 * 32 * 9.
    assert counts[(3, 10)] - counts[(1, 10)] == 2 * 32 * 9
    with_norm = ModelConfig(color_norm=True)
    assert (count_parameters(build_model(with_norm, 3, 10)) - counts[(3, 10)]) == 6
    assert count_parameters(build_model(with_norm, 1, 10)) == counts[(1, 10)]
    # Each extra class adds one head row of 384 weights and a bias.
    assert counts[(1, 26)] - counts[(1, 10)] == 16 * 385
    assert counts[(1, 47)] - counts[(1, 10)] == 37 * 385


def test_presets_are_fresh_copies():
    cfg = preset("baseline_sdpa")
    assert not cfg.uses_nkat_attention
    cfg.depth = 1
    assert preset("baseline_sdpa").depth == ModelConfig().depth
    assert isinstance(NKAT(preset("baseline"), 3, 10), NKAT)


def test_colour_layernorm_matches_torch_layernorm_over_channels():
    norm = ColorLayerNorm(3, enabled=True)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    reference = torch.nn.LayerNorm(3)
    reference.load_state_dict({"weight": norm.weight.detach(), "bias": norm.bias.detach()})
    x = torch.randn(2, 3, 5, 5)
    expected = reference(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.allclose(norm(x), expected, atol=1e-5)
    grey = torch.full((1, 3, 2, 2), 0.7)
    # A grey pixel has no colour variance: its brightness is erased (why the default is off).
    assert torch.allclose(norm(grey), norm.bias[None, :, None, None].expand(1, 3, 2, 2))


@pytest.mark.parametrize("n", [17, 65])
def test_pairwise_and_sorted_filters_agree(n):
    # n = 17 takes the pairwise form, n = 65 the topk / sort form; both must match a reference.
    torch.manual_seed(n)
    logits = torch.randn(4, 3, n, n)
    for k in (1, 6, n - 1):
        reference = logits >= logits.topk(k, dim=-1).values[..., -1:]
        assert torch.equal(topk_mask(logits, k), reference)
    probs = logits.softmax(dim=-1)
    for p in (0.01, 0.5, 0.8, 0.95):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < p
        reference = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        assert torch.equal(nucleus_mask(probs, p), reference)


def pairwise_topk_then_nucleus(logits, k, p):
    """The filters' definitions written out pairwise, at any row length (ties kept together)."""
    larger = (logits.unsqueeze(-2) > logits.unsqueeze(-1)).sum(dim=-1)
    keep = larger < k
    probs = logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    mass_above = ((probs.unsqueeze(-2) > probs.unsqueeze(-1)) * probs.unsqueeze(-2)).sum(dim=-1)
    return keep & (mass_above < p)


@pytest.mark.parametrize("n", [33, 65, 257])
@pytest.mark.parametrize("ties", [False, True])
def test_fused_topk_nucleus_matches_the_two_filters_in_sequence(n, ties):
    from nkat_search.train.model import topk_nucleus_mask

    torch.manual_seed(n)
    logits = torch.randn(1, 2, n, n) * 3
    if ties:
        logits = logits.round()  # many exact ties, also at the k-th value
    for k in (1, 4, 6, 8):
        for p in (0.3, 0.8, 0.95):
            fused = topk_nucleus_mask(logits, k, p)
            assert torch.equal(fused, pairwise_topk_then_nucleus(logits, k, p)), (k, p)
            assert fused.any(dim=-1).all()  # the top entry always stays


def test_long_rows_take_the_fused_filter_and_match_the_sequential_one(monkeypatch):
    """A 257-token model (ConvStem off, patch 2) gives the same outputs through the fused filter."""
    import nkat_search.train.model as model_module

    torch.manual_seed(0)
    cfg = small_cfg(embed_dim=32, num_heads=4, conv_stem="off", patch_size=2, top_k=6, top_p=0.8)
    model = build_model(cfg, in_chans=3, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    calls = []
    real = model_module.topk_nucleus_mask
    monkeypatch.setattr(model_module, "topk_nucleus_mask",
                        lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fused = model(x)
        monkeypatch.setattr(model_module, "PAIRWISE_MAX_TOKENS", 10**6)  # the sequential form
        sequential = model(x)
    assert calls == [1]
    assert torch.allclose(fused, sequential, atol=1e-5)


def test_sorted_nucleus_keeps_ties_together():
    """Rows longer than PAIRWISE_MAX_TOKENS take the sort; tied probabilities have the same mass
    strictly above them, so they are kept or dropped together there too."""
    probs = torch.tensor([0.3, 0.2, 0.2, 0.2, 0.1] + [0.0] * 35)
    # Mass strictly above each 0.2 is 0.3 < 0.4: all three stay, though cumulatively 0.3 + 0.2
    # already passes 0.4 after the first of them.
    assert nucleus_mask(probs, 0.4).tolist()[:5] == [True, True, True, True, False]
    assert nucleus_mask(probs, 0.3).tolist()[:5] == [True, False, False, False, False]
    shuffled = torch.randperm(40)
    assert torch.equal(nucleus_mask(probs[shuffled], 0.4), nucleus_mask(probs, 0.4)[shuffled])
