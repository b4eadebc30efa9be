"""Gated PixelCNN's fused refresh and step as GPU kernels in the OpenAI Triton language.

The same program as the CPU operators (csrc/gated_pixelcnn.cpp) on the same state tensors and
packed weights, so the engine runs either and a test compares them call by call:
- `gated_refresh_kernel`, one program per slot: every layer's vertical stack for the whole row
  (columns as the GEMM's rows), its link into the horizontal stack and the row cache's shift;
- `gated_step_kernel`, one program per block of slots: `span` pixels, each through every layer,
  the output layers and the inverse-CDF choice, inside one launch. A pixel's chain through the
  layers never leaves the kernel, so batch 1 costs two launches per row (refresh, step) rather than
  ~100 per pixel.

Every dense layer is a `tl.dot` in IEEE float32 (never TF32: the images must equal the CPU's),
its tiles padded to 16 with masked loads (padded weights and inputs read as zero, so padded
lanes stay zero). A state that is read and rewritten (the caches) is loaded whole as one tile,
then, after a barrier, stored back at shifted addresses: no thread overwrites what another has
yet to read, even when the output aliases the input (the engine's in-place row call).

Kernels only: the checks and launches are in triton_ops.py. Without a GPU the tests run these
kernels in Triton's interpreter and compile them to sm_90 cubins (tests/triton_compile.py).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _gate(content, gate_logits):
    """tanh(content) * sigmoid(gate_logits), written as the CPU operators write it."""
    return (1.0 - 2.0 / (tl.exp(2.0 * content) + 1.0)) * (1.0 / (1.0 + tl.exp(-gate_logits)))


@triton.jit
def _matrix(ptr, row0, rows, col0, cols, ld, R: tl.constexpr, K: tl.constexpr):
    """Rows row0..row0+rows-1, columns col0..col0+cols-1 of a row-major matrix as an (R, K) tile, zero-padded."""
    r = tl.arange(0, R)[:, None]
    k = tl.arange(0, K)[None, :]
    return tl.load(ptr + (row0 + r) * ld + col0 + k, mask=(r < rows) & (k < cols), other=0.0)


@triton.jit
def _row(ptr, offset, count, K: tl.constexpr):
    """A (1, K) tile of count values from ptr + offset (a bias), zero-padded."""
    k = tl.arange(0, K)[None, :]
    return tl.load(ptr + offset + k, mask=k < count, other=0.0)


@triton.jit
def _dot(x, w):
    return tl.dot(x, w, input_precision="ieee")


@triton.jit
def _choose(logits, draw, temperature, LEVELS: tl.constexpr, LB: tl.constexpr):
    """Per row, the level by inverse CDF of softmax(logits / temperature) at `draw`, as the graphs choose
    it: the count of CDF entries (all but the last) below the draw; temperature 0 takes the first argmax."""
    level = tl.arange(0, LB)[None, :]
    logits = tl.where(level < LEVELS, logits, float("-inf"))
    best = tl.argmax(logits, axis=1, tie_break_left=True)[:, None].to(tl.int64)
    safe = tl.where(temperature == 0.0, 1.0, temperature)
    probs = tl.where(level < LEVELS, tl.exp(logits / safe - tl.max(logits, axis=1)[:, None] / safe), 0.0)
    cdf = tl.cumsum(probs / tl.sum(probs, axis=1)[:, None], axis=1)
    chosen = tl.sum(((cdf < draw) & (level < LEVELS - 1)).to(tl.int64), axis=1)[:, None]
    return tl.where(temperature == 0.0, best, chosen)


@triton.jit
def _conditioning(row, cond_w, cond_b, layer, stack, C: tl.constexpr, COND: tl.constexpr, CB: tl.constexpr,
                  CCB: tl.constexpr):
    """One stack's (0 vertical, 1 horizontal) 1x1 of the conditioning map's row (WB columns, CCB channels)
    in `layer`: its two CB halves."""
    C2: tl.constexpr = 2 * C
    w = cond_w + (layer * 2 + stack) * COND * C2
    bias = (layer * 2 + stack) * C2
    content = _dot(row, _matrix(w, 0, COND, 0, C, C2, CCB, CB)) + _row(cond_b, bias, C, CB)
    gate = _dot(row, _matrix(w, 0, COND, C, C, C2, CCB, CB)) + _row(cond_b, bias + C, C, CB)
    return content, gate


@triton.jit
def _link_and_hand_on(pre_a, pre_b, layer, s, j, c, labels, condition_row, links, scratch, link_w, link_bias, h_b,
                      class_bias, cond_w, cond_b,
                      WIDTH: tl.constexpr, LAYERS: tl.constexpr, C: tl.constexpr, CLASSES: tl.constexpr,
                      COND: tl.constexpr, WB: tl.constexpr, CB: tl.constexpr, CCB: tl.constexpr):
    """A layer's vertical pre-activations (WB columns, two CB halves) → its links into the horizontal stack
    (stored) and its gated output, handed to the next layer through `scratch`."""
    C2: tl.constexpr = 2 * C
    ok = (j < WIDTH) & (c < C)
    # The horizontal bias, but for the first layer's column 0: its shift right leaves it nothing, bias included.
    has_bias = (j > 0) | (layer > 0)
    link_a = tl.where(has_bias, _row(h_b, layer * C2, C, CB), 0.0) + _row(link_bias, layer * C2, C, CB)
    link_b = tl.where(has_bias, _row(h_b, layer * C2 + C, C, CB), 0.0) + _row(link_bias, layer * C2 + C, C, CB)
    lw = link_w + layer * C2 * C2
    link_a += _dot(pre_a, _matrix(lw, 0, C, 0, C, C2, CB, CB)) + _dot(pre_b, _matrix(lw, C, C, 0, C, C2, CB, CB))
    link_b += _dot(pre_a, _matrix(lw, 0, C, C, C, C2, CB, CB)) + _dot(pre_b, _matrix(lw, C, C, C, C, C2, CB, CB))
    if CLASSES > 0:  # the class biases: the vertical gate's after the link, the horizontal one's in it
        bias = class_bias + (layer * CLASSES + tl.load(labels + s)) * 2 * C2
        pre_a += _row(bias, 0, C, CB)
        pre_b += _row(bias, C, C, CB)
        link_a += _row(bias, C2, C, CB)
        link_b += _row(bias, C2 + C, C, CB)
    if COND > 0:  # the conditioning map's 1x1s, added as the class biases are
        v_content, v_gate = _conditioning(condition_row, cond_w, cond_b, layer, 0, C, COND, CB, CCB)
        h_content, h_gate = _conditioning(condition_row, cond_w, cond_b, layer, 1, C, COND, CB, CCB)
        pre_a += v_content
        pre_b += v_gate
        link_a += h_content
        link_b += h_gate
    out = links + (s * LAYERS + layer) * C2 * WIDTH
    tl.store(out + c * WIDTH + j, link_a, mask=ok)
    tl.store(out + (C + c) * WIDTH + j, link_b, mask=ok)
    if layer < LAYERS - 1:  # this layer's vertical output, the next layer's input row i
        tl.debug_barrier()  # every read of the previous output is done
        tl.store(scratch + (s * C + c) * WIDTH + j, _gate(pre_a, pre_b), mask=ok)
        tl.debug_barrier()


@triton.jit
def _kernel_row(pre_a, pre_b, rows, row_stride, rr, weights, j, c, column_ok, channel_ok,
                WIDTH: tl.constexpr, C: tl.constexpr, P: tl.constexpr, CB: tl.constexpr):
    """Adds kernel row rr of a later layer's vertical stack over one row of the layer before's outputs
    (`rows` + c * row_stride + column, zero outside the row), tap by tap."""
    C2: tl.constexpr = 2 * C
    K: tl.constexpr = 2 * P + 1
    for kk in range(K):
        source = j - P + kk  # (WB, 1): the column each output column reads at this tap
        ok = (source >= 0) & (source < WIDTH) & column_ok & channel_ok
        x = tl.load(rows + c * row_stride + source, mask=ok, other=0.0)
        tap = (rr * K + kk) * C
        pre_a += _dot(x, _matrix(weights, tap, C, 0, C, C2, CB, CB))
        pre_b += _dot(x, _matrix(weights, tap, C, C, C, C2, CB, CB))
    return pre_a, pre_b


@triton.jit
def _cache_part(s, layer, vertical, v_w, v_b, j, c, column_ok, channel_ok,
                WIDTH: tl.constexpr, LAYERS: tl.constexpr, C: tl.constexpr, P: tl.constexpr, WB: tl.constexpr,
                CB: tl.constexpr):
    """A later layer's vertical pre-activations (two CB halves) as far as its cache gives them: the bias,
    then kernel rows 0..P-1 over rows i-P..i-1 of the layer before's outputs. Nothing of the row being
    started: the part gated_prepare_kernel can compute apart."""
    C2: tl.constexpr = 2 * C
    K: tl.constexpr = 2 * P + 1
    cache = vertical + (s * (LAYERS - 1) + layer - 1) * C * P * WIDTH  # (C, P, W)
    weights = v_w + (layer - 1) * (P + 1) * K * C * C2
    pre_a = tl.zeros((WB, CB), tl.float32) + _row(v_b, (layer - 1) * C2, C, CB)
    pre_b = tl.zeros((WB, CB), tl.float32) + _row(v_b, (layer - 1) * C2 + C, C, CB)
    for rr in tl.static_range(P):
        pre_a, pre_b = _kernel_row(pre_a, pre_b, cache + rr * WIDTH, P * WIDTH, rr, weights, j, c, column_ok,
                                   channel_ok, WIDTH, C, P, CB)
    return pre_a, pre_b


@triton.jit
def gated_prepare_kernel(
    vertical, prepared, v_w, v_b,
    WIDTH: tl.constexpr, LAYERS: tl.constexpr, C: tl.constexpr, P: tl.constexpr, WB: tl.constexpr,
    CB: tl.constexpr,
):
    """One (slot, later layer) per program: `_cache_part` into `prepared` (n, L - 1, 2C, W), for a refresh
    launched with PREPARED. At batch 1 the refresh is one program; this spreads two thirds of the shipped
    model's refresh arithmetic (the cache's part, P of P + 1 kernel rows) over L - 1 programs."""
    s = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64) + 1
    j = tl.arange(0, WB)[:, None]
    c = tl.arange(0, CB)[None, :]
    column_ok = j < WIDTH
    channel_ok = c < C
    pre_a, pre_b = _cache_part(s, layer, vertical, v_w, v_b, j, c, column_ok, channel_ok, WIDTH, LAYERS, C, P, WB,
                               CB)
    out = prepared + (s * (LAYERS - 1) + layer - 1) * 2 * C * WIDTH
    tl.store(out + c * WIDTH + j, pre_a, mask=column_ok & channel_ok)
    tl.store(out + (C + c) * WIDTH + j, pre_b, mask=column_ok & channel_ok)


@triton.jit
def gated_refresh_kernel(
    pixels, positions, labels, vertical, condition, vertical_out, links, scratch, prepared,
    v0_w, v0_b, v_w, v_b, link_w, link_bias, h_b, class_bias, cond_w, cond_b,
    level_scale,
    HEIGHT: tl.constexpr, WIDTH: tl.constexpr, LAYERS: tl.constexpr, C: tl.constexpr, P0: tl.constexpr,
    P: tl.constexpr, CLASSES: tl.constexpr, COND: tl.constexpr, PREPARED: tl.constexpr,
    WB: tl.constexpr, CB: tl.constexpr, QB: tl.constexpr, VB: tl.constexpr, CCB: tl.constexpr,
):
    """One slot's row start. Tiles: WB columns, CB channels, QB first-layer window taps, VB cache entries,
    CCB conditioning channels (COND of them; 0 for a network without a conditioning map). With
    PREPARED, the later layers' cache parts are read from `prepared` (gated_prepare_kernel, launched
    before on the same caches) rather than computed: the same values, so the same bits.

    The layers after the first run in a loop, not unrolled: unrolled, the shipped model's 7 layers
    of 15 taps made a kernel that Triton's compiler had not finished after 15 minutes."""
    s = tl.program_id(0).to(tl.int64)
    C2: tl.constexpr = 2 * C
    K0: tl.constexpr = 2 * P0 + 1
    K: tl.constexpr = 2 * P + 1
    j = tl.arange(0, WB)[:, None]  # (WB, 1): the row's columns
    c = tl.arange(0, CB)[None, :]  # (1, CB): channels
    column_ok = j < WIDTH
    channel_ok = c < C
    position = tl.load(positions + s)
    i = position // WIDTH  # the row being started
    k = tl.arange(0, CCB)[None, :]  # row i of the conditioning map, (WB, CCB); read only where COND > 0
    condition_row = tl.load(condition + ((s * COND + k) * HEIGHT + i) * WIDTH + j, mask=column_ok & (k < COND),
                            other=0.0)

    # The first layer: image rows i-1-P0..i-1 (zero outside the image), columns j-P0..j+P0.
    q = tl.arange(0, QB)[None, :]
    ii = i - 1 - P0 + q // K0
    jj = j - P0 + q % K0
    inside = (q < (P0 + 1) * K0) & (ii >= 0) & (jj >= 0) & (jj < WIDTH) & column_ok
    level = tl.load(pixels + (s * HEIGHT + ii) * WIDTH + jj, mask=inside, other=0)
    window = tl.where(inside, level.to(tl.float32) * level_scale - 1.0, 0.0)
    pre_a = _dot(window, _matrix(v0_w, 0, (P0 + 1) * K0, 0, C, C2, QB, CB)) + _row(v0_b, 0, C, CB)
    pre_b = _dot(window, _matrix(v0_w, 0, (P0 + 1) * K0, C, C, C2, QB, CB)) + _row(v0_b, C, C, CB)
    first_row = position < WIDTH  # the shift down: the first row sees nothing above
    pre_a = tl.where(first_row, 0.0, pre_a)
    pre_b = tl.where(first_row, 0.0, pre_b)
    _link_and_hand_on(pre_a, pre_b, 0, s, j, c, labels, condition_row, links, scratch, link_w, link_bias, h_b,
                      class_bias, cond_w, cond_b, WIDTH, LAYERS, C, CLASSES, COND, WB, CB, CCB)

    for layer in range(1, LAYERS):  # rows i-P..i of the previous layer's vertical output, columns j-P..j+P
        cache = vertical + (s * (LAYERS - 1) + layer - 1) * C * P * WIDTH  # (C, P, W)
        if PREPARED:
            part = prepared + (s * (LAYERS - 1) + layer - 1) * C2 * WIDTH
            pre_a = tl.load(part + c * WIDTH + j, mask=column_ok & channel_ok, other=0.0)
            pre_b = tl.load(part + (C + c) * WIDTH + j, mask=column_ok & channel_ok, other=0.0)
        else:
            pre_a, pre_b = _cache_part(s, layer, vertical, v_w, v_b, j, c, column_ok, channel_ok, WIDTH, LAYERS, C,
                                       P, WB, CB)
        pre_a, pre_b = _kernel_row(pre_a, pre_b, scratch + s * C * WIDTH, WIDTH, P,
                                   v_w + (layer - 1) * (P + 1) * K * C * C2, j, c, column_ok, channel_ok, WIDTH, C, P,
                                   CB)
        # The previous layer's cache moves up one row (rows i-P+1..i), its newest row the output in scratch.
        v = tl.arange(0, VB)[None, :]  # cache entries (channel, row) = v // P, v % P
        cached = column_ok & (v < C * P)
        old = tl.load(cache + v * WIDTH + j, mask=cached, other=0.0)
        newest = tl.load(scratch + (s * C + c) * WIDTH + j, mask=column_ok & channel_ok, other=0.0)
        tl.debug_barrier()
        moved = vertical_out + (s * (LAYERS - 1) + layer - 1) * C * P * WIDTH
        tl.store(moved + (v - 1) * WIDTH + j, old, mask=cached & (v % P > 0))
        tl.store(moved + (c * P + P - 1) * WIDTH + j, newest, mask=column_ok & channel_ok)
        _link_and_hand_on(pre_a, pre_b, layer, s, j, c, labels, condition_row, links, scratch, link_w, link_bias,
                          h_b, class_bias, cond_w, cond_b, WIDTH, LAYERS, C, CLASSES, COND, WB, CB, CCB)


