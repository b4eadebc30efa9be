"""Cached incremental sampling for Gated PixelCNN (Ramachandran, Paine et al. 2017).

Naive sampling recomputes the whole network over the whole image for every pixel. Here the
work follows the causal structure of `GatedPixelCNN` (export/models/gated_pixelcnn.py):
- once per row i, each layer's vertical stack is computed for the whole row from a window of
  the rows above (its kernel's height), together with its 1x1 link into the horizontal stack;
- once per pixel (i, j), each layer's horizontal stack is computed from a window of the
  pixels to its left in the current row, then the output layers give the logits of (i, j).
A pixel then costs O(layers) convolutions on a few columns instead of a full forward pass,
and the values computed are the same as the full network's, so from the same noise the
images are the same as `model.sample`'s (tested).

This is the reference step of the sampling engine; all rows of a batch advance together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genserve.serving.kernels.sampling import choose_pixels

from .models.gated_pixelcnn import GatedLayer, GatedPixelCNN, gate


def _vertical_row(layer: GatedLayer, below: torch.Tensor, row: int) -> torch.Tensor:
    """The layer's vertical pre-activation for one row: (N, 2C, 1, W), from the buffer `below`.

    `below` is the layer's input (N, Cin, H, W): the scaled image for the first layer (rows < i
    known), the previous layer's vertical output otherwise (rows <= i known).
    """
    k = layer.kernel_size
    source_row = row - 1 if layer.first else row  # the first layer's output is shifted down one row
    if source_row < 0:
        n, _, _, width = below.shape
        return below.new_zeros(n, layer.vertical.out_channels, 1, width)
    top = source_row - k // 2  # the window is input rows top..source_row; rows above 0 are zero padding
    window = below[:, :, max(top, 0) : source_row + 1, :]
    return layer.vertical(F.pad(window, (k // 2, k // 2, max(-top, 0), 0)))


def _horizontal_pixel(layer: GatedLayer, row_input: torch.Tensor, col: int) -> torch.Tensor:
    """The layer's horizontal pre-activation at one pixel: (N, 2C), from the current row's inputs.

    `row_input` is (N, Cin, W): the scaled image row (cols < j known) for the first layer, the
    previous layer's horizontal output row (cols <= j known) otherwise.
    """
    k = layer.kernel_size
    source_col = col - 1 if layer.first else col  # the first layer's output is shifted right one column
    if source_col < 0:
        return row_input.new_zeros(row_input.shape[0], layer.horizontal.out_channels)
    left = source_col - k // 2  # the window is input cols left..source_col; cols left of 0 are zero padding
    window = F.pad(row_input[:, :, max(left, 0) : source_col + 1], (max(-left, 0), 0))  # (N, Cin, k//2 + 1)
    return layer.horizontal(window.unsqueeze(2)).flatten(1)


@torch.inference_mode()
def cached_sample(
    model: GatedPixelCNN, noise: torch.Tensor, temperature: float | torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Samples with per-row vertical and per-pixel horizontal caches.

    Args:
        model: a Gated PixelCNN in eval mode.
        noise: (N, C, H, W) uniform noise, one number per pixel (as for `naive_sample`).
        temperature: a float or (N,) per-row temperatures.
        labels: (N,) class labels for a conditional model.

    Returns:
        (N, C, H, W) int64 pixel values.
    """
    n, channels, height, width = noise.shape
    levels = model.config.pixel_levels
    pixels = torch.zeros(n, channels, height, width, dtype=torch.long)
    scaled = model.scale_input(pixels)  # (N, C, H, W) network input; rows fill in as pixels are chosen
    layers = list(model.layers)
    biases = [  # per layer: (vertical, horizontal) class biases, each (N, 2C, 1, 1)
        layer.class_bias(labels)[:, :, None, None].chunk(2, dim=1) if layer.class_bias is not None else (0, 0)
        for layer in layers
    ]
    vertical_out = [scaled.new_zeros(n, layer.horizontal_out.out_channels, height, width) for layer in layers]
    for i in range(height):
        # Once per row: every layer's vertical stack for row i, and its link into the horizontal stack.
        links = []
        below = scaled
        for layer, (v_bias, _), v_buffer in zip(layers, biases, vertical_out):
            v_pre = _vertical_row(layer, below, i)  # (N, 2C, 1, W)
            links.append(layer.vertical_to_horizontal(v_pre)[:, :, 0, :])  # (N, 2C, W)
            v_buffer[:, :, i : i + 1, :] = gate(v_pre + v_bias)
            below = v_buffer
        # Once per pixel: the horizontal stacks left to right, then the output layers.
        h_rows = [scaled.new_zeros(n, layer.horizontal_out.out_channels, width) for layer in layers]
        for j in range(width):
            row_input = scaled[:, :, i, :]  # (N, C, W)
            skips = 0
            for layer, (_, h_bias), link, h_row in zip(layers, biases, links, h_rows):
                h_pre = _horizontal_pixel(layer, row_input, j) + link[:, :, j]  # (N, 2C)
                if layer.class_bias is not None:
                    h_pre = h_pre + h_bias[:, :, 0, 0]
                h_gated = gate(h_pre)[:, :, None, None]  # (N, C, 1, 1)
                h_out = layer.horizontal_out(h_gated)[:, :, 0, 0]
                if not layer.first:
                    h_out = h_out + row_input[:, :, j]
                h_row[:, :, j] = h_out
                skips = skips + layer.skip(h_gated)
                row_input = h_row
            out = model.output_logits(F.relu(model.output_hidden(F.relu(skips))))  # (N, L*C, 1, 1)
            logits = out.view(n, levels, channels)
            pixels[:, :, i, j] = choose_pixels(logits, noise[:, :, i, j], temperature)
            scaled[:, :, i, j] = model.scale_input(pixels[:, :, i, j])
    return pixels
