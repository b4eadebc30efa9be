"""Compiles the fused operators' Triton kernels for a GPU, on a machine without one.

`python -m tests.triton_compile [CAPABILITY]` runs the launchers (serving/fused/triton_ops.py) on
the arguments of the tiny test models and of the shipped ones, with every kernel swapped for a
stand-in that, instead of launching, compiles it with Triton's own compiler all the way to a
cubin (ptxas included) for that CUDA compute capability (default 90: H100 and H200). Prints one
line per compiled kernel. The interpreter the unit tests use accepts code the compiler rejects
(a loop-carried variable changing shape, say), so this is what shows the kernels build for a GPU
before one is at hand. Run it without TRITON_INTERPRET: interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as compile_kernel

from genserve.export.checkpoint import load_checkpoint
from genserve.export.fused import packed_weights
from genserve.export.steps import step_program
from genserve.serving.fused import triton_gated, triton_ops, triton_pixelcnn
from tests.unit.test_sampling_engine import tiny

POINTER_TYPES = {torch.float32: "*fp32", torch.int64: "*i64", torch.uint8: "*u8"}
KERNELS = ((triton_gated, "gated_refresh_kernel"), (triton_gated, "gated_step_kernel"),
           (triton_gated, "gated_prepare_kernel"), (triton_pixelcnn, "pixelcnn_step_kernel"))


class CompileInstead:
    """Stands in for a kernel: `kernel[grid](*args, **constexprs)` compiles it for `target` and prints so."""

    def __init__(self, kernel, target: GPUTarget, label: str) -> None:
        self.kernel, self.target, self.label = kernel, target, label

    def __getitem__(self, grid):
        def compile_for(*args, **keywords):
            constexprs = {k: v for k, v in keywords.items() if k in self.kernel.arg_names}
            options = {k: v for k, v in keywords.items() if k not in constexprs}  # launch options
            values = dict(zip(self.kernel.arg_names, args))
            signature = {}
            for name in self.kernel.arg_names:
                value = values.get(name)
                if name in constexprs:
                    signature[name] = "constexpr"
                elif isinstance(value, torch.Tensor):
                    signature[name] = POINTER_TYPES[value.dtype]
                else:
                    signature[name] = "i32" if isinstance(value, int) else "fp32"
            compiled = compile_kernel(ASTSource(self.kernel, signature, constexprs), target=self.target,
                                      options=options)
            assert "cubin" in compiled.asm
            print(f"{self.label}: {self.kernel.__name__} compiled for sm_{self.target.arch} "
                  f"({len(compiled.asm['cubin'])} bytes of cubin, {compiled.metadata.shared} bytes shared)")
        return compile_for


def compile_all(capability: int) -> None:
    target = GPUTarget("cuda", capability, 32)
    models = [("tiny " + name, tiny(name)) for name in ("gated_conditional_3_levels", "pixelcnn_3_levels", "pixel_vae")]
    models += [(name, load_checkpoint(name).model) for name in ("gated_pixelcnn_mnist", "pixelcnn_mnist",
                                                                 "pixel_vae_mnist")]
    for label, model in models:
        for module, name in KERNELS:
            kernel = getattr(module, name)
            kernel = kernel.kernel if isinstance(kernel, CompileInstead) else kernel
            setattr(module, name, CompileInstead(kernel, target, label))
        family, weights = packed_weights(model)
        weights = list(weights.values())
        program = step_program(model)
        refresh = dict(zip((s.name for s in program.refresh.inputs), program.refresh.example(2)))
        step = dict(zip((s.name for s in program.step.inputs), program.step.example(2)))
        controls = [step[k] for k in ("positions", "noise", "temperature")]
        if family.endswith("gated_pixelcnn"):  # a PixelVAE's decoder: conditioned on its map
            triton_ops.gated_refresh(refresh["pixels"], refresh["positions"], refresh.get("labels"),
                                     refresh["vertical"], refresh.get("condition"), weights)
            triton_ops.gated_step(*controls, step["links"], step["image_context"], step["hidden_context"], None,
                                  weights)
            triton_ops.SPLIT_REFRESH_SLOTS = 2  # the split refresh: its prepare kernel, then the rest
            triton_ops.gated_refresh(refresh["pixels"], refresh["positions"], refresh.get("labels"),
                                     refresh["vertical"], refresh.get("condition"), weights)
            triton_ops.SPLIT_REFRESH_SLOTS = 0
        else:
            blocks = [step[s.name] for s in program.states if s.name.startswith("block")]
            triton_ops.pixelcnn_step(*controls, step["image_rows"], blocks, None, weights)


if __name__ == "__main__":
    compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
