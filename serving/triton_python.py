"""The logic of genserve's Triton Python-backend models (the generated model.py imports these).

Thin by design: `initialize` reads the manifest once (verifying artifact hashes), `execute`
answers every request with exactly one response, and a bad request gets its own error
response without failing the others in its batch. `triton_python_backend_utils` exists only
inside Triton's stub process, so it is imported in `initialize`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .artifacts import load_manifest
from .engine import EngineConfig, SamplingEngine, load_step_runner
from .entry_runner import OnnxEntryPoint
from .errors import InvalidArgument
from .limits import MAX_IMPORTANCE_SAMPLES
from .sampling_args import check_sampling


class _TritonModel:
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


class OnnxEntryPointModel(_TritonModel):
    """Runs one exported entry point (encode, decode, score, logits, ...) through ONNX Runtime."""

    def setup(self) -> None:
        self.runner = OnnxEntryPoint.load(self.manifest, self.version)

    def check(self, feeds):
        # Triton bounds the rows (max_batch_size) but not a free axis: a client calling this model
        # directly could otherwise ask for any number of importance samples.
        for spec in self.manifest.inputs:
            for axis, (size, declared) in enumerate(zip(feeds[spec.name].shape[1:], spec.shape), start=1):
                if declared == -1 and size > MAX_IMPORTANCE_SAMPLES:
                    raise InvalidArgument(spec.name, f"has {size} entries on axis {axis}, over the limit of "
                                          f"{MAX_IMPORTANCE_SAMPLES}")
        return feeds

    def compute(self, feeds):
        return self.runner.run_merged(feeds)


class SamplingModel(_TritonModel):
    """Runs the sampling engine inside Triton: rows of (seed, index, temperature[, label]) in, images out.

    Every row is one sample keyed by (seed, index); all rows of all requests in a batch run in
    one engine (the fused operators where built, else the step graphs in ONNX Runtime), so
    concurrent requests share every step. The engine is driven to completion per batch: Triton's
    Python backend answers a batch at once (no decoupled streaming here), so joins happen at
    batch boundaries.
    """

    def setup(self) -> None:
        self.runner = load_step_runner(self.manifest, "onnx", "cpu", self.version)
        self.num_classes = self.runner.spec.num_classes
        slots = self.manifest.batching.max_batch_size
        self.engine = SamplingEngine(self.runner, EngineConfig(num_slots=slots))

    def check(self, feeds):
        check_sampling(feeds["seed"], feeds["index"], feeds["temperature"], feeds.get("labels"), self.num_classes,
                       index_field="index")
        return feeds

    def compute(self, feeds):
        jobs = []
        for f in feeds:
            jobs.append([
                self.engine.submit(int(seed), indices=[int(index)], temperature=float(t),
                                   labels=None if self.num_classes is None else [int(f["labels"][row, 0])])
                for row, (seed, index, t) in enumerate(zip(f["seed"][:, 0], f["index"][:, 0], f["temperature"][:, 0]))
            ])
        self.engine.run_until_idle()
        return [{"images": np.concatenate([job.images for job in request])} for request in jobs]
