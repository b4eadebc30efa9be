"""Writing an entry point as ONNX and as TorchScript."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from .entry_points import EntryPoint

ONNX_OPSET = 17


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """`model` with every Conv2d → BatchNorm2d pair of a Sequential folded into the conv (a copy, in eval mode,
    where there is any pair; else `model` itself).

    Why: the ONNX exporter folds these pairs itself, in float32 on the exporting CPU, and Intel and
    AMD kernels round that product differently, so the same checkpoint gave different ONNX bytes
    (and the shipped repository's checksums held on one CPU only). Folded here in float64 and
    rounded once, the weights are the same on every x86 CPU.
    """
    def pairs(module: nn.Module):
        for sequential in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
            for index in range(len(sequential) - 1):
                if isinstance(sequential[index], nn.Conv2d) and isinstance(sequential[index + 1], nn.BatchNorm2d):
                    yield sequential, index

    if not any(pairs(model)):
        return model  # untouched: a copy would trace to other TorchScript bytes
    model = copy.deepcopy(model).eval()
    for sequential, index in list(pairs(model)):
        conv, norm = sequential[index], sequential[index + 1]
        with torch.no_grad():
            scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
            bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
            folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                               conv.padding, conv.dilation, conv.groups, bias=True)
            folded.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).float())
            folded.bias.copy_(((bias - norm.running_mean.double()) * scale + norm.bias.double()).float())
        sequential[index], sequential[index + 1] = folded.eval(), nn.Identity()
    return model


def export_onnx(entry: EntryPoint, path: str | Path) -> Path:
    """ONNX (opset 17, legacy exporter) with named tensors and a dynamic batch axis.

    Free axes beyond the batch (the VAE's K samples) are dynamic too.
    """
    path = Path(path)
    dynamic_axes = {}
    for spec in (*entry.inputs, *entry.outputs):
        axes = {0: "batch"}
        axes.update({i + 1: f"{spec.name}_{i + 1}" for i, size in enumerate(spec.shape) if size == -1})
        dynamic_axes[spec.name] = axes
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter warns about its own deprecation
        torch.onnx.export(
            entry.module,
            entry.example_inputs(2),
            buffer,
            input_names=[s.name for s in entry.inputs],
            output_names=[s.name for s in entry.outputs],
            dynamic_axes=dynamic_axes,
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    path.write_bytes(buffer.getvalue())
    return path


def export_torchscript(entry: EntryPoint, path: str | Path) -> str:
    """TorchScript by tracing at batch 2, without debug records; returns "traced".

    Why not `torch.jit.script`: the wrappers read Python config dataclasses (sizes, level
    counts) that the scripting compiler cannot compile, and the one family it could compile
    (the VAE's encoder) intermittently failed to serialise on torch 2.13. Tracing gives every
    family the same, byte-deterministic artifact; shapes read from tensors stay dynamic, and
    parity is tested at a batch size other than the traced one.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated in torch 2.13 (still what Triton loads)
        with torch.no_grad():
            traced = torch.jit.trace(entry.module, entry.example_inputs(2), check_trace=False)
        torch.jit.save(traced, str(path))
    _drop_debug_records(Path(path))
    return "traced"


def _drop_debug_records(path: Path) -> None:
    """Rewrites a TorchScript archive without its `*.debug_pkl` records.

    Those hold the Python stack of every traced op, with the absolute paths of the checkout
    that exported it: without them the same export is byte-identical in any directory (the
    repository's SHA256SUMS depend on it). TorchScript loads without them; its runtime errors
    lose only the Python source lines.
    """
    reader = torch._C.PyTorchFileReader(str(path))
    records = [(name, reader.get_record(name)) for name in reader.get_all_records()
               if not name.endswith(".debug_pkl") and name != ".data/serialization_id"]
    del reader
    writer = torch._C.PyTorchFileWriter(str(path))  # writes its own serialization id, from the records' CRCs
    for name, data in records:
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()
