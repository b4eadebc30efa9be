"""The GPU implementation of the fused operators: checks, outputs and launches.

`gated_refresh`, `gated_step`, `gated_row` and `pixelcnn_refresh`, `pixelcnn_step`,
`pixelcnn_row` have the signatures of the operators of the same names (csrc/), so `register`
installs them as those operators' CUDA kernels and the engine runs them like the CPU ones.
Under Triton's interpreter (TRITON_INTERPRET=1, as the tests run on a machine without a GPU)
the same launches run on CPU tensors.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from . import triton_gated, triton_pixelcnn
from .weights import CONDITIONED_GATED_WEIGHTS, GATED_WEIGHTS, PIXELCNN_WEIGHTS

log = logging.getLogger("genserve.fused")

# Slots per step program: the rows of its tiles. 16 is what was measured on an H200. Triton 3.9's
# tl.dot also takes float32 tiles of 1 or 2 rows (compiled for sm_90 here), less padded work at
# batch 1: the variants deploy/gpu/check.sh's profile-batch1 step compares (not yet run on a GPU).
SLOTS_PER_PROGRAM = 16
TILE = 16  # every other tile side is padded to at least this
# A multiply then an add may become one fused multiply-add (one rounding fewer): within the float32
# tolerance every parity test allows. Said explicitly: Triton 3.9 warns that its default will change.
LAUNCH = {"enable_fp_fusion": True}
# Warps per program, by kernel, as measured fastest on an H200 at batch 1 and at 4096 (8 vs 4 warps,
# deploy/gpu/profile_fused.py). At 4, ptxas gives the shipped Gated PixelCNN's step kernel 32 registers
# and 4.4 KB of spills per thread; at 8, 255 registers and 368 bytes (cuobjdump --dump-resource-usage).
WARPS = {"gated_refresh": 4, "gated_step": 8, "pixelcnn_step": 4,
         # The split refresh's two kernels (off by default): not yet timed, so by ptxas (Triton 3.9, sm_90a,
         # the shipped model) the fewest warps without spills: at 4 its refresh kernel spills ~1 KB per thread.
         "gated_prepare": 8, "gated_refresh_split": 8}
# Steps of at most this many slots run on the resident kernels (csrc/gated_resident.cuh and
# csrc/pixelcnn_resident.cuh: a block per slot, the weights in its shared memory) where the operator library
# has them for the device: the CUDA library that `genserve build-ops` builds where nvcc and a GPU are
# present. 0, so off, until they have been timed against the Triton steps on a GPU (deploy/gpu/check.sh
# sets it for its batch-1 runs).
RESIDENT_STEP_SLOTS = int(os.environ.get("GENSERVE_RESIDENT_STEP_SLOTS", "0"))
RESIDENT_THREADS = 256  # per block: 32 groups of 8 lanes, one output each at a time
RESIDENT_SHARED_BYTES = -1  # the shared memory a block may use: -1, the device's most
# Gated refreshes of at most this many slots run in two launches: every (slot, later layer)'s cache part
# in a program of its own (gated_prepare_kernel), then the rest; else one program per slot does it all.
# 0, so off, until timed on a GPU (deploy/gpu/check.sh's profile-resident step times it).
SPLIT_REFRESH_SLOTS = int(os.environ.get("GENSERVE_SPLIT_REFRESH_SLOTS", "0"))


def _tile(size: int) -> int:
    return max(TILE, 1 << max(0, size - 1).bit_length())


def _named_weights(weights: list[torch.Tensor], names: tuple[str, ...], family: str) -> dict[str, torch.Tensor]:
    """The packed weights by name, checked as the CPU operators check them."""
    if len(weights) != len(names):
        raise RuntimeError(f"{family} weights: expected {len(names)} tensors, got {len(weights)}")
    device = weights[0].device
    for name, tensor in zip(names, weights):
        if tensor.dtype != torch.float32 or not tensor.is_contiguous() or tensor.device != device:
            raise RuntimeError(f"{family} weights: {name} must be a contiguous float32 tensor on {device}")
    return dict(zip(names, weights))


def _level_scale(levels: int) -> float:
    """Levels 0..L-1 → [-1, 1] as level * scale - 1, the scale rounded to float32 as the graphs round it."""
    return float(torch.tensor(2.0 / (levels - 1), dtype=torch.float32))


@dataclass(frozen=True)
class GatedShape:
    """A Gated PixelCNN's sizes, read off its packed weights (as the CPU operators read them)."""

    layers: int
    channels: int
    p0: int  # the first horizontal kernel's left context: its width is p0 + 1
    p: int  # the other layers' cached columns and rows
    classes: int
    output_channels: int
    levels: int
    condition_channels: int  # of the conditioning map (a PixelVAE decoder's m(z)); 0 without one
    weights: dict[str, torch.Tensor] = field(repr=False)  # by name, checked

    @classmethod
    def of(cls, weights: list[torch.Tensor]) -> GatedShape:
        names = CONDITIONED_GATED_WEIGHTS if len(weights) == len(CONDITIONED_GATED_WEIGHTS) else GATED_WEIGHTS
        named = _named_weights(weights, names, "gated")
        channels = named["hout_w"].shape[1]
        shape = cls(
            layers=named["link_w"].shape[0],
            channels=channels,
            p0=named["h0_w"].shape[0] - 1,
            p=named["h_w"].shape[1] // channels - 1,
            classes=named["class_bias"].shape[1] if named["class_bias"].dim() == 3 else 0,
            output_channels=named["oh_w"].shape[1],
            levels=named["lg_w"].shape[1],
            condition_channels=named["cond_w"].shape[2] if "cond_w" in named else 0,
            weights=named,
        )
        if not 2 <= shape.levels <= 256 or shape.layers < 2 or shape.p < 1:
            raise RuntimeError(f"gated weights: unsupported sizes {shape} (2..256 levels, 2+ layers, kernel 3+)")
        return shape


