"""PixelCNN++: a discretized logistic mixture over the pixel levels, streams at three resolutions.

Salimans, Karpathy, Chen, Kingma, "PixelCNN++: Improving the PixelCNN with Discretized Logistic
Mixture Likelihood and Other Modifications", ICLR 2017. As in the paper:
- the likelihood of a pixel is a mixture of logistics integrated over each level's bin, the
  edge bins taking the tails (section 2.1), instead of a 256-way softmax;
- two streams without blind spot: `u` sees the rows above (down-shifted convolutions),
  `ul` the rows above and the pixels to the left (down-right-shifted ones);
- gated resnet blocks with concatenated ELUs (2.3, 2.4), downsampling by stride-2 convolutions
  and upsampling by stride-2 transposed ones, and shortcut connections from every block of the
  up pass into the mirrored block of the down pass (2.5);
- dropout inside the blocks (2.6). Single-channel images only (the RGB channel coupling of 2.2
  is not implemented); unconditional.

Every causal convolution has kernel height 2 (its input's row above and its own row), which is
what the cached step program (export/steps.py) is built on: given each convolution's input on
the row above, a whole row of the network is computable from the row itself, `RowContext`
supplying those rows where the full pass pads. The same module code runs both ways.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .autoregressive import AutoregressiveModel
from .base import ImageConfig
from .gated_pixelcnn import shift_down, shift_right

MIN_LOG_SCALE = -7.0  # the paper's floor on a component's log scale: a bin's probability stays well-defined


@dataclass(frozen=True)
class PixelCNNPPConfig(ImageConfig):
    pixel_levels: int = 256
    filters: int = 32
    resnets_per_scale: int = 1
    num_scales: int = 3  # resolutions H, H/2, H/4
    mixtures: int = 5
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.channels != 1:
            raise ValueError(f"PixelCNN++ here supports single-channel images, got channels={self.channels}")
        if self.num_classes is not None:
            raise ValueError("PixelCNN++ is unconditional here")
        if self.filters < 1 or self.resnets_per_scale < 1 or self.num_scales < 1 or self.mixtures < 1:
            raise ValueError(
                f"bad sizes: filters={self.filters} resnets_per_scale={self.resnets_per_scale} "
                f"num_scales={self.num_scales} mixtures={self.mixtures}"
            )
        if self.image_size % 2 ** (self.num_scales - 1):
            raise ValueError(f"image_size {self.image_size} must divide by 2**(num_scales - 1) = "
                             f"{2 ** (self.num_scales - 1)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


U, UL = "u", "ul"  # the two streams: rows above only; rows above and pixels to the left


class RowContext:
    """One row of the network at a time: what each causal convolution sees of its input's row above.

    Full passes run without one (the convolutions pad); the step program runs the same modules
    on single rows (N, C, 1, W_s) with one of these. Rows are keyed by (stream, width): per stream
    and resolution, a list in the order the convolutions are called, which the step program packs
    into one state each.

    The u stream of row i depends on rows < i only, so the step program computes it once per row
    (`refresh`, recording each of its values in `u_made`) and its pixel steps replay those values
    (`u_values`) instead of computing them again: `u_stream` is where the network asks for them.

    Args:
        above: per (stream, width), each call's tensor from the previous visit: a convolution's
            input row above, or for `carry` the row's finished value; a key left out: zeros.
        live: per width, (N, 1, 1, 1) bool: whether this row of that resolution is computed now.
            A coarse row r is computed while the image is on row r * 2**s; on the rows in
            between, its values come from `above` instead ("run every", Ramachandran et al. 2017).
        row: (N,) the image row being computed.
        width: the image width.
        u_values: the u stream's values for this row, in the order `u_stream` is asked; None: compute them.
    """

    def __init__(self, above: dict[tuple[str, int], list[torch.Tensor]], live: dict[int, torch.Tensor],
                 row: torch.Tensor, width: int, u_values: list[torch.Tensor] | None = None) -> None:
        self.above, self.live, self.row, self.width, self.u_values = above, live, row, width, u_values
        self.current: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)  # left for the next visit
        self.u_made: list[torch.Tensor] = []

    def _record(self, x: torch.Tensor, stream: str) -> torch.Tensor:
        key = (stream, int(x.shape[3]))  # a static size, also when traced
        index = len(self.current[key])
        self.current[key].append(x)
        return self.above[key][index] if key in self.above else torch.zeros_like(x)

    def window(self, x: torch.Tensor, stream: str) -> torch.Tensor:
        """(N, C, 1, W) → (N, C, 2, W): the input's row above on top of it."""
        return torch.cat([self._record(x, stream), x], dim=2)

    def carry(self, x: torch.Tensor, stream: str) -> torch.Tensor:
        """A coarse row as computed now where its resolution is live, else as finished on its live image row."""
        return torch.where(self.live[int(x.shape[3])], x, self._record(x, stream))

    def pick(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, C, 2, w) rows 2r, 2r+1 of an upsampling → the one the image row is on, (N, C, 1, w)."""
        odd = (self.row // (self.width // int(rows.shape[3]))) % 2 == 1
        return torch.where(odd.view(-1, 1, 1, 1), rows[:, :, 1:], rows[:, :, :1])

    def u_stream(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The u stream's next value: replayed where given, else computed (and kept in `u_made`)."""
        value = compute() if self.u_values is None else self.u_values[len(self.u_made)]
        self.u_made.append(value)
        return value


