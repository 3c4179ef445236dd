"""Triton kernels for CMRF's cascade of depthwise 3x3 conv + BatchNorm stages (2-D inputs).

Notation: ``y`` is the ``(B, 2c, H, W)`` output of CMRF's first pointwise conv, ``even = y[:, 1::2]``,
``odd = y[:, 0::2]``; stage ``k = 1..S`` (``S = N - 1``) computes ``z_k = dwconv3x3(d_{k-1}, w_k)``
and ``d_k = BN_k(z_k)`` with ``d_0 = even``; the result is ``[odd + even, d_1, ..., d_S]``
(``(B, (S + 1) c, H, W)``). ``cmrf.ops.cascade.cascade_concat_reference`` is the oracle.

Kernels (one program = one ``(batch, channel)`` plane tile of ``BLOCK_H x BLOCK_W`` pixels):

* ``_eval_cascade_kernel`` (inference, BatchNorm folded): ALL stages of a tile in one program and
  one launch. The block is the output tile plus an ``S``-pixel halo; the intermediate stages
  ping-pong between two fp32 scratch planes private to the program (zeroed outside the image
  before the next stage reads them), and every stage's tile centre goes straight into its concat
  slot, as does ``odd + even``. The grid is persistent (at most ``EVAL_MAX_PROGRAMS`` programs
  loop over the tiles), which bounds the scratch. ``eval_tile_shape`` picks the block and decides
  the fallback to the per-stage kernel below when the halo would eat most of the block.

* ``_stage_forward_kernel``: loads the stage input with a one-pixel halo, applying the previous
  stage's BatchNorm affine while loading (zero outside the image, exactly like the reference's
  zero padding of the *normalised* tensor), convolves, and writes either the raw conv output
  ``z_k`` (training: BatchNorm needs batch statistics first) plus per-tile ``(count, sum, M2)``
  partials for those statistics, or the BatchNorm-folded ``d_k`` straight into its slot of the
  concatenated output (inference). The same program also writes the previous stage's ``d_{k-1}``
  (or ``odd + even``) into its slot, so no ``torch.cat`` and no separate BatchNorm pass exist.
* ``_affine_kernel``: writes the last stage's ``d_S`` from ``z_S`` once its statistics are known.
* ``_stage_backward_kernel``: one launch per stage, last stage first. It forms the gradient of
  ``z_{k+1}`` on the fly from the stored gradient of ``d_{k+1}`` and ``z_{k+1}`` (BatchNorm backward
  is affine in both once the per-channel reductions are known), applies the transposed depthwise
  conv, adds the gradient flowing into slot ``k`` and writes the gradient of ``d_k``; it also emits
  per-tile partials of the weight gradient of stage ``k + 1`` and of the BatchNorm reductions of
  stage ``k``.

Per-tile partials are combined on the host with plain torch reductions (Chan's parallel variance
formula for the statistics), which is deterministic and numerically stable, unlike float atomics.

All arithmetic is in fp32 whatever the storage dtype (fp32, fp16, bf16). Element offsets are
64-bit, so tensors beyond 2**31 elements are addressed correctly. Any strides are accepted
(channels_last, sliced views).

The three host functions are registered as ``torch.library`` custom ops (``cmrf::cascade_inference``,
``cmrf::cascade_forward``, ``cmrf::cascade_backward``) with fake implementations, so
``torch.compile`` keeps them in its graph as opaque kernels.

Importing this module imports Triton; ``cmrf.ops.cascade`` imports it lazily, only when the fused
path is chosen. ``TRITON_INTERPRET=1`` must be set before the first import for the kernels to run
on CPU tensors through Triton's interpreter (``INTERPRETED`` records which mode they were built in).
"""

from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl

# Largest tile: BLOCK_W <= MAX_BLOCK_W and BLOCK_H * BLOCK_W <= MAX_BLOCK_ELEMENTS (powers of two).
# Module constants rather than arguments so tests can shrink them to exercise many tiles.
MAX_BLOCK_W = 64
MAX_BLOCK_ELEMENTS = 1024

