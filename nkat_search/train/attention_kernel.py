"""The NKAT attention core as one Triton kernel per direction, flash-attention style (issue 22).

Same definition as ``row_filter`` and ``fused_attention`` in ``train/attention.py``: scores =
(q k^T) * scale in float32; keep the entries with fewer than ``top_k`` strictly larger scores
(ties kept together); nucleus on the softmax of the kept scores (the top entry always stays, ties
go together); softmax; attention dropout; ``weights @ v``. The per-row modulation stays a factor on
the output rows, applied by the caller.

Why a kernel. The fused core writes and re-reads the N x N logits, weights, dropout mask and their
gradients (about 24 bytes per logit per layer, ``benchmarks/attention_notes.md``). Here nothing
N x N reaches memory:

- forward, one program per (batch x head, block of query rows). With a filter it loops over the
  key tiles twice. The first pass keeps, per row, the ``LEVELS`` largest distinct scores with
  their counts (each tile's scores are merged into that short list by the same level walk as
  ``row_filter``: one max and one count per level), which gives the threshold, the row max and
  the kept softmax mass exactly as ``row_filter`` computes them. The second pass forms the
  weights (filter, softmax, dropout) and accumulates ``weights @ v``. Without a filter (top_k and
  top_p off) there is nothing to find first, so one pass does it all with the online softmax
  (FlashAttention's running max, with the sum and accumulator rescaled as it grows). Only two
  float32 scalars per row are saved: threshold and log-sum-exp.
- backward recomputes the scores and probabilities from q, k and those scalars (as
  FlashAttention-2 does) and regenerates the dropout mask from the seed and each entry's (row,
  column). ``bwd_mode`` picks how dQ is formed. "split": one kernel per key block
  accumulates dK and dV over the query blocks, one per query block accumulates dQ over the key
  blocks; no atomics, and the result is deterministic, but every tile's scores, probabilities,
  dO V^T and mask are computed twice. "atomic" (the default, ``BWD_MODE``: 12 % faster on an
  H100): the key-block kernel also adds each tile's dS K into a zeroed float32 dQ with atomics,
  FlashAttention-2's way, then one copy converts it to the output's dtype and layout; half the
  recomputation, for atomic traffic and a float32 sum order that changes from run to run (dQ may
  differ in its last bits between identical calls). ``delta = rowsum(dO * O)`` equals
  ``rowsum(P * dP)`` of the softmax backward even with dropout (the mask and 1 / (1 - p) are in
  both O and dP). "sparse" (with top_k on; untimed, see ``SPARSE_SLOTS``): a row keeps at most
  top_k keys but for ties, so one kernel per query block finds each row's kept entries once and
  forms dP, dS and dQ from gathered k and v rows, and the key-block kernel spreads dS and the
  weights onto its tiles for dK and dV: two products per tile, no exp, no dropout mask.
- dropout: one Philox call (``tl.rand4x``) serves 4 consecutive columns of a row
  (``DROPOUT_COLUMNS_PER_PHILOX``), a quarter of the random-number work of one call per entry,
  which matters because every kernel regenerates the mask. Each entry's keep bit stays a
  function of (seed, batch x head, row, column) alone, so all kernels agree on it whatever their
  tiles.
- launch options, all arguments of ``kernel_attention`` with module defaults: tile sizes
  (``BLOCK_M``, ``BLOCK_N``), warps (``NUM_WARPS``), software pipelining depth (``NUM_STAGES``),
  skipping all-zero tiles (``SKIP_EMPTY_TILES``), ``BWD_MODE``, the backward's warps and query
  tile (``BWD_NUM_WARPS``, ``BWD_BLOCK_M``), tail tiles (``TAIL_BLOCK``) and the dropout
  generator's rounds (``PHILOX_ROUNDS``); ``benchmarks/attention_kernel_check.py``
  times the choices. Removed after losing to the baseline's 6.53 ms (session 12's H100,
  ``results/gpu/session12/kernel_timing.json``; skip_merge and bits had lost twice before):
  ``paired_levels`` 6.92 ms, ``skip_merge`` 7.16, ``dropout_mask`` "bits" 7.16.

The filter keeps ``scores >= threshold`` and the threshold is itself one of the row's scores, so
forward and backward must compute every score bit for bit the same: every kernel forms them with
the same ``_score_tile`` on tiles of the same shape (but with ``bwd_block_m``, which gives the
dK / dV programs query tiles of their own: only the GPU agreement check can tell whether that
shape's products come out alike; see ``BWD_BLOCK_M``).

Registered as ``torch.library.custom_op`` (``nkat::attention_kernel_fwd`` / ``_bwd``) with a fake
implementation and an autograd formula, so ``torch.compile`` treats the pair as one opaque op and
CUDA graphs capture its launches. The dropout seed is an int64 tensor drawn from torch's generator
on the tensors' device at every call (so it changes per step, follows ``torch.manual_seed``, and is
not baked into a CUDA graph), and the same tensor goes to backward.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from nkat_search.train.attention import dropout_on, filter_levels, level_count, nucleus_on

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only environment may lack Triton; the kernel path is then never taken
    triton = None

# The level walk costs two row reductions per level and tile; past this many levels (top_k off or
# >= N with the nucleus on: one level per distinct value) the explicit path's sort is the tool.
KERNEL_MAX_LEVELS = 16
# Head dims are padded to a power of two in registers (48 and 56 run as 64); larger ones would
# need more registers than the tiles below leave, and none of the searched configs has them.
KERNEL_MAX_HEAD_DIM = 64
# Tiles of 64 keys cover a 257-token row in 5 tiles (320 columns) instead of one power-of-two
# tile of 512. Session 8's H100 (batch 512, 257 tokens, bf16, dropout 0.17, forward + backward,
# results/gpu/session8/kernel_timing.json): 64 x 64 with 4 warps 6.46 ms, 64 x 32 6.58 ms (atomic
# backward); session 7 had dropped 64 x 64 w8, 32 x 64, 128 x 64 and 128 x 32 (all slower). All
# kernels use the same tiles (see ``_score_tile``).
BLOCK_M = 64
BLOCK_N = 64
NUM_WARPS = 4
# The backward programs' warps (None: NUM_WARPS). Each backward program holds more tiles than the
# forward's (dK and dV accumulators besides the score, dP and dS tiles), and at 4 warps ptxas
# cannot keep them in registers: sm_90 code from Triton 3.8 at 64 x 64 tiles, bf16, used 255
# registers a thread and spilled (stores) 352 bytes in dK / dV (atomic), 384 in the sparse slots
# and 1,780 in the sparse dK / dV; at 8 warps none spilled but the sparse dK / dV (380 bytes),
# and the forward did not spill at 4 (benchmarks/kernel_registers.py,
# results/kernel_registers.json). Triton 3.6, the GPU machine's, spills more: atomic dK / dV 676
# bytes at 4 warps and 148 at 8; only the split backward at 64 x 32 tiles and 8 warps spills
# nothing (results/kernel_registers_triton36.json). Untimed: attention_kernel_check.py times 8
# against 4 per backward mode; the forward at 8 warps was the slowest tile choice in session 7.
BWD_NUM_WARPS = None
# The query tile of the dK / dV program's inner loop, and of the sparse backward's slots program
# (None: the forward's BLOCK_M). That program keeps a key block's dK and dV accumulators and loops
# over query tiles, so a smaller query tile shrinks every score-sized tile it holds (scores,
# probabilities, dP, dS, the dropout mask) without touching the accumulators; FlashAttention-2's
# Triton backward uses 32 there for the same reason. At 32 rows and the default 64-key tiles on 4
# warps no dK / dV program but the sparse one spills, under Triton 3.6 and 3.8 alike (atomic
# 255 registers, 0 bytes; results/kernel_registers_triton36.json, kernel_registers.json). The
# catch: the backward must form each score bit for bit as the forward did, and a 32-row tile
# may be multiplied with other MMA instructions than the forward's 64 rows; the GPU agreement
# check (benchmarks/attention_kernel_check.py) shows that as rows off. Untimed, so off.
BWD_BLOCK_M = None
# Software pipelining depth of the key loops (Triton's num_stages); None is Triton's default (3 on
# sm_90). Session 8's H100: 1 stage 7.05 ms, 2 stages 6.61, 3 stages 6.34, the default 6.46 (the
# same launch as 3: about 2 % is run-to-run noise), so the default stays.
NUM_STAGES = None
# The sparsity idea at tile granularity: a (query block, key block) tile whose
# probabilities are all 0 skips its P V (forward), dO V^T, dV and dK (backward) and dQ products.
# With top_k of 257 keys a row keeps a few keys, but 64 rows rarely miss a whole 64-key tile on
# random data, so the gain depends on how trained attention concentrates; off until measured
# (``benchmarks/attention_kernel_check.py`` times both).
SKIP_EMPTY_TILES = False
# The dropout mask costs one Philox call (PHILOX_ROUNDS rounds of 32-bit multiplies) per 4
# entries instead of per entry: a call yields 4 numbers, used by 4 consecutive columns of one row.
# Each kernel regenerates the mask (forward, and each backward tile), so this cuts the Philox
# multiplies about 3.5-fold (each kernel's sm_90 code at 64 x 64 tiles and 10 rounds: 146 mul.hi
# instructions instead of 514) for one layout conversion of the boolean tile into the MMA layout
# (the four outputs are interleaved into columns). Fixed, not an argument: ``_dropout_keep``
# hard-wires the interleave.
DROPOUT_COLUMNS_PER_PHILOX = 4
# Backward: "split" runs one kernel per key block (dK, dV) and one per query block (dQ), each
# recomputing the scores, probabilities, dO V^T and dropout mask of every tile; "atomic" runs the
# first only and adds each tile's dS K into a float32 dQ with atomics (FlashAttention-2's way):
# half the recomputation, for atomic traffic, a (B, H, N, head_dim) float32 buffer and a float32
# sum order that varies from run to run. Session 8's H100 (forward + backward as above): atomic
# 6.46 ms against split 7.34 at 64 x 64 tiles, 6.58 against 7.13 at 64 x 32; both passed the
# agreement check there (results/gpu/session8/kernel_check_log.txt).
BWD_MODE = "atomic"
BWD_MODES = ("split", "atomic", "sparse")
# bwd_mode "sparse" (issue 22's sparsity idea, untimed): with top_k on, a row keeps top_k of its
# N keys (more only on ties), so backward needs no N x N product but the scores once. The first
# kernel finds each row's kept entries (up to SPARSE_SLOTS; a query tile with a row of more takes
# the dense tiles, exactly) and forms dP, dS and dQ from gathered k and v rows; the second spreads
# dS and the weights onto each key block's tiles for dK and dV, two products per tile instead of
# five, with no exp and no dropout mask over the tile. Without top_k (or top_k >= N) it is "atomic".
SPARSE_SLOTS = 16
# Tail tiles. With tiles of 64, a 257-token row (256 patches and the CLS token) takes 5 key tiles
# and 5 query blocks, the last of each holding 1 valid row or key: 25 tile pairs of work for
# 16.1 useful, and every kernel pays it (the first pass's level walk too). With a tail block T,
# the rows and keys below the last multiple of the full tile go in full tiles and the rest in
# tiles of T (16: 4 full tiles and one of 16, rows and keys: 18.1 tile pairs' work at 257 tokens).
# Every kernel forms the score of (row, key) on a tile of the same shape (full or tail, per row
# and per key), so forward and backward still compute it bit for bit the same. 0: off (one tile
# size, the last tile masked). 16 is the default since session 12's H100 (batch 512, 257 tokens,
# bf16, dropout 0.17, results/gpu/session12/kernel_timing.json): forward + backward 6.14 ms
# against 6.53 with tail_block 0, forward only 2.45 against 2.77, no filter 4.53 against 4.91; it
# passed the agreement check and, on random bf16 data, matched tail_block 0 with 0 rows off.
TAIL_BLOCK = 16
# Philox rounds per call of the dropout mask's generator. Triton's default is 10, Random123's
# margin over the 7 that its authors found to pass TestU01's BigCrush (Salmon et al., SC 2011,
# "Parallel random numbers: as easy as 1, 2, 3"); a dropout mask needs no more. Every kernel
# regenerates the mask (forward, and each backward tile), so the rounds are a share of the
# mask's cost (1.4 ms of the core's 6.5 at 257 tokens, session 11's H100). The mask depends on
# them, so forward and backward take the same. 7 is the default since session 12's H100 (as
# TAIL_BLOCK): 6.37 ms against 6.53 with 10 rounds; at dropout 0.3 it kept 0.6992 of the entries
# (expected 0.7000 +- 0.0006) and forward and backward used one mask.
PHILOX_ROUNDS = 7


def kernel_available() -> bool:
    """Whether Triton is importable here (the kernel itself then runs on CUDA, or on the CPU
    under ``TRITON_INTERPRET=1``)."""
    return triton is not None


def kernel_supports(head_dim: int, top_k: int, top_p: float | Tensor, n: int) -> bool:
    """Whether ``kernel_attention`` takes this head dim and filter for rows of ``n`` keys."""
    return (kernel_available() and head_dim <= KERNEL_MAX_HEAD_DIM
            and filter_levels(top_k, top_p, n) <= KERNEL_MAX_LEVELS)


if triton is not None:

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr):
        if PRECISION == "upcast":
            # Triton's interpreter multiplies bf16 operands as raw integers (Triton 3.8); bf16
            # values are exact in float32, so the CPU tests upcast them instead.
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(a, b, input_precision=PRECISION)
        return out

    @triton.jit
    def _score_tile(q, k, col_ok, scale, PRECISION: tl.constexpr):
        # The one place scores are formed: forward and both backward kernels must agree bit for
        # bit, because the filter keeps scores >= a threshold that is one of the scores.
        s = _dot(q, tl.trans(k), PRECISION) * scale
        return tl.where(col_ok[None, :], s, float("-inf"))

    @triton.jit
    def _key_scores(q, k_base, start, skn, skd, dims, dim_ok, N, scale, BLOCK_N: tl.constexpr,
                    PRECISION: tl.constexpr):
        # The key tile from start (BLOCK_N keys) and its scores against q, for the tiles that
        # walk over keys: its columns, their mask (with the head dims') and the loaded keys too.
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        kv_mask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_base + cols[:, None] * skn + dims[None, :] * skd, mask=kv_mask, other=0.0)
        return cols, kv_mask, k, _score_tile(q, k, col_ok, scale, PRECISION)

    @triton.jit
    def _any_kept(p, SKIP_EMPTY: tl.constexpr):
        # Whether a tile of probabilities needs its products (always, unless SKIP_EMPTY): with
        # top_k of 257 keys most entries are 0, and a tile where every entry is 0 adds nothing.
        if SKIP_EMPTY:
            active = tl.max(tl.max(p, 1), 0) > 0
        else:
            active = True
        return active

    @triton.jit
    def _dropout_keep(seed, bh, rows, col0, N, dropout_p, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, ROUNDS: tl.constexpr):
        # Philox keyed by (seed, batch x head) on the entry's offset in its N x N row block: the
        # offset stays below 2**31 for rows up to 46,340 keys, and the key separates the heads.
        # One Philox call yields 4 numbers, so one call serves 4 consecutive columns
        # (DROPOUT_COLUMNS_PER_PHILOX): entry (r, c) takes output c % 4 of the call at offset
        # r * N + c - c % 4. The mask stays a function of (seed, batch x head, row, column)
        # alone, the same in every kernel for any tiles of a multiple of 4 columns.
        key = seed + bh.to(tl.int64) * 4294967296
        quads = col0 + 4 * tl.arange(0, BLOCK_N // 4)
        u0, u1, u2, u3 = tl.rand4x(key, rows[:, None] * N + quads[None, :], ROUNDS)
        # (row, quad, 2, 2) in row-major order is column 4 * quad + 2 * i + j: outputs 0, 1, 2, 3.
        keep = tl.join(tl.join(u0 >= dropout_p, u2 >= dropout_p),
                       tl.join(u1 >= dropout_p, u3 >= dropout_p))
        return tl.reshape(keep, [BLOCK_M, BLOCK_N])

    @triton.jit
    def _merge_tile(
        q, k_base, start, skn, skd, dims, dim_ok, N, scale, values, counts, slots,
        LEVELS: tl.constexpr, LEVELS_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # One key tile of the first pass: merged into each row's list of the LEVELS largest
        # distinct scores with their counts. The union's levels from the top, each the largest
        # value below the previous one, its count summed over tile and list.
        _, _, _, s = _key_scores(q, k_base, start, skn, skd, dims, dim_ok, N, scale, BLOCK_N,
                                 PRECISION)
        new_values = tl.full([BLOCK_M, LEVELS_PAD], float("-inf"), tl.float32)
        new_counts = tl.zeros([BLOCK_M, LEVELS_PAD], tl.int32)
        prev = tl.full([BLOCK_M], float("inf"), tl.float32)
        for i in tl.static_range(LEVELS):
            level = tl.maximum(
                tl.max(tl.where(s < prev[:, None], s, float("-inf")), 1),
                tl.max(tl.where(values < prev[:, None], values, float("-inf")), 1))
            count = (tl.sum((s == level[:, None]).to(tl.int32), 1)
                     + tl.sum(tl.where(values == level[:, None], counts, 0), 1))
            # -inf is padding (columns past N, empty slots), never a score.
            count = tl.where(level == float("-inf"), 0, count)
            new_values = tl.where(slots[None, :] == i, level[:, None], new_values)
            new_counts = tl.where(slots[None, :] == i, count[:, None], new_counts)
            prev = level
        return new_values, new_counts

    @triton.jit
    def _filter_threshold(
        q, k_base, skn, skd, dims, dim_ok, N, N_FULL, scale, top_p,
        TOP_K: tl.constexpr, TOPK_ON: tl.constexpr, NUCLEUS_ON: tl.constexpr,
        LEVELS: tl.constexpr, LEVELS_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, TAIL: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # The forward's first pass over the keys, when a filter is on: each row's threshold and
        # the log-sum-exp of its kept scores, from the LEVELS largest distinct scores of the row
        # with their counts. Keys below N_FULL in tiles of BLOCK_N, the rest in tiles of TAIL
        # (TAIL 0: N_FULL is N and BLOCK_N tiles cover every key).
        slots = tl.arange(0, LEVELS_PAD)
        values = tl.full([BLOCK_M, LEVELS_PAD], float("-inf"), tl.float32)
        counts = tl.zeros([BLOCK_M, LEVELS_PAD], tl.int32)
        for start in range(0, N_FULL, BLOCK_N):
            values, counts = _merge_tile(q, k_base, start, skn, skd, dims, dim_ok, N, scale,
                                         values, counts, slots, LEVELS, LEVELS_PAD, BLOCK_M,
                                         BLOCK_N, PRECISION)
        if TAIL > 0:
            for start in range(N_FULL, N, TAIL):
                values, counts = _merge_tile(q, k_base, start, skn, skd, dims, dim_ok, N, scale,
                                             values, counts, slots, LEVELS, LEVELS_PAD, BLOCK_M,
                                             TAIL, PRECISION)

        # The threshold and kept mass from the levels, in row_filter's order of operations.
        row_max = tl.max(values, 1)
        above = tl.zeros([BLOCK_M], tl.int32)
        topk_mass = tl.zeros([BLOCK_M], tl.float32)
        level_masses = tl.zeros([BLOCK_M, LEVELS_PAD], tl.float32)
        level_kept = tl.zeros([BLOCK_M, LEVELS_PAD], tl.int32)
        threshold = row_max
        for i in tl.static_range(LEVELS):
            value = tl.sum(tl.where(slots[None, :] == i, values, 0.0), 1)
            count = tl.sum(tl.where(slots[None, :] == i, counts, 0), 1)
            if TOPK_ON:
                kept = (count > 0) & (above < TOP_K)
            else:
                kept = count > 0
            level_mass = tl.where(kept, count.to(tl.float32) * tl.exp(value - row_max), 0.0)
            if i == 0:
                topk_mass = level_mass
            else:
                topk_mass = topk_mass + level_mass
                if not NUCLEUS_ON:
                    threshold = tl.where(kept, value, threshold)
            level_masses = tl.where(slots[None, :] == i, level_mass[:, None], level_masses)
            level_kept = tl.where(slots[None, :] == i, kept.to(tl.int32)[:, None], level_kept)
            above = above + count
        mass = topk_mass
        if NUCLEUS_ON:
            mass = tl.sum(tl.where(slots[None, :] == 0, level_masses, 0.0), 1)
            above_mass = mass
            for i in tl.static_range(1, LEVELS):
                value = tl.sum(tl.where(slots[None, :] == i, values, 0.0), 1)
                level_mass = tl.sum(tl.where(slots[None, :] == i, level_masses, 0.0), 1)
                kept = tl.sum(tl.where(slots[None, :] == i, level_kept, 0), 1) > 0
                keep = kept & (above_mass / topk_mass < top_p)
                threshold = tl.where(keep, value, threshold)
                mass = mass + tl.where(keep, level_mass, 0.0)
                above_mass = above_mass + level_mass
        lse = row_max + tl.log(mass)
        return threshold, lse

    @triton.jit
    def _fwd_tile(
        q, k_base, v_base, start, skn, skd, svn, svd, dims, dim_ok, N, scale, acc, row_max,
        total, threshold, lse, seed, dropout_p, inv_keep, bh, rows,
        LEVELS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, SKIP_EMPTY: tl.constexpr,
        ROUNDS: tl.constexpr,
    ):
        # One key tile of the second pass: weights (filter, softmax, dropout) @ v. Without a
        # filter (LEVELS 0) the online softmax: the row max so far, the sum and the accumulator
        # rescaled whenever it grows, as in FlashAttention.
        cols, kv_mask, k, s = _key_scores(q, k_base, start, skn, skd, dims, dim_ok, N, scale,
                                          BLOCK_N, PRECISION)
        if LEVELS == 0:
            new_max = tl.maximum(row_max, tl.max(s, 1))
            rescale = tl.exp(row_max - new_max)
            p = tl.exp(s - new_max[:, None])
            total = total * rescale + tl.sum(p, 1)
            acc = acc * rescale[:, None]
            row_max = new_max
        else:
            p = tl.where(s >= threshold[:, None], tl.exp(s - lse[:, None]), 0.0)
        if _any_kept(p, SKIP_EMPTY):
            if DROPOUT:
                survives = _dropout_keep(seed, bh, rows, start, N, dropout_p, BLOCK_M, BLOCK_N,
                                         ROUNDS)
                p = tl.where(survives, p * inv_keep, 0.0)
            v = tl.load(v_base + cols[:, None] * svn + dims[None, :] * svd, mask=kv_mask,
                        other=0.0)
            acc += _dot(p.to(v.dtype), v, PRECISION)
        return acc, row_max, total

    @triton.jit
    def _fwd_kernel(
        Q, K, V, O, THR, LSE, SEED,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
        H, N, D, KNOBS, ROW0, N_FULL,
        TOP_K: tl.constexpr, TOPK_ON: tl.constexpr, NUCLEUS_ON: tl.constexpr,
        LEVELS: tl.constexpr, LEVELS_PAD: tl.constexpr, DROPOUT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TAIL: tl.constexpr,
        PRECISION: tl.constexpr, SKIP_EMPTY: tl.constexpr, ROUNDS: tl.constexpr,
    ):
        # Rows ROW0 + pid * BLOCK_M onwards; keys below N_FULL in tiles of BLOCK_N, the rest in
        # tiles of TAIL (see TAIL_BLOCK). A trial's scale, top_p and dropout rate are loaded, not
        # arguments: a compiled graph then takes them as an input (see _knobs) and trials share
        # its cache entry.
        scale = tl.load(KNOBS)
        top_p = tl.load(KNOBS + 1)
        dropout_p = tl.load(KNOBS + 2)
        inv_keep = tl.load(KNOBS + 3)
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        bh = b * H + h
        rows = ROW0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < N
        dim_ok = dims < D
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :] * sqd,
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh

        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        if LEVELS == 0:
            threshold = tl.full([BLOCK_M], float("-inf"), tl.float32)
            lse = tl.zeros([BLOCK_M], tl.float32)
        else:
            threshold, lse = _filter_threshold(
                q, k_base, skn, skd, dims, dim_ok, N, N_FULL, scale, top_p, TOP_K, TOPK_ON,
                NUCLEUS_ON, LEVELS, LEVELS_PAD, BLOCK_M, BLOCK_N, TAIL, PRECISION)

        # Weights @ v: the second pass with a filter, the only one without.
        seed = tl.load(SEED)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, N_FULL, BLOCK_N):
            acc, row_max, total = _fwd_tile(
                q, k_base, v_base, start, skn, skd, svn, svd, dims, dim_ok, N, scale, acc,
                row_max, total, threshold, lse, seed, dropout_p, inv_keep, bh, rows, LEVELS,
                DROPOUT, BLOCK_M, BLOCK_N, PRECISION, SKIP_EMPTY, ROUNDS)
        if TAIL > 0:
            for start in range(N_FULL, N, TAIL):
                acc, row_max, total = _fwd_tile(
                    q, k_base, v_base, start, skn, skd, svn, svd, dims, dim_ok, N, scale, acc,
                    row_max, total, threshold, lse, seed, dropout_p, inv_keep, bh, rows, LEVELS,
                    DROPOUT, BLOCK_M, TAIL, PRECISION, SKIP_EMPTY, ROUNDS)
        if LEVELS == 0:
            acc = acc / total[:, None]
            lse = row_max + tl.log(total)
        tl.store(O + b * sob + h * soh + rows[:, None] * son + dims[None, :] * sod,
                 acc.to(O.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
        tl.store(THR + bh * N + rows, threshold, mask=row_ok)
        tl.store(LSE + bh * N + rows, lse, mask=row_ok)

    @triton.jit
    def _bwd_kv_tile(
        THR, LSE, DELTA, DQ_ACC, q_base, do_base, start, sqn, sqd, sdn, sdd, k, v,
        dk, dv, cols, col0, col_ok, dims, dim_ok, bh, N, D, scale, dropout_p, inv_keep, seed,
        DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, SKIP_EMPTY: tl.constexpr, ATOMIC_DQ: tl.constexpr,
        ROUNDS: tl.constexpr,
    ):
        # One query tile of a key block's backward: its share of dK and dV (and of dQ, atomic).
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        qo_mask = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(q_base + rows[:, None] * sqn + dims[None, :] * sqd, mask=qo_mask, other=0.0)
        # Rows past N: threshold +inf keeps nothing.
        threshold = tl.load(THR + bh * N + rows, mask=row_ok, other=float("inf"))
        lse = tl.load(LSE + bh * N + rows, mask=row_ok, other=0.0)
        s = _score_tile(q, k, col_ok, scale, PRECISION)
        p = tl.where(s >= threshold[:, None], tl.exp(s - lse[:, None]), 0.0)
        if _any_kept(p, SKIP_EMPTY):
            do = tl.load(do_base + rows[:, None] * sdn + dims[None, :] * sdd, mask=qo_mask,
                         other=0.0)
            delta = tl.load(DELTA + bh * N + rows, mask=row_ok, other=0.0)
            dw = _dot(do, tl.trans(v), PRECISION)
            if DROPOUT:
                keep = _dropout_keep(seed, bh, rows, col0, N, dropout_p, BLOCK_M, BLOCK_N, ROUNDS)
                w = tl.where(keep, p * inv_keep, 0.0)
                dp = tl.where(keep, dw * inv_keep, 0.0)
            else:
                w = p
                dp = dw
            dv += _dot(tl.trans(w.to(do.dtype)), do, PRECISION)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION)
            if ATOMIC_DQ:
                # Relaxed: only the sum matters, no other memory is ordered by it.
                dq = _dot(ds.to(k.dtype), k, PRECISION) * scale
                tl.atomic_add(DQ_ACC + (bh * N + rows[:, None]) * D + dims[None, :], dq,
                              mask=qo_mask, sem="relaxed")
        return dk, dv

    @triton.jit
    def _bwd_kv_kernel(
        Q, K, V, DO, THR, LSE, DELTA, DK, DV, DQ_ACC, SEED, IDX, DSS, WS, COUNT,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
        sgb, sgh, sgn, sgd,
        H, N, D, KNOBS, COL0, M_FULL,
        DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, TAIL: tl.constexpr, PRECISION: tl.constexpr,
        SKIP_EMPTY: tl.constexpr, ATOMIC_DQ: tl.constexpr, ROUNDS: tl.constexpr,
        SPARSE: tl.constexpr, S: tl.constexpr,
    ):
        # dK and dV of one key block (keys COL0 + pid * BLOCK_N onwards), over every query block:
        # rows below M_FULL in tiles of BLOCK_M, the rest in tiles of TAIL. DK and DV share the
        # strides sg*. bwd_mode "atomic" (ATOMIC_DQ): the block's share of dQ, dS K, is added
        # into DQ_ACC too (float32, contiguous (B, H, N, D), zeroed). "split": dQ comes from
        # _bwd_q_kernel and DQ_ACC is any pointer, never read. "sparse" (SPARSE): each query
        # tile from the S slots _bwd_slots_kernel filled (IDX, DSS, WS, COUNT; without SPARSE
        # any pointers, never read), see _bwd_kv_query_tile.
        scale = tl.load(KNOBS)
        dropout_p = tl.load(KNOBS + 2)
        inv_keep = tl.load(KNOBS + 3)
        pid_n = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        bh = b * H + h
        col0 = COL0 + pid_n * BLOCK_N
        cols = col0 + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        col_ok = cols < N
        dim_ok = dims < D
        kv_mask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + dims[None, :] * skd,
                    mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + dims[None, :] * svd,
                    mask=kv_mask, other=0.0)
        seed = tl.load(SEED)
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start in range(0, M_FULL, BLOCK_M):
            dk, dv = _bwd_kv_query_tile(
                THR, LSE, DELTA, DQ_ACC, IDX, DSS, WS, COUNT, q_base, do_base, start, sqn, sqd,
                sdn, sdd, k, v, dk, dv, cols, col0, col_ok, dims, dim_ok, bh, N, D, scale,
                dropout_p, inv_keep, seed, S, DROPOUT, BLOCK_M, BLOCK_N, PRECISION, SKIP_EMPTY,
                ATOMIC_DQ, SPARSE, ROUNDS)
        if TAIL > 0:
            for start in range(M_FULL, N, TAIL):
                dk, dv = _bwd_kv_query_tile(
                    THR, LSE, DELTA, DQ_ACC, IDX, DSS, WS, COUNT, q_base, do_base, start, sqn,
                    sqd, sdn, sdd, k, v, dk, dv, cols, col0, col_ok, dims, dim_ok, bh, N, D,
                    scale, dropout_p, inv_keep, seed, S, DROPOUT, TAIL, BLOCK_N, PRECISION,
                    SKIP_EMPTY, ATOMIC_DQ, SPARSE, ROUNDS)
        dk = dk * scale
        g = b * sgb + h * sgh + cols[:, None] * sgn + dims[None, :] * sgd
        tl.store(DK + g, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + g, dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _bwd_q_tile(
        q, do, k_base, v_base, start, skn, skd, svn, svd, dq, threshold, lse, delta, rows,
        dims, dim_ok, bh, N, scale, dropout_p, inv_keep, seed,
        DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, SKIP_EMPTY: tl.constexpr, ROUNDS: tl.constexpr,
    ):
        # One key tile of a query block's dQ.
        cols, kv_mask, k, s = _key_scores(q, k_base, start, skn, skd, dims, dim_ok, N, scale,
                                          BLOCK_N, PRECISION)
        p = tl.where(s >= threshold[:, None], tl.exp(s - lse[:, None]), 0.0)
        if _any_kept(p, SKIP_EMPTY):
            v = tl.load(v_base + cols[:, None] * svn + dims[None, :] * svd, mask=kv_mask,
                        other=0.0)
            dw = _dot(do, tl.trans(v), PRECISION)
            if DROPOUT:
                keep = _dropout_keep(seed, bh, rows, start, N, dropout_p, BLOCK_M, BLOCK_N,
                                     ROUNDS)
                dw = tl.where(keep, dw * inv_keep, 0.0)
            ds = p * (dw - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, PRECISION)
        return dq

    @triton.jit
    def _bwd_q_kernel(
        Q, K, V, DO, THR, LSE, DELTA, DQ, SEED,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
        sgb, sgh, sgn, sgd,
        H, N, D, KNOBS, ROW0, N_FULL,
        DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, TAIL: tl.constexpr, PRECISION: tl.constexpr,
        SKIP_EMPTY: tl.constexpr, ROUNDS: tl.constexpr,
    ):
        # dQ of one query block (rows ROW0 + pid * BLOCK_M onwards), over every key block.
        scale = tl.load(KNOBS)
        dropout_p = tl.load(KNOBS + 2)
        inv_keep = tl.load(KNOBS + 3)
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        bh = b * H + h
        rows = ROW0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < N
        dim_ok = dims < D
        qo_mask = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :] * sqd,
                    mask=qo_mask, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + dims[None, :] * sdd,
                     mask=qo_mask, other=0.0)
        threshold = tl.load(THR + bh * N + rows, mask=row_ok, other=float("inf"))
        lse = tl.load(LSE + bh * N + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * N + rows, mask=row_ok, other=0.0)
        seed = tl.load(SEED)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        for start in range(0, N_FULL, BLOCK_N):
            dq = _bwd_q_tile(q, do, k_base, v_base, start, skn, skd, svn, svd, dq, threshold,
                             lse, delta, rows, dims, dim_ok, bh, N, scale, dropout_p, inv_keep,
                             seed, DROPOUT, BLOCK_M, BLOCK_N, PRECISION, SKIP_EMPTY, ROUNDS)
        if TAIL > 0:
            for start in range(N_FULL, N, TAIL):
                dq = _bwd_q_tile(q, do, k_base, v_base, start, skn, skd, svn, svd, dq,
                                 threshold, lse, delta, rows, dims, dim_ok, bh, N, scale,
                                 dropout_p, inv_keep, seed, DROPOUT, BLOCK_M, TAIL, PRECISION,
                                 SKIP_EMPTY, ROUNDS)
        dq = dq * scale
        tl.store(DQ + b * sgb + h * sgh + rows[:, None] * sgn + dims[None, :] * sgd,
                 dq.to(DQ.dtype.element_ty), mask=qo_mask)


    @triton.jit
    def _slot_dropout_keep(seed, bh, rows, cols, N, dropout_p, ROUNDS: tl.constexpr):
        # _dropout_keep's bit for one (row, column) pair per row: the Philox call at the offset
        # of the column's group of 4, its output cols % 4 (the same bit as in any tile).
        key = seed + bh.to(tl.int64) * 4294967296
        u0, u1, u2, u3 = tl.rand4x(key, rows * N + (cols - cols % 4), ROUNDS)
        lane = cols % 4
        u = tl.where(lane == 0, u0, tl.where(lane == 1, u1, tl.where(lane == 2, u2, u3)))
        return u >= dropout_p

    @triton.jit
    def _slot_scatter_tile(
        q, k_base, start, skn, skd, dims, dim_ok, N, scale, threshold, lse, count, slot_base,
        IDX, PS, S: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # One key tile of the sparse backward's first kernel: each row's kept entries (scores at
        # or above its threshold, formed as in the forward) appended to its S slots: column and
        # probability. Entries past S are counted, not stored (count > S sends the query tile
        # to the dense tiles).
        cols, _, _, s = _key_scores(q, k_base, start, skn, skd, dims, dim_ok, N, scale, BLOCK_N,
                                    PRECISION)
        kept = s >= threshold[:, None]
        pos = count[:, None] + tl.cumsum(kept.to(tl.int32), 1) - 1
        ok = kept & (pos < S)
        at = slot_base[:, None] + pos
        tl.store(IDX + at, tl.zeros_like(pos) + cols[None, :], mask=ok)
        tl.store(PS + at, tl.exp(s - lse[:, None]), mask=ok)
        return count + tl.sum(kept.to(tl.int32), 1)

    @triton.jit
    def _bwd_slots_kernel(
        Q, K, V, DO, THR, LSE, DELTA, DQ_ACC, SEED, IDX, PS, DSS, WS, COUNT,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
        H, N, D, KNOBS, ROW0, N_FULL,
        S: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, TAIL: tl.constexpr, PRECISION: tl.constexpr,
        SKIP_EMPTY: tl.constexpr, ROUNDS: tl.constexpr,
    ):
        # bwd_mode "sparse", first kernel, one query block (rows ROW0 + pid * BLOCK_M onwards):
        # the kept entries into slots (one pass of scores over the keys, as the forward's tiles),
        # then per slot the gathered v and k rows give dP, dS and dQ without any N x N product.
        # dS and the dropped-out weights go to their slots for the key-block kernel. A block with
        # a row of more than S kept entries (ties) stores no dQ: the key-block kernel then takes
        # its tiles the dense way and adds their dQ into DQ_ACC (zeroed) with atomics.
        scale = tl.load(KNOBS)
        dropout_p = tl.load(KNOBS + 2)
        inv_keep = tl.load(KNOBS + 3)
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        bh = b * H + h
        rows = ROW0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < N
        dim_ok = dims < D
        qo_mask = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :] * sqd,
                    mask=qo_mask, other=0.0)
        threshold = tl.load(THR + bh * N + rows, mask=row_ok, other=float("inf"))
        lse = tl.load(LSE + bh * N + rows, mask=row_ok, other=0.0)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        slot_base = (bh * N + rows) * S
        count = tl.zeros([BLOCK_M], tl.int32)
        for start in range(0, N_FULL, BLOCK_N):
            count = _slot_scatter_tile(q, k_base, start, skn, skd, dims, dim_ok, N, scale,
                                       threshold, lse, count, slot_base, IDX, PS, S, BLOCK_N,
                                       PRECISION)
        if TAIL > 0:
            for start in range(N_FULL, N, TAIL):
                count = _slot_scatter_tile(q, k_base, start, skn, skd, dims, dim_ok, N, scale,
                                           threshold, lse, count, slot_base, IDX, PS, S, TAIL,
                                           PRECISION)
        tl.store(COUNT + bh * N + rows, count, mask=row_ok)
        # The slots just stored are read back by other threads of this program.
        tl.debug_barrier()
        do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + dims[None, :] * sdd,
                     mask=qo_mask, other=0.0).to(tl.float32)
        delta = tl.load(DELTA + bh * N + rows, mask=row_ok, other=0.0)
        seed = tl.load(SEED)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # As many slots as the block's fullest row fills: the nucleus often keeps 1 to 3.
        for j in range(0, tl.minimum(tl.max(count, 0), S)):
            ok = row_ok & (j < count)
            col = tl.load(IDX + slot_base + j, mask=ok, other=0)
            p = tl.load(PS + slot_base + j, mask=ok, other=0.0)
            gather = ok[:, None] & dim_ok[None, :]
            v = tl.load(v_base + col[:, None] * svn + dims[None, :] * svd, mask=gather, other=0.0)
            dw = tl.sum(do * v.to(tl.float32), 1)
            if DROPOUT:
                keep = _slot_dropout_keep(seed, bh, rows, col, N, dropout_p, ROUNDS)
                w = tl.where(keep, p * inv_keep, 0.0)
                dp = tl.where(keep, dw * inv_keep, 0.0)
            else:
                w = p
                dp = dw
            ds = p * (dp - delta)
            k = tl.load(k_base + col[:, None] * skn + dims[None, :] * skd, mask=gather, other=0.0)
            dq += ds[:, None] * k.to(tl.float32)
            tl.store(DSS + slot_base + j, ds, mask=ok)
            tl.store(WS + slot_base + j, w, mask=ok)
        fits = tl.max(count, 0) <= S
        tl.store(DQ_ACC + (bh * N + rows[:, None]) * D + dims[None, :], dq * scale,
                 mask=qo_mask & fits)

    @triton.jit
    def _bwd_kv_query_tile(
        THR, LSE, DELTA, DQ_ACC, IDX, DSS, WS, COUNT, q_base, do_base, start, sqn, sqd, sdn,
        sdd, k, v, dk, dv, cols, col0, col_ok, dims, dim_ok, bh, N, D, scale, dropout_p,
        inv_keep, seed,
        S: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, SKIP_EMPTY: tl.constexpr, ATOMIC_DQ: tl.constexpr,
        SPARSE: tl.constexpr, ROUNDS: tl.constexpr,
    ):
        # One query tile of a key block's backward. Dense (_bwd_kv_tile) unless SPARSE: then dS
        # and the weights from the rows' slots, spread onto the tile's columns, and dK and dV as
        # two products; a tile with a row of more than S kept entries is taken the dense way
        # (its dQ added with atomics).
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        if SPARSE:
            count = tl.load(COUNT + bh * N + rows, mask=row_ok, other=0)
            if tl.max(count, 0) > S:
                dk, dv = _bwd_kv_tile(
                    THR, LSE, DELTA, DQ_ACC, q_base, do_base, start, sqn, sqd, sdn, sdd, k, v,
                    dk, dv, cols, col0, col_ok, dims, dim_ok, bh, N, D, scale, dropout_p,
                    inv_keep, seed, DROPOUT, BLOCK_M, BLOCK_N, PRECISION, SKIP_EMPTY, True,
                    ROUNDS)
            else:
                qo_mask = row_ok[:, None] & dim_ok[None, :]
                slot_base = (bh * N + rows) * S
                ds = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                w = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for j in range(0, tl.max(count, 0)):
                    ok = row_ok & (j < count)
                    col = tl.load(IDX + slot_base + j, mask=ok, other=-1)
                    hit = col[:, None] == cols[None, :]
                    ds += tl.where(hit, tl.load(DSS + slot_base + j, mask=ok,
                                                other=0.0)[:, None], 0.0)
                    w += tl.where(hit, tl.load(WS + slot_base + j, mask=ok,
                                               other=0.0)[:, None], 0.0)
                q = tl.load(q_base + rows[:, None] * sqn + dims[None, :] * sqd, mask=qo_mask,
                            other=0.0)
                do = tl.load(do_base + rows[:, None] * sdn + dims[None, :] * sdd, mask=qo_mask,
                             other=0.0)
                dv += _dot(tl.trans(w.to(do.dtype)), do, PRECISION)
                dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION)
        else:
            dk, dv = _bwd_kv_tile(
                THR, LSE, DELTA, DQ_ACC, q_base, do_base, start, sqn, sqd, sdn, sdd, k, v, dk,
                dv, cols, col0, col_ok, dims, dim_ok, bh, N, D, scale, dropout_p, inv_keep, seed,
                DROPOUT, BLOCK_M, BLOCK_N, PRECISION, SKIP_EMPTY, ATOMIC_DQ, ROUNDS)
        return dk, dv


# Grids are (row blocks, heads, batch): CUDA allows 65,535 programs along the last two axes, so
# batch x heads on one of them would stop at batch 8,191 with 8 heads.


def _blocks(n: int, d: int, block_m: int, block_n: int) -> tuple[int, int, int]:
    """Tile sizes: the defaults, shrunk to a 16-multiple power of two for short rows (tl.dot
    needs 16 at least)."""
    fit = max(16, triton.next_power_of_2(n))
    return min(block_m, fit), min(block_n, fit), max(16, triton.next_power_of_2(d))


def _tiling(n: int, d: int, block_m: int, block_n: int, tail_block: int
            ) -> tuple[int, int, int, int, int, int]:
    """``(bm, bn, bd, tail, m_full, n_full)``: the tile sizes (``_blocks``), the tail tile (0:
    none) and where the tail tiles start, in rows and in keys (``n`` without a tail: the full
    tiles cover everything, the last one masked)."""
    bm, bn, bd = _blocks(n, d, block_m, block_n)
    if not tail_block:
        return bm, bn, bd, 0, n, n
    tail = min(tail_block, bm, bn)
    return bm, bn, bd, tail, n // bm * bm, n // bn * bn


def _launches(n: int, block: int, tail: int, full: int) -> list[tuple[int, int, int]]:
    """``(programs, block size, first index)`` of each launch over rows (or key blocks): one
    launch of full blocks, and one of tail blocks from ``full`` when there is a tail."""
    if not tail:
        return [(triton.cdiv(n, block), block, 0)]
    return [(count, size, first) for count, size, first in
            ((full // block, block, 0), (triton.cdiv(n - full, tail), tail, full)) if count]


def _like_qkv_layout(q: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    # (B, N, H, D) in memory, seen as (B, H, N, D): the caller's transpose(1, 2).reshape(B, N, C)
    # is then free.
    B, H, N, D = q.shape
    return q.new_empty((B, N, H, D), dtype=dtype).transpose(1, 2)


def _launch(num_warps: int, num_stages: int | None) -> dict:
    # Triton's launch options; num_stages left out (Triton's default) when None.
    options = dict(num_warps=num_warps)
    if num_stages is not None:
        options["num_stages"] = num_stages
    return options


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs are the reference checks: full float32 products, no TF32.
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if os.environ.get("TRITON_INTERPRET") == "1" else "tf32"


@torch.library.custom_op("nkat::attention_kernel_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, seed: Tensor, knobs: Tensor, top_k: int,
                   nucleus: bool, dropout: bool, block_m: int, block_n: int, num_warps: int,
                   skip_empty: bool, bwd_mode: str = BWD_MODE, num_stages: int | None = NUM_STAGES,
                   tail_block: int = TAIL_BLOCK, philox_rounds: int = PHILOX_ROUNDS,
                   bwd_num_warps: int | None = BWD_NUM_WARPS,
                   bwd_block_m: int | None = BWD_BLOCK_M) -> tuple[Tensor, Tensor, Tensor]:
    # knobs: _knobs's float32 (scale, top_p, dropout_p, 1 / (1 - dropout_p)); nucleus and dropout
    # say whether those filters are on. bwd_mode, bwd_num_warps and bwd_block_m are backward's
    # (see _setup_context); they are inputs here so autograd carries them.
    B, H, N, D = q.shape
    o = _like_qkv_layout(q)
    threshold = q.new_empty((B, H, N), dtype=torch.float32)
    lse = q.new_empty((B, H, N), dtype=torch.float32)
    bm, bn, bd, tail, m_full, n_full = _tiling(N, D, block_m, block_n, tail_block)
    levels = level_count(top_k, nucleus, N)
    for programs, rows, row0 in _launches(N, bm, tail, m_full):
        _fwd_kernel[(programs, H, B)](
            q, k, v, o, threshold, lse, seed,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, N, D, knobs, row0, n_full,
            TOP_K=top_k, TOPK_ON=0 < top_k < N, NUCLEUS_ON=nucleus,
            LEVELS=levels, LEVELS_PAD=max(2, triton.next_power_of_2(max(levels, 1))),
            DROPOUT=dropout, BLOCK_M=rows, BLOCK_N=bn, BLOCK_D=bd, TAIL=tail,
            PRECISION=_precision(q.dtype), SKIP_EMPTY=skip_empty, ROUNDS=philox_rounds,
            **_launch(num_warps, num_stages),
        )
    return o, threshold, lse


@_attention_fwd.register_fake
def _(q, k, v, seed, knobs, top_k, nucleus, dropout, block_m, block_n, num_warps, skip_empty,
      bwd_mode=BWD_MODE, num_stages=NUM_STAGES, tail_block=TAIL_BLOCK,
      philox_rounds=PHILOX_ROUNDS, bwd_num_warps=BWD_NUM_WARPS, bwd_block_m=BWD_BLOCK_M):
    B, H, N, D = q.shape
    return (_like_qkv_layout(q), q.new_empty((B, H, N), dtype=torch.float32),
            q.new_empty((B, H, N), dtype=torch.float32))


@torch.library.custom_op("nkat::attention_kernel_bwd", mutates_args=())
def _attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                   threshold: Tensor, lse: Tensor, seed: Tensor, knobs: Tensor, dropout: bool,
                   block_m: int, block_n: int, num_warps: int, skip_empty: bool,
                   bwd_mode: str = BWD_MODE, num_stages: int | None = NUM_STAGES,
                   tail_block: int = TAIL_BLOCK, philox_rounds: int = PHILOX_ROUNDS,
                   top_k: int = 0, bwd_num_warps: int | None = BWD_NUM_WARPS,
                   bwd_block_m: int | None = BWD_BLOCK_M) -> tuple[Tensor, Tensor, Tensor]:
    B, H, N, D = q.shape
    grad_out = grad_out.to(q.dtype)
    # The backward's programs hold more tiles than the forward's (see BWD_NUM_WARPS).
    num_warps = num_warps if bwd_num_warps is None else bwd_num_warps
    delta = (grad_out.float() * out.float()).sum(dim=-1).contiguous()
    dk = _like_qkv_layout(q)
    dv = _like_qkv_layout(q)
    bm, bn, bd, tail, m_full, n_full = _tiling(N, D, block_m, block_n, tail_block)
    # The query tiles of the dK / dV and slots programs (see BWD_BLOCK_M): rows below kv_m_full
    # in tiles of kv_bm, the rest in tiles of kv_tail (never wider than the forward's tail); the
    # key tiles stay the forward's.
    kv_bm, kv_tail, kv_m_full = bm, tail, m_full
    if bwd_block_m is not None:
        kv_bm, _, _, kv_tail, kv_m_full, _ = _tiling(N, D, bwd_block_m, block_n, tail)
    common = dict(DROPOUT=dropout, BLOCK_D=bd, TAIL=tail, PRECISION=_precision(q.dtype),
                  SKIP_EMPTY=skip_empty, ROUNDS=philox_rounds, **_launch(num_warps, num_stages))
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    scalars = (H, N, D, knobs)
    sparse = bwd_mode == "sparse" and 0 < top_k < N
    # "sparse" sums dQ in float32 as "atomic" does (and is "atomic" without top_k).
    atomic = bwd_mode != "split"
    if atomic:
        dq_sum = torch.zeros((B, H, N, D), device=q.device, dtype=torch.float32)
    else:
        dq = _like_qkv_layout(q)
    if sparse:
        slots = _fill_slots(grad_out, q, k, v, threshold, lse, delta, seed, dq_sum,
                            (kv_bm, bn, kv_tail, kv_m_full, n_full), common, strides, scalars)
    else:
        slots = (dk,) * 4  # never read without SPARSE
    for programs, cols, col0 in _launches(N, bn, tail, n_full):
        # The split mode's DQ_ACC is never read: dk stands in for it.
        _bwd_kv_kernel[(programs, H, B)](
            q, k, v, grad_out, threshold, lse, delta, dk, dv, dq_sum if atomic else dk, seed,
            *slots, *strides, *dk.stride(), *scalars, col0, kv_m_full, BLOCK_M=kv_bm,
            BLOCK_N=cols, ATOMIC_DQ=atomic, SPARSE=sparse, S=SPARSE_SLOTS,
            **dict(common, TAIL=kv_tail))
    if atomic:
        dq = _like_qkv_layout(q).copy_(dq_sum)
    else:
        for programs, rows, row0 in _launches(N, bm, tail, m_full):
            _bwd_q_kernel[(programs, H, B)](
                q, k, v, grad_out, threshold, lse, delta, dq, seed, *strides, *dq.stride(),
                *scalars, row0, n_full, BLOCK_M=rows, BLOCK_N=bn, **common)
    return dq, dk, dv


def _fill_slots(grad_out, q, k, v, threshold, lse, delta, seed, dq_sum, tiling, common, strides,
                scalars) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """bwd_mode "sparse"'s first kernel over the query blocks (see ``SPARSE_SLOTS``): each row's
    kept entries in its slots, and dQ into ``dq_sum`` (but for query blocks with a row of more
    kept entries, whose dQ the key-block kernel adds from dense tiles). Returns the slots the
    key-block kernel reads: columns, dS, dropped-out weights, and each row's kept count."""
    B, H, N, D = q.shape
    bm, bn, tail, m_full, n_full = tiling
    shape = (B, H, N, SPARSE_SLOTS)
    idx = torch.empty(shape, device=q.device, dtype=torch.int32)
    probs, ds, weights = (torch.empty(shape, device=q.device, dtype=torch.float32)
                          for _ in range(3))
    count = torch.empty((B, H, N), device=q.device, dtype=torch.int32)
    for programs, rows, row0 in _launches(N, bm, tail, m_full):
        _bwd_slots_kernel[(programs, H, B)](
            q, k, v, grad_out, threshold, lse, delta, dq_sum, seed, idx, probs, ds, weights,
            count, *strides, *scalars, row0, n_full, S=SPARSE_SLOTS, BLOCK_M=rows, BLOCK_N=bn,
            **common)
    return idx, ds, weights, count