def _check(tensor: torch.Tensor, dtype: torch.dtype, dim: int, name: str, device: torch.device) -> None:
    if tensor.device != device or tensor.dtype != dtype or tensor.dim() != dim or not tensor.is_contiguous():
        raise RuntimeError(f"{name}: expected a contiguous {device} tensor of {dim} dims and type {dtype}, got "
                           f"{tuple(tensor.shape)} {tensor.dtype} on {tensor.device}")


def gated_refresh(pixels, positions, labels, vertical, condition, weights):
    shape = GatedShape.of(weights)
    n, width = vertical.shape[0], vertical.shape[-1]
    vertical_out = torch.empty_like(vertical)
    links = torch.empty(n, shape.layers, 2 * shape.channels, width, device=vertical.device)
    _refresh_into(shape, pixels, positions, labels, vertical, condition, vertical_out, links)
    zeros = vertical.new_zeros
    return vertical_out, links, zeros(n, shape.p0 + 1), zeros(n, shape.layers - 1, shape.p * shape.channels)


def gated_step(positions, noise, temperature, links, image_context, hidden_context, teacher, weights):
    shape = GatedShape.of(weights)
    n, span = positions.shape[0], noise.shape[1]
    pixel = positions.new_empty(n, span, 1)
    image_out, hidden_out = image_context.clone(), hidden_context.clone()
    logits = links.new_empty(n if teacher is not None else 0, span, shape.levels)
    _step_into(shape, positions, noise, temperature, links, image_out, hidden_out, teacher, pixel, logits)
    return pixel, image_out, hidden_out, logits


def gated_row(pixels, positions, labels, noise, temperature, states, weights):
    shape = GatedShape.of(weights)
    if len(states) != (5 if shape.condition_channels else 4):
        raise RuntimeError("states: expected vertical, links, image_context, hidden_context"
                           f"{', condition' if shape.condition_channels else ''}; got {len(states)} tensors")
    vertical, links, image_context, hidden_context, *condition = states
    _refresh_into(shape, pixels, positions, labels, vertical, condition[0] if condition else None, vertical, links)
    image_context.zero_()
    hidden_context.zero_()
    pixel = positions.new_empty(positions.shape[0], noise.shape[1], 1)
    _step_into(shape, positions, noise, temperature, links, image_context, hidden_context, None, pixel,
               links.new_empty(0))
    return pixel


