"""The weights of a fused sampling operator, in the layout the operator reads (serving/fused/csrc).

Every dense layer is stored (in, out), so the operator's inner loop runs along contiguous
outputs; convolution kernels are flattened in the order of the windows the operator builds
(Gated PixelCNN: rows, columns, channels; PixelCNN's masked kernels, cut to the rows they see:
channels, rows, columns); MAF's are its step graph's own float64 tables. The tensors are written,
in the order serving.fused.weights names, to `fused.safetensors` beside the step graphs, and the
manifest records its sha256.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from genserve.serving.artifacts import FusedSection
from genserve.serving.fused.weights import (
    CONDITIONED_GATED_WEIGHTS,
    FUSED_OPS,
    GATED_WEIGHTS,
    MAF_WEIGHTS,
    PIXELCNN_PP_WEIGHTS,
    PIXELCNN_WEIGHTS,
    WAVENET_WEIGHTS,
    WEIGHTS_FILE,
)

from .models.autoregressive import AutoregressiveModel
from .models.gated_pixelcnn import GatedPixelCNN
from .models.maf import LOG_SCALE_BOUND, MAF
from .models.pixel_vae import PixelVAE
from .models.pixelcnn import PixelCNN
from .models.pixelcnn_pp import PixelCNNPP
from .models.wavenet import WaveNet
from .steps import MAFStep, masked_rows, step_program


def _dense(conv: nn.Conv1d | nn.Conv2d) -> torch.Tensor:
    """A 1x1 convolution as an (in, out) matrix."""
    return conv.weight.flatten(1).t()


def _window(conv: nn.Conv2d) -> torch.Tensor:
    """An (out, in, kh, kw) kernel as ((row, column, channel), out), matching a window flattened that way."""
    return conv.weight.permute(2, 3, 1, 0).reshape(-1, conv.out_channels)


def _stacked(tensors: list[torch.Tensor], *empty: int) -> torch.Tensor:
    """The tensors stacked; (0, *empty) where there are none (a network without such a layer)."""
    return torch.stack(tensors) if tensors else torch.zeros(0, *empty)


def _output_layers(model: AutoregressiveModel) -> dict[str, torch.Tensor]:
    """The two output 1x1s every autoregressive family ends with, as (in, out) matrices and biases."""
    return {"oh_w": _dense(model.output_hidden), "oh_b": model.output_hidden.bias,
            "lg_w": _dense(model.output_logits), "lg_b": model.output_logits.bias}


@torch.no_grad()
def gated_weights(model: GatedPixelCNN) -> dict[str, torch.Tensor]:
    layers, c = model.layers, model.config
    rest = layers[1:]
    packed = {
        "v0_w": _window(layers[0].vertical),
        "v0_b": layers[0].vertical.bias,
        "v_w": torch.stack([_window(layer.vertical) for layer in rest]),
        "v_b": torch.stack([layer.vertical.bias for layer in rest]),
        "link_w": torch.stack([_dense(layer.vertical_to_horizontal) for layer in layers]),
        "link_b": torch.stack([layer.vertical_to_horizontal.bias for layer in layers]),
        "h_b": torch.stack([layer.horizontal.bias for layer in layers]),
        "class_bias": (torch.stack([layer.class_bias.weight for layer in layers]) if c.num_classes
                       else torch.zeros(0)),
        "h0_w": _window(layers[0].horizontal),
        "h_w": torch.stack([_window(layer.horizontal) for layer in rest]),
        "hout_w": torch.stack([_dense(layer.horizontal_out) for layer in layers[:-1]]),
        "hout_b": torch.stack([layer.horizontal_out.bias for layer in layers[:-1]]),
        "skip_w": torch.cat([_dense(layer.skip) for layer in layers]),
        "skip_b": sum(layer.skip.bias for layer in layers),
        **_output_layers(model),
    }
    assert tuple(packed) == GATED_WEIGHTS
    return _contiguous(packed)


@torch.no_grad()
def conditioned_gated_weights(model: PixelVAE) -> dict[str, torch.Tensor]:
    """A PixelVAE decoder's: the Gated PixelCNN's, then each layer's 1x1s of m(z) split by stack,
    cond_w (L, 2, Cc, 2C) and cond_b (L, 2, 2C) (vertical, then horizontal: the chunk the layer makes)."""
    layers = model.pixelcnn.layers
    packed = {
        **gated_weights(model.pixelcnn),
        "cond_w": torch.stack([torch.stack(_dense(layer.condition).chunk(2, dim=1)) for layer in layers]),
        "cond_b": torch.stack([torch.stack(layer.condition.bias.chunk(2)) for layer in layers]),
    }
    assert tuple(packed) == CONDITIONED_GATED_WEIGHTS
    return _contiguous(packed)


@torch.no_grad()
def pixelcnn_weights(model: PixelCNN) -> dict[str, torch.Tensor]:
    blocks, h = model.blocks, model.config.hidden_channels

    window = h * (model.config.kernel_size // 2 + 1) * model.config.kernel_size
    packed = {
        "in_w": masked_rows(model.input_conv).t(),
        "in_b": model.input_conv.bias,
        "reduce_w": _stacked([_dense(b.reduce) for b in blocks], 2 * h, h),
        "reduce_b": _stacked([b.reduce.bias for b in blocks], h),
        "masked_w": _stacked([masked_rows(b.masked).t() for b in blocks], window, h),
        "masked_b": _stacked([b.masked.bias for b in blocks], h),
        "expand_w": _stacked([_dense(b.expand) for b in blocks], h, 2 * h),
        "expand_b": _stacked([b.expand.bias for b in blocks], 2 * h),
        **_output_layers(model),
    }
    assert tuple(packed) == PIXELCNN_WEIGHTS
    return _contiguous(packed)


def _transposed_rows(deconv: nn.ConvTranspose2d) -> torch.Tensor:
    """An (in, out, kh, kw) transposed kernel as (kh, (kw, in), out): per output row, the taps a column reads."""
    return deconv.weight.permute(2, 3, 0, 1).flatten(1, 2)


@torch.no_grad()
def pixelcnn_pp_weights(model: PixelCNNPP) -> dict[str, torch.Tensor]:
    """Blocks in the order the network runs them: the up pass from the finest resolution, then the down pass
    from the coarsest (models/pixelcnn_pp.mixture_params)."""
    c, f = model.config, model.config.filters
    coarsest_first = list(reversed(range(c.num_scales)))
    up_u, up_ul = [b for blocks in model.up_u for b in blocks], [b for blocks in model.up_ul for b in blocks]
    down_u = [b for s in coarsest_first for b in model.down_u[s]]
    down_ul = [b for s in coarsest_first for b in model.down_ul[s]]

    def convolutions(blocks, name):
        convs = [getattr(b, name).conv for b in blocks]
        return torch.stack([_window(conv) for conv in convs]), torch.stack([conv.bias for conv in convs])

    def shortcuts(blocks):
        return torch.stack([_dense(b.shortcut) for b in blocks]), torch.stack([b.shortcut.bias for b in blocks])

    packed = {
        "u_init_w": _window(model.u_init.conv), "u_init_b": model.u_init.conv.bias,
        "ul_above_w": _window(model.ul_init_above), "ul_above_b": model.ul_init_above.bias,
        "ul_left_w": _window(model.ul_init_left), "ul_left_b": model.ul_init_left.bias,
    }
    packed["u_in_w"], packed["u_in_b"] = convolutions(up_u + down_u, "conv_in")
    packed["u_out_w"], packed["u_out_b"] = convolutions(up_u + down_u, "conv_out")
    packed["u_short_w"], packed["u_short_b"] = shortcuts(down_u)
    packed["ul_in_w"], packed["ul_in_b"] = convolutions(up_ul + down_ul, "conv_in")
    packed["ul_out_w"], packed["ul_out_b"] = convolutions(up_ul + down_ul, "conv_out")
    packed["ul_up_short_w"], packed["ul_up_short_b"] = shortcuts(up_ul)
    packed["ul_down_short_w"], packed["ul_down_short_b"] = shortcuts(down_ul)
    for stream, taps in (("u", 3), ("ul", 2)):  # the u stream's kernels are 3 columns wide, the ul stream's 2
        downsample, upsample = getattr(model, f"downsample_{stream}"), getattr(model, f"upsample_{stream}")
        packed[f"{stream}_down_w"] = _stacked([_window(d.conv) for d in downsample], 2 * taps * f, f)
        packed[f"{stream}_down_b"] = _stacked([d.conv.bias for d in downsample], f)
        packed[f"{stream}_up_w"] = _stacked([_transposed_rows(u.deconv) for u in upsample], 2, taps * f, f)
        packed[f"{stream}_up_b"] = _stacked([u.deconv.bias for u in upsample], f)
    packed |= {"out_w": _dense(model.output_params), "out_b": model.output_params.bias,
               "constants": torch.tensor([float(c.pixel_levels)])}
    packed = {name: packed[name] for name in PIXELCNN_PP_WEIGHTS}
    return _contiguous(packed)


@torch.no_grad()
def maf_weights(model: MAF) -> dict[str, torch.Tensor]:
    """The step graph's own tables (MAFStep: float64, indexed by the pixel first) and the constants of its
    pixel map, in float64 as the inverse runs."""
    step, c = MAFStep(model), model.config
    constants = torch.tensor([c.alpha, c.pixel_levels, LOG_SCALE_BOUND, c.image_size], dtype=torch.float64)
    packed = {name: getattr(step, name) for name in MAF_WEIGHTS[:-1]} | {"constants": constants}
    assert tuple(packed) == MAF_WEIGHTS
    return {name: t.detach().contiguous().clone() for name, t in packed.items()}


@torch.no_grad()
def wavenet_weights(model: WaveNet) -> dict[str, torch.Tensor]:
    layers, c = model.layers, model.config
    packed = {
        "in_w": model.input_conv.weight.flatten(1).t(),  # (C * 2 taps, R): the taps read x_{t-2}, x_{t-1}
        "in_b": model.input_conv.bias,
        "dilated_w": torch.stack([torch.cat([w.dilated.weight[:, :, 0], w.dilated.weight[:, :, 1]], 1).t()
                                  for w in layers]),  # (L, 2R in: [oldest, newest], 2R out)
        "dilated_b": torch.stack([w.dilated.bias for w in layers]),
        "class_bias": (torch.stack([w.class_bias.weight for w in layers]) if c.num_classes else torch.zeros(0)),
        "out_w": torch.stack([torch.cat([_dense(w.residual), _dense(w.skip)], 1) for w in layers]),
        "out_b": torch.stack([torch.cat([w.residual.bias, w.skip.bias]) for w in layers]),
        **_output_layers(model),
    }
    assert tuple(packed) == WAVENET_WEIGHTS
    return _contiguous(packed)


def _contiguous(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().float().contiguous().clone() for name, t in packed.items()}


# (model class, operator family, packer) of every family with fused operators.
_PACKERS = (
    (MAF, "maf", maf_weights),
    (WaveNet, "wavenet", wavenet_weights),
    (PixelVAE, "conditioned_gated_pixelcnn", conditioned_gated_weights),
    (GatedPixelCNN, "gated_pixelcnn", gated_weights),
    (PixelCNN, "pixelcnn", pixelcnn_weights),
    (PixelCNNPP, "pixelcnn_pp", pixelcnn_pp_weights),
)


def packed_weights(model: AutoregressiveModel | PixelVAE | MAF) -> tuple[str, dict[str, torch.Tensor]] | None:
    """(operator family, weights) of a model with fused operators; None for the others."""
    for model_class, op, packer in _PACKERS:
        if isinstance(model, model_class):
            return op, packer(model)
    return None


def write_fused_weights(model: AutoregressiveModel | PixelVAE | MAF, folder: Path) -> tuple[FusedSection, Path] | None:
    """Writes `folder/fused.safetensors` for a family with fused operators; None for the others."""
    packed = packed_weights(model)
    if packed is None:
        return None
    path = folder / WEIGHTS_FILE
    save_file(packed[1], str(path))
    return FusedSection(packed[0], WEIGHTS_FILE), path


def fused_runner(model: AutoregressiveModel | PixelVAE | MAF, span: int | None = None, namespace=None,
                 device: str = "cpu"):
    """The engine's runner over the fused operators with weights packed from `model` (before export);
    a program's `start` graph (a PixelVAE's latents → m(z), a MAF's → u and its hidden units) runs as the
    eager module.

    `namespace`: where the operator functions are found (FusedStepRunner); torch.ops.genserve by default.
    """
    from genserve.serving.engine import FusedStepRunner, StepSpec, TorchStepRunner

    op, weights = packed_weights(model)
    program = step_program(model, span)
    spec = StepSpec.from_section(program.section(), model.config.to_dict())
    start = None
    if program.start is not None:  # a copy: the module holds the whole model, which stays where it is
        start = TorchStepRunner(spec, {"start": copy.deepcopy(program.start.module).to(device)}, device)
    return FusedStepRunner(spec, FUSED_OPS[op], [w.to(device) for w in weights.values()], device, namespace,
                           start=start)
