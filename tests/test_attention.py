"""nkat_search.train.attention: the fused NKAT core against the definition and the explicit path."""

from __future__ import annotations

import functools

import pytest
import torch

from nkat_search.config import ModelConfig
from nkat_search.train.attention import (
    FUSED_MAX_LEVELS,
    filter_levels,
    fused_attention,
    row_filter,
    topk_nucleus_threshold,
)
from nkat_search.train.model import (
    NKATAttention,
    build_model,
    nucleus_mask,
    topk_mask,
    topk_nucleus_mask,
)

torch.set_num_threads(2)


def definition(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MISSION.md sec. 2 written out pairwise in float64: the top-k mask and, for every entry, the
    softmax mass of the kept entries strictly above it.

    Keep iff fewer than k entries are strictly larger (k = 0 or k >= n: all); the nucleus then
    keeps a kept entry iff its mass above is below p.
    """
    x = logits.double()
    n = x.shape[-1]
    larger = (x.unsqueeze(-2) > x.unsqueeze(-1)).double()  # [..., i, j]: x_j > x_i
    keep = larger.sum(dim=-1) < k if 0 < k < n else torch.ones_like(x, dtype=torch.bool)
    probs = x.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    return keep, (larger @ probs.unsqueeze(-1)).squeeze(-1)


def definition_mask(keep: torch.Tensor, above: torch.Tensor, p: float) -> torch.Tensor:
    return keep & (above < p) if p < 1.0 else keep


def logits_for(n: int, ties: bool, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """(2, rows, n) logits; the reference holds rows x n x n float64 values, so fewer long rows."""
    gen = torch.Generator().manual_seed(seed + n)
    logits = torch.randn(2, 128 if n < 257 else 48, n, generator=gen) * 3
    if ties:
        logits = logits.round()  # many exact ties, at the k-th value and inside the nucleus
    return logits.to(dtype)


# --- the threshold ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n", [17, 65, 257])
def test_threshold_is_the_definition_and_the_explicit_masks(n, ties, dtype):
    logits = logits_for(n, ties, dtype)
    for k in (1, 4, 6, 8):
        keep, above = definition(logits, k)
        for p in (0.3, 0.8, 0.95, 1.0):
            fused = logits >= topk_nucleus_threshold(logits, k, p)
            expected = definition_mask(keep, above, p)
            assert torch.equal(fused, expected), (k, p)
            # The explicit path's masks, from the same logits: identical. (Its softmax runs in
            # float32 for bf16 logits, as autocast does.)
            explicit = topk_mask(logits, k)
            if p < 1.0 and n > 32:
                explicit = topk_nucleus_mask(logits, k, p)
            elif p < 1.0:
                probs = logits.float().masked_fill(~explicit, float("-inf")).softmax(dim=-1)
                explicit = explicit & nucleus_mask(probs, p)
            assert torch.equal(fused, explicit), (k, p)
            assert fused.any(dim=-1).all()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n", [17, 65, 257])
def test_threshold_with_topk_off_or_at_least_n(n, ties):
    """top_k = 0 or >= n keeps every entry for the top-k; the nucleus then walks every level."""
    logits = logits_for(n, ties, torch.float32, seed=1)
    for k in (0, n, n + 3):
        keep, above = definition(logits, k)
        for p in (0.5, 0.9, 1.0):
            fused = logits >= topk_nucleus_threshold(logits, k, p)
            expected = definition_mask(keep, above, p)
            # Summing up to n float32 probabilities in another order moves the mass above an
            # entry by a few ulps: entries that close to p may differ, no other.
            differ = fused != expected
            assert ((above[differ] - p).abs() < 1e-5).all(), (k, p)
            assert differ.sum() <= 2, (k, p)
    assert (logits >= topk_nucleus_threshold(logits, 0, 1.0)).all()


def test_threshold_hand_examples():
    row = torch.tensor([[3.0, 1.0, 3.0, 2.0, 2.0, 0.0]])
    # Top-2 with ties: 3, 3 are the two largest; nothing else has fewer than 2 larger.
    assert (row >= topk_nucleus_threshold(row, 2, 1.0)).tolist() == [[True, False, True, False,
                                                                       False, False]]
    # Top-3: the 2s have 2 larger entries (< 3), so both stay: 4 entries for k = 3.
    assert (row >= topk_nucleus_threshold(row, 3, 1.0)).tolist() == [[True, False, True, True,
                                                                       True, False]]
    # Nucleus on the top-3 set: mass of the two 3s is 2e^0 / (2 + 2e^-1) = 0.731; p = 0.7 stops
    # after them, p = 0.75 keeps the 2s as well. The top entry always stays (p tiny).
    assert (row >= topk_nucleus_threshold(row, 3, 0.7)).sum().item() == 2
    assert (row >= topk_nucleus_threshold(row, 3, 0.75)).sum().item() == 4
    assert (row >= topk_nucleus_threshold(row, 3, 1e-9)).sum().item() == 2


def test_row_filter_mass_is_the_kept_softmax_denominator():
    logits = logits_for(65, True, torch.float32)
    threshold, row_max, mass = row_filter(logits, 6, 0.8)
    keep = logits >= threshold
    assert torch.allclose(row_max, logits.amax(-1, keepdim=True))
    expected = torch.where(keep, (logits - row_max).exp(), 0).sum(-1, keepdim=True)
    assert torch.allclose(mass, expected, rtol=1e-6)


def test_filter_levels():
    assert filter_levels(6, 0.8, 257) == 6
    assert filter_levels(6, 1.0, 257) == 6
    assert filter_levels(0, 0.8, 257) == 257   # the nucleus alone needs every level
    assert filter_levels(300, 0.8, 257) == 257
    assert filter_levels(0, 1.0, 257) == 0
    assert filter_levels(17, 1.0, 17) == 0
    assert FUSED_MAX_LEVELS >= 8  # the searched top_k range is 4..8


# --- the attention layer ------------------------------------------------------------------------

FILTER_CASES = {
    "baseline": dict(top_k=6, top_p=0.8, nkat_strength=0.3),
    "topk_only": dict(top_k=4, top_p=1.0, nkat_strength=0.3),
    "nucleus_only": dict(top_k=0, top_p=0.7, nkat_strength=0.3),
    "topk_at_least_n": dict(top_k=300, top_p=0.8, nkat_strength=0.3),
    "strength_0": dict(top_k=6, top_p=0.8, nkat_strength=0.0),
}


def layer_tokens(n: int, ties: bool, dim: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, dim, generator=gen)
    if ties:
        # Identical tokens (blank background, zero padding) give exactly tied logits.
        x[:, 1::2] = x[:, 1:2]
        x[:, 2:8] = x[:, 3:4]
    return x


def run_paths(make, x: torch.Tensor, paths=("explicit", "fused"), compiled=False):
    """Output and every gradient (input and parameters) per path, from the same weights:
    ``make(path=...)`` builds the layer with that path, after the same seed each time."""
    results = {}
    weight = torch.linspace(-1, 1, x.numel()).view_as(x)
    for path in paths:
        torch.manual_seed(0)
        attn = make(path=path).train()
        inp = x.clone().requires_grad_()
        forward = torch.compile(attn) if compiled and path == "fused" else attn
        out = forward(inp)
        (out * weight).sum().backward()
        results[path] = [("out", out.detach()), ("grad x", inp.grad)] + [
            (f"grad {name}", p.grad.clone()) for name, p in attn.named_parameters()]
    return results


def assert_paths_agree(results, rtol=1e-5):
    """Float32 agreement, relative to each tensor's largest value."""
    for (name, a), (_, b) in zip(results["explicit"], results["fused"]):
        scale = a.abs().max().clamp_min(1e-12)
        assert ((a - b).abs().max() / scale) < rtol, name


# Rows of 257 only where the level walk is short: the nucleus alone walks every level (eager,
# one pass per level; the model keeps those configurations on the explicit path).
LAYER_CASES = [(n, case) for n in (17, 65, 257) for case in FILTER_CASES
               if n < 257 or case not in ("nucleus_only", "topk_at_least_n")]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n,case", LAYER_CASES)
def test_fused_layer_matches_explicit_forward_and_gradients(n, case, ties):
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=32, num_heads=4, temperature=0.65, dropout_attn=0.0,
                      **FILTER_CASES[case])
    cfg.validate()
    make = functools.partial(NKATAttention, 32, 4, layer_index=1, cfg=cfg)
    attn = make().train()
    results = run_paths(make, layer_tokens(n, ties, 32))
    # Every parameter got a gradient on both paths (alpha and beta only with strength > 0).
    assert len(results["fused"]) == 2 + len(list(attn.parameters()))
    assert_paths_agree(results)