@_attention_bwd.register_fake
def _(grad_out, q, k, v, out, threshold, lse, seed, knobs, dropout, block_m, block_n, num_warps,
      skip_empty, bwd_mode=BWD_MODE, num_stages=NUM_STAGES, tail_block=TAIL_BLOCK,
      philox_rounds=PHILOX_ROUNDS, top_k=0, bwd_num_warps=BWD_NUM_WARPS,
      bwd_block_m=BWD_BLOCK_M):
    return _like_qkv_layout(q), _like_qkv_layout(q), _like_qkv_layout(q)


def _setup_context(ctx, inputs, output):
    (q, k, v, seed, knobs, top_k, _nucleus, dropout, block_m, block_n, num_warps, skip_empty,
     bwd_mode, num_stages, tail_block, philox_rounds, bwd_num_warps, bwd_block_m) = inputs
    out, threshold, lse = output
    ctx.save_for_backward(q, k, v, out, threshold, lse, seed, knobs)
    ctx.args = (dropout, block_m, block_n, num_warps, skip_empty, bwd_mode, num_stages,
                tail_block, philox_rounds, top_k, bwd_num_warps, bwd_block_m)
    ctx.num_inputs = len(inputs)


def _backward(ctx, grad_out, _grad_threshold, _grad_lse):
    q, k, v, out, threshold, lse, seed, knobs = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(grad_out, q, k, v, out, threshold, lse, seed, knobs, *ctx.args)
    # No gradient for seed, the filter and the launch arguments.
    return dq, dk, dv, *[None] * (ctx.num_inputs - 3)


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _knobs(like: Tensor, scale: float | Tensor, top_p: float | Tensor,
           dropout_p: float | Tensor) -> Tensor:
    """float32 (scale, top_p, dropout_p, 1 / (1 - dropout_p)) on ``like``'s device, for the kernels.

    Loaded, not passed as Triton scalars: a float argument of the custom op would be a constant of
    the compiled graph, so every trial (its own temperature, top_p, dropout) would compile its own;
    as a tensor built from the model's buffers it is an input, and trials share the graph.
    """
    values = [x.to(like.device, torch.float32).reshape(()) if isinstance(x, Tensor)
              else torch.full((), float(x), device=like.device, dtype=torch.float32)
              for x in (scale, top_p, dropout_p)]
    return torch.stack([*values, 1.0 / (1.0 - values[2])])


