"""Triton kernels for CMRF's cascade of depthwise 3x3 conv + BatchNorm stages (2-D inputs).

This module holds only the kernels, their launch wrappers, the tile configurations and the
``torch.library`` custom ops (with fake implementations) plus ``FusedCascade``, the autograd
function around them. Reading ``nn`` modules, folding BatchNorm, caching what is derived from
parameters and updating running statistics is ``cmrf.ops.fused_cascade``'s job; picking the
reference or this path is ``cmrf.ops.cascade``'s.

Notation: ``y`` is the ``(B, 2c, H, W)`` output of CMRF's first pointwise conv, ``even = y[:, 1::2]``,
``odd = y[:, 0::2]``; stage ``k = 1..S`` (``S = N - 1``) computes ``z_k = dwconv3x3(d_{k-1}, w_k)``
and ``d_k = BN_k(z_k)`` with ``d_0 = even``; the result is ``[odd + even, d_1, ..., d_S]``
(``(B, (S + 1) c, H, W)``). ``cmrf.ops.cascade.cascade_concat_reference`` is the oracle.

Kernels (one program = one ``(batch, channel)`` plane tile of ``BLOCK_H x BLOCK_W`` pixels):

* ``_eval_cascade_kernel`` (inference, BatchNorm folded): ALL stages of a tile in one program and
  one launch. The block is the output tile plus an ``S``-pixel halo; the intermediate stages
  ping-pong between two fp32 scratch planes private to the program, and every stage's tile centre
  goes straight into its concat slot, as does ``odd + even``. The grid is persistent (at most
  ``EVAL_MAX_PROGRAMS`` programs loop over the tiles), which bounds the scratch.
* ``_stage_forward_kernel``: loads the stage input with a one-pixel halo, applying the previous
  stage's BatchNorm affine while loading, convolves, and writes either the raw conv output ``z_k``
  plus per-tile ``(count, sum, M2)`` partials (training) or the folded ``d_k`` into its concat slot
  (inference fallback). The same program writes the previous slot (or ``odd + even``).
* ``_stats_kernel``: one program per channel combines a stage's partials in a fixed order
  (Chan's parallel variance, deterministic, no atomics) and writes mean, variance, ``1/std``, the
  folded scale/shift and the unbiased variance into the ``(STATS_ROWS, S, c)`` statistics tensor.
* ``_affine_kernel``: writes the last stage's ``d_S`` from ``z_S`` once its statistics are known.
* ``_stage_backward_kernel``: one launch per stage, last stage first: forms ``grad z_{k+1}`` on the
  fly (BatchNorm backward is affine in ``G_{k+1}`` and ``z_{k+1}`` once the per-channel reductions
  are known), applies the transposed depthwise conv, adds the slot's gradient, writes ``G_k`` and
  per-tile partials of the weight gradient and of stage ``k``'s BatchNorm reductions.
* ``_backward_reduce_kernel``: one program per channel turns those partials into the weight, gamma
  and beta gradients and the next launch's BatchNorm-backward coefficients, on the device.

No host<->device copy and no synchronisation happens in any wrapper: shapes, strides and Python
floats (``eps``) are the only host data, passed as kernel arguments; every per-stage tensor is
addressed as base pointer + element offset, so no view is created per stage. That makes the ops
capturable in a CUDA graph. All arithmetic is fp32 whatever the storage dtype; element offsets are
64-bit; any strides are accepted (channels_last, sliced views).

``TRITON_INTERPRET=1`` must be set before the first import for the kernels to run on CPU tensors
through Triton's interpreter (``INTERPRETED`` records which mode they were built in).
"""

from __future__ import annotations

import collections
import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Largest tile of the per-stage kernels: BLOCK_W <= MAX_BLOCK_W, BLOCK_H * BLOCK_W <= MAX_BLOCK_ELEMENTS.
# Module constants rather than arguments so tests can shrink them to exercise many tiles.
MAX_BLOCK_W = 64
MAX_BLOCK_ELEMENTS = 1024

# Single-launch inference kernel: block (halo included) at most EVAL_MAX_BLOCK_W wide and
# EVAL_MAX_BLOCK_ELEMENTS in all, and at most EVAL_MAX_PROGRAMS programs (persistent grid), which
# bounds its fp32 scratch to EVAL_MAX_PROGRAMS * 2 * block elements * 4 bytes (32 MiB by default).
EVAL_MAX_BLOCK_W = 64
EVAL_MAX_BLOCK_ELEMENTS = 2048
EVAL_MAX_PROGRAMS = 2048

# Rows of the (STATS_ROWS, S, c) fp32 statistics tensor that cascade_forward returns.
MEAN, VAR, INVSTD, SCALE, SHIFT, UNBIASED_VAR = range(6)
STATS_ROWS = 6

# The same rows as kernel constants (Triton only reads globals that are constexpr).
MEAN_ROW = tl.constexpr(MEAN)
INVSTD_ROW = tl.constexpr(INVSTD)
SCALE_ROW = tl.constexpr(SCALE)
SHIFT_ROW = tl.constexpr(SHIFT)

# Per-channel reductions of the partials: chunk of partials read per step.
REDUCE_BLOCK = 256

# Launches per kernel name since import: lets tests prove the Triton path really ran.
launch_counts: collections.Counter = collections.Counter()


# The kernels use only Triton builtins and this module's own jit functions: the library's jit
# helpers (tl.sum, tl.zeros, ...) are compiled or interpreted depending on TRITON_INTERPRET when
# triton.language is first imported, which may happen before the variable is set (timm imports
# torchvision, which imports triton); this module's functions follow it as of this import.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _tile_sum(x):
    # Sum of a 2-D block as a scalar.
    return tl.reduce(tl.reduce(x, 1, _add), 0, _add)


@triton.jit
def _vector_sum(x):
    return tl.reduce(x, 0, _add)


@triton.jit
def _sum_two_planes(base, plane_stride, n, BLOCK: tl.constexpr):
    """Fixed-order sums of ``base[0:n]`` and ``base[plane_stride:plane_stride + n]`` (deterministic)."""
    acc0 = tl.full((BLOCK,), 0.0, tl.float32)
    acc1 = tl.full((BLOCK,), 0.0, tl.float32)
    for start in range(0, n, BLOCK):
        index = start + tl.arange(0, BLOCK)
        valid = index < n
        acc0 += tl.load(base + index, mask=valid, other=0.0)
        acc1 += tl.load(base + plane_stride + index, mask=valid, other=0.0)
    return _vector_sum(acc0), _vector_sum(acc1)