@pytest.mark.parametrize("ties", [False, True])
def test_fused_layer_with_split_heads(ties):
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=64, num_heads=8, split_heads=True, dropout_attn=0.0,
                      nkat_strength=0.3)
    cfg.validate()
    make = functools.partial(NKATAttention, 64, 8, layer_index=0, cfg=cfg)
    assert_paths_agree(run_paths(make, layer_tokens(65, ties, 64)))


def test_fused_model_matches_explicit_model():
    """A 65-token model (ConvStem off, patch 4), forward and every parameter's gradient."""
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=32, num_heads=4, depth=2, conv_stem="off", patch_size=4,
                      dropout_attn=0.0, dropout_embed=0.0, nkat_strength=0.3)
    weights = build_model(cfg, in_chans=1, num_classes=10).state_dict()
    images = torch.zeros(2, 1, 32, 32)
    images[:, :, 6:26, 6:26] = torch.randn(2, 1, 20, 20)  # a blank border: tied tokens
    grads = {}
    for path in ("explicit", "fused"):
        model = build_model(cfg, in_chans=1, num_classes=10, attention_path=path).train()
        model.load_state_dict(weights)
        out = model(images)
        out.square().sum().backward()
        grads[path] = [out.detach()] + [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["explicit"], grads["fused"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_compiled_fused_layer_matches_explicit():
    """Inductor's code for the fused core (CPU C++ here; Triton on a GPU) computes the same."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=32, num_heads=4, dropout_attn=0.0, nkat_strength=0.3)
    make = functools.partial(NKATAttention, 32, 4, layer_index=0, cfg=cfg)
    # Inductor's vectorised exp and its summation order: a few float32 ulps more.
    assert_paths_agree(run_paths(make, layer_tokens(65, True, 32), compiled=True), rtol=1e-4)


def keep_rate(q: torch.Tensor, k: torch.Tensor, dropout_p: float, compiled: bool = False) -> float:
    """The fraction of attention weights that survive dropout, seen through the output.

    With top_k = 1 and no ties every row keeps one entry with probability 1, and with v = 1 the
    output row is 1 / (1 - p) if that entry survived dropout and 0 if not.
    """
    v = torch.ones(*q.shape[:-1], 1)
    fn = torch.compile(fused_attention) if compiled else fused_attention
    out = fn(q, k, v, 1.0, 1, 1.0, dropout_p)
    survived = out > 0
    assert torch.allclose(out[survived], torch.tensor(1 / (1 - dropout_p)))
    return survived.float().mean().item()


@pytest.mark.parametrize("dropout_p", [0.17, 0.5])
def test_fused_dropout_keep_rate(dropout_p):
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 2, 4, 257, 8).unbind(0)
    rows = q.shape[:-1].numel()
    rate = keep_rate(q, k, dropout_p)
    sigma = (dropout_p * (1 - dropout_p) / rows) ** 0.5
    assert abs(rate - (1 - dropout_p)) < 4 * sigma
    assert keep_rate(q, k, 0.0) == 1.0


def test_fused_dropout_gradient_only_through_surviving_weights():
    """Backward applies the forward's dropout mask: gradient of sum(out) w.r.t. v counts the
    surviving weights of each key column, scaled by 1 / (1 - p)."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 1, 33, 8).unbind(0)
    v = torch.ones(1, 1, 33, 1, requires_grad=True)
    out = fused_attention(q, k, v, 1.0, 1, 1.0, 0.5)  # top-1: one weight of 1 per row
    out.sum().backward()
    survivors = (out > 0).sum()
    assert v.grad.sum().item() == pytest.approx(survivors.item() * 2.0)


# --- which path runs ----------------------------------------------------------------------------

def test_cpu_and_eager_take_the_explicit_path(monkeypatch):
    import nkat_search.train.model as model_module

    calls = []
    real = model_module.fused_attention
    monkeypatch.setattr(model_module, "fused_attention", lambda *a: calls.append(1) or real(*a))
    cfg = ModelConfig(embed_dim=32, num_heads=4, depth=1, conv_stem="off", patch_size=2)
    model = build_model(cfg, 3, 10).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls == []  # auto on the CPU: explicit
    model = build_model(cfg, 3, 10, attention_path="fused").eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls == [1]
    with pytest.raises(ValueError, match="attention path"):
        build_model(cfg, 3, 10, attention_path="sideways")