def _refresh_into(shape: GatedShape, pixels, positions, labels, vertical, condition, vertical_out, links):
    device = shape.weights["lg_w"].device  # every weight's (checked)
    _check(pixels, torch.uint8, 4, "pixels", device)
    _check(positions, torch.int64, 2, "positions", device)
    _check(vertical, torch.float32, 5, "vertical", device)
    n, height, width = pixels.shape[0], pixels.shape[2], pixels.shape[3]
    C, L = shape.channels, shape.layers
    if pixels.shape[1] != 1:
        raise RuntimeError("pixels: single-channel images only")
    if tuple(vertical.shape) != (n, L - 1, C, shape.p, width):
        raise RuntimeError(f"vertical: shape {tuple(vertical.shape)} does not match the weights")
    if shape.classes:
        if labels is None:
            raise RuntimeError("labels: a conditional model needs labels")
        _check(labels, torch.int64, 2, "labels", device)
        # The check reads the labels back, which a CUDA graph capture forbids (and a replay's labels
        # are not the capture's): the engine checked them when the job was submitted.
        capturing = labels.is_cuda and torch.cuda.is_current_stream_capturing()
        if n and not capturing and not bool(((labels >= 0) & (labels < shape.classes)).all()):
            raise RuntimeError(f"labels: outside [0, {shape.classes})")
    cc = shape.condition_channels
    if not cc and condition is not None:
        raise RuntimeError("condition: this network takes no conditioning map")
    if cc:
        if condition is None:
            raise RuntimeError("condition: a conditioned network needs its conditioning map")
        _check(condition, torch.float32, 4, "condition", device)
        if tuple(condition.shape) != (n, cc, height, width):
            raise RuntimeError(f"condition: expected {(n, cc, height, width)}, got {tuple(condition.shape)}")
    if n == 0:
        return
    named = shape.weights
    scratch = torch.empty(n, C, width, device=device)  # each layer's vertical output, the next one's input
    unused = named["lg_b"]  # where a network has no conditioning: a pointer the kernel never reads
    prepared = unused
    if n <= SPLIT_REFRESH_SLOTS:
        prepared = torch.empty(n, L - 1, 2 * C, width, device=device)
        triton_gated.gated_prepare_kernel[(n, L - 1)](
            vertical, prepared, named["v_w"], named["v_b"], WIDTH=width, LAYERS=L, C=C, P=shape.p,
            WB=_tile(width), CB=_tile(C), num_warps=WARPS["gated_prepare"], **LAUNCH,
        )
    triton_gated.gated_refresh_kernel[(n,)](
        pixels, positions, labels if shape.classes else positions, vertical, condition if cc else unused,
        vertical_out, links, scratch, prepared,
        *(named[k] for k in ("v0_w", "v0_b", "v_w", "v_b", "link_w", "link_b", "h_b", "class_bias")),
        named.get("cond_w", unused), named.get("cond_b", unused),
        _level_scale(shape.levels),
        HEIGHT=height, WIDTH=width, LAYERS=L, C=C, P0=shape.p0, P=shape.p, CLASSES=shape.classes, COND=cc,
        PREPARED=prepared is not unused, WB=_tile(width), CB=_tile(C),
        QB=_tile((shape.p0 + 1) * (2 * shape.p0 + 1)), VB=_tile(C * shape.p), CCB=_tile(cc),
        num_warps=WARPS["gated_refresh" if prepared is unused else "gated_refresh_split"], **LAUNCH,
    )