@triton.jit
def _stage_forward_kernel(
    src_ptr, src_off, src_scale_ptr, src_scale_off, src_shift_ptr, src_shift_off, weight_ptr, weight_off,
    dst_ptr, dst_off, dst_scale_ptr, dst_scale_off, dst_shift_ptr, dst_shift_off,
    prev_ptr, prev_off, odd_ptr, odd_off, partial_ptr,
    C, H, W, n_tiles_h, n_tiles_w, num_partials, partial_plane,
    src_sb, src_sc, src_sh, src_sw,
    dst_sb, dst_sc, dst_sh, dst_sw,
    prev_sb, prev_sc, prev_sh, prev_sw,
    odd_sb, odd_sc, odd_sh, odd_sw,
    SRC_AFFINE: tl.constexpr, DST_AFFINE: tl.constexpr, WRITE_PREV: tl.constexpr,
    ADD_ODD: tl.constexpr, STATS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)
    tile_h = tl.program_id(1)
    tile_w = tl.program_id(2)
    b = (pid // C).to(tl.int64)
    ch = pid % C
    ch64 = ch.to(tl.int64)
    rows = tile_h * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = tile_w * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    inside = (rows < H) & (cols < W)
    src_base = src_ptr + src_off + b * src_sb + ch64 * src_sc
    if SRC_AFFINE:
        src_scale = tl.load(src_scale_ptr + src_scale_off + ch)
        src_shift = tl.load(src_shift_ptr + src_shift_off + ch)

    acc = tl.full((BLOCK_H, BLOCK_W), 0.0, tl.float32)
    for tap in tl.static_range(9):
        r = rows + (tap // 3 - 1)
        c = cols + (tap % 3 - 1)
        in_image = (r >= 0) & (r < H) & (c >= 0) & (c < W)
        offsets = r.to(tl.int64) * src_sh + c.to(tl.int64) * src_sw
        v = tl.load(src_base + offsets, mask=in_image, other=0.0).to(tl.float32)
        if SRC_AFFINE:
            # The reference pads the normalised tensor with zeros: the affine must not leak out.
            v = tl.where(in_image, v * src_scale + src_shift, 0.0)
        acc += v * tl.load(weight_ptr + weight_off + ch * 9 + tap).to(tl.float32)
        if WRITE_PREV and tap == 4:
            # The centre tap is this tile's own input: it is the previous concat slot's value.
            prev = v
            if ADD_ODD:
                odd_base = odd_ptr + odd_off + b * odd_sb + ch64 * odd_sc
                odd_offsets = rows.to(tl.int64) * odd_sh + cols.to(tl.int64) * odd_sw
                prev += tl.load(odd_base + odd_offsets, mask=inside, other=0.0).to(tl.float32)
            prev_base = prev_ptr + prev_off + b * prev_sb + ch64 * prev_sc
            prev_offsets = rows.to(tl.int64) * prev_sh + cols.to(tl.int64) * prev_sw
            tl.store(prev_base + prev_offsets, prev.to(prev_ptr.dtype.element_ty), mask=inside)

    if DST_AFFINE:
        acc = acc * tl.load(dst_scale_ptr + dst_scale_off + ch) + tl.load(dst_shift_ptr + dst_shift_off + ch)
    stored = acc.to(dst_ptr.dtype.element_ty)
    dst_base = dst_ptr + dst_off + b * dst_sb + ch64 * dst_sc
    dst_offsets = rows.to(tl.int64) * dst_sh + cols.to(tl.int64) * dst_sw
    tl.store(dst_base + dst_offsets, stored, mask=inside)

    if STATS:
        # Statistics of the stored (rounded) values, as BatchNorm sees them in the reference.
        z = tl.where(inside, stored.to(tl.float32), 0.0)
        count = _tile_sum(inside.to(tl.float32))
        total = _tile_sum(z)
        deviation = tl.where(inside, z - total / count, 0.0)
        m2 = _tile_sum(deviation * deviation)
        index = ch64 * num_partials + (b * n_tiles_h + tile_h) * n_tiles_w + tile_w
        tl.store(partial_ptr + index, count)
        tl.store(partial_ptr + partial_plane + index, total)
        tl.store(partial_ptr + 2 * partial_plane + index, m2)


@triton.jit
def _stats_kernel(
    partial_ptr, gamma_ptr, beta_ptr, fixed_ptr, stats_ptr,
    stage_off, stats_plane, num_partials, partial_plane, eps, unbiased_factor,
    FROM_PARTIALS: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per channel: statistics of one stage. Fixed-order sums, so bit-reproducible.
    ch = tl.program_id(0)
    ch64 = ch.to(tl.int64)
    if FROM_PARTIALS:
        base = partial_ptr + ch64 * num_partials
        n, total_sum = _sum_two_planes(base, partial_plane, num_partials, BLOCK)
        mean = total_sum / n
        # Chan: M2 = sum(M2_i + n_i (mean_i - mean)^2), stable for large counts.
        m2_acc = tl.full((BLOCK,), 0.0, tl.float32)
        for start in range(0, num_partials, BLOCK):
            index = start + tl.arange(0, BLOCK)
            valid = index < num_partials
            count = tl.load(base + index, mask=valid, other=1.0)
            total = tl.load(base + partial_plane + index, mask=valid, other=0.0)
            m2 = tl.load(base + 2 * partial_plane + index, mask=valid, other=0.0)
            deviation = total / count - mean
            m2_acc += tl.where(valid, m2 + count * deviation * deviation, 0.0)
        var = _vector_sum(m2_acc) / n
    else:
        # fixed_ptr: the (2, S, c) running mean and variance.
        mean = tl.load(fixed_ptr + stage_off + ch)
        var = tl.load(fixed_ptr + stats_plane + stage_off + ch)
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = tl.load(gamma_ptr + stage_off + ch) * invstd
    shift = tl.load(beta_ptr + stage_off + ch) - mean * scale
    out = stats_ptr + stage_off + ch
    tl.store(out, mean)
    tl.store(out + stats_plane, var)
    tl.store(out + 2 * stats_plane, invstd)
    tl.store(out + 3 * stats_plane, scale)
    tl.store(out + 4 * stats_plane, shift)
    tl.store(out + 5 * stats_plane, var * unbiased_factor)


@triton.jit
def _affine_kernel(
    src_ptr, src_off, scale_ptr, scale_off, shift_ptr, shift_off, dst_ptr, dst_off, C, H, W,
    src_sb, src_sc, src_sh, src_sw,
    dst_sb, dst_sc, dst_sh, dst_sw,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // C).to(tl.int64)
    ch = pid % C
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    inside = (rows < H) & (cols < W)
    r64 = rows.to(tl.int64)
    c64 = cols.to(tl.int64)
    src = src_ptr + src_off + b * src_sb + ch.to(tl.int64) * src_sc + r64 * src_sh + c64 * src_sw
    v = tl.load(src, mask=inside, other=0.0).to(tl.float32)
    v = v * tl.load(scale_ptr + scale_off + ch) + tl.load(shift_ptr + shift_off + ch)
    dst = dst_ptr + dst_off + b * dst_sb + ch.to(tl.int64) * dst_sc + r64 * dst_sh + c64 * dst_sw
    tl.store(dst, v.to(dst_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _stage_backward_kernel(
    gslot_ptr, gslot_off, next_g_ptr, next_g_off, next_z_ptr, next_z_off, coef_ptr, next_w_ptr, next_w_off,
    cur_ptr, cur_off, stats_ptr, cur_stage_off, stats_plane,
    g_ptr, g_off, godd_ptr, godd_off, stats_partial_ptr, wgrad_partial_ptr,
    C, H, W, n_tiles_h, n_tiles_w, num_partials, partial_plane,
    gslot_sb, gslot_sc, gslot_sh, gslot_sw,
    next_g_sb, next_g_sc, next_g_sh, next_g_sw,
    next_z_sb, next_z_sc, next_z_sh, next_z_sw,
    cur_sb, cur_sc, cur_sh, cur_sw,
    g_sb, g_sc, g_sh, g_sw,
    godd_sb, godd_sc, godd_sh, godd_sw,
    HAS_NEXT: tl.constexpr, CUR_IS_Z: tl.constexpr, WRITE_G: tl.constexpr, WRITE_ODD: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # Gradient of d_k (G_k) and partial reductions for stage k (see the module docstring).
    # next_*: stage k + 1: its G and z, the (3, c) coefficients with
    # grad z_{k+1} = a * G_{k+1} + b * z_{k+1} + c, and its weights. cur: z_k when CUR_IS_Z (then
    # d_k = z_k * scale + shift and x_hat = (z_k - mean) * invstd, from the stats tensor at
    # cur_stage_off), else d_0 = even.
    pid = tl.program_id(0)
    tile_h = tl.program_id(1)
    tile_w = tl.program_id(2)
    b = (pid // C).to(tl.int64)
    ch = pid % C
    ch64 = ch.to(tl.int64)
    rows = tile_h * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = tile_w * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    inside = (rows < H) & (cols < W)
    r64 = rows.to(tl.int64)
    c64 = cols.to(tl.int64)
    tile_index = (b * n_tiles_h + tile_h) * n_tiles_w + tile_w

    g_slot = tl.load(gslot_ptr + gslot_off + b * gslot_sb + ch64 * gslot_sc + r64 * gslot_sh + c64 * gslot_sw,
                     mask=inside, other=0.0).to(tl.float32)
    g = g_slot
    cur_base = cur_ptr + cur_off + b * cur_sb + ch64 * cur_sc
    cur_stats = stats_ptr + cur_stage_off + ch
    if CUR_IS_Z:
        cur_scale = tl.load(cur_stats + SCALE_ROW * stats_plane)
        cur_shift = tl.load(cur_stats + SHIFT_ROW * stats_plane)

    if HAS_NEXT:
        coef_a = tl.load(coef_ptr + ch)
        coef_b = tl.load(coef_ptr + C + ch)
        coef_c = tl.load(coef_ptr + 2 * C + ch)
        next_g_base = next_g_ptr + next_g_off + b * next_g_sb + ch64 * next_g_sc
        next_z_base = next_z_ptr + next_z_off + b * next_z_sb + ch64 * next_z_sc
        # Transposed depthwise conv: d_k[q] fed z_{k+1}[q - offset(tap)] through w[tap].
        gz_centre = tl.full((BLOCK_H, BLOCK_W), 0.0, tl.float32)
        for tap in tl.static_range(9):
            r = rows - (tap // 3 - 1)
            c = cols - (tap % 3 - 1)
            in_image = (r >= 0) & (r < H) & (c >= 0) & (c < W)
            r_64 = r.to(tl.int64)
            c_64 = c.to(tl.int64)
            gn = tl.load(next_g_base + r_64 * next_g_sh + c_64 * next_g_sw, mask=in_image, other=0.0)
            zn = tl.load(next_z_base + r_64 * next_z_sh + c_64 * next_z_sw, mask=in_image, other=0.0)
            gz = coef_a * gn.to(tl.float32) + coef_b * zn.to(tl.float32) + coef_c
            gz = tl.where(in_image, gz, 0.0)
            g += gz * tl.load(next_w_ptr + next_w_off + ch * 9 + tap).to(tl.float32)
            if tap == 4:
                gz_centre = gz
        # Weight gradient of stage k + 1: grad z_{k+1}[p] * d_k[p + offset(tap)], summed.
        for tap in tl.static_range(9):
            r = rows + (tap // 3 - 1)
            c = cols + (tap % 3 - 1)
            in_image = (r >= 0) & (r < H) & (c >= 0) & (c < W)
            d = tl.load(cur_base + r.to(tl.int64) * cur_sh + c.to(tl.int64) * cur_sw,
                        mask=in_image, other=0.0).to(tl.float32)
            if CUR_IS_Z:
                d = tl.where(in_image, d * cur_scale + cur_shift, 0.0)
            partial = _tile_sum(gz_centre * d)
            tl.store(wgrad_partial_ptr + tap * partial_plane + ch64 * num_partials + tile_index, partial)

    if CUR_IS_Z:
        z = tl.load(cur_base + r64 * cur_sh + c64 * cur_sw, mask=inside, other=0.0).to(tl.float32)
        cur_mean = tl.load(cur_stats + MEAN_ROW * stats_plane)
        x_hat = (z - cur_mean) * tl.load(cur_stats + INVSTD_ROW * stats_plane)
        g_in = tl.where(inside, g, 0.0)
        tl.store(stats_partial_ptr + ch64 * num_partials + tile_index, _tile_sum(g_in))
        tl.store(stats_partial_ptr + partial_plane + ch64 * num_partials + tile_index,
                 _tile_sum(tl.where(inside, g_in * x_hat, 0.0)))
    if WRITE_G:
        tl.store(g_ptr + g_off + b * g_sb + ch64 * g_sc + r64 * g_sh + c64 * g_sw,
                 g.to(g_ptr.dtype.element_ty), mask=inside)
    if WRITE_ODD:
        tl.store(godd_ptr + godd_off + b * godd_sb + ch64 * godd_sc + r64 * godd_sh + c64 * godd_sw,
                 g_slot.to(godd_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _backward_reduce_kernel(
    stats_partial_ptr, wgrad_partial_ptr, stats_ptr, gamma_ptr,
    grad_weight_ptr, grad_gamma_ptr, grad_beta_ptr, coef_ptr,
    C, next_w_off, cur_stage_off, stats_plane, num_partials, partial_plane, inv_n,
    HAS_NEXT: tl.constexpr, HAS_CUR: tl.constexpr, USE_BATCH_STATS: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per channel, fixed-order sums (deterministic): stage k + 1's weight gradient
    # (HAS_NEXT) and stage k's gamma/beta gradients plus the coefficients (a, b, c) of
    # grad z_k = a * G_k + b * z_k + c for the next launch (HAS_CUR). Training BatchNorm:
    # grad z = gamma * invstd / n * (n G - sum G - x_hat * sum(G x_hat)); fixed statistics: a G.
    ch = tl.program_id(0)
    ch64 = ch.to(tl.int64)
    if HAS_NEXT:
        for tap in tl.static_range(9):
            base = wgrad_partial_ptr + tap * partial_plane + ch64 * num_partials
            acc = tl.full((BLOCK,), 0.0, tl.float32)
            for start in range(0, num_partials, BLOCK):
                index = start + tl.arange(0, BLOCK)
                acc += tl.load(base + index, mask=index < num_partials, other=0.0)
            tl.store(grad_weight_ptr + next_w_off + ch * 9 + tap, _vector_sum(acc))
    if HAS_CUR:
        base = stats_partial_ptr + ch64 * num_partials
        sum_g, sum_gx = _sum_two_planes(base, partial_plane, num_partials, BLOCK)
        tl.store(grad_beta_ptr + cur_stage_off + ch, sum_g)
        tl.store(grad_gamma_ptr + cur_stage_off + ch, sum_gx)
        cur_stats = stats_ptr + cur_stage_off + ch
        invstd = tl.load(cur_stats + INVSTD_ROW * stats_plane)
        a = tl.load(gamma_ptr + cur_stage_off + ch) * invstd
        if USE_BATCH_STATS:
            coef_b = -a * invstd * sum_gx * inv_n
            coef_c = -a * sum_g * inv_n - coef_b * tl.load(cur_stats + MEAN_ROW * stats_plane)
        else:
            coef_b = a * 0.0
            coef_c = a * 0.0
        tl.store(coef_ptr + ch, a)
        tl.store(coef_ptr + C + ch, coef_b)
        tl.store(coef_ptr + 2 * C + ch, coef_c)


@triton.jit
def _eval_cascade_kernel(
    even_ptr, even_off, odd_ptr, weight_ptr, scale_ptr, shift_ptr, out_ptr, scratch_ptr,
    C, H, W, n_tiles_h, n_tiles_w, num_tiles,
    even_sb, even_sc, even_sh, even_sw,
    odd_sb, odd_sc, odd_sh, odd_sw,
    out_sb, out_sc, out_sh, out_sw,
    NUM_STAGES: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # All S = NUM_STAGES folded stages of one (batch, channel) tile in one program (inference).
    # The block is BLOCK_H x BLOCK_W pixels; its centre (BLOCK - 2 S per side) is the output tile
    # and the S-pixel ring around it is the halo. Each stage's out-of-block taps corrupt one more
    # ring, so stage k is exact at least k pixels in from the block edge, hence on the whole
    # centre for every k <= S.
    # Intermediate stages live in this program's two fp32 scratch planes (ping-pong); Triton has
    # no register shifts / shared-memory indexing, so neighbours are re-read from scratch, which
    # stays in L1/L2. The grid is persistent (programs loop over tiles) so scratch is bounded.
    # Plain locals: arithmetic on constexprs is itself constexpr.
    HALO = NUM_STAGES
    TILE_H = BLOCK_H - 2 * NUM_STAGES
    TILE_W = BLOCK_W - 2 * NUM_STAGES
    PLANE = BLOCK_H * BLOCK_W
    prog = tl.program_id(0)
    num_programs = tl.num_programs(0)
    local_r = tl.arange(0, BLOCK_H)[:, None]
    local_c = tl.arange(0, BLOCK_W)[None, :]
    local = local_r * BLOCK_W + local_c
    centre = (local_r >= HALO) & (local_r < HALO + TILE_H) & (local_c >= HALO) & (local_c < HALO + TILE_W)
    scratch = scratch_ptr + prog.to(tl.int64) * (2 * PLANE)
    tiles_per_plane = n_tiles_h * n_tiles_w
    for t in range(prog, num_tiles, num_programs):
        plane = t // tiles_per_plane
        tile = t % tiles_per_plane
        b = (plane // C).to(tl.int64)
        ch = plane % C
        ch64 = ch.to(tl.int64)
        rows = (tile // n_tiles_w) * TILE_H - HALO + local_r
        cols = (tile % n_tiles_w) * TILE_W - HALO + local_c
        in_image = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
        store_mask = centre & in_image
        r64 = rows.to(tl.int64)
        c64 = cols.to(tl.int64)
        out_pixel = out_ptr + b * out_sb + r64 * out_sh + c64 * out_sw

        # d_0 = even over the whole block; zero outside the image is the first stage's padding.
        even = tl.load(even_ptr + even_off + b * even_sb + ch64 * even_sc + r64 * even_sh + c64 * even_sw,
                       mask=in_image, other=0.0).to(tl.float32)
        odd = tl.load(odd_ptr + b * odd_sb + ch64 * odd_sc + r64 * odd_sh + c64 * odd_sw,
                      mask=store_mask, other=0.0).to(tl.float32)
        tl.store(out_pixel + ch64 * out_sc, (odd + even).to(out_ptr.dtype.element_ty), mask=store_mask)
        # The previous tile's last stage may still be reading buffer 0 in other threads.
        tl.debug_barrier()
        tl.store(scratch + local, even)

        for k in range(NUM_STAGES):
            # Stage k's input (buffer k % 2) was written by all threads before this barrier; the
            # buffer written below was last read by stage k - 1, also before it.
            tl.debug_barrier()
            src = scratch + (k % 2) * PLANE
            acc = tl.full((BLOCK_H, BLOCK_W), 0.0, tl.float32)
            for tap in tl.static_range(9):
                nr = local_r + (tap // 3 - 1)
                nc = local_c + (tap % 3 - 1)
                # Out-of-block neighbours read as 0: only the halo ring is wrong, never the centre.
                in_block = (nr >= 0) & (nr < BLOCK_H) & (nc >= 0) & (nc < BLOCK_W)
                v = tl.load(src + nr * BLOCK_W + nc, mask=in_block, other=0.0)
                acc += v * tl.load(weight_ptr + (k * C + ch) * 9 + tap).to(tl.float32)
            d = acc * tl.load(scale_ptr + k * C + ch) + tl.load(shift_ptr + k * C + ch)
            # The reference zero-pads every stage's input: outside the image d_k must read as 0
            # for stage k + 1, not as the folded BatchNorm shift.
            d = tl.where(in_image, d, 0.0)
            tl.store(scratch + ((k + 1) % 2) * PLANE + local, d)
            slot = ((k + 1) * C + ch).to(tl.int64)
            tl.store(out_pixel + slot * out_sc, d.to(out_ptr.dtype.element_ty), mask=store_mask)


INTERPRETED = type(_stage_forward_kernel).__name__ == "InterpretedFunction"


def _on_tensor_device(fn):
    """Run ``fn(first, ...)`` with ``first``'s GPU as the current device.

    Triton launches on the current CUDA device, whatever device the tensors are on: a model on
    ``cuda:1`` in a process whose current device is ``cuda:0`` would otherwise launch on GPU 0
    with GPU 1's pointers. Autograd's backward already runs on the right device; eager forward
    calls do not.
    """

    @functools.wraps(fn)
    def on_device(first: torch.Tensor, *args, **kwargs):
        if not first.is_cuda:
            return fn(first, *args, **kwargs)
        with torch.cuda.device(first.device):
            return fn(first, *args, **kwargs)

    return on_device


def _launch(kernel, grid, *args, **meta) -> None:
    """Launch ``kernel`` on ``grid``; counts launches (tests, launch budgets)."""
    launch_counts[getattr(kernel, "fn", kernel).__name__] += 1
    kernel[grid](*args, **meta)


# ---------------------------------------------------------------------------------------------
# Tilings: the default rules, the candidates of a sweep, and forcing one.


@dataclass(frozen=True)
class TileConfig:
    """One tiling of the fused kernels.

    Args:
        mode: ``"eval"`` (``cascade_inference``) or ``"train"`` (``cascade_forward``/``backward``).
        block_h, block_w: block of one program, powers of two. For ``single_launch`` it includes
            the ``S``-pixel halo on every side (the output tile is ``block - 2S``).
        num_warps: warps per program (ignored by the interpreter).
        single_launch: eval only: all stages in one launch of ``_eval_cascade_kernel`` (else one
            ``_stage_forward_kernel`` launch per stage).
    """

    mode: str
    block_h: int
    block_w: int
    num_warps: int = 4
    single_launch: bool = False

    def __post_init__(self):
        if self.mode not in ("eval", "train"):
            raise ValueError(f"TileConfig.mode must be 'eval' or 'train', got {self.mode!r}")
        for name in ("block_h", "block_w", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"TileConfig.{name} must be a positive power of two, got {value!r}")
        if self.single_launch and self.mode != "eval":
            raise ValueError("TileConfig.single_launch applies to mode='eval' only")

    @property
    def name(self) -> str:
        """Short name for benchmark rows, e.g. ``single.32x64.w4``."""
        kind = "single" if self.single_launch else "stages"
        return f"{kind}.{self.block_h}x{self.block_w}.w{self.num_warps}"


_forced: dict[str, TileConfig | None] = {"eval": None, "train": None}


@contextlib.contextmanager
def force_config(config: TileConfig):
    """Use ``config`` for every fused call of its mode inside the block (benchmark sweeps).

    A config that cannot run a given shape (e.g. a single-launch block narrower than its halo)
    raises ``ValueError`` at the call. Process-global, not thread-local: meant for benchmarks.
    """
    if not isinstance(config, TileConfig):
        raise TypeError(f"force_config expects a TileConfig, got {type(config).__name__}")
    previous = _forced[config.mode]
    _forced[config.mode] = config
    try:
        yield config
    finally:
        _forced[config.mode] = previous


def _next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``).

    Plain integer arithmetic: ``triton.next_power_of_2`` and ``triton.cdiv`` are ``@triton.jit``
    functions in Triton 3.x, and calling them from the host costs microseconds per call.
    """
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (see ``_next_power_of_2``)."""
    return -(-a // b)


def _tile_shape(H: int, W: int, max_w: int | None = None, max_elements: int | None = None) -> tuple[int, int]:
    max_w = MAX_BLOCK_W if max_w is None else max_w
    max_elements = MAX_BLOCK_ELEMENTS if max_elements is None else max_elements
    block_w = min(max_w, _next_power_of_2(W))
    block_h = min(_next_power_of_2(H), max(1, max_elements // block_w))
    return block_h, block_w


def eval_tile_shape(H: int, W: int, num_stages: int, max_w: int | None = None,
                    max_elements: int | None = None) -> tuple[int, int] | None:
    """Block ``(BLOCK_H, BLOCK_W)`` of the single-launch inference kernel, or ``None`` to fall back.

    The block holds the output tile plus a halo of ``S = num_stages`` pixels on every side, so the
    tile is ``(BLOCK_H - 2S) x (BLOCK_W - 2S)``. The block is the smallest power of two covering
    the image plus halo, capped at ``max_w`` (default ``EVAL_MAX_BLOCK_W``) wide and
    ``max_elements`` (default ``EVAL_MAX_BLOCK_ELEMENTS``) in all. Rule (deterministic): the single
    launch is used when, in each dimension, the tile is at least one pixel and either covers the
    whole image (one tile) or is at least half the block (halo recompute at most 4x the useful
    convs); otherwise ``None``: the per-stage kernel runs instead (e.g. ``N > 9`` with a 32-row block).
    """
    max_w = EVAL_MAX_BLOCK_W if max_w is None else max_w
    max_elements = EVAL_MAX_BLOCK_ELEMENTS if max_elements is None else max_elements
    halo = 2 * num_stages
    block_w = min(max_w, _next_power_of_2(W + halo))
    block_h = min(_next_power_of_2(H + halo), max(1, max_elements // block_w))
    for block, extent in ((block_h, H), (block_w, W)):
        tile = block - halo
        if tile < 1 or (tile < extent and 2 * tile < block):
            return None
    return block_h, block_w


def default_eval_config(H: int, W: int, num_stages: int) -> TileConfig:
    """The tiling ``cascade_inference`` uses unless one is forced (the rule of ``eval_tile_shape``)."""
    block = eval_tile_shape(H, W, num_stages)
    if block is not None:
        return TileConfig("eval", *block, single_launch=True)
    return TileConfig("eval", *_tile_shape(H, W))


def default_train_config(H: int, W: int) -> TileConfig:
    """The tiling of the training kernels unless one is forced."""
    return TileConfig("train", *_tile_shape(H, W))


def eval_configs(H: int, W: int, num_stages: int) -> list[TileConfig]:
    """Candidate eval tilings for an ``H x W`` image and ``num_stages`` stages, the default first.

    Single-launch blocks of 1024-4096 pixels, 32-128 wide, whose tile keeps at least half the
    block in each dimension it does not cover, with 4 and 8 warps; and per-stage blocks.
    """
    configs = [default_eval_config(H, W, num_stages)]
    for max_w in (32, 64, 128):
        for elements in (1024, 2048, 4096):
            block = eval_tile_shape(H, W, num_stages, max_w, elements)
            if block is not None:
                configs += [TileConfig("eval", *block, warps, True) for warps in (4, 8)]
    for max_w, elements in ((64, 1024), (128, 2048)):
        configs.append(TileConfig("eval", *_tile_shape(H, W, max_w, elements)))
    return list(dict.fromkeys(configs))


def train_configs(H: int, W: int) -> list[TileConfig]:
    """Candidate training tilings (per-stage forward and backward kernels), the default first."""
    configs = [default_train_config(H, W)]
    for max_w in (32, 64, 128):
        for elements in (512, 1024, 2048):
            block = _tile_shape(H, W, max_w, elements)
            configs += [TileConfig("train", *block, warps) for warps in (4, 8)]
    return list(dict.fromkeys(configs))


def _eval_config(H: int, W: int, S: int) -> TileConfig:
    config = _forced["eval"] or default_eval_config(H, W, S)
    if config.single_launch and min(config.block_h, config.block_w) - 2 * S < 1:
        raise ValueError(f"forced eval config {config.name}: a block of {config.block_h}x{config.block_w} "
                         f"leaves no output tile inside a halo of {S} pixels")
    return config


def _train_config(H: int, W: int) -> TileConfig:
    return _forced["train"] or default_train_config(H, W)


# ---------------------------------------------------------------------------------------------
# Launch wrappers and custom ops.


def _output_memory_format(y: torch.Tensor) -> torch.memory_format:
    """The layout ``torch.cat`` would give: channels_last for channels_last inputs."""
    if not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _grid(B: int, C: int, H: int, W: int, block_h: int, block_w: int) -> tuple[int, int, int]:
    return (B * C, _cdiv(H, block_h), _cdiv(W, block_w))


def _parity_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of ``t[:, 0::2]`` / ``t[:, 1::2]`` (the latter at element offset ``t.stride(1)``)."""
    sb, sc, sh, sw = t.stride()
    return sb, 2 * sc, sh, sw


def _check_inputs(y: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int, int, int]:
    if y.dim() != 4 or y.shape[1] % 2:
        raise ValueError(f"fused cascade expects y of shape (B, 2c, H, W), got {tuple(y.shape)}")
    B, two_c, H, W = y.shape
    c = two_c // 2
    if weight.dim() != 3 or tuple(weight.shape[1:]) != (c, 9):
        raise ValueError(f"fused cascade expects weight (S, {c}, 9), got {tuple(weight.shape)}")
    return B, c, H, W, weight.shape[0]


def _empty_output(y: torch.Tensor, num_stages: int) -> torch.Tensor:
    B, two_c, H, W = y.shape
    shape = (B, (num_stages + 1) * (two_c // 2), H, W)
    return torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=_output_memory_format(y))


def _check_stats_eps(eps: list[float], S: int) -> None:
    if len(eps) != S:
        raise ValueError(f"fused cascade expects {S} BatchNorm eps values, got {len(eps)}")


@_on_tensor_device
def eval_cascade(y: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                 shift: torch.Tensor) -> torch.Tensor:
    """Inference cascade with BatchNorm folded: ``d_k = dwconv(d_{k-1}, w_k) * scale_k + shift_k``.

    Args:
        y: ``(B, 2c, H, W)``, any strides, fp32/fp16/bf16.
        weight: ``(S, c, 9)`` fp32 depthwise 3x3 weights, row-major taps.
        scale, shift: ``(S, c)`` fp32, the folded BatchNorm of each stage.

    Returns:
        ``(B, (S + 1) c, H, W)`` in ``y``'s dtype and layout.

    One launch of ``_eval_cascade_kernel`` (all stages per tile, halo of ``S`` pixels) when the
    tiling (``default_eval_config`` unless forced) is single-launch, else ``_stage_forward_kernel``
    once per stage. Besides the output and the kernel's scratch it allocates nothing and copies
    nothing from the host, so it can be captured in a CUDA graph.
    """
    B, c, H, W, S = _check_inputs(y, weight)
    out = _empty_output(y, S)
    config = _eval_config(H, W, S)
    # The kernels index the (S, c) parameters densely (no-ops for the cached fp32 tensors).
    weight, scale, shift = weight.contiguous(), scale.contiguous(), shift.contiguous()
    y_parity = _parity_strides(y)
    if config.single_launch:
        # One launch for all stages; intermediates never leave the program's scratch.
        block_h, block_w = config.block_h, config.block_w
        n_tiles_h = _cdiv(H, block_h - 2 * S)
        n_tiles_w = _cdiv(W, block_w - 2 * S)
        num_tiles = B * c * n_tiles_h * n_tiles_w
        if num_tiles == 0:
            return out
        num_programs = min(num_tiles, EVAL_MAX_PROGRAMS)
        # Tile indices (and t + num_programs) are int32 in the kernel; pixel offsets are int64.
        if num_tiles + num_programs >= 2**31:
            raise ValueError(f"too many tiles ({num_tiles}) for one launch: split the batch")
        scratch = torch.empty((num_programs, 2, block_h, block_w), dtype=torch.float32, device=y.device)
        _launch(
            _eval_cascade_kernel, (num_programs,),
            y, y.stride(1), y, weight, scale, shift, out, scratch,
            c, H, W, n_tiles_h, n_tiles_w, num_tiles,
            *y_parity, *y_parity, *out.stride(),
            NUM_STAGES=S, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=config.num_warps,
        )
        return out
    # Per-stage kernel: one launch per stage, re-reading the previous slot.
    grid = _grid(B, c, H, W, config.block_h, config.block_w)
    if grid[0] == 0:
        return out
    slot = c * out.stride(1)
    for s in range(S):
        src, src_off, src_strides = (y, y.stride(1), y_parity) if s == 0 else (out, s * slot, out.stride())
        _launch(
            _stage_forward_kernel, grid,
            src, src_off, scale, 0, shift, 0, weight, s * c * 9,
            out, (s + 1) * slot, scale, s * c, shift, s * c,
            out, 0, y, 0, scale,
            c, H, W, grid[1], grid[2], 1, c,
            *src_strides, *out.stride(), *out.stride(), *y_parity,
            SRC_AFFINE=False, DST_AFFINE=True, WRITE_PREV=s == 0, ADD_ODD=s == 0, STATS=False,
            BLOCK_H=config.block_h, BLOCK_W=config.block_w, num_warps=config.num_warps,
        )
    return out


# The custom op ``cmrf::cascade_inference`` (what inference and torch.compile call). Eager callers
# that are not being traced may call ``eval_cascade`` itself and skip the dispatcher's overhead.
cascade_inference = torch.library.custom_op("cmrf::cascade_inference", eval_cascade, mutates_args=())


@cascade_inference.register_fake
def _(y, weight, scale, shift):
    return _empty_output(y, weight.shape[0])


@_on_tensor_device
def train_forward(
    y: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
    fixed_stats: torch.Tensor | None, eps: list[float], use_batch_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-capable cascade that keeps every stage's conv output for the backward pass.

    Args:
        y: ``(B, 2c, H, W)``, any strides, fp32/fp16/bf16.
        weight: ``(S, c, 9)`` fp32 depthwise weights.
        gamma, beta: ``(S, c)`` fp32 BatchNorm affine parameters (ones/zeros when not affine).
        fixed_stats: ``(2, S, c)`` fp32 running mean and variance, used (and required) when
            ``use_batch_stats`` is False; ``None`` otherwise.
        eps: the ``S`` BatchNorm epsilons (host floats: kernel arguments, never copied to the device).
        use_batch_stats: normalise with the batch statistics (training mode) or ``fixed_stats``.

    Returns:
        ``out`` ``(B, (S + 1) c, H, W)``; ``z`` ``(S, B, c, H, W)`` the raw conv outputs in ``y``'s
        dtype; ``stats`` ``(STATS_ROWS, S, c)`` fp32: rows ``MEAN``, ``VAR`` (biased), ``INVSTD``,
        ``SCALE``, ``SHIFT`` (folded affine) and ``UNBIASED_VAR`` each stage normalised with.

    Launches ``2 S + 1`` kernels: per stage the conv and its statistics (combined on the device in
    a fixed order), then the last stage's affine.
    """
    B, c, H, W, S = _check_inputs(y, weight)
    _check_stats_eps(eps, S)
    out = _empty_output(y, S)
    z = torch.empty((S, B, c, H, W), dtype=y.dtype, device=y.device)
    stats = torch.empty((STATS_ROWS, S, c), dtype=torch.float32, device=y.device)
    config = _train_config(H, W)
    grid = _grid(B, c, H, W, config.block_h, config.block_w)
    num_partials = B * grid[1] * grid[2]
    if fixed_stats is None:
        if not use_batch_stats:
            raise ValueError("cascade_forward needs fixed_stats when use_batch_stats is False")
        fixed_stats = stats  # not read
    partial = stats  # not read with fixed statistics
    if use_batch_stats:
        partial = torch.empty((3, c, num_partials), dtype=torch.float32, device=y.device)
    n = B * H * W
    unbiased_factor = n / (n - 1) if n > 1 else float("nan")
    plane = S * c
    slot = c * out.stride(1)
    y_parity = _parity_strides(y)
    z_strides = z.stride()[1:]
    meta = dict(BLOCK_H=config.block_h, BLOCK_W=config.block_w, num_warps=config.num_warps)
    for s in range(S):
        if s == 0:
            src, src_off, src_strides = y, y.stride(1), y_parity
        else:
            src, src_off, src_strides = z, (s - 1) * z.stride(0), z_strides
        prev_stage = max(s - 1, 0) * c
        if grid[0]:
            _launch(
                _stage_forward_kernel, grid,
                src, src_off, stats, SCALE * plane + prev_stage, stats, SHIFT * plane + prev_stage,
                weight, s * c * 9,
                z, s * z.stride(0), stats, 0, stats, 0,
                out, s * slot, y, 0, partial,
                c, H, W, grid[1], grid[2], num_partials, c * num_partials,
                *src_strides, *z_strides, *out.stride(), *y_parity,
                SRC_AFFINE=s > 0, DST_AFFINE=False, WRITE_PREV=True, ADD_ODD=s == 0, STATS=use_batch_stats,
                **meta,
            )
        _launch(
            _stats_kernel, (c,),
            partial, gamma, beta, fixed_stats, stats,
            s * c, plane, num_partials, c * num_partials, float(eps[s]), unbiased_factor,
            FROM_PARTIALS=use_batch_stats, BLOCK=REDUCE_BLOCK,
        )
    if grid[0]:
        last = (S - 1) * c
        _launch(
            _affine_kernel, grid, z, (S - 1) * z.stride(0),
            stats, SCALE * plane + last, stats, SHIFT * plane + last, out, S * slot,
            c, H, W, *z_strides, *out.stride(), **meta,
        )
    return out, z, stats


cascade_forward = torch.library.custom_op("cmrf::cascade_forward", train_forward, mutates_args=())


@cascade_forward.register_fake
def _(y, weight, gamma, beta, fixed_stats, eps, use_batch_stats):
    B, c, H, W, S = _check_inputs(y, weight)
    z = y.new_empty((S, B, c, H, W))
    return _empty_output(y, S), z, y.new_empty((STATS_ROWS, S, c), dtype=torch.float32)


@_on_tensor_device
def train_backward(
    grad_out: torch.Tensor, y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor,
    stats: torch.Tensor, use_batch_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``cascade_forward``'s ``out`` w.r.t. ``y``, ``weight``, ``gamma`` and ``beta``.

    Args:
        grad_out: ``(B, (S + 1) c, H, W)``, any strides (expanded gradients too).
        y, z, weight, gamma, stats, use_batch_stats: as given to / returned by ``cascade_forward``.

    Returns:
        ``grad_y`` (``y``'s dtype and layout), ``grad_weight`` ``(S, c, 9)``, ``grad_gamma`` and
        ``grad_beta`` ``(S, c)``, all fp32 except ``grad_y``.

    Launches ``2 S + 1`` kernels: per stage the transposed conv and its per-channel reductions
    (on the device, fixed order), then the first half's gradient.
    """
    B, c, H, W, S = _check_inputs(y, weight)
    device = y.device
    config = _train_config(H, W)
    grid = _grid(B, c, H, W, config.block_h, config.block_w)
    num_partials = B * grid[1] * grid[2]
    plane = S * c
    partials = torch.empty((11, c, num_partials), dtype=torch.float32, device=device)
    stats_partial, wgrad_partial = partials[:2], partials[2:]
    grad_weight = torch.empty_like(weight)
    # Separate tensors: a custom op's outputs may not alias each other.
    grad_gamma = torch.empty((S, c), dtype=torch.float32, device=device)
    grad_beta = torch.empty((S, c), dtype=torch.float32, device=device)
    coef = torch.empty((3, c), dtype=torch.float32, device=device)
    grad_y = torch.empty_like(y, memory_format=_output_memory_format(y))
    if grid[0] == 0:
        return grad_y, grad_weight.zero_(), grad_gamma.zero_(), grad_beta.zero_()
    # G_k (gradient of d_k) for 0 < k < S, ping-ponged; G_S is the last slot's gradient itself.
    buffers = torch.empty((1 + (S > 2), B, c, H, W), dtype=torch.float32, device=device)
    buffer_strides = buffers.stride()[1:]
    go_slot = c * grad_out.stride(1)
    y_parity, gy_parity = _parity_strides(y), _parity_strides(grad_y)
    z_strides = z.stride()[1:]
    inv_n = 1.0 / (B * H * W)
    meta = dict(BLOCK_H=config.block_h, BLOCK_W=config.block_w, num_warps=config.num_warps)
    next_g = None
    for k in range(S, -1, -1):
        has_next = k < S
        gslot = (grad_out, k * go_slot, grad_out.stride())
        cur = (z, (k - 1) * z.stride(0), z_strides) if k > 0 else (y, y.stride(1), y_parity)
        if k == S:
            g_dst = gslot  # not written: G_S is the slot's gradient
        elif k > 0:
            g_dst = (buffers, (k % buffers.shape[0]) * buffers.stride(0), buffer_strides)
        else:
            g_dst = (grad_y, grad_y.stride(1), gy_parity)
        # Unused pointer arguments get any valid tensor of the right device.
        nxt = next_g if has_next else gslot
        next_z_off = k * z.stride(0) if has_next else 0
        cur_stage = (k - 1) * c if k > 0 else 0
        _launch(
            _stage_backward_kernel, grid,
            gslot[0], gslot[1], nxt[0], nxt[1], z, next_z_off, coef, weight, min(k, S - 1) * c * 9,
            cur[0], cur[1], stats, cur_stage, plane,
            g_dst[0], g_dst[1], grad_y, 0, stats_partial, wgrad_partial,
            c, H, W, grid[1], grid[2], num_partials, c * num_partials,
            *gslot[2], *nxt[2], *z_strides, *cur[2], *g_dst[2], *gy_parity,
            HAS_NEXT=has_next, CUR_IS_Z=k > 0, WRITE_G=k < S, WRITE_ODD=k == 0, **meta,
        )
        if has_next or k > 0:
            _launch(
                _backward_reduce_kernel, (c,),
                stats_partial, wgrad_partial, stats, gamma, grad_weight, grad_gamma, grad_beta, coef,
                c, k * c * 9, cur_stage, plane, num_partials, c * num_partials, inv_n,
                HAS_NEXT=has_next, HAS_CUR=k > 0, USE_BATCH_STATS=use_batch_stats, BLOCK=REDUCE_BLOCK,
            )
        next_g = g_dst
    return grad_y, grad_weight, grad_gamma, grad_beta


cascade_backward = torch.library.custom_op("cmrf::cascade_backward", train_backward, mutates_args=())


@cascade_backward.register_fake
def _(grad_out, y, z, weight, gamma, stats, use_batch_stats):
    grad_y = torch.empty_like(y, memory_format=_output_memory_format(y))
    return grad_y, torch.empty_like(weight), torch.empty_like(gamma), torch.empty_like(gamma)


class FusedCascade(torch.autograd.Function):
    """Autograd around ``cascade_forward``/``cascade_backward``.

    ``apply(y, weight, gamma, beta, fixed_stats, eps, use_batch_stats, affine_stages, *params)``:
    ``weight``/``gamma``/``beta``/``fixed_stats`` are the stacked fp32 tensors the kernels read
    (detached, possibly cached by the caller); ``params`` are the modules' own parameters, the
    ``S`` conv weights then ``gamma_s, beta_s`` for each stage index in ``affine_stages``: they
    are inputs only so that autograd routes their gradients (slices of the kernels' stacked
    gradients, cast to each parameter's dtype). Returns ``(out, stats)``; ``stats`` (see
    ``cascade_forward``) is non-differentiable and lets the caller update running statistics.
    """

    @staticmethod
    def forward(ctx, y, weight, gamma, beta, fixed_stats, eps, use_batch_stats, affine_stages, *params):
        forward = torch.ops.cmrf.cascade_forward if torch.compiler.is_compiling() else train_forward
        out, z, stats = forward(y, weight, gamma, beta, fixed_stats, eps, use_batch_stats)
        ctx.save_for_backward(y, z, weight, gamma, stats)
        ctx.use_batch_stats, ctx.affine_stages = use_batch_stats, affine_stages
        ctx.param_meta = [(p.shape, p.dtype) for p in params]
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, grad_out, _grad_stats):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # create_graph=True: the kernels' gradients have no graph of their own, so a second
            # derivative would silently miss this op's part (a gradient penalty would be wrong).
            raise RuntimeError(
                "the fused CMRF cascade has no double backward (autograd.grad(..., create_graph=True) "
                "through it); for higher-order gradients run the reference: CMRF(fused=False) or "
                "CMRF_FUSED=0"
            )
        y, z, weight, gamma, stats = ctx.saved_tensors
        backward = torch.ops.cmrf.cascade_backward if torch.compiler.is_compiling() else train_backward
        grad_y, grad_weight, grad_gamma, grad_beta = backward(
            grad_out, y, z, weight, gamma, stats, ctx.use_batch_stats
        )
        S = weight.shape[0]
        flat = list(grad_weight.unbind(0))
        gammas, betas = grad_gamma.unbind(0), grad_beta.unbind(0)
        for s in ctx.affine_stages:
            flat += [gammas[s], betas[s]]
        grads = [g.view(shape).to(dtype) for g, (shape, dtype) in zip(flat, ctx.param_meta)]
        assert len(grads) == S + 2 * len(ctx.affine_stages)
        return (grad_y, None, None, None, None, None, None, None, *grads)