@triton.jit(do_not_specialize=["n", "span"])
def gated_step_kernel(
    positions, noise, temperature, links, image_context, hidden_context, teacher, pixel, logits_out, n, span,
    h0_w, h_w, hout_w, hout_b, skip_w, skip_b, oh_w, oh_b, lg_w, lg_b,
    level_scale,
    WIDTH: tl.constexpr, LAYERS: tl.constexpr, C: tl.constexpr, P0: tl.constexpr, P: tl.constexpr,
    OUT: tl.constexpr, LEVELS: tl.constexpr, TEACHER: tl.constexpr,
    SB: tl.constexpr, CB: tl.constexpr, XB: tl.constexpr, HB: tl.constexpr, OB: tl.constexpr, LB: tl.constexpr,
):
    """`span` pixels of SB slots. Tiles: CB channels, XB image context, HB hidden context, OB outputs, LB levels."""
    C2: tl.constexpr = 2 * C
    HIDDEN: tl.constexpr = (P + 1) * C  # a layer's window: P cached columns, then the current one
    slot = tl.program_id(0).to(tl.int64) * SB + tl.arange(0, SB)[:, None]  # (SB, 1)
    live = slot < n
    c = tl.arange(0, CB)[None, :]
    channel_ok = live & (c < C)
    x = tl.arange(0, XB)[None, :]
    h = tl.arange(0, HB)[None, :]
    level = tl.arange(0, LB)[None, :]
    level_ok = level < LEVELS
    column0 = tl.load(positions + slot, mask=live, other=0) % WIDTH
    temp = tl.load(temperature + slot, mask=live, other=1.0)

    for t in range(span):
        column = column0 + t
        # Layer 0: the image context (the row's last P0+1 pixels) through the first horizontal kernel.
        context_ok = live & (x < P0 + 1)
        context = tl.load(image_context + slot * (P0 + 1) + x, mask=context_ok, other=0.0)
        link = links + slot * LAYERS * C2 * WIDTH + column
        pre_a = tl.load(link + c * WIDTH, mask=channel_ok, other=0.0)
        pre_b = tl.load(link + (C + c) * WIDTH, mask=channel_ok, other=0.0)
        pre_a += _dot(context, _matrix(h0_w, 0, P0 + 1, 0, C, C2, XB, CB))
        pre_b += _dot(context, _matrix(h0_w, 0, P0 + 1, C, C, C2, XB, CB))
        gated = _gate(pre_a, pre_b)
        skips = _dot(gated, _matrix(skip_w, 0, C, 0, C, C, CB, CB)) + _row(skip_b, 0, C, CB)
        out = _dot(gated, _matrix(hout_w, 0, C, 0, C, C, CB, CB)) + _row(hout_b, 0, C, CB)
        for layer in range(1, LAYERS):
            # This layer's window: the previous layer's outputs at the P previous columns (its cache), then `out`.
            cache = hidden_context + (slot * (LAYERS - 1) + layer - 1) * P * C
            cache_ok = live & (h < P * C)
            cached = tl.load(cache + h, mask=cache_ok, other=0.0)
            weights = h_w + (layer - 1) * HIDDEN * C2
            link_l = link + layer * C2 * WIDTH
            pre_a = tl.load(link_l + c * WIDTH, mask=channel_ok, other=0.0)
            pre_b = tl.load(link_l + (C + c) * WIDTH, mask=channel_ok, other=0.0)
            pre_a += _dot(cached, _matrix(weights, 0, P * C, 0, C, C2, HB, CB))
            pre_a += _dot(out, _matrix(weights, P * C, C, 0, C, C2, CB, CB))
            pre_b += _dot(cached, _matrix(weights, 0, P * C, C, C, C2, HB, CB))
            pre_b += _dot(out, _matrix(weights, P * C, C, C, C, C2, CB, CB))
            tl.debug_barrier()  # the cache is read: drop its oldest column, append `out`
            tl.store(cache + h - C, cached, mask=cache_ok & (h >= C))
            tl.store(cache + (P - 1) * C + c, out, mask=channel_ok)
            tl.debug_barrier()
            gated = _gate(pre_a, pre_b)
            skips += _dot(gated, _matrix(skip_w, layer * C, C, 0, C, C, CB, CB))
            if layer < LAYERS - 1:  # the residual; the last layer's horizontal output feeds nothing
                out += _dot(gated, _matrix(hout_w, layer * C, C, 0, C, C, CB, CB)) + _row(hout_b, layer * C, C, CB)
        skips = tl.maximum(skips, 0.0)
        hidden = tl.maximum(_dot(skips, _matrix(oh_w, 0, C, 0, OUT, OUT, CB, OB)) + _row(oh_b, 0, OUT, OB), 0.0)
        logits = _dot(hidden, _matrix(lg_w, 0, OUT, 0, LEVELS, LEVELS, OB, LB)) + _row(lg_b, 0, LEVELS, LB)

        index = slot * span + t  # (SB, 1)
        if TEACHER:
            tl.store(logits_out + index * LEVELS + level, logits, mask=live & level_ok)
            value = tl.load(teacher + index, mask=live, other=0)
        else:
            value = _choose(logits, tl.load(noise + index, mask=live, other=0.0), temp, LEVELS, LB)
        tl.store(pixel + index, value, mask=live)
        tl.debug_barrier()  # the context is read: drop its oldest pixel, append this one
        tl.store(image_context + slot * (P0 + 1) + x - 1, context, mask=context_ok & (x >= 1))
        tl.store(image_context + slot * (P0 + 1) + P0, value.to(tl.float32) * level_scale - 1.0, mask=live)
        tl.debug_barrier()