class DownShiftedConv(nn.Module):
    """Sees its input's rows i-1..i (zero above the image) and columns j-1..j+1 (kernel (2, 3)): the u stream's."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, (2, 3), stride)

    def forward(self, x: torch.Tensor, rows: RowContext | None = None) -> torch.Tensor:
        x = F.pad(x, (1, 1, 1, 0)) if rows is None else F.pad(rows.window(x, U), (1, 1, 0, 0))
        return self.conv(x)


class DownRightShiftedConv(nn.Module):
    """Sees its input's rows i-1..i and columns j-1..j (kernel (2, 2)): nothing to the right; the ul stream's."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, (2, 2), stride)

    def forward(self, x: torch.Tensor, rows: RowContext | None = None) -> torch.Tensor:
        x = F.pad(x, (1, 0, 1, 0)) if rows is None else F.pad(rows.window(x, UL), (1, 0, 0, 0))
        return self.conv(x)


class Upsample(nn.Module):
    """Stride-2 transposed convolution: output rows 2r, 2r+1 come from input row r alone.

    right=False (the u stream): kernel (2, 3), output column j from input columns (j-1)/2..(j+1)/2.
    right=True (the ul stream): kernel (2, 2), output (i, j) from input (i//2, j//2) alone.
    """

    def __init__(self, channels: int, right: bool) -> None:
        super().__init__()
        self.right = right
        self.deconv = nn.ConvTranspose2d(channels, channels, (2, 2 if right else 3), stride=2, output_padding=1)

    def forward(self, x: torch.Tensor, rows: RowContext | None = None) -> torch.Tensor:
        y = self.deconv(x)  # (N, C, 2H+1, 2W+1 or 2W+2): the last row (and column) is output padding
        y = y[:, :, :-1, :-1] if self.right else y[:, :, :-1, 1:-1]
        return y if rows is None else rows.pick(y)


def concat_elu(x: torch.Tensor) -> torch.Tensor:
    """ELU of x and of -x side by side: (N, C, ...) → (N, 2C, ...), no information thrown away at 0."""
    return F.elu(torch.cat([x, -x], dim=1))


