"""The GPU implementation of the fused Gated PixelCNN operators: checks, outputs and launches.

`gated_refresh`, `gated_step` and `gated_row` have the signatures of the operators of the same
names (csrc/gated_pixelcnn.cpp), so `register_cuda` installs them as those operators' CUDA
kernels and the engine runs them like the CPU ones. Under Triton's interpreter
(TRITON_INTERPRET=1, as the tests run on a machine without a GPU) the same launches run on CPU
tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import triton_gated
from .weights import GATED_WEIGHTS

SLOTS_PER_PROGRAM = 16  # rows of a step program's tiles: tl.dot's smallest
TILE = 16  # tl.dot's smallest side; every tile is padded to at least this


def _tile(size: int) -> int:
    return max(TILE, 1 << max(0, size - 1).bit_length())


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

    @classmethod
    def of(cls, weights: list[torch.Tensor]) -> GatedShape:
        if len(weights) != len(GATED_WEIGHTS):
            raise RuntimeError(f"gated weights: expected {len(GATED_WEIGHTS)} tensors, got {len(weights)}")
        named = dict(zip(GATED_WEIGHTS, weights))
        device = weights[0].device
        for name, tensor in named.items():
            if tensor.dtype != torch.float32 or not tensor.is_contiguous() or tensor.device != device:
                raise RuntimeError(f"gated weights: {name} must be a contiguous float32 tensor on {device}")
        channels = named["hout_w"].shape[1]
        shape = cls(
            layers=named["link_w"].shape[0],
            channels=channels,
            p0=named["h0_w"].shape[0] - 1,
            p=named["h_w"].shape[1] // channels - 1,
            classes=named["class_bias"].shape[1] if named["class_bias"].dim() == 3 else 0,
            output_channels=named["oh_w"].shape[1],
            levels=named["lg_w"].shape[1],
        )
        if not 2 <= shape.levels <= 256 or shape.layers < 2 or shape.p < 1:
            raise RuntimeError(f"gated weights: unsupported sizes {shape} (2..256 levels, 2+ layers, kernel 3+)")
        return shape

    @property
    def level_scale(self) -> float:
        """Levels 0..L-1 → [-1, 1] as level * scale - 1, the scale rounded to float32 as the graphs round it."""
        return float(torch.tensor(2.0 / (self.levels - 1), dtype=torch.float32))


def _check(tensor: torch.Tensor, dtype: torch.dtype, dim: int, name: str, device: torch.device) -> None:
    if tensor.device != device or tensor.dtype != dtype or tensor.dim() != dim or not tensor.is_contiguous():
        raise RuntimeError(f"{name}: expected a contiguous {device} tensor of {dim} dims and type {dtype}, got "
                           f"{tuple(tensor.shape)} {tensor.dtype} on {tensor.device}")


def gated_refresh(pixels, positions, labels, vertical, weights):
    shape = GatedShape.of(weights)
    n, width = vertical.shape[0], vertical.shape[-1]
    vertical_out = torch.empty_like(vertical)
    links = torch.empty(n, shape.layers, 2 * shape.channels, width, device=vertical.device)
    _refresh_into(shape, pixels, positions, labels, vertical, vertical_out, links, weights)
    zeros = vertical.new_zeros
    return vertical_out, links, zeros(n, shape.p0 + 1), zeros(n, shape.layers - 1, shape.p * shape.channels)


def gated_step(positions, noise, temperature, links, image_context, hidden_context, teacher, weights):
    shape = GatedShape.of(weights)
    n, span = positions.shape[0], noise.shape[1]
    pixel = positions.new_empty(n, span, 1)
    image_out, hidden_out = image_context.clone(), hidden_context.clone()
    logits = links.new_empty(n if teacher is not None else 0, span, shape.levels)
    _step_into(shape, positions, noise, temperature, links, image_out, hidden_out, teacher, pixel, logits, weights)
    return pixel, image_out, hidden_out, logits


def gated_row(pixels, positions, labels, noise, temperature, states, weights):
    shape = GatedShape.of(weights)
    if len(states) != 4:
        raise RuntimeError("states: expected vertical, links, image_context, hidden_context")
    vertical, links, image_context, hidden_context = states
    _refresh_into(shape, pixels, positions, labels, vertical, vertical, links, weights)
    image_context.zero_()
    hidden_context.zero_()
    pixel = positions.new_empty(positions.shape[0], noise.shape[1], 1)
    _step_into(shape, positions, noise, temperature, links, image_context, hidden_context, None, pixel,
               links.new_empty(0), weights)
    return pixel


def _refresh_into(shape, pixels, positions, labels, vertical, vertical_out, links, weights):
    device = weights[0].device
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
        if n and not bool(((labels >= 0) & (labels < shape.classes)).all()):
            raise RuntimeError(f"labels: outside [0, {shape.classes})")
    if n == 0:
        return
    named = dict(zip(GATED_WEIGHTS, weights))
    scratch = torch.empty(n, C, width, device=device)  # each layer's vertical output, the next one's input
    triton_gated.gated_refresh_kernel[(n,)](
        pixels, positions, labels if shape.classes else positions, vertical, vertical_out, links, scratch,
        *(named[k] for k in ("v0_w", "v0_b", "v_w", "v_b", "link_w", "link_b", "h_b", "class_bias")),
        shape.level_scale,
        HEIGHT=height, WIDTH=width, LAYERS=L, C=C, P0=shape.p0, P=shape.p, CLASSES=shape.classes,
        WB=_tile(width), CB=_tile(C), QB=_tile((shape.p0 + 1) * (2 * shape.p0 + 1)), VB=_tile(C * shape.p),
    )


def _step_into(shape, positions, noise, temperature, links, image_out, hidden_out, teacher, pixel, logits,
               weights):
    device = weights[0].device
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
    named = dict(zip(GATED_WEIGHTS, weights))
    grid = (-(-n // SLOTS_PER_PROGRAM),)
    triton_gated.gated_step_kernel[grid](
        positions, noise, temperature, links, image_out, hidden_out,
        teacher if teacher is not None else positions, pixel, logits, n, span,
        *(named[k] for k in ("h0_w", "h_w", "hout_w", "hout_b", "skip_w", "skip_b", "oh_w", "oh_b", "lg_w",
                             "lg_b")),
        shape.level_scale,
        WIDTH=width, LAYERS=L, C=C, P0=shape.p0, P=shape.p, OUT=shape.output_channels, LEVELS=shape.levels,
        TEACHER=teacher is not None,
        SB=SLOTS_PER_PROGRAM, CB=_tile(C), XB=_tile(shape.p0 + 1), HB=_tile(shape.p * C),
        OB=_tile(shape.output_channels), LB=_tile(shape.levels),
    )


_registrations: dict[str, torch.library.Library] = {}


def register(dispatch_key: str = "CUDA") -> None:
    """Installs gated_refresh / gated_step / gated_row as the operators' kernels for `dispatch_key`.

    The operators' schemas come from the compiled library (serving.fused.load_ops loads it first).
    Tests install them for "CPU" in a throwaway process, to call them through the dispatcher.
    """
    if dispatch_key in _registrations:
        return
    library = torch.library.Library("genserve", "IMPL")
    for function in (gated_refresh, gated_step, gated_row):
        library.impl(function.__name__, function, dispatch_key)
    _registrations[dispatch_key] = library