def _step_into(shape: GatedShape, positions, noise, temperature, links, image_out, hidden_out, teacher, pixel, logits):
    device = shape.weights["lg_w"].device  # every weight's (checked)
    for tensor, dtype, dim, name in ((positions, torch.int64, 2, "positions"), (noise, torch.float32, 3, "noise"),
                                     (temperature, torch.float32, 2, "temperature"),
                                     (links, torch.float32, 4, "links"),
                                     (image_out, torch.float32, 2, "image_context"),
                                     (hidden_out, torch.float32, 3, "hidden_context")):
        _check(tensor, dtype, dim, name, device)
    n, span, width = positions.shape[0], noise.shape[1], links.shape[3]
    C, L = shape.channels, shape.layers
    if noise.shape[2] != 1:
        raise RuntimeError("noise: single-channel images only")
    if links.shape[1] != L or links.shape[2] != 2 * C:
        raise RuntimeError(f"links: shape {tuple(links.shape)} does not match the weights")
    if image_out.shape[1] != shape.p0 + 1 or tuple(hidden_out.shape[1:]) != (L - 1, shape.p * C):
        raise RuntimeError(f"contexts: shapes {tuple(image_out.shape)} and {tuple(hidden_out.shape)} do not "
                           "match the weights")
    if teacher is not None:
        _check(teacher, torch.int64, 3, "teacher", device)
    if n == 0:
        return
    if n <= RESIDENT_STEP_SLOTS:
        weights = list(shape.weights.values())

        def resident(*tensors):  # the step call's tensors, then the weights, threads, shared memory
            torch.ops.genserve.gated_step_resident(*tensors, weights, RESIDENT_THREADS, RESIDENT_SHARED_BYTES)

        tensors = (positions, noise, temperature, links, image_out, hidden_out, teacher, pixel, logits)
        if _fits_resident("gated_step_resident", resident, tensors, weights):
            resident(*tensors)
            return
    named = shape.weights
    grid = (-(-n // SLOTS_PER_PROGRAM),)
    triton_gated.gated_step_kernel[grid](
        positions, noise, temperature, links, image_out, hidden_out,
        teacher if teacher is not None else positions, pixel, logits, n, span,
        *(named[k] for k in ("h0_w", "h_w", "hout_w", "hout_b", "skip_w", "skip_b", "oh_w", "oh_b", "lg_w",
                             "lg_b")),
        _level_scale(shape.levels),
        WIDTH=width, LAYERS=L, C=C, P0=shape.p0, P=shape.p, OUT=shape.output_channels, LEVELS=shape.levels,
        TEACHER=teacher is not None,
        SB=SLOTS_PER_PROGRAM, CB=_tile(C), XB=_tile(shape.p0 + 1), HB=_tile(shape.p * C),
        OB=_tile(shape.output_channels), LB=_tile(shape.levels), num_warps=WARPS["gated_step"], **LAUNCH,
    )


def has_resident_step(op: str, device: torch.device) -> bool:
    """Whether the loaded operator library has the resident step kernel `op` for `device`."""
    return hasattr(torch.ops.genserve, op) and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"genserve::{op}", "CUDA" if device.type == "cuda" else "CPU")


# Whether a model's steps fit a resident kernel, by operator, device and sizes: found once per size.
_resident_fits: dict[tuple, bool] = {}
# How the resident operators refuse a model too large for a block (csrc/*_resident_op.h).
TOO_LARGE_FOR_A_BLOCK = ("do not hold a block's activations", "more than a block holds")


def _fits_resident(op: str, call, tensors: tuple, weights: list[torch.Tensor]) -> bool:
    """Whether the resident kernel `op` is loaded for the step call's device and a block of it holds this
    model's activations (larger models' do not fit its shared memory). The operator plans its shared
    memory before it launches anything, so `call` on no slots (every tensor's first n rows: none) finds
    out without running the kernel; a model that does not fit steps on the Triton kernel, said once."""
    device = tensors[0].device
    if not has_resident_step(op, device):
        return False
    shapes = tuple(None if t is None else tuple(t.shape[1:]) for t in tensors)
    key = (op, device, RESIDENT_THREADS, RESIDENT_SHARED_BYTES, shapes, tuple(tuple(w.shape) for w in weights))
    if key not in _resident_fits:
        try:
            call(*(None if t is None else t[:0] for t in tensors))
            _resident_fits[key] = True
        except RuntimeError as error:
            if not any(refusal in str(error) for refusal in TOO_LARGE_FOR_A_BLOCK):
                raise
            log.warning("%s: this model does not fit the resident step kernel, its steps run on the Triton kernel "
                        "(%s)", op, error)
            _resident_fits[key] = False
    return _resident_fits[key]


@dataclass(frozen=True)
class PixelCNNShape:
    """A PixelCNN's sizes, read off its packed weights."""

    blocks: int
    hidden: int
    output_channels: int
    levels: int
    weights: dict[str, torch.Tensor] = field(repr=False)  # by name, checked

    @classmethod
    def of(cls, weights: list[torch.Tensor]) -> PixelCNNShape:
        named = _named_weights(weights, PIXELCNN_WEIGHTS, "pixelcnn")
        shape = cls(blocks=named["reduce_w"].shape[0], hidden=named["in_b"].shape[0] // 2,
                    output_channels=named["oh_w"].shape[1], levels=named["lg_w"].shape[1], weights=named)
        if not 2 <= shape.levels <= 256:
            raise RuntimeError(f"pixelcnn weights: 2..256 pixel levels, got {shape.levels}")
        return shape


def pixelcnn_refresh(image_rows, block_rows, weights):
    """Every row cache moves up one row, the new row empty."""
    return [torch.cat([rows[:, :, 1:], torch.zeros_like(rows[:, :, :1])], 2) for rows in (image_rows, *block_rows)]


def pixelcnn_step(positions, noise, temperature, image_rows, block_rows, teacher, weights):
    shape = PixelCNNShape.of(weights)
    n, span = positions.shape[0], noise.shape[1]
    pixel = positions.new_empty(n, span, 1)
    caches = [image_rows.clone(), *(rows.clone() for rows in block_rows)]
    logits = image_rows.new_empty(n if teacher is not None else 0, span, shape.levels)
    _pixelcnn_step_into(shape, positions, noise, temperature, caches, teacher, pixel, logits)
    return [pixel, *caches, logits]


def pixelcnn_row(positions, noise, temperature, states, weights):
    """The caches roll up a row and the step runs, in place on `states` (image_rows, then each block's)."""
    shape = PixelCNNShape.of(weights)
    if len(states) != shape.blocks + 1:
        raise RuntimeError("states: image_rows and one cache per block")
    pixel = positions.new_empty(positions.shape[0], noise.shape[1], 1)
    _pixelcnn_step_into(shape, positions, noise, temperature, list(states), None, pixel, states[0].new_empty(0),
                        roll=True)
    return pixel


def _pixelcnn_step_into(shape: PixelCNNShape, positions, noise, temperature, caches, teacher, pixel, logits,
                        roll=False):
    """The step on `caches` (image_rows, then each block's rows), updated in place; with `roll`, every
    cache first moves up a row (the refresh)."""
    device = shape.weights["lg_w"].device  # every weight's (checked)
    image_rows, block_rows = caches[0], caches[1:]
    for tensor, dtype, dim, name in ((positions, torch.int64, 2, "positions"), (noise, torch.float32, 3, "noise"),
                                     (temperature, torch.float32, 2, "temperature"),
                                     (image_rows, torch.float32, 4, "image_rows"),
                                     *((rows, torch.float32, 4, "block_rows") for rows in block_rows)):
        _check(tensor, dtype, dim, name, device)
    n, span = positions.shape[0], noise.shape[1]
    if noise.shape[2] != 1 or image_rows.shape[1] != 1:
        raise RuntimeError("noise, image_rows: single-channel images only")
    if len(block_rows) != shape.blocks:
        raise RuntimeError(f"block_rows: {len(block_rows)} caches for {shape.blocks} blocks")
    r0 = image_rows.shape[2]
    width = image_rows.shape[3] - 2 * (r0 - 1)
    r = block_rows[0].shape[2] if block_rows else 1
    for rows in block_rows:
        if tuple(rows.shape[1:]) != (shape.hidden, r, width + 2 * (r - 1)):
            raise RuntimeError(f"block rows: shape {tuple(rows.shape)} does not match the weights")
    if teacher is not None:
        _check(teacher, torch.int64, 3, "teacher", device)
    if 0 < n <= RESIDENT_STEP_SLOTS:
        weights = list(shape.weights.values())

        def resident(positions, noise, temperature, image_rows, teacher, pixel, logits, *block_rows):
            torch.ops.genserve.pixelcnn_step_resident(positions, noise, temperature, image_rows, list(block_rows),
                                                      teacher, pixel, logits, weights, roll, RESIDENT_THREADS,
                                                      RESIDENT_SHARED_BYTES)

        tensors = (positions, noise, temperature, image_rows, teacher, pixel, logits, *block_rows)
        if _fits_resident("pixelcnn_step_resident", resident, tensors, weights):
            resident(*tensors)  # one launch: the roll too
            return
    if roll:
        for rows in caches:
            rows[:, :, :-1].copy_(rows[:, :, 1:].clone())
            rows[:, :, -1].zero_()
    if n == 0:
        return
    # The blocks' caches stacked, so the kernel indexes them by block; copied back after.
    stacked = torch.stack(block_rows, 1) if block_rows else image_rows.new_zeros(n, 0)
    named = shape.weights
    h, window = shape.hidden, shape.hidden * r * (2 * r - 1)
    triton_pixelcnn.pixelcnn_step_kernel[(-(-n // SLOTS_PER_PROGRAM),)](
        positions, noise, temperature, image_rows, stacked, teacher if teacher is not None else positions, pixel,
        logits, n, span, *(named[k] for k in PIXELCNN_WEIGHTS), _level_scale(shape.levels),
        WIDTH=width, BLOCKS=shape.blocks, H=h, R0=r0, R=r, OUT=shape.output_channels, LEVELS=shape.levels,
        TEACHER=teacher is not None, SB=SLOTS_PER_PROGRAM, IB=_tile(r0 * (2 * r0 - 1)), HB=_tile(h), H2B=_tile(2 * h),
        WINB=_tile(window), OB=_tile(shape.output_channels), LB=_tile(shape.levels),
        num_warps=WARPS["pixelcnn_step"], **LAUNCH,
    )
    for b, rows in enumerate(block_rows):
        rows.copy_(stacked[:, b])


_registrations: dict[str, torch.library.Library] = {}


def register(dispatch_key: str = "CUDA") -> None:
    """Installs gated_refresh / gated_step / gated_row as the operators' kernels for `dispatch_key`.

    The operators' schemas come from the compiled library (serving.fused.load_ops loads it first).
    Tests install them for "CPU" in a throwaway process, to call them through the dispatcher.
    """
    if dispatch_key in _registrations:
        return
    library = torch.library.Library("genserve", "IMPL")
    for function in (gated_refresh, gated_step, gated_row, pixelcnn_refresh, pixelcnn_step, pixelcnn_row):
        library.impl(function.__name__, function, dispatch_key)
    _registrations[dispatch_key] = library

