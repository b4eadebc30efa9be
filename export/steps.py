"""Cached incremental sampling steps (Ramachandran, Paine et al. 2017), as exportable graphs.

Naive sampling recomputes the whole network over the whole image for every pixel. A step
program instead carries each layer's causal context in explicit cache tensors ("states"),
one row per sample slot, and computes only what a new pixel needs. Two graphs make a program:
- `refresh` runs for a slot when its position starts a row (position % period == 0): the
  per-row work (Gated PixelCNN: every layer's vertical stack for the whole row at once, and
  its 1x1 link into the horizontal stack; PixelCNN: roll each layer's row cache up one row);
- `step` runs for every slot every step: O(layers) small matmuls on the cached context give
  the logits of the slot's current pixel, the pixel is chosen from them and the per-sample
  noise by inverse CDF, and the caches are updated.
Every slot has its own position (an input), so slots at different pixels share one call: this
is what lets the engine (serving/engine) batch continuously. The graphs are plain
tensor-in, tensor-out modules, exported to ONNX and TorchScript like every entry point, so
the architecture travels in the artifact and the engine stays family-agnostic.

The contract with the engine (control inputs, `pixel` and `next_<state>` outputs, the manifest's
step section) is genserve.serving.artifacts.step. A state a graph does not update is left as
it was: the step reads the row-level caches without copying them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genserve.serving.artifacts import FP32, FP64, INT64, NEXT, PIXEL, UINT8, GraphSignature, StepSection, TensorSpec
from genserve.serving.kernels.sampling import choose_at_temperature, temperature_rows

from .entry_points import EntryPoint
from .models.autoregressive import AutoregressiveModel
from .models.base import GenerativeModel
from .models.gated_pixelcnn import GatedPixelCNN, gate
from .models.maf import MAF, bounded_log_scale
from .models.pixel_vae import PixelVAE, prior_latents
from .models.pixelcnn import PixelCNN
from .models.pixelcnn_pp import UL, PixelCNNPP, RowContext, U, discretized_mixture_log_probs
from .models.wavenet import WaveNet


def controls(model: AutoregressiveModel, span: int) -> dict[str, TensorSpec]:
    """The engine's side of the contract (artifacts.CONTROLS and PIXEL) with this model's shapes."""
    c = model.config
    return {
        "positions": TensorSpec("positions", INT64, (1,)),  # raster index of the slot's next pixel
        "pixels": TensorSpec("pixels", UINT8, c.sample_shape),  # sample so far
        "noise": TensorSpec("noise", FP32, (span, c.channels)),  # uniform noise of the step's pixels
        "temperature": TensorSpec("temperature", FP32, (1,)),
        "labels": TensorSpec("labels", INT64, (1,)),
        PIXEL: TensorSpec(PIXEL, INT64, (span, c.channels)),  # the step's chosen pixels
    }


def _step_controls_example(n: int, c, span: int) -> tuple[torch.Tensor, ...]:
    """positions (at row starts, as the engine keeps them when span = width), noise, temperature."""
    positions = (torch.arange(n).view(n, 1) % c.image_size) * c.image_size
    return positions, torch.rand(n, span, c.channels), torch.ones(n, 1)


@dataclass(frozen=True)
class StepProgram:
    """A family's refresh and step graphs with their states, ready to export or to run eagerly."""

    states: tuple[TensorSpec, ...]
    refresh: EntryPoint | None  # None: no per-row work
    step: EntryPoint
    period: int  # refresh runs on slots whose position is a multiple of this
    length: int  # positions per sample
    span: int  # pixels per step call
    start: EntryPoint | None = None  # runs once per slot at admission (latents → states)

    @property
    def graphs(self) -> tuple[EntryPoint, ...]:
        return tuple(g for g in (self.start, self.refresh, self.step) if g is not None)

    def section(self) -> StepSection:
        """The manifest's description of this program (kind "graphs": the start, refresh and step artifacts)."""
        return StepSection(
            kind="graphs",
            states=self.states,
            graphs={g.name: GraphSignature(tuple(s.name for s in g.inputs), tuple(s.name for s in g.outputs))
                    for g in self.graphs},
            period=self.period,
            length=self.length,
            span=self.span,
        )


def _next(*states: TensorSpec) -> tuple[TensorSpec, ...]:
    """The output that replaces each state."""
    return tuple(s.renamed(NEXT + s.name) for s in states)


class StepModule(nn.Module):
    """A step graph over `model`, with the index offsets its gathers use as a buffer.

    Why a buffer: tracing bakes `torch.arange(...)` in as a CPU constant, which breaks the
    TorchScript artifact on CUDA; a buffer moves with `map_location`.
    """

    def __init__(self, model: AutoregressiveModel) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("offsets", torch.arange(2 * model.config.image_size + 1), persistent=False)

    def columns(self, positions: torch.Tensor, width: int, span: int, like: torch.Tensor) -> torch.Tensor:
        """Gather indices of columns j..j+span-1 (j = position % width) over `like`'s last axis.

        Returns an index of like's shape with the last axis replaced by `span`.
        """
        n = positions.shape[0]
        cols = positions.view(n, *([1] * (like.dim() - 1))) % width + self.offsets[:span]
        return cols.expand(*like.shape[:-1], span)


