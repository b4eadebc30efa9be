"""WaveNet's cached step program: one queue per dilated layer (fast-wavenet, Paine et al. 2016).

A layer of dilation d reads its input at t - d and t. Naive sampling recomputes every layer
over the whole clip per sample; here each layer keeps a queue of its last d inputs (a state
(n, R, d), oldest first): the step pops the oldest, computes the layer at t from it and the
new input, and pushes that input. `recent` holds the last two scaled samples, what the input
convolution reads. Per sample that is O(layers) small matmuls, and the queues start as zeros,
which is the naive network's causal zero padding. No refresh: the step does all the work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genserve.serving.artifacts import FP32, PIXEL, TensorSpec
from genserve.serving.kernels.sampling import choose_at_temperature, temperature_rows

from .entry_points import EntryPoint
from .models.wavenet import WaveNet
from .steps import StepProgram, _next, controls


def _pointwise(conv: nn.Conv1d) -> torch.Tensor:
    """A (out, in, 1) kernel as a (out, in) matrix."""
    return conv.weight[:, :, 0].detach().clone()


class WaveNetStep(nn.Module):
    """K samples per slot: noise (n, K, C), temperature (n, 1) [, labels (n, 1)], recent (n, C, 2),
    queue{l} (n, R, d_l) → pixel (n, K, C) int64, recent and the queues advanced K samples."""

    def __init__(self, model: WaveNet) -> None:
        super().__init__()
        self.model = model
        self.conditional = model.config.num_classes is not None
        # Buffers, not Python lists of tensors: a traced constant stays on the CPU when the TorchScript
        # artifact is loaded onto a GPU.
        layers = model.layers
        # Per layer the two taps side by side, (2R, 2R): [oldest input, newest input] @ W^T in one matmul.
        self._buffer("dilated", [torch.cat([w.dilated.weight[:, :, 0], w.dilated.weight[:, :, 1]], 1) for w in layers])
        # Residual and skip 1x1s stacked, (R + S, R): one matmul per layer.
        self._buffer("outputs", [torch.cat([_pointwise(w.residual), _pointwise(w.skip)]) for w in layers])
        self._buffer("output_biases", [torch.cat([w.residual.bias, w.skip.bias]) for w in layers])
        if self.conditional:  # every layer's class bias in one table: one gather per step
            self.register_buffer("class_biases", torch.cat([w.class_bias.weight for w in layers], 1).detach(), False)
        # The input and output convolutions as matrices, made once here rather than on every sample.
        self.register_buffer("input_weight", model.input_conv.weight.flatten(1).detach(), False)  # (R, C * 2)
        self.register_buffer("hidden_weight", _pointwise(model.output_hidden), False)
        self.register_buffer("logits_weight", _pointwise(model.output_logits), False)
        self.choose = choose_at_temperature  # (logits, noise, divisor, greedy) → pixel; tests force pixels here

    def _buffer(self, name: str, per_layer: list[torch.Tensor]) -> None:
        self.register_buffer(name, torch.stack(per_layer).detach(), persistent=False)

    def forward(self, noise, temperature, *rest):
        labels, rest = (rest[0], rest[1:]) if self.conditional else (None, rest)
        recent, queues = rest[0], list(rest[1:])
        model, c = self.model, self.model.config
        r = c.residual_channels
        divisor, greedy = temperature_rows(temperature, 3)
        class_biases = None if labels is None else self.class_biases[labels[:, 0]]  # (n, layers * 2R)
        pixels = []
        for s in range(noise.shape[1]):
            # channel-major taps, as recent.flatten(1)
            h = F.linear(recent.flatten(1), self.input_weight, model.input_conv.bias)  # (n, R)
            skips = 0
            for index, layer in enumerate(model.layers):
                queue = queues[index]
                z = F.linear(torch.cat([queue[:, :, 0], h], 1), self.dilated[index], layer.dilated.bias)  # (n, 2R)
                if class_biases is not None:
                    z = z + class_biases[:, 2 * r * index : 2 * r * (index + 1)]
                g = torch.tanh(z[:, :r]) * torch.sigmoid(z[:, r:])
                newest = h.unsqueeze(2)
                queues[index] = torch.cat([queue[:, :, 1:], newest], 2) if layer.dilation > 1 else newest
                out = F.linear(g, self.outputs[index], self.output_biases[index])  # (n, R + S)
                h, skips = h + out[:, :r], skips + out[:, r:]
            hidden = F.relu(F.linear(F.relu(skips), self.hidden_weight, model.output_hidden.bias))
            logits = F.linear(hidden, self.logits_weight, model.output_logits.bias)  # (n, C*L)
            pixel = self.choose(logits.reshape(-1, c.pixel_levels, c.channels), noise[:, s], divisor, greedy)
            pixels.append(pixel)
            recent = torch.cat([recent[:, :, 1:], model.scale_input(pixel).unsqueeze(2)], 2)
        return (torch.stack(pixels, 1), recent, *queues)


def wavenet_program(model: WaveNet, span: int) -> StepProgram:
    c = model.config
    ctl = controls(model, span)
    recent = TensorSpec("recent", FP32, (c.channels, 2))
    queues = tuple(TensorSpec(f"queue{i}", FP32, (c.residual_channels, d)) for i, d in enumerate(c.dilations))
    states = (recent, *queues)
    labels = (ctl["labels"],) if c.num_classes else ()

    def step_example(n):
        label_values = (torch.arange(n).view(n, 1) % c.num_classes,) if c.num_classes else ()
        return (torch.rand(n, span, c.channels), torch.ones(n, 1), *label_values,
                *(torch.randn(n, *s.shape) for s in states))

    return StepProgram(
        states=states,
        refresh=None,
        step=EntryPoint("step", WaveNetStep(model), (ctl["noise"], ctl["temperature"], *labels, *states),
                        (ctl[PIXEL], *_next(*states)), step_example),
        period=c.frame,
        length=c.length,
        span=span,
    )