# Single-launch inference kernel: block (halo included) at most EVAL_MAX_BLOCK_W wide and
# EVAL_MAX_BLOCK_ELEMENTS in all, and at most EVAL_MAX_PROGRAMS programs (persistent grid), which
# bounds its fp32 scratch to EVAL_MAX_PROGRAMS * 2 * EVAL_MAX_BLOCK_ELEMENTS * 4 bytes (32 MiB).
EVAL_MAX_BLOCK_W = 64
EVAL_MAX_BLOCK_ELEMENTS = 2048
EVAL_MAX_PROGRAMS = 2048

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
def _stage_forward_kernel(
    src_ptr, src_scale_ptr, src_shift_ptr, weight_ptr,
    dst_ptr, dst_scale_ptr, dst_shift_ptr,
    prev_ptr, odd_ptr, partial_ptr,
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
    rows = tile_h * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    cols = tile_w * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    inside = (rows < H) & (cols < W)
    src_base = src_ptr + b * src_sb + ch.to(tl.int64) * src_sc
    if SRC_AFFINE:
        src_scale = tl.load(src_scale_ptr + ch)
        src_shift = tl.load(src_shift_ptr + ch)

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
        acc += v * tl.load(weight_ptr + ch * 9 + tap)
        if WRITE_PREV and tap == 4:
            # The centre tap is this tile's own input: it is the previous concat slot's value.
            prev = v
            if ADD_ODD:
                odd_base = odd_ptr + b * odd_sb + ch.to(tl.int64) * odd_sc
                odd_offsets = rows.to(tl.int64) * odd_sh + cols.to(tl.int64) * odd_sw
                prev += tl.load(odd_base + odd_offsets, mask=inside, other=0.0).to(tl.float32)
            prev_base = prev_ptr + b * prev_sb + ch.to(tl.int64) * prev_sc
            prev_offsets = rows.to(tl.int64) * prev_sh + cols.to(tl.int64) * prev_sw
            tl.store(prev_base + prev_offsets, prev.to(prev_ptr.dtype.element_ty), mask=inside)

    if DST_AFFINE:
        acc = acc * tl.load(dst_scale_ptr + ch) + tl.load(dst_shift_ptr + ch)
    stored = acc.to(dst_ptr.dtype.element_ty)
    dst_base = dst_ptr + b * dst_sb + ch.to(tl.int64) * dst_sc
    dst_offsets = rows.to(tl.int64) * dst_sh + cols.to(tl.int64) * dst_sw
    tl.store(dst_base + dst_offsets, stored, mask=inside)

    if STATS:
        # Statistics of the stored (rounded) values, as BatchNorm sees them in the reference.
        z = tl.where(inside, stored.to(tl.float32), 0.0)
        count = _tile_sum(inside.to(tl.float32))
        total = _tile_sum(z)
        deviation = tl.where(inside, z - total / count, 0.0)
        m2 = _tile_sum(deviation * deviation)
        index = ch.to(tl.int64) * num_partials + (b * n_tiles_h + tile_h) * n_tiles_w + tile_w
        tl.store(partial_ptr + index, count)
        tl.store(partial_ptr + partial_plane + index, total)
        tl.store(partial_ptr + 2 * partial_plane + index, m2)


@triton.jit
def _affine_kernel(
    src_ptr, scale_ptr, shift_ptr, dst_ptr, C, H, W,
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
    src = src_ptr + b * src_sb + ch.to(tl.int64) * src_sc + r64 * src_sh + c64 * src_sw
    v = tl.load(src, mask=inside, other=0.0).to(tl.float32)
    v = v * tl.load(scale_ptr + ch) + tl.load(shift_ptr + ch)
    dst = dst_ptr + b * dst_sb + ch.to(tl.int64) * dst_sc + r64 * dst_sh + c64 * dst_sw
    tl.store(dst, v.to(dst_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _stage_backward_kernel(
    gslot_ptr,
    next_g_ptr, next_z_ptr, next_a_ptr, next_b_ptr, next_c_ptr, next_w_ptr,
    cur_ptr, cur_scale_ptr, cur_shift_ptr, cur_mean_ptr, cur_invstd_ptr,
    g_ptr, godd_ptr, stats_partial_ptr, wgrad_partial_ptr,
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
    # next_*: stage k + 1: its G and z, the per-channel coefficients with
    # grad z_{k+1} = a * G_{k+1} + b * z_{k+1} + c, and its weights. cur: z_k when CUR_IS_Z (then
    # d_k = z_k * scale + shift and x_hat = (z_k - mean) * invstd), else d_0 = even.
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

    g_slot = tl.load(gslot_ptr + b * gslot_sb + ch64 * gslot_sc + r64 * gslot_sh + c64 * gslot_sw,
                     mask=inside, other=0.0).to(tl.float32)
    g = g_slot
    cur_base = cur_ptr + b * cur_sb + ch64 * cur_sc
    if CUR_IS_Z:
        cur_scale = tl.load(cur_scale_ptr + ch)
        cur_shift = tl.load(cur_shift_ptr + ch)

    if HAS_NEXT:
        coef_a = tl.load(next_a_ptr + ch)
        coef_b = tl.load(next_b_ptr + ch)
        coef_c = tl.load(next_c_ptr + ch)
        next_g_base = next_g_ptr + b * next_g_sb + ch64 * next_g_sc
        next_z_base = next_z_ptr + b * next_z_sb + ch64 * next_z_sc
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
            g += gz * tl.load(next_w_ptr + ch * 9 + tap)
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
        x_hat = (z - tl.load(cur_mean_ptr + ch)) * tl.load(cur_invstd_ptr + ch)
        g_in = tl.where(inside, g, 0.0)
        tl.store(stats_partial_ptr + ch64 * num_partials + tile_index, _tile_sum(g_in))
        tl.store(stats_partial_ptr + partial_plane + ch64 * num_partials + tile_index,
                 _tile_sum(tl.where(inside, g_in * x_hat, 0.0)))
    if WRITE_G:
        tl.store(g_ptr + b * g_sb + ch64 * g_sc + r64 * g_sh + c64 * g_sw,
                 g.to(g_ptr.dtype.element_ty), mask=inside)
    if WRITE_ODD:
        tl.store(godd_ptr + b * godd_sb + ch64 * godd_sc + r64 * godd_sh + c64 * godd_sw,
                 g_slot.to(godd_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _eval_cascade_kernel(
    even_ptr, odd_ptr, weight_ptr, scale_ptr, shift_ptr, out_ptr, scratch_ptr,
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
        even = tl.load(even_ptr + b * even_sb + ch64 * even_sc + r64 * even_sh + c64 * even_sw,
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
                acc += v * tl.load(weight_ptr + (k * C + ch) * 9 + tap)
            d = acc * tl.load(scale_ptr + k * C + ch) + tl.load(shift_ptr + k * C + ch)
            # The reference zero-pads every stage's input: outside the image d_k must read as 0
            # for stage k + 1, not as the folded BatchNorm shift.
            d = tl.where(in_image, d, 0.0)
            tl.store(scratch + ((k + 1) % 2) * PLANE + local, d)
            slot = ((k + 1) * C + ch).to(tl.int64)
            tl.store(out_pixel + slot * out_sc, d.to(out_ptr.dtype.element_ty), mask=store_mask)


INTERPRETED = type(_stage_forward_kernel).__name__ == "InterpretedFunction"


def _launch(kernel, grid, *args, **meta) -> None:
    """Launch ``kernel`` on ``grid``; counts launches for tests."""
    launch_counts[getattr(kernel, "fn", kernel).__name__] += 1
    kernel[grid](*args, **meta)


def _tile_shape(H: int, W: int) -> tuple[int, int]:
    block_w = min(MAX_BLOCK_W, triton.next_power_of_2(W))
    block_h = min(triton.next_power_of_2(H), max(1, MAX_BLOCK_ELEMENTS // block_w))
    return block_h, block_w


def eval_tile_shape(H: int, W: int, num_stages: int) -> tuple[int, int] | None:
    """Block ``(BLOCK_H, BLOCK_W)`` of the single-launch inference kernel, or ``None`` to fall back.

    The block holds the output tile plus a halo of ``S = num_stages`` pixels on every side, so the
    tile is ``(BLOCK_H - 2S) x (BLOCK_W - 2S)``. The block is the smallest power of two covering
    the image plus halo, capped at ``EVAL_MAX_BLOCK_W`` wide and ``EVAL_MAX_BLOCK_ELEMENTS`` in all.
    Rule (deterministic, depends only on ``H``, ``W``, ``S`` and the caps): the single launch is
    used when, in each dimension, the tile is at least one pixel and either covers the whole image
    (one tile) or is at least half the block (so halo recompute costs at most 4x the useful convs);
    otherwise ``None``: the per-stage kernel runs instead (e.g. ``N > 9`` with a 32-row block).
    """
    halo = 2 * num_stages
    block_w = min(EVAL_MAX_BLOCK_W, triton.next_power_of_2(W + halo))
    block_h = min(triton.next_power_of_2(H + halo), max(1, EVAL_MAX_BLOCK_ELEMENTS // block_w))
    for block, extent in ((block_h, H), (block_w, W)):
        tile = block - halo
        if tile < 1 or (tile < extent and 2 * tile < block):
            return None
    return block_h, block_w


def _output_memory_format(y: torch.Tensor) -> torch.memory_format:
    """The layout ``torch.cat`` would give: channels_last for channels_last inputs."""
    if not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())


def _combine_statistics(partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance from per-tile ``(count, sum, M2)`` partials ``(3, C, P)``.

    Chan's parallel formula: ``M2 = sum(M2_i + n_i (mean_i - mean)^2)``, stable for large counts.
    """
    count, total, m2 = partial.unbind(0)
    n = count.sum(dim=1)
    mean = total.sum(dim=1) / n
    tile_mean = total / count
    m2 = m2.sum(dim=1) + (count * (tile_mean - mean[:, None]).square()).sum(dim=1)
    return mean, m2 / n


def _grid(B: int, C: int, H: int, W: int, block_h: int, block_w: int) -> tuple[int, int, int]:
    return (B * C, triton.cdiv(H, block_h), triton.cdiv(W, block_w))


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


@torch.library.custom_op("cmrf::cascade_inference", mutates_args=())
def cascade_inference(y: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      shift: torch.Tensor) -> torch.Tensor:
    """Inference cascade with BatchNorm folded: ``d_k = dwconv(d_{k-1}, w_k) * scale_k + shift_k``.

    Args:
        y: ``(B, 2c, H, W)``, any strides, fp32/fp16/bf16.
        weight: ``(S, c, 9)`` fp32 depthwise 3x3 weights, row-major taps.
        scale, shift: ``(S, c)`` fp32, the folded BatchNorm of each stage.

    Returns:
        ``(B, (S + 1) c, H, W)`` in ``y``'s dtype and layout.

    Runs ``_eval_cascade_kernel`` once (all stages per tile, halo of ``S`` pixels) when
    ``eval_tile_shape(H, W, S)`` gives a block, else ``_stage_forward_kernel`` once per stage.
    """
    B, c, H, W, S = _check_inputs(y, weight)
    out = _empty_output(y, S)
    even, odd = y[:, 1::2], y[:, 0::2]
    eval_block = eval_tile_shape(H, W, S)
    if eval_block is not None:
        # One launch for all stages; intermediates never leave the program's scratch.
        block_h, block_w = eval_block
        n_tiles_h = triton.cdiv(H, block_h - 2 * S)
        n_tiles_w = triton.cdiv(W, block_w - 2 * S)
        num_tiles = B * c * n_tiles_h * n_tiles_w
        if num_tiles == 0:
            return out
        num_programs = min(num_tiles, EVAL_MAX_PROGRAMS)
        # Tile indices (and t + num_programs) are int32 in the kernel; pixel offsets are int64.
        if num_tiles + num_programs >= 2**31:
            raise ValueError(f"too many tiles ({num_tiles}) for one launch: split the batch")
        # The kernel indexes the (S, c) parameters densely.
        weight, scale, shift = weight.contiguous(), scale.contiguous(), shift.contiguous()
        scratch = torch.empty((num_programs, 2, block_h, block_w), dtype=torch.float32, device=y.device)
        _launch(
            _eval_cascade_kernel, (num_programs,),
            even, odd, weight, scale, shift, out, scratch,
            c, H, W, n_tiles_h, n_tiles_w, num_tiles,
            *_strides(even), *_strides(odd), *_strides(out),
            NUM_STAGES=S, BLOCK_H=block_h, BLOCK_W=block_w,
        )
        return out
    # Fallback (halo too wide for the block): one launch per stage, re-reading the previous slot.
    block_h, block_w = _tile_shape(H, W)
    grid = _grid(B, c, H, W, block_h, block_w)
    for s in range(S):
        src = even if s == 0 else out[:, s * c:(s + 1) * c]
        dst = out[:, (s + 1) * c:(s + 2) * c]
        prev = out[:, :c]
        _launch(
            _stage_forward_kernel, grid,
            src, scale, shift, weight[s], dst, scale[s], shift[s], prev, odd, scale,
            c, H, W, grid[1], grid[2], 1, c,
            *_strides(src), *_strides(dst), *_strides(prev), *_strides(odd),
            SRC_AFFINE=False, DST_AFFINE=True, WRITE_PREV=s == 0, ADD_ODD=s == 0, STATS=False,
            BLOCK_H=block_h, BLOCK_W=block_w,
        )
    return out


@cascade_inference.register_fake
def _(y, weight, scale, shift):
    return _empty_output(y, weight.shape[0])


@torch.library.custom_op("cmrf::cascade_forward", mutates_args=())
def cascade_forward(
    y: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
    mean: torch.Tensor, var: torch.Tensor, eps: list[float], use_batch_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-capable cascade that keeps every stage's conv output for the backward pass.

    Args:
        y: ``(B, 2c, H, W)``, any strides, fp32/fp16/bf16.
        weight: ``(S, c, 9)`` fp32 depthwise weights.
        gamma, beta: ``(S, c)`` fp32 BatchNorm affine parameters (ones/zeros when not affine).
        mean, var: ``(S, c)`` fp32 running statistics, used when ``use_batch_stats`` is False.
        eps: the ``S`` BatchNorm epsilons.
        use_batch_stats: normalise with the batch statistics (training mode) or the given ones.

    Returns:
        ``out`` ``(B, (S + 1) c, H, W)``; ``z`` ``(S, B, c, H, W)`` the raw conv outputs in ``y``'s
        dtype; the ``(S, c)`` fp32 mean and biased variance each stage normalised with.
    """
    B, c, H, W, S = _check_inputs(y, weight)
    out = _empty_output(y, S)
    z = torch.empty((S, B, c, H, W), dtype=y.dtype, device=y.device)
    block_h, block_w = _tile_shape(H, W)
    grid = _grid(B, c, H, W, block_h, block_w)
    num_partials = B * grid[1] * grid[2]
    partial = torch.empty((3, c, num_partials), dtype=torch.float32, device=y.device)
    mean, var = mean.clone(), var.clone()
    scale = torch.empty_like(gamma)
    shift = torch.empty_like(beta)
    even, odd = y[:, 1::2], y[:, 0::2]
    for s in range(S):
        src = even if s == 0 else z[s - 1]
        prev = out[:, s * c:(s + 1) * c]
        _launch(
            _stage_forward_kernel, grid,
            src, scale[max(s - 1, 0)], shift[max(s - 1, 0)], weight[s], z[s], scale[s], shift[s],
            prev, odd, partial,
            c, H, W, grid[1], grid[2], num_partials, c * num_partials,
            *_strides(src), *_strides(z[s]), *_strides(prev), *_strides(odd),
            SRC_AFFINE=s > 0, DST_AFFINE=False, WRITE_PREV=True, ADD_ODD=s == 0, STATS=use_batch_stats,
            BLOCK_H=block_h, BLOCK_W=block_w,
        )
        if use_batch_stats:
            mean[s], var[s] = _combine_statistics(partial)
        scale[s] = gamma[s] * torch.rsqrt(var[s] + eps[s])
        shift[s] = beta[s] - mean[s] * scale[s]
    last = out[:, S * c:]
    _launch(
        _affine_kernel, grid, z[S - 1], scale[S - 1], shift[S - 1], last, c, H, W,
        *_strides(z[S - 1]), *_strides(last), BLOCK_H=block_h, BLOCK_W=block_w,
    )
    return out, z, mean, var


@cascade_forward.register_fake
def _(y, weight, gamma, beta, mean, var, eps, use_batch_stats):
    B, c, H, W, S = _check_inputs(y, weight)
    z = y.new_empty((S, B, c, H, W))
    return _empty_output(y, S), z, torch.empty_like(mean), torch.empty_like(var)


def _bn_backward_coefficients(gamma, mean, invstd, sum_g, sum_g_xhat, n, use_batch_stats):
    """``(a, b, c)`` with ``grad z = a * grad d + b * z + c`` for one BatchNorm.

    Training: ``grad z = gamma * invstd / n * (n * G - sum G - x_hat * sum(G x_hat))`` with
    ``x_hat = (z - mean) * invstd``; with fixed statistics only the ``a`` term remains.
    """
    a = gamma * invstd
    if not use_batch_stats:
        return a, torch.zeros_like(a), torch.zeros_like(a)
    b = -a * invstd * sum_g_xhat / n
    return a, b, -a * sum_g / n - b * mean


@torch.library.custom_op("cmrf::cascade_backward", mutates_args=())
def cascade_backward(
    grad_out: torch.Tensor, y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor,
    beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: list[float], use_batch_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``cascade_forward``'s ``out`` w.r.t. ``y``, ``weight``, ``gamma`` and ``beta``.

    Args:
        grad_out: ``(B, (S + 1) c, H, W)``, any strides.
        y, z, weight, gamma, beta, mean, var, eps, use_batch_stats: as given to / returned by
            ``cascade_forward``.

    Returns:
        ``grad_y`` (``y``'s dtype and layout), ``grad_weight`` ``(S, c, 9)``, ``grad_gamma`` and
        ``grad_beta`` ``(S, c)``, all fp32 except ``grad_y``.
    """
    B, c, H, W, S = _check_inputs(y, weight)
    n = B * H * W
    block_h, block_w = _tile_shape(H, W)
    grid = _grid(B, c, H, W, block_h, block_w)
    num_partials = B * grid[1] * grid[2]
    device = y.device
    invstd = torch.rsqrt(var + torch.tensor(eps, device=device, dtype=torch.float32)[:, None])
    scale = gamma * invstd
    shift = beta - mean * scale
    stats_partial = torch.empty((2, c, num_partials), dtype=torch.float32, device=device)
    wgrad_partial = torch.empty((9, c, num_partials), dtype=torch.float32, device=device)
    grad_weight = torch.empty_like(weight)
    grad_gamma = torch.empty_like(gamma)
    grad_beta = torch.empty_like(gamma)
    grad_y = torch.empty_like(y, memory_format=_output_memory_format(y))
    grad_even, grad_odd = grad_y[:, 1::2], grad_y[:, 0::2]
    # G_k (gradient of d_k) for 0 < k < S, ping-ponged; G_S is the last slot's gradient itself.
    buffers = [torch.empty((B, c, H, W), dtype=torch.float32, device=device) for _ in range(1 + (S > 2))]
    next_g = coefficients = None
    for k in range(S, -1, -1):
        gslot = grad_out[:, k * c:(k + 1) * c]
        has_next = k < S
        cur = z[k - 1] if k > 0 else y[:, 1::2]
        # G_S is not written (it is gslot); G_0 is the gradient of the even half of y.
        g_dst = gslot if k == S else (buffers[k % len(buffers)] if k > 0 else grad_even)
        # Unused pointer arguments get any valid tensor of the right device.
        next_z, next_w = (z[k], weight[k]) if has_next else (cur, weight[0])
        a, b, cc = coefficients if has_next else (gamma[0], gamma[0], gamma[0])
        sk = max(k - 1, 0)
        _launch(
            _stage_backward_kernel, grid,
            gslot, next_g if has_next else gslot, next_z, a, b, cc, next_w,
            cur, scale[sk], shift[sk], mean[sk], invstd[sk],
            g_dst, grad_odd, stats_partial, wgrad_partial,
            c, H, W, grid[1], grid[2], num_partials, c * num_partials,
            *_strides(gslot), *_strides(next_g if has_next else gslot), *_strides(next_z), *_strides(cur),
            *_strides(g_dst), *_strides(grad_odd),
            HAS_NEXT=has_next, CUR_IS_Z=k > 0, WRITE_G=k < S, WRITE_ODD=k == 0,
            BLOCK_H=block_h, BLOCK_W=block_w,
        )
        if has_next:
            grad_weight[k] = wgrad_partial.sum(dim=2).t()
        if k > 0:
            sum_g, sum_g_xhat = stats_partial.sum(dim=2).unbind(0)
            grad_beta[k - 1] = sum_g
            grad_gamma[k - 1] = sum_g_xhat
            coefficients = _bn_backward_coefficients(
                gamma[k - 1], mean[k - 1], invstd[k - 1], sum_g, sum_g_xhat, n, use_batch_stats
            )
            next_g = g_dst
    return grad_y, grad_weight, grad_gamma, grad_beta


@cascade_backward.register_fake
def _(grad_out, y, z, weight, gamma, beta, mean, var, eps, use_batch_stats):
    grad_y = torch.empty_like(y, memory_format=_output_memory_format(y))
    return grad_y, torch.empty_like(weight), torch.empty_like(gamma), torch.empty_like(gamma)


class FusedCascade(torch.autograd.Function):
    """Autograd wrapper of the fused cascade: forward keeps ``z``; backward runs the Triton kernels.

    ``forward(y, weight, gamma, beta, mean, var, eps, use_batch_stats)`` returns
    ``(out, batch_mean, batch_var)``; the statistics are non-differentiable and let the caller
    update BatchNorm running statistics.
    """

    @staticmethod
    def forward(ctx, y, weight, gamma, beta, mean, var, eps, use_batch_stats):
        weight32 = weight.detach().reshape(weight.shape[0], -1, 9).float().contiguous()
        gamma32, beta32 = gamma.detach().float().contiguous(), beta.detach().float().contiguous()
        out, z, mean, var = torch.ops.cmrf.cascade_forward(
            y, weight32, gamma32, beta32, mean.float().contiguous(), var.float().contiguous(),
            eps, use_batch_stats,
        )
        ctx.save_for_backward(y, z, weight32, gamma32, beta32, mean, var)
        ctx.eps, ctx.use_batch_stats = eps, use_batch_stats
        ctx.weight_dtype, ctx.gamma_dtype = weight.dtype, gamma.dtype
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        y, z, weight, gamma, beta, mean, var = ctx.saved_tensors
        grad_y, grad_weight, grad_gamma, grad_beta = torch.ops.cmrf.cascade_backward(
            grad_out, y, z, weight, gamma, beta, mean, var, ctx.eps, ctx.use_batch_stats
        )
        return (
            grad_y,
            grad_weight.to(ctx.weight_dtype),
            grad_gamma.to(ctx.gamma_dtype),
            grad_beta.to(ctx.gamma_dtype),
            None, None, None, None,
        )


def _affine(norm: torch.nn.BatchNorm2d, c: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if norm.affine:
        return norm.weight, norm.bias
    return torch.ones(c, device=like.device), torch.zeros(c, device=like.device)


def _update_running_stats(norm: torch.nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """Exactly what ``nn.BatchNorm2d`` does to its buffers in a training-mode forward."""
    if not (norm.training and norm.track_running_stats):
        return
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # cumulative moving average
            factor = 1.0 / float(norm.num_batches_tracked)
    with torch.no_grad():
        norm.running_mean.mul_(1 - factor).add_(mean.to(norm.running_mean.dtype), alpha=factor)
        unbiased = var * (n / (n - 1))
        norm.running_var.mul_(1 - factor).add_(unbiased.to(norm.running_var.dtype), alpha=factor)


def cascade_concat_fused(y: torch.Tensor, stages) -> torch.Tensor:
    """The fused cascade on ``stages`` (a sequence of 2-D ``ConvNorm``: depthwise 3x3 conv + BatchNorm2d).

    Reads each stage's conv weight and BatchNorm parameters and buffers, and updates the running
    statistics like PyTorch in training mode. The caller (``cmrf.ops.cascade.cascade_concat``)
    has already checked with ``fused_unsupported_reason`` that the stages qualify.

    Args:
        y: ``(B, 2c, H, W)`` fp32/fp16/bf16 on a CUDA device (or CPU under ``TRITON_INTERPRET=1``).
        stages: ``S >= 1`` modules with ``.conv`` (``Conv2d(c, c, 3, padding=1, groups=c, bias=False)``)
            and ``.norm`` (``BatchNorm2d(c)``).

    Returns:
        ``(B, (S + 1) c, H, W)``, equal to ``cascade_concat_reference(y, stages)``.
    """
    c = y.shape[1] // 2
    norms = [stage.norm for stage in stages]
    first = norms[0]
    use_batch_stats = first.training or first.running_mean is None
    n = y.shape[0] * y.shape[2] * y.shape[3]
    if use_batch_stats and n <= 1:
        raise ValueError(
            f"BatchNorm needs more than 1 value per channel when training, got input size {tuple(y.shape)}"
        )
    weight = torch.stack([stage.conv.weight.reshape(c, 9) for stage in stages])
    affines = [_affine(norm, c, y) for norm in norms]
    gamma = torch.stack([a[0] for a in affines])
    beta = torch.stack([a[1] for a in affines])
    eps = [float(norm.eps) for norm in norms]
    if first.running_mean is not None:
        mean = torch.stack([norm.running_mean for norm in norms])
        var = torch.stack([norm.running_var for norm in norms])
    else:
        mean = var = torch.zeros_like(gamma, dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and (
        y.requires_grad or weight.requires_grad or gamma.requires_grad or beta.requires_grad
    )
    if not (needs_grad or use_batch_stats):
        # Inference: fold each BatchNorm into its conv and skip storing the conv outputs.
        with torch.no_grad():
            scale = gamma.float() * torch.rsqrt(var.float() + torch.tensor(eps, device=y.device)[:, None])
            shift = beta.float() - mean.float() * scale
            return torch.ops.cmrf.cascade_inference(
                y, weight.float().contiguous(), scale.contiguous(), shift.contiguous()
            )
    out, batch_mean, batch_var = FusedCascade.apply(y, weight, gamma, beta, mean, var, eps, use_batch_stats)
    if use_batch_stats:
        for s, norm in enumerate(norms):
            _update_running_stats(norm, batch_mean[s], batch_var[s], n)
    return out