class GatedResnet(nn.Module):
    """x + a * sigmoid(b), (a, b) from two causal convolutions of concat_elu(x) [+ a 1x1 of shortcuts]."""

    def __init__(self, filters: int, conv: type[nn.Module], shortcut_channels: int, dropout: float) -> None:
        super().__init__()
        self.conv_in = conv(2 * filters, filters)
        self.shortcut = nn.Conv2d(2 * shortcut_channels, filters, 1) if shortcut_channels else None
        self.dropout = nn.Dropout(dropout)
        self.conv_out = conv(2 * filters, 2 * filters)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None,
                rows: RowContext | None = None) -> torch.Tensor:
        h = self.conv_in(concat_elu(x), rows)
        if shortcut is not None:
            h = h + self.shortcut(concat_elu(shortcut))
        h = self.conv_out(self.dropout(concat_elu(h)), rows)
        content, gate = h.chunk(2, dim=1)
        return x + content * torch.sigmoid(gate)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)) to full precision everywhere (F.softplus returns x itself above x = 20)."""
    return x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))


def discretized_mixture_log_probs(params: torch.Tensor, levels: torch.Tensor, num_levels: int) -> torch.Tensor:
    """log P(level) under a mixture of logistics integrated over the level's bin of [-1, 1].

    Args:
        params: (N, 3M, ...) mixture logits, means and log scales (means in the [-1, 1] pixel scale).
        levels: (N or 1, K, ...) integer levels to evaluate, in [0, num_levels).
    Returns:
        (N, K, ...) log-probabilities; over all levels they sum to 1 (to rounding).

    A middle bin [c - h, c + h] has mass sigmoid(a) - sigmoid(b), a = (c + h - mu) / s,
    b = (c - h - mu) / s, computed as a - softplus(a) - softplus(b) + log(1 - exp(-(a - b))): no
    difference of nearly equal numbers, however far into a tail the bin lies. The first and
    last bins take the tails: log sigmoid(a) and log(1 - sigmoid(b)).
    """
    logit_weights, means, log_scales = params.unsqueeze(1).chunk(3, dim=2)  # (N, 1, M, ...) each
    log_weights = F.log_softmax(logit_weights, dim=2)
    log_scales = log_scales.clamp(min=MIN_LOG_SCALE)
    half = 1.0 / (num_levels - 1)
    centres = levels.unsqueeze(2).to(params.dtype) * (2 * half) - 1.0  # (N, K, 1, ...)
    inv_scales = torch.exp(-log_scales)
    upper = (centres + half - means) * inv_scales  # (N, K, M, ...)
    lower = (centres - half - means) * inv_scales
    width = 2 * half * inv_scales  # a - b > 0, the same for every level
    # log(1 - exp(-d)) = log d + log((1 - exp(-d)) / d): below d = 0.1, where 1 - exp(-d) would lose
    # digits, the ratio's Taylor series to d**7 (the first term left out is below 3e-14).
    terms = -1.0 / math.factorial(8)
    for k in range(7, 1, -1):  # Horner over sum_{k=2..8} (-d)**(k-1) / k!, the ratio minus 1
        terms = (-1.0) ** (k - 1) / math.factorial(k) + width * terms
    series = math.log(2 * half) - log_scales + torch.log1p(width * terms)
    log_mass_factor = torch.where(width < 0.1, series, torch.log(1 - torch.exp(-width.clamp(min=0.1))))
    middle = upper - softplus(upper) - softplus(lower) + log_mass_factor
    first, last = -softplus(-upper), -softplus(lower)
    log_mass = torch.where(levels.unsqueeze(2) == 0, first,
                           torch.where(levels.unsqueeze(2) == num_levels - 1, last, middle))
    return torch.logsumexp(log_weights + log_mass, dim=2)


class PixelCNNPP(AutoregressiveModel):
    family = "pixelcnn_pp"
    config_class = PixelCNNPPConfig

    def __init__(self, config: PixelCNNPPConfig) -> None:
        super().__init__(config)
        f, r, scales = config.filters, config.resnets_per_scale, config.num_scales
        # The first layer's inputs: the scaled image and a channel of ones (zero in the padding: the border).
        self.u_init = DownShiftedConv(2, f)  # rows i-2..i-1 after the shift
        self.ul_init_above = nn.Conv2d(2, f, (1, 3), padding=(0, 1))  # row i-1 after the shift
        self.ul_init_left = nn.Conv2d(2, f, (2, 1))  # rows i-1..i of column j-1 after the shift

        def blocks(conv, shortcut, count):
            return nn.ModuleList(GatedResnet(f, conv, shortcut, config.dropout) for _ in range(count))

        self.up_u = nn.ModuleList(blocks(DownShiftedConv, 0, r) for _ in range(scales))
        self.up_ul = nn.ModuleList(blocks(DownRightShiftedConv, f, r) for _ in range(scales))
        self.downsample_u = nn.ModuleList(DownShiftedConv(f, f, stride=2) for _ in range(scales - 1))
        self.downsample_ul = nn.ModuleList(DownRightShiftedConv(f, f, stride=2) for _ in range(scales - 1))
        # The down pass: r blocks at the coarsest scale, r + 1 at the others (one per up-pass output).
        counts = [r + (s < scales - 1) for s in range(scales)]
        self.down_u = nn.ModuleList(blocks(DownShiftedConv, f, counts[s]) for s in range(scales))
        self.down_ul = nn.ModuleList(blocks(DownRightShiftedConv, 2 * f, counts[s]) for s in range(scales))
        self.upsample_u = nn.ModuleList(Upsample(f, right=False) for _ in range(scales - 1))
        self.upsample_ul = nn.ModuleList(Upsample(f, right=True) for _ in range(scales - 1))
        self.output_params = nn.Conv2d(f, 3 * config.mixtures, 1)

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel values (N, 1, H, W) → the scaled image and a channel of ones, (N, 2, H, W)."""
        scaled = self.scale_input(x)
        return torch.cat([scaled, torch.ones_like(scaled)], dim=1)

    def initial_streams(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer, (N, 2, H, W) → u, ul (N, F, H, W), shifted so that (i, j) sees no pixel >= (i, j)."""
        u, above, left = self.initial_parts(inputs)
        return u, above + left

    def initial_parts(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u and ul's two terms (from the row above, from the left). Row 0 of the first two is exactly
        zero (the shift down), not the convolutions' biases: a step program computing row 0 from a
        window of zero rows must zero them itself."""
        u = shift_down(self.u_init(inputs))
        above = shift_down(self.ul_init_above(inputs))
        left = shift_right(self.ul_init_left(F.pad(inputs, (0, 0, 1, 0))))
        return u, above, left

    def mixture_params(self, u: torch.Tensor, ul: torch.Tensor, rows: RowContext | None = None) -> torch.Tensor:
        """The streams after the first layer → (N, 3M, H, W) mixture parameters at every position.

        With `rows`, u and ul are one image row (N, F, 1, W) and so is the result.
        """
        def stream_u(compute, *args):  # the u stream's next value (a step program's pixel steps replay it)
            return compute(*args) if rows is None else rows.u_stream(partial(compute, *args))

        us, uls = [u], [ul]
        scales = self.config.num_scales
        for s in range(scales):
            for block_u, block_ul in zip(self.up_u[s], self.up_ul[s]):
                u = stream_u(block_u, u, None, rows)
                ul = block_ul(ul, u, rows=rows)
                us.append(u)
                uls.append(ul)
            if s < scales - 1:
                u, ul = stream_u(self.downsample_u[s], u, rows), self.downsample_ul[s](ul, rows)
                us.append(u)
                uls.append(ul)
        u, ul = us.pop(), uls.pop()
        for s in reversed(range(scales)):
            for block_u, block_ul in zip(self.down_u[s], self.down_ul[s]):
                u = stream_u(block_u, u, us.pop(), rows)
                ul = block_ul(ul, torch.cat([u, uls.pop()], dim=1), rows=rows)
            if s > 0:
                if rows is not None:  # on the image rows between this scale's rows: its finished row
                    u, ul = stream_u(rows.carry, u, U), rows.carry(ul, UL)
                u, ul = stream_u(self.upsample_u[s - 1], u, rows), self.upsample_ul[s - 1](ul, rows)
        return self.output_params(F.elu(ul))

    def logits(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 1, H, W) → (N, L, 1, H, W): the mixture's log-probability of every level (normalised logits)."""
        params = self.mixture_params(*self.initial_streams(self.network_input(x)))
        levels = torch.arange(self.config.pixel_levels, device=x.device).view(1, -1, 1, 1)
        return discretized_mixture_log_probs(params, levels, self.config.pixel_levels).unsqueeze(2)

    def log_prob(self, x: torch.Tensor, labels: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
        """Exact log p(x) in nats, (N,): the mixture evaluated at the observed levels only."""
        x = self.check_pixels(x)
        self.check_labels(labels, x.shape[0])
        params = self.mixture_params(*self.initial_streams(self.network_input(x)))
        return discretized_mixture_log_probs(params, x, self.config.pixel_levels).flatten(1).sum(1)
