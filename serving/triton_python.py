"""The logic of genserve's Triton Python-backend models (the generated model.py imports these).

Thin by design: `initialize` reads the manifest once (verifying artifact hashes); entry points
answer every request with exactly one response, and a bad request gets its own error response
without failing the others in its batch. `triton_python_backend_utils` exists only inside
Triton's stub process, so it is imported in `initialize`. The sampler, which needs torch for its
engine, is in triton_sampler.py: an entry point's stub imports numpy and ONNX Runtime only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .artifacts import load_manifest
from .entry_runner import OnnxEntryPoint
from .errors import InvalidArgument
from .limits import check_free_axes


class TritonModel:
    """What every genserve Python-backend model shares: the manifest, request inputs, responses, errors."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        folder = Path(args["model_repository"])
        self.manifest = load_manifest(folder)
        self.version = int(args["model_version"])
        self.setup()

    def setup(self) -> None:
        raise NotImplementedError

    def _inputs(self, request) -> dict[str, np.ndarray]:
        feeds = {}
        for spec in self.manifest.inputs:
            tensor = self.pb.get_input_tensor_by_name(request, spec.name)
            if tensor is None:
                raise InvalidArgument(spec.name, "input is required")
            feeds[spec.name] = tensor.as_numpy()
        return feeds

    def _respond(self, outputs: dict[str, np.ndarray]):
        tensors = [self.pb.Tensor(t.name, outputs[t.name].astype(t.dtype.numpy)) for t in self.manifest.outputs]
        return self.pb.InferenceResponse(output_tensors=tensors)

    def _error(self, error: Exception):
        return self.pb.InferenceResponse(error=self.pb.TritonError(f"{type(error).__name__}: {error}"))

    def execute(self, requests: list) -> list:
        feeds, valid, responses = [], [], [None] * len(requests)
        for k, request in enumerate(requests):
            try:
                feeds.append(self.check(self._inputs(request)))
                valid.append(k)
            except Exception as error:  # noqa: BLE001 - one bad request must not fail its batch
                responses[k] = self._error(error)
        if valid:
            try:
                for k, outputs in zip(valid, self.compute(feeds)):
                    responses[k] = self._respond(outputs)
            except Exception as error:  # noqa: BLE001
                for k in valid:
                    responses[k] = self._error(error)
        return responses

    def check(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-request validation beyond the dtype/shape checks Triton already made."""
        return feeds

    def compute(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        raise NotImplementedError

    def finalize(self) -> None:
        pass


class OnnxEntryPointModel(TritonModel):
    """Runs one exported entry point (encode, decode, score, logits, ...) through ONNX Runtime."""

    def setup(self) -> None:
        self.runner = OnnxEntryPoint.load(self.manifest, self.version)

    def check(self, feeds):
        check_free_axes(self.manifest.inputs, feeds)
        return feeds

    def compute(self, feeds):
        return self.runner.run_merged(feeds)


def __getattr__(name: str):
    """`SamplingModel`, for repositories exported before the sampler moved to triton_sampler.py: their
    model.py imports it from here. Imported on that request only, so an entry point's stub stays
    without torch."""
    if name == "SamplingModel":
        from .triton_sampler import SamplingModel

        return SamplingModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