def op_filter_args(like: Tensor, scale: float | Tensor, top_k: int, top_p: float | Tensor,
                   dropout_p: float | Tensor) -> tuple[Tensor, int, bool, bool]:
    """The forward op's ``(knobs, top_k, nucleus, dropout)`` from ``kernel_attention``'s filter
    arguments, the knobs on ``like``'s device (tests and benchmarks call the op directly)."""
    return _knobs(like, scale, top_p, dropout_p), top_k, nucleus_on(top_p), dropout_on(dropout_p)


def kernel_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | Tensor, top_k: int,
                     top_p: float | Tensor, dropout_p: float | Tensor = 0.0,
                     block_m: int = BLOCK_M, block_n: int = BLOCK_N, num_warps: int = NUM_WARPS,
                     skip_empty: bool = SKIP_EMPTY_TILES,
                     bwd_mode: str = BWD_MODE, num_stages: int | None = NUM_STAGES,
                     tail_block: int = TAIL_BLOCK, philox_rounds: int = PHILOX_ROUNDS,
                     bwd_num_warps: int | None = BWD_NUM_WARPS,
                     bwd_block_m: int | None = BWD_BLOCK_M) -> Tensor:
    """The NKAT attention core from q, k, v (B, heads, N, head_dim), unmodulated: (B, heads, N, hd).

    Same contract as ``fused_attention``: ``dropout_p`` applied as given (pass 0 in eval mode);
    under autocast q, k, v arrive in bf16 and the output is bf16, the scores, filter and softmax
    are float32 (the bf16 products summed in float32, not rounded to bf16 in between: ties are
    those of exactly equal products, e.g. identical tokens). The output is laid out (B, N, heads,
    hd) in memory. ``block_m`` / ``block_n`` are the query and key tile sizes (tests shrink them to
    cross tile borders on small rows), ``num_warps`` the warps per program, ``num_stages`` the
    software pipelining depth of the key loops (None: Triton's default); ``skip_empty`` skips
    the products of tiles whose probabilities are all 0 (the same result, bit for bit, but for
    the atomic backward's dQ: see below); ``bwd_mode`` is one of ``BWD_MODES``: "split",
    "atomic" (see ``BWD_MODE``; atomic sums dQ in float32 in no fixed order, so its dQ may differ
    from run to run in the last bits) or "sparse" (see ``SPARSE_SLOTS``; "atomic" without
    top_k). ``tail_block`` (0 or a power of two from 16) covers the rows and keys past the last
    full tile with tiles of that size instead of one masked full tile (see ``TAIL_BLOCK``).
    ``philox_rounds``: the dropout generator's rounds, 1 to 10 (see ``PHILOX_ROUNDS``; another
    mask, drawn as well). ``bwd_num_warps``: the backward programs' warps (None: ``num_warps``;
    see ``BWD_NUM_WARPS``). ``bwd_block_m``: the query tile of the dK / dV program's loop (and
    of the sparse backward's slots), None: ``block_m``; see ``BWD_BLOCK_M``.
    """
    if not kernel_supports(q.shape[-1], top_k, top_p, q.shape[-2]):
        raise ValueError(f"kernel_attention: head dim {q.shape[-1]} with top_k {top_k}, top_p "
                         f"{top_p} over {q.shape[-2]} keys is not supported; use the explicit path")
    if bwd_mode not in BWD_MODES:
        raise ValueError(f"kernel_attention: bwd_mode {bwd_mode!r} is not one of {BWD_MODES}")
    if not 1 <= philox_rounds <= 10:
        raise ValueError(f"kernel_attention: philox_rounds {philox_rounds} is not 1 to 10")
    if bwd_block_m is not None and (bwd_block_m < 16 or bwd_block_m & (bwd_block_m - 1)):
        raise ValueError(f"kernel_attention: bwd_block_m {bwd_block_m} is not None or a power of "
                         "two from 16 (tl.dot's smallest tile)")
    if tail_block and (tail_block < 16 or tail_block & (tail_block - 1)):
        raise ValueError(f"kernel_attention: tail_block {tail_block} is not 0 or a power of two "
                         "from 16 (tl.dot's smallest tile)")
    k, v = k.to(q.dtype), v.to(q.dtype)
    dropout = dropout_on(dropout_p)
    if dropout:
        seed = torch.randint(0, 2**31 - 1, (1,), device=q.device, dtype=torch.int64)
    else:
        seed = torch.zeros(1, device=q.device, dtype=torch.int64)
    return _attention_fwd(q, k, v, seed, *op_filter_args(seed, scale, top_k, top_p, dropout_p),
                          block_m, block_n, num_warps, skip_empty, bwd_mode, num_stages,
                          tail_block, philox_rounds, bwd_num_warps, bwd_block_m)[0]