# ---- Gated PixelCNN -------------------------------------------------------------------------
# Left contexts are kept column-major, (n, columns * C) with the newest column last, so a
# window is one concat and the horizontal convolution one matmul with the kernel flattened in
# the same (column, channel) order; dropping the oldest column is one slice.
def _column_major(conv: nn.Conv2d) -> torch.Tensor:
    """A (out, in, 1, k) kernel as (out, k * in), matching a column-major window."""
    # A copy: a view of a parameter cannot be traced as a constant.
    return conv.weight[:, :, 0, :].permute(0, 2, 1).flatten(1).clone()


def _gate(x: torch.Tensor, channels: int) -> torch.Tensor:
    """`gate` on (n, 2C) with the split at a constant: exported as two static slices, no shape arithmetic."""
    return torch.tanh(x[:, :channels]) * torch.sigmoid(x[:, channels:])


class GatedRefresh(StepModule):
    """Row start: every layer's vertical stack for row i, its link into the horizontal stack, empty left context.

    pixels (n, C, H, W), positions (n, 1) [, labels (n, 1)], vertical (n, L-1, C, p, W)
    [, condition (n, Cc, H, W)] →
    vertical (updated), links (n, L, 2C, W), image_context (n, (p0+1) * C_img) and
    hidden_context (n, L-1, p * C), the last two zero (the left padding of the new row).
    A link holds everything the horizontal pre-activation adds to its convolution: the 1x1
    of the vertical stack, the class bias and the convolution's own bias (for the first layer
    zero at column 0, where its shift right leaves exact zeros).
    """

    def __init__(self, model: GatedPixelCNN, conditioned: bool = False) -> None:
        super().__init__(model)
        self.conditional = model.config.num_classes is not None
        self.conditioned = conditioned  # a conditioning map state (a PixelVAE's m(z)) follows `vertical`

    def forward(self, pixels, positions, *rest):
        labels, rest = (rest[0], rest[1:]) if self.conditional else (None, rest)
        vertical, condition = rest if self.conditioned else (rest[0], None)
        model, c = self.model, self.model.config
        n, width = pixels.shape[0], c.image_size
        first = model.layers[0]
        p0 = first.kernel_size // 2
        # The first layer sees image rows i-1-p0..i-1 (zero above the image) across the padded width.
        padded = F.pad(model.scale_input(pixels), (p0, p0, p0 + 1, 0))  # (n, C, p0+1+H, W+2p0)
        rows = positions.reshape(-1, 1, 1, 1) // width + self.offsets[: p0 + 1].view(1, 1, -1, 1)
        below = padded.gather(2, rows.expand(n, c.channels, p0 + 1, padded.shape[3]))  # (n, C, p0+1, W+2p0)
        not_first_column = (self.offsets[:width] > 0).to(below.dtype)  # (W,)
        if condition is not None:  # row i of the conditioning map, (n, Cc, 1, W)
            row = (positions // width).reshape(-1, 1, 1, 1).expand(n, condition.shape[1], 1, width)
            condition = condition.gather(2, row)
        new_vertical, links, v_out = [], [], None
        for index, layer in enumerate(model.layers):
            if index > 0:
                p = layer.kernel_size // 2
                window = torch.cat([vertical[:, index - 1], v_out], dim=2)  # (n, C, p+1, W): rows i-p..i
                new_vertical.append(window[:, :, 1:])
                below = F.pad(window, (p, p))
            v_pre = layer.vertical(below)  # (n, 2C, 1, W)
            if index == 0:  # the first layer's shift down makes row 0 exactly zero, bias included
                v_pre = v_pre * (positions >= width).reshape(-1, 1, 1, 1)
            h_bias = layer.horizontal.bias.view(-1, 1)  # (2C, 1)
            if index == 0:
                h_bias = h_bias * not_first_column
            link = layer.vertical_to_horizontal(v_pre)[:, :, 0, :] + h_bias
            if labels is not None:
                v_class, h_class = layer.class_bias(labels[:, 0]).chunk(2, dim=1)  # (n, 2C) each
                v_pre, link = v_pre + v_class[:, :, None, None], link + h_class[:, :, None]
            if condition is not None:
                v_cond, h_cond = layer.condition(condition).chunk(2, dim=1)  # (n, 2C, 1, W) each
                v_pre, link = v_pre + v_cond, link + h_cond[:, :, 0]
            links.append(link)  # (n, 2C, W)
            if index < len(model.layers) - 1:  # the last layer's vertical output feeds nothing
                v_out = gate(v_pre)  # (n, C, 1, W): the next layer's newest input row
        image_context = vertical.new_zeros(n, (p0 + 1) * c.channels)
        p = model.layers[-1].kernel_size // 2
        hidden_context = vertical.new_zeros(n, len(model.layers) - 1, p * c.hidden_channels)
        return torch.stack(new_vertical, 1), torch.stack(links, 1), image_context, hidden_context


class GatedStep(StepModule):
    """K pixels of a row per slot: horizontal stacks from the left context, output layers, inverse-CDF choice.

    positions (n, 1), noise (n, K, C), temperature (n, 1), links, image_context, hidden_context →
    pixel (n, K, C) int64, image_context and hidden_context moved K columns right. K is the
    noise's second axis, fixed when the graph is exported (the loop over it is unrolled: per
    pixel a few small matmuls per layer and nothing else, which is what makes batch 1 fast).
    """

    def __init__(self, model: GatedPixelCNN) -> None:
        super().__init__(model)
        self.choose = choose_at_temperature  # (logits, noise, divisor, greedy) → pixel; tests force pixels here
        with torch.no_grad():
            layers = model.layers
            horizontal = torch.stack([_column_major(layer.horizontal) for layer in layers[1:]])  # (L-1, 2C, (p+1)*C)
            self.register_buffer("horizontal", horizontal, False)
            self.register_buffer("first_horizontal", _column_major(layers[0].horizontal), False)
            # Every layer's skip 1x1 as one matmul over the concatenated gated outputs: (C, L*C).
            skip_weight = torch.cat([layer.skip.weight.flatten(1) for layer in layers], 1)
            self.register_buffer("skip_weight", skip_weight, False)
            self.register_buffer("skip_bias", sum(layer.skip.bias for layer in layers), False)

    def forward(self, positions, noise, temperature, links, image_context, hidden_context):
        model, c = self.model, self.model.config
        width, span, num_layers = links.shape[3], noise.shape[1], links.shape[1]
        channels = c.hidden_channels
        columns = links.gather(3, self.columns(positions, width, span, links))  # (n, L, 2C, K): columns j..j+K-1
        columns = columns.permute(3, 1, 0, 2)  # (K, L, n, 2C)
        divisor, greedy = temperature_rows(temperature, 3)
        hidden = list(hidden_context.unbind(1))  # per layer l >= 1: (n, p*C), layer l-1's last p outputs
        pixels = []
        for s in range(span):
            link = columns[s]  # (L, n, 2C)
            h = torch.addmm(link[0], image_context, self.first_horizontal.t())  # (n, 2C); pixels j-1-p0..j-1
            gated = [_gate(h, channels)]
            h_out = F.linear(gated[0], model.layers[0].horizontal_out.weight.flatten(1),
                             model.layers[0].horizontal_out.bias)
            for index in range(1, num_layers):
                window = torch.cat([hidden[index - 1], h_out], dim=1)  # (n, (p+1)*C): columns j-p..j
                hidden[index - 1] = window[:, channels:]
                gated.append(_gate(torch.addmm(link[index], window, self.horizontal[index - 1].t()), channels))
                if index < num_layers - 1:  # the last layer's horizontal output feeds nothing
                    out = model.layers[index].horizontal_out
                    h_out = F.linear(gated[-1], out.weight.flatten(1), out.bias) + h_out
            skips = F.linear(torch.cat(gated, 1), self.skip_weight, self.skip_bias)  # (n, C)
            hidden_out = F.relu(F.linear(F.relu(skips), model.output_hidden.weight.flatten(1),
                                         model.output_hidden.bias))
            logits = F.linear(hidden_out, model.output_logits.weight.flatten(1), model.output_logits.bias)
            pixel = self.choose(logits.reshape(-1, c.pixel_levels, c.channels), noise[:, s], divisor, greedy)
            pixels.append(pixel)  # (n, C)
            image_context = torch.cat([image_context[:, c.channels:], model.scale_input(pixel)], dim=1)
        return torch.stack(pixels, 1), image_context, torch.stack(hidden, 1)


class LatentStart(nn.Module):
    """Admission: latents (n, D) → the slot's conditioning map m(z), (n, Cc, H, W), kept for every row."""

    def __init__(self, model: PixelVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, latents):
        return self.model.condition_map(latents)


def gated_program(model: GatedPixelCNN, span: int, latent_model: PixelVAE | None = None) -> StepProgram:
    """The Gated PixelCNN's program; with `latent_model` (whose decoder `model` is) a `start` graph maps
    each slot's latents to a conditioning map state that every refresh reads its row of."""
    c = model.config
    if c.num_layers < 2:
        raise ValueError("the cached Gated PixelCNN step needs num_layers >= 2")
    f32, ctl = FP32, controls(model, span)
    p0, p = c.first_kernel_size // 2, c.kernel_size // 2
    rest = c.num_layers - 1
    vertical = TensorSpec("vertical", f32, (rest, c.hidden_channels, p, c.image_size))
    links = TensorSpec("links", f32, (c.num_layers, 2 * c.hidden_channels, c.image_size))
    image_context = TensorSpec("image_context", f32, ((p0 + 1) * c.channels,))
    hidden_context = TensorSpec("hidden_context", f32, (rest, p * c.hidden_channels))
    labels = (ctl["labels"],) if c.num_classes else ()
    conditioning, start = (), None
    if latent_model is not None:
        lc = latent_model.config
        conditioning = (TensorSpec("condition", f32, (lc.condition_channels, c.image_size, c.image_size)),)
        latents = TensorSpec("latents", f32, (lc.latent_dim,))
        start = EntryPoint("start", LatentStart(latent_model), (latents,), _next(*conditioning),
                           lambda n: (torch.randn(n, lc.latent_dim),))

    def refresh_example(n):
        pixels = torch.randint(0, c.pixel_levels, (n, c.channels, c.image_size, c.image_size), dtype=torch.uint8)
        positions = (torch.arange(n) % c.image_size * c.image_size).view(n, 1)
        label_values = (torch.arange(n).view(n, 1) % c.num_classes,) if c.num_classes else ()
        condition_values = tuple(torch.randn(n, *s.shape) for s in conditioning)
        return pixels, positions, *label_values, torch.randn(n, *vertical.shape), *condition_values

    def step_example(n):
        return (*_step_controls_example(n, c, span), torch.randn(n, *links.shape),
                torch.randn(n, *image_context.shape), torch.randn(n, *hidden_context.shape))

    return StepProgram(
        states=(vertical, links, image_context, hidden_context, *conditioning),
        refresh=EntryPoint("refresh", GatedRefresh(model, conditioned=latent_model is not None),
                           (ctl["pixels"], ctl["positions"], *labels, vertical, *conditioning),
                           _next(vertical, links, image_context, hidden_context), refresh_example),
        step=EntryPoint("step", GatedStep(model),
                        (ctl["positions"], ctl["noise"], ctl["temperature"], links, image_context, hidden_context),
                        (ctl[PIXEL], *_next(image_context, hidden_context)), step_example),
        period=c.image_size,
        length=c.image_size * c.image_size,
        span=span,
        start=start,
    )


# ---- PixelCNN -------------------------------------------------------------------------------
def masked_rows(conv: nn.Conv2d) -> torch.Tensor:
    """A masked k x k kernel's rows 0..k//2 (all rows below the centre are masked), flattened.

    Returns (out, in * (k//2 + 1) * k), matching a flattened (in, k//2 + 1, k) window.
    """
    k = conv.kernel_size[0]
    return (conv.weight * conv.mask)[:, :, : k // 2 + 1, :].flatten(1)


class RollRows(nn.Module):
    """Row start: every row cache moves up one row; the new current row is empty (zeros)."""

    def forward(self, *caches):
        return tuple(torch.cat([r[:, :, 1:], torch.zeros_like(r[:, :, :1])], dim=2) for r in caches)


class PixelCNNStep(StepModule):
    """K pixels of a row per slot: each masked layer at the current pixel only, from its rows cache.

    positions, noise (n, K, C), temperature, image_rows (n, C, p0+1, W+2p0), block{b}_rows
    (n, h, p+1, W+2p) → pixel (n, K, C) int64 and the caches with the new pixels' values written.
    """

    def __init__(self, model: PixelCNN) -> None:
        super().__init__(model)
        self.choose = choose_at_temperature  # (logits, noise, divisor, greedy) → pixel; tests force pixels here

    def forward(self, positions, noise, temperature, image_rows, *block_rows):
        block_rows, pixels = list(block_rows), []
        divisor, greedy = temperature_rows(temperature, 3)
        for s in range(noise.shape[1]):
            pixel, image_rows = self._pixel(positions + s, noise[:, s], divisor, greedy, image_rows, block_rows)
            pixels.append(pixel)
        return (torch.stack(pixels, 1), image_rows, *block_rows)

    def _pixel(self, positions, noise, divisor, greedy, image_rows, block_rows):
        """One pixel at `positions`: returns (pixel (n, C), image_rows); updates `block_rows` in place."""
        model, c = self.model, self.model.config
        width = c.image_size
        k0 = model.input_conv.kernel_size[0]
        window = image_rows.gather(3, self.columns(positions, width, k0, image_rows))  # (n, C, p0+1, k0)
        x = F.linear(window.flatten(1), masked_rows(model.input_conv), model.input_conv.bias)  # (n, 2h)
        for b, block in enumerate(model.blocks):
            k = block.masked.kernel_size[0]
            a = F.relu(F.linear(F.relu(x), block.reduce.weight.flatten(1), block.reduce.bias))  # (n, h)
            block_rows[b] = rows = self.write_current(block_rows[b], positions, width, k // 2, a)
            window = rows.gather(3, self.columns(positions, width, k, rows))  # (n, h, p+1, k)
            m = F.linear(window.flatten(1), masked_rows(block.masked), block.masked.bias)
            x = x + F.linear(F.relu(m), block.expand.weight.flatten(1), block.expand.bias)
        hidden = F.relu(F.linear(F.relu(x), model.output_hidden.weight.flatten(1), model.output_hidden.bias))
        logits = F.linear(hidden, model.output_logits.weight.flatten(1), model.output_logits.bias)
        pixel = self.choose(logits.reshape(-1, c.pixel_levels, c.channels), noise, divisor, greedy)
        return pixel, self.write_current(image_rows, positions, width, k0 // 2, model.scale_input(pixel))

    def write_current(self, rows: torch.Tensor, positions: torch.Tensor, width: int, pad: int, values: torch.Tensor):
        """rows (n, C, R, W+2pad) with `values` (n, C) written at the current pixel: last row, column j+pad."""
        current = rows[:, :, -1, :]  # (n, C, W+2pad)
        index = self.columns(positions, width, 1, current) + pad
        current = current.scatter(2, index, values.unsqueeze(2))
        return torch.cat([rows[:, :, :-1], current.unsqueeze(2)], dim=2)


def pixelcnn_program(model: PixelCNN, span: int) -> StepProgram:
    c = model.config
    f32, ctl = FP32, controls(model, span)
    p0, p = c.first_kernel_size // 2, c.kernel_size // 2
    image_rows = TensorSpec("image_rows", f32, (c.channels, p0 + 1, c.image_size + 2 * p0))
    block_rows = tuple(
        TensorSpec(f"block{b}_rows", f32, (c.hidden_channels, p + 1, c.image_size + 2 * p))
        for b in range(c.num_residual_blocks)
    )
    caches = (image_rows, *block_rows)

    def caches_example(n):
        return tuple(torch.randn(n, *s.shape) for s in caches)

    def step_example(n):
        return (*_step_controls_example(n, c, span), *caches_example(n))

    return StepProgram(
        states=caches,
        refresh=EntryPoint("refresh", RollRows(), caches, _next(*caches), caches_example),
        step=EntryPoint("step", PixelCNNStep(model), (ctl["positions"], ctl["noise"], ctl["temperature"], *caches),
                        (ctl[PIXEL], *_next(*caches)), step_example),
        period=c.image_size,
        length=c.image_size * c.image_size,
        span=span,
    )


# ---- PixelCNN++ ------------------------------------------------------------------------------
# Every convolution has kernel height 2, so a row of the whole network follows from the row itself
# and each convolution's input on the row above: those rows are states, one tensor per stream and
# resolution (models/pixelcnn_pp.RowContext lists them). The u stream of row i depends on rows < i
# only: `refresh` computes it once per row and keeps every value the ul stream reads; each pixel step
# then computes the ul stream's row strip, O(W) per pixel rather than O(1), and never the rows
# above. Coarse resolutions follow "cache every, run every": their row r is computed on image row
# r * 2**s and carried, finished, through the image rows up to the next. The fused operator
# (serving/fused/csrc/pixelcnn_pp.cpp) runs the same program on the same states, but a whole row per
# call, keeping the row so far: O(1) per pixel.
@dataclass(frozen=True)
class PixelCNNPPLayout:
    """What the states hold, per width (finest first): channels of each row recorded, in call order."""

    u_rows: dict[int, list[int]]  # the u stream's convolution inputs and carried rows
    ul_rows: dict[int, list[int]]  # the same of the ul stream
    u_values: list[tuple[int, int]]  # (width, channels) of each u-stream value the ul stream reads, in order

    @classmethod
    def of(cls, model: PixelCNNPP) -> PixelCNNPPLayout:
        """One dry run of a row with zero rows above."""
        c = model.config
        widths = [c.image_size >> s for s in range(c.num_scales)]
        rows = RowContext({}, {w: torch.ones(1, 1, 1, 1, dtype=torch.bool) for w in widths},
                          torch.zeros(1, dtype=torch.long), c.image_size)
        with torch.no_grad():
            u, ul = model.initial_streams(torch.zeros(1, 2, 3, c.image_size, dtype=next(model.parameters()).dtype))
            model.mixture_params(u[:, :, -1:], ul[:, :, -1:], rows)

        def channels(stream):
            return {w: [r.shape[1] for r in rows.current[(stream, w)]] for w in widths}

        return cls(channels(U), channels(UL), [(v.shape[3], v.shape[1]) for v in rows.u_made])

    @property
    def widths(self) -> list[int]:
        return list(self.u_rows)

    def value_channels(self, width: int) -> list[int]:
        return [ch for w, ch in self.u_values if w == width]

    def specs(self, name: str) -> tuple[TensorSpec, ...]:
        """The states `name`0.. of one resolution each: u_rows, ul_rows or u_values."""
        per_width = self.u_rows if name == "u_rows" else self.ul_rows if name == "ul_rows" else None
        return tuple(TensorSpec(f"{name}{s}", FP32, (sum(per_width[w] if per_width else self.value_channels(w)), w))
                     for s, w in enumerate(self.widths))


class PixelCNNPPRow(StepModule):
    """What the refresh and the step share: the image window, which resolutions are live, the first layer."""

    def __init__(self, model: PixelCNNPP, layout: PixelCNNPPLayout) -> None:
        super().__init__(model)
        self.layout = layout

    def begin(self, pixels, positions):
        """→ row (n,), live {width: (n, 1, 1, 1)}, window (n, 2, 3, W): image rows i-2..i, zero above the image."""
        model, width = self.model, self.model.config.image_size
        n, row = positions.shape[0], positions[:, 0] // width
        live = {w: (row % (width // w) == 0).view(n, 1, 1, 1) for w in self.layout.widths}
        padded = F.pad(model.network_input(pixels), (0, 0, 2, 0))
        index = (row.view(n, 1, 1, 1) + self.offsets[:3].view(1, 1, 3, 1)).expand(n, 2, 3, width)
        return row, live, padded.gather(2, index)

    def first_layer(self, window, row):
        """u, ul of the window's last row, (n, F, 1, W), with the full pass's shifted-in zeros on image row 0."""
        u, above, left = (part[:, :, -1:] for part in self.model.initial_parts(window))
        not_first_row = (row > 0).to(window.dtype).view(-1, 1, 1, 1)
        return u * not_first_row, above * not_first_row + left

    def unpack(self, states, per_width: dict[int, list[int]], stream: str) -> dict:
        return {(stream, w): [r.unsqueeze(2) for r in state.split(per_width[w], dim=1)]
                for w, state in zip(self.layout.widths, states)}

    def pack(self, rows: RowContext, states, stream: str, update: dict[int, torch.Tensor]) -> tuple:
        """Each resolution's recorded rows as its next state where `update` (n, 1, 1, 1) says, else the state."""
        return tuple(torch.where(update[w].view(-1, 1, 1), torch.cat(rows.current[(stream, w)], 1)[:, :, 0], state)
                     for w, state in zip(self.layout.widths, states))


class PixelCNNPPRefresh(PixelCNNPPRow):
    """Row start: pixels, positions, u_rows{s} → u_rows{s} (where the resolution is live) and u_values{s}."""

    def forward(self, pixels, positions, *u_rows):
        row, live, window = self.begin(pixels, positions)
        u, ul = self.first_layer(window, row)
        rows = RowContext(self.unpack(u_rows, self.layout.u_rows, U), live, row, self.model.config.image_size)
        self.model.mixture_params(u, ul, rows)  # the ul stream's part of it is not kept (rows above: zeros)
        values = tuple(torch.cat([v for v in rows.u_made if v.shape[3] == w], 1)[:, :, 0] for w in self.layout.widths)
        return (*self.pack(rows, u_rows, U, live), *values)


class PixelCNNPPStep(PixelCNNPPRow):
    """K pixels of a row per slot: positions, pixels, noise (n, K, 1), temperature, ul_rows{s}, u_values{s} →
    pixel (n, K, 1) int64 and ul_rows{s}, replaced where the call finishes a row of that resolution."""

    def __init__(self, model: PixelCNNPP, layout: PixelCNNPPLayout) -> None:
        super().__init__(model, layout)
        self.choose = choose_at_temperature  # (logits, noise, divisor, greedy) → pixel; tests force pixels here
        self.register_buffer("levels", torch.arange(model.config.pixel_levels).view(1, -1), persistent=False)

    def forward(self, positions, pixels, noise, temperature, *states):
        model, c, layout = self.model, self.model.config, self.layout
        n, width, levels, scales = positions.shape[0], c.image_size, c.pixel_levels, c.num_scales
        ul_rows, value_states = states[:scales], states[scales:]
        row, live, window = self.begin(pixels, positions)
        above = self.unpack(ul_rows, layout.ul_rows, UL)
        # The refresh's u values, back in the order the network asks for them.
        by_width = {w: list(state.unsqueeze(2).split(layout.value_channels(w), dim=1))
                    for w, state in zip(layout.widths, value_states)}
        u_values = [by_width[w].pop(0) for w, _ in layout.u_values]
        divisor, greedy = temperature_rows(temperature, 3)
        chosen, rows = [], None
        for s in range(noise.shape[1]):
            column = positions[:, 0] % width + s  # (n,)
            u, ul = self.first_layer(window, row)
            rows = RowContext(above, live, row, width, u_values)
            params = model.mixture_params(u, ul, rows)[:, :, 0]  # (n, 3M, W)
            at = params.gather(2, column.view(n, 1, 1).expand(n, params.shape[1], 1))[:, :, 0]  # (n, 3M)
            logits = discretized_mixture_log_probs(at, self.levels, levels)  # (n, L)
            pixel = self.choose(logits.view(n, levels, 1), noise[:, s], divisor, greedy)  # (n, 1)
            chosen.append(pixel)
            current = window[:, :1, 2].scatter(2, column.view(n, 1, 1), model.scale_input(pixel).unsqueeze(2))
            window = torch.cat([window[:, :, :2], torch.cat([current, window[:, 1:, 2]], 1).unsqueeze(2)], 2)
        # A call never crosses a row: where its last pixel ends a live row, that row is the next one's above.
        ends_row = ((positions[:, 0] + noise.shape[1]) % width == 0).view(n, 1, 1, 1)
        return (torch.stack(chosen, 1), *self.pack(rows, ul_rows, UL, {w: live[w] & ends_row for w in live}))


def pixelcnn_pp_program(model: PixelCNNPP, span: int) -> StepProgram:
    c = model.config
    ctl = controls(model, span)
    layout = PixelCNNPPLayout.of(model)
    u_rows, ul_rows, u_values = layout.specs("u_rows"), layout.specs("ul_rows"), layout.specs("u_values")

    def random(specs, n):
        return tuple(torch.randn(n, *st.shape) for st in specs)

    def pixels_example(n):
        return torch.randint(0, c.pixel_levels, (n, c.channels, c.image_size, c.image_size), dtype=torch.uint8)

    def refresh_example(n):
        return pixels_example(n), (torch.arange(n).view(n, 1) % c.image_size) * c.image_size, *random(u_rows, n)

    def step_example(n):
        positions, noise, temperature = _step_controls_example(n, c, span)
        return positions, pixels_example(n), noise, temperature, *random(ul_rows, n), *random(u_values, n)

    return StepProgram(
        states=(*u_rows, *ul_rows, *u_values),
        refresh=EntryPoint("refresh", PixelCNNPPRefresh(model, layout), (ctl["pixels"], ctl["positions"], *u_rows),
                           _next(*u_rows, *u_values), refresh_example),
        step=EntryPoint("step", PixelCNNPPStep(model, layout),
                        (ctl["positions"], ctl["pixels"], ctl["noise"], ctl["temperature"], *ul_rows, *u_values),
                        (ctl[PIXEL], *_next(*ul_rows)), step_example),
        period=c.image_size,
        length=c.image_size * c.image_size,
        span=span,
    )


# ---- MAF ------------------------------------------------------------------------------------
# Every layer is triangular in raster order, so the whole stack inverts one pixel per step (maf.py):
# at pixel i the latent's entry u_i passes down the layers, a_i = b_i exp(s_i) + mu_i, each layer's
# (mu_i, s_i) read off its hidden units' cached pre-activations W1 a_<i + b1, which then take the
# new value's column of W1. Per pixel and layer that is O(hidden units), not a MADE pass. All in
# float64, as the naive inverse, so the pixel bins (edges 1/256 apart) see the same values.
class MAFStart(nn.Module):
    """Admission: latents (n, C, H, W) → u (n, D) float64 and every layer's pre-activations at a = 0: b1."""

    def __init__(self, model: MAF) -> None:
        super().__init__()
        self.register_buffer("hidden_bias", torch.stack([layer.float64_weights()[1] for layer in model.layers]),
                             False)  # (K, H)

    def forward(self, latents):
        u = latents.flatten(1).double()
        return u, torch.zeros_like(u[:, :1, None]) + self.hidden_bias  # (n, K, H): a batch-sized broadcast


class MAFStep(nn.Module):
    """K pixels per slot: positions (n, 1), u (n, D), hidden (n, K, H) float64 → pixel (n, K, C), hidden."""

    def __init__(self, model: MAF) -> None:
        super().__init__()
        self.model = model
        weights = [layer.float64_weights() for layer in model.layers]  # per layer: W1, b1, W_mu, b_mu, W_s, b_s
        # Indexed by the pixel first, so one gather per step brings every layer's row or column of it.
        self.register_buffer("columns", torch.stack([w[0].t() for w in weights], 1), False)  # (D, K, H)
        self.register_buffer("shift_rows", torch.stack([w[2] for w in weights], 1), False)  # (D, K, H)
        self.register_buffer("shift_bias", torch.stack([w[3] for w in weights], 1), False)  # (D, K)
        self.register_buffer("scale_rows", torch.stack([w[4] for w in weights], 1), False)  # (D, K, H)
        self.register_buffer("scale_bias", torch.stack([w[5] for w in weights], 1), False)  # (D, K)

    def forward(self, positions, u, hidden):
        num_layers, pixels = hidden.shape[1], []
        span = self.model.config.image_size
        for s in range(span):
            index = positions[:, 0] + s  # (n,)
            b = u.gather(1, index[:, None])[:, 0]  # (n,): the latent's entry, the top layer's output
            columns, shift_rows, scale_rows = self.columns[index], self.shift_rows[index], self.scale_rows[index]
            shift_bias, scale_bias = self.shift_bias[index], self.scale_bias[index]
            updated = [hidden[:, 0]] * num_layers
            for k in range(num_layers - 1, -1, -1):  # down the stack: layer K-1's input first
                h = F.relu(hidden[:, k])  # (n, H): from a_<i of layer k's input
                mu = (h * shift_rows[:, k]).sum(1) + shift_bias[:, k]
                log_scale = bounded_log_scale((h * scale_rows[:, k]).sum(1) + scale_bias[:, k])
                b = b * log_scale.exp() + mu  # a_i of layer k: the next layer down's output
                updated[k] = hidden[:, k] + columns[:, k] * b[:, None]
            hidden = torch.stack(updated, 1)
            pixels.append(self.model.to_pixels(b).unsqueeze(1))  # (n, C=1)
        return torch.stack(pixels, 1), hidden


def maf_program(model: MAF) -> StepProgram:
    c = model.config
    f64 = FP64
    u = TensorSpec("u", f64, (c.dims,))
    hidden = TensorSpec("hidden", f64, (c.num_layers, c.hidden_units))
    latents = TensorSpec("latents", FP32, (c.channels, c.image_size, c.image_size))
    ctl = controls(model, c.image_size)

    def step_example(n):
        positions = (torch.arange(n).view(n, 1) % c.image_size) * c.image_size
        return positions, torch.randn(n, c.dims, dtype=torch.float64), torch.randn(n, *hidden.shape).double()

    return StepProgram(
        states=(u, hidden),
        start=EntryPoint("start", MAFStart(model), (latents,), _next(u, hidden),
                         lambda n: (torch.randn(n, *latents.shape),)),
        refresh=None,
        step=EntryPoint("step", MAFStep(model), (ctl["positions"], u, hidden), (ctl[PIXEL], *_next(hidden)),
                        step_example),
        period=c.image_size,
        length=c.dims,
        span=c.image_size,
    )


def has_step_program(model: GenerativeModel) -> bool:
    """Whether `model` samples pixel by pixel through a cached step program (and so the engine)."""
    return isinstance(model, AutoregressiveModel | PixelVAE | MAF)


def step_program(model: AutoregressiveModel | PixelVAE | MAF, span: int | None = None) -> StepProgram:
    """The cached step program of an autoregressive model or decoder (eval mode).

    Args:
        span: pixels per step call, a divisor of the image width (of the frame, for audio); default the whole
            width (PixelCNN++: 1, WaveNet: 4).
            One row per call keeps the per-call overhead (session, Python) off the per-pixel
            path, at the price of joining the engine at row boundaries; span 1 is the
            finest-grained program.
    """
    model = model.eval()
    if isinstance(model, WaveNet):
        from .wavenet_steps import wavenet_program  # it builds on this module's StepProgram

        # Four samples per call: the per-call cost (the engine's bookkeeping, feeding 19 states) paid once
        # per four samples; 3.95 → 2.61 s per clip at batch 1 (ONNX Runtime, one thread; 16: 2.35 s for a
        # graph 15 s to export).
        span = 4 if span is None else span
        if span < 1 or model.config.frame % span:
            raise ValueError(f"span must divide the frame {model.config.frame}, got {span}")
        return wavenet_program(model, span)
    if isinstance(model, MAF):
        if span not in (None, model.config.image_size):
            raise ValueError(f"a MAF's step program advances a whole row: span {model.config.image_size}, got {span}")
        return maf_program(model)
    width = model.config.image_size
    if isinstance(model, PixelCNNPP) and span is None:
        # Its step already computes a row strip per pixel: unrolling a whole row into one graph saves
        # nothing per pixel and makes the graph 28 times larger (30 s to export, 8 MB of ONNX).
        span = 1
    span = width if span is None else span
    if span < 1 or width % span:
        raise ValueError(f"span must divide the image width {width}, got {span}")
    if isinstance(model, PixelVAE):
        return gated_program(model.pixelcnn, span, latent_model=model)
    if isinstance(model, GatedPixelCNN):
        return gated_program(model, span)
    if isinstance(model, PixelCNN):
        return pixelcnn_program(model, span)
    if isinstance(model, PixelCNNPP):
        return pixelcnn_pp_program(model, span)
    raise ValueError(f"no cached step program for family {model.family!r}")


def eager_runner(model: AutoregressiveModel | PixelVAE, span: int | None = None):
    """The engine's runner over the eager step modules (the very modules the exporters trace)."""
    from genserve.serving.engine import StepSpec, TorchStepRunner

    program = step_program(model, span)
    spec = StepSpec.from_section(program.section(), model.config.to_dict())
    return TorchStepRunner(spec, {g.name: g.module for g in program.graphs})


def cached_sample(
    model: AutoregressiveModel | PixelVAE | MAF, n: int, seed: int, temperature: float = 1.0,
    labels: torch.Tensor | None = None, latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """`model.sample` through the sampling engine (fused operators where built, else the eager step program).

    Args:
        latents: a PixelVAE's z per sample, (n, D), or a MAF's, (n, C, H, W): `model.decode(latents[, seed])`
            instead; default the prior draws `model.sample` makes.

    Returns:
        (n, C, H, W) int64 pixel values ((n, C, T) for audio), equal to `model.sample(n, seed, temperature, labels)`.
    """
    from genserve.serving.engine import EngineConfig, SamplingEngine
    from genserve.serving.fused import load_ops

    from .fused import fused_runner, packed_weights

    runner = fused_runner(model) if load_ops() and packed_weights(model) else eager_runner(model)
    engine = SamplingEngine(runner, EngineConfig(num_slots=min(n, 64)))
    label_list = None if labels is None else [int(v) for v in labels]
    if isinstance(model, PixelVAE) and latents is None:
        latents = prior_latents(model, seed, range(n))
    if isinstance(model, MAF) and latents is None:
        latents = model.prior_latents(seed, range(n), temperature)
    z = None if latents is None else latents.detach().cpu().float().numpy()
    images = engine.generate(seed, n, temperature, label_list, latents=z)  # the engine's rows: audio as frames
    return torch.from_numpy(images).long().reshape(n, *model.config.sample_shape)


def sample_images(
    model: GenerativeModel, n: int, seed: int, temperature: float = 1.0, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """`model.sample`, through the sampling engine for autoregressive decoders (same images, far faster)."""
    if has_step_program(model):
        return cached_sample(model, n, seed, temperature, labels)
    return model.sample(n, seed, temperature, labels)
