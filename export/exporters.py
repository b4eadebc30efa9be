"""Writing an entry point as ONNX and as TorchScript, and checking both against eager PyTorch."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch

from .entry_points import EntryPoint

ONNX_OPSET = 17
PARITY_ATOL = 1e-4


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
    """TorchScript, scripted where the wrapper allows it and traced otherwise.

    The wrappers read Python config dataclasses (sizes, level counts), which `torch.jit.script`
    cannot compile, so in practice they are traced at batch 2; tracing keeps shapes read from
    tensors dynamic, and parity is tested at other batch sizes. Returns "scripted" or "traced".
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated in torch 2.13 (still what Triton loads)
        try:
            compiled, how = torch.jit.script(entry.module), "scripted"
        except Exception:  # noqa: BLE001 - any compile failure means "trace instead"
            with torch.no_grad():
                compiled, how = torch.jit.trace(entry.module, entry.example_inputs(2), check_trace=False), "traced"
        torch.jit.save(compiled, str(path))
    return how


def onnx_session(path: str | Path):
    """An ONNX Runtime session on the best provider present (CUDA, else CPU), one thread pool."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), options, providers=providers)


def run_onnx(session, entry: EntryPoint, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    feeds = {spec.name: tensor.numpy() for spec, tensor in zip(entry.inputs, inputs)}
    return session.run([s.name for s in entry.outputs], feeds)


def run_torchscript(path: str | Path, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path))
    with torch.no_grad():
        out = module(*inputs)
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def run_eager(entry: EntryPoint, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    with torch.no_grad():
        out = entry.module(*inputs)
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
