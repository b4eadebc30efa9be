"""PixelCNN's fused step as a GPU kernel in the OpenAI Triton language.

The same program as the CPU operator (csrc/pixelcnn.cpp) on the same row caches: `span` pixels
of a block of slots, each through the masked input layer, every residual block (relu, 1x1
reduce, the masked layer over the block's row cache, 1x1 expand, residual) and the output
layers, then the inverse-CDF choice, inside one launch. (The refresh only rolls the caches up a
row: plain tensor copies, done by the launcher.) The residual blocks' caches arrive stacked in
one tensor (n, blocks, h, R, W + 2p) so that the kernel can index them by block.

Conventions as in triton_gated: IEEE-float32 `tl.dot` on zero-padded tiles; a cache entry written
and then read by other threads of the program is separated from those reads by barriers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_gated import _choose, _dot, _matrix, _row


@triton.jit(do_not_specialize=["n", "span"])
def pixelcnn_step_kernel(
    positions, noise, temperature, image_rows, block_rows, teacher, pixel, logits_out, n, span,
    in_w, in_b, reduce_w, reduce_b, masked_w, masked_b, expand_w, expand_b, oh_w, oh_b, lg_w, lg_b,
    level_scale,
    WIDTH: tl.constexpr, BLOCKS: tl.constexpr, H: tl.constexpr, R0: tl.constexpr, R: tl.constexpr,
    OUT: tl.constexpr, LEVELS: tl.constexpr, TEACHER: tl.constexpr,
    SB: tl.constexpr, IB: tl.constexpr, HB: tl.constexpr, H2B: tl.constexpr, WINB: tl.constexpr,
    OB: tl.constexpr, LB: tl.constexpr,
):
    """`span` pixels of SB slots. Tiles: IB input-layer taps, HB / H2B hidden features, WINB masked-window
    taps, OB outputs, LB levels. The image rows are (n, 1, R0, W + 2(R0-1)), each block's (h, R, W + 2(R-1))."""
    P0: tl.constexpr = R0 - 1
    K0: tl.constexpr = 2 * P0 + 1
    P: tl.constexpr = R - 1
    K: tl.constexpr = 2 * P + 1
    PADDED0: tl.constexpr = WIDTH + 2 * P0
    PADDED: tl.constexpr = WIDTH + 2 * P
    WINDOW: tl.constexpr = H * R * K  # (channel, row, column) taps of a masked layer
    slot = tl.program_id(0).to(tl.int64) * SB + tl.arange(0, SB)[:, None]  # (SB, 1)
    live = slot < n
    q = tl.arange(0, IB)[None, :]
    c = tl.arange(0, HB)[None, :]
    w = tl.arange(0, WINB)[None, :]
    level = tl.arange(0, LB)[None, :]
    column0 = tl.load(positions + slot, mask=live, other=0) % WIDTH
    temp = tl.load(temperature + slot, mask=live, other=1.0)
    image = image_rows + slot * R0 * PADDED0

    for t in range(span):
        column = column0 + t  # of the image; cache columns are padded by P0 (image) or P (blocks) on the left
        window = tl.load(image + (q // K0) * PADDED0 + column + q % K0, mask=live & (q < R0 * K0), other=0.0)
        x = _dot(window, _matrix(in_w, 0, R0 * K0, 0, 2 * H, 2 * H, IB, H2B)) + _row(in_b, 0, 2 * H, H2B)
        for b in range(BLOCKS):
            reduced = _dot(tl.maximum(x, 0.0), _matrix(reduce_w + b * 2 * H * H, 0, 2 * H, 0, H, H, H2B, HB))
            reduced = tl.maximum(reduced + _row(reduce_b, b * H, H, HB), 0.0)
            cache = block_rows + (slot * BLOCKS + b) * H * R * PADDED
            tl.debug_barrier()  # every read of this cache by the pixel before is done
            tl.store(cache + (c * R + P) * PADDED + column + P, reduced, mask=live & (c < H))  # joins its row
            tl.debug_barrier()
            channel, rest = w // (R * K), w % (R * K)
            seen = tl.load(cache + (channel * R + rest // K) * PADDED + column + rest % K, mask=live & (w < WINDOW),
                           other=0.0)
            masked = _dot(seen, _matrix(masked_w + b * WINDOW * H, 0, WINDOW, 0, H, H, WINB, HB))
            masked = tl.maximum(masked + _row(masked_b, b * H, H, HB), 0.0)
            x += _dot(masked, _matrix(expand_w + b * H * 2 * H, 0, H, 0, 2 * H, 2 * H, HB, H2B))
            x += _row(expand_b, b * 2 * H, 2 * H, H2B)
        hidden = _dot(tl.maximum(x, 0.0), _matrix(oh_w, 0, 2 * H, 0, OUT, OUT, H2B, OB)) + _row(oh_b, 0, OUT, OB)
        logits = _dot(tl.maximum(hidden, 0.0), _matrix(lg_w, 0, OUT, 0, LEVELS, LEVELS, OB, LB))
        logits += _row(lg_b, 0, LEVELS, LB)

        index = slot * span + t  # (SB, 1)
        if TEACHER:
            tl.store(logits_out + index * LEVELS + level, logits, mask=live & (level < LEVELS))
            value = tl.load(teacher + index, mask=live, other=0)
        else:
            value = _choose(logits, tl.load(noise + index, mask=live, other=0.0), temp, LEVELS, LB)
        tl.store(pixel + index, value, mask=live)
        tl.debug_barrier()  # every read of the image rows is done
        tl.store(image + P0 * PADDED0 + column + P0, value.to(tl.float32) * level_scale - 1.0, mask=live)
        tl.debug_barrier()
