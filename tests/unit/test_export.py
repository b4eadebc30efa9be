"""Exported artifacts: parity with eager PyTorch, valid Triton configs, verified manifests, no drift."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from genserve.export.checkpoint import load_checkpoint, save_checkpoint
from genserve.export.data import fixed_held_out, load_dataset, load_mnist5k
from genserve.export.entry_points import entry_points
from genserve.export.exporters import export_onnx, export_torchscript, fold_batch_norms
from genserve.export.repository import ExportOptions, check_sums, export_checkpoint
from genserve.export.triton_config import DynamicBatching, ModelConfig, parse, render
from genserve.serving import entry_runner
from genserve.serving.artifacts import FP32, UINT8, ArtifactIntegrityError, ManifestError, TensorSpec, load_manifest
from genserve.serving.entry_runner import OnnxEntryPoint, TorchScriptEntryPoint, intermediate_bytes, onnx_session
from genserve.serving.limits import MAX_WORK_PER_RUN
from tests.conftest import SHIPPED, make_model
from tests.rounding import assert_within_rounding, rounding_sigma

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def real_inputs(entry, model, n: int = 3) -> tuple[torch.Tensor, ...]:
    """Real held-out digits (at the model's pixel levels, with their labels), or spoken digits for an audio
    model, and random latents/noise."""
    if model.config.modality == "audio":  # one clip is 6,400 samples: values enough, where 5 took ~40 s
        n = 1
    dataset = load_dataset("spoken_digits") if model.config.modality == "audio" else load_mnist5k()
    held = fixed_held_out(dataset, model.config.pixel_levels)
    g = torch.Generator().manual_seed(5)
    inputs = []
    for spec in entry.inputs:
        if spec.name == "images":
            inputs.append(held.images[:n])
        elif spec.name == "labels":
            inputs.append(held.labels[:n].view(n, 1))
        elif spec.name == "noise":
            inputs.append(torch.rand(n, *spec.shape, generator=g))
        else:  # z, eps: standard normal latents (eps with K = 7 samples)
            shape = tuple(7 if s == -1 else s for s in spec.shape)
            inputs.append(torch.randn(n, *shape, generator=g))
    return tuple(inputs)


def as_list(out) -> list[np.ndarray]:
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


@pytest.mark.parametrize("name", SHIPPED)
def test_onnx_and_torchscript_match_eager_pytorch(name, shipped):
    # The artifacts as served: model_repository/ (exported by setup, checked against the recorded sums).
    model = shipped(name).model
    for entry in entry_points(model):
        inputs = real_inputs(entry, model)  # batch 3: not the batch size the graphs were traced at
        with torch.no_grad():
            eager = as_list(entry.module(*inputs))
        sigmas = rounding_sigma(entry.module, inputs)
        manifest = load_manifest(REPOSITORY / f"{name}_{entry.name}")
        session = onnx_session(manifest.artifact("model.onnx"))
        onnx_out = session.run(None, {s.name: t.numpy() for s, t in zip(entry.inputs, inputs)})
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            scripted = as_list(torch.jit.load(str(manifest.artifact("model.pt")))(*inputs))
        for spec, e, o, s, sigma in zip(entry.outputs, eager, onnx_out, scripted, sigmas):
            where = f"{name}.{entry.name}.{spec.name}"
            assert o.shape == e.shape == s.shape, where
            assert o.dtype == e.dtype == s.dtype, where
            if spec.dtype == torch.uint8:  # images: the same pixel values, exactly
                assert np.array_equal(o, e) and np.array_equal(s, e), where
            else:  # ONNX Runtime's MLAS and PyTorch's kernels round differently, and per CPU
                assert_within_rounding(o, e, sigma, f"{where} (ONNX Runtime)")
                assert_within_rounding(s, e, sigma, f"{where} (TorchScript)")


def test_batch_norms_are_folded_in_float64_and_rounded_once():
    # The ONNX exporter's own float32 fold rounds differently on Intel and AMD; ours is the float64
    # product rounded once, the same bytes on any x86 CPU. Models without a pair are not copied.
    model = make_model("dcgan", num_classes=4)
    norm = model.discriminator.features[3]
    with torch.no_grad():  # running statistics as training leaves them, not the identity's
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
    folded = fold_batch_norms(model)
    conv = model.discriminator.features[2]
    scale = norm.weight.double() / (norm.running_var.double() + norm.eps).sqrt()
    want = (conv.weight.double() * scale.view(-1, 1, 1, 1)).float()
    assert isinstance(folded.discriminator.features[3], torch.nn.Identity)
    assert torch.equal(folded.discriminator.features[2].weight, want)
    x, labels = torch.rand(4, 1, 8, 8) * 2 - 1, torch.arange(4)
    with torch.no_grad():
        # One float32 rounding of each folded weight and bias moves the logit by far less than 1e-4 of it.
        assert torch.allclose(folded.discriminator(x, labels), model.discriminator(x, labels), rtol=1e-4, atol=1e-5)
    plain = make_model("vae")
    assert fold_batch_norms(plain) is plain


def test_outputs_are_deterministic_functions_of_inputs(shipped, tmp_path):
    # Randomness stays outside the graphs: the same inputs twice give the same outputs, eagerly
    # and in each exported runtime.
    model = shipped("vae_mnist").model
    entry = entry_points(model)[2]  # score: images + eps
    inputs = real_inputs(entry, model)
    feed = {s.name: t.numpy() for s, t in zip(entry.inputs, inputs)}
    session = onnx_session(export_onnx(entry, tmp_path / "score.onnx"))
    export_torchscript(entry, tmp_path / "score.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(tmp_path / "score.pt"))
    with torch.no_grad():
        for run in (lambda: as_list(entry.module(*inputs)), lambda: session.run(None, feed),
                    lambda: as_list(scripted(*inputs))):
            first, again = run(), run()
            assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_generated_config_parses_into_tritons_model_config():
    config = ModelConfig(
        name="m", backend="python", max_batch_size=8,
        inputs=(TensorSpec("images", UINT8, (1, 28, 28)),), outputs=(TensorSpec("logit", FP32, (1,)),),
        dynamic_batching=DynamicBatching(500, (4, 8)),
    )
    parsed = parse(render(config))
    assert parsed.max_batch_size == 8 and parsed.input[0].dims == [1, 28, 28]
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(parsed.dynamic_batching.preferred_batch_size) == [4, 8]
    assert parsed.version_policy.latest.num_versions == 1


def test_invalid_config_text_is_rejected():
    with pytest.raises(Exception, match="max_batch_sise"):
        parse('name: "m"\nmax_batch_sise: 4\n')
    with pytest.raises(ValueError, match="bad instance group"):
        from genserve.export.triton_config import InstanceGroup

        InstanceGroup(kind="KIND_TPU")


def tiny_checkpoint(tmp_path, family="gated_pixelcnn", **overrides) -> Path:
    folder = tmp_path / f"tiny_{family}"
    save_checkpoint(folder, make_model(family, **overrides), training={"data": "none", "seed": 0})
    return folder


def test_repository_layout_manifest_and_native_flavour(tmp_path):
    checkpoint = load_checkpoint(tiny_checkpoint(tmp_path, num_classes=3))
    folders = export_checkpoint(checkpoint, tmp_path / "repo")
    assert [f.name for f in folders] == ["tiny_gated_pixelcnn_logits", "tiny_gated_pixelcnn_sample"]
    logits = folders[0]
    assert sorted(p.name for p in (logits / "1").iterdir()) == ["model.onnx", "model.pt", "model.py"]
    manifest = load_manifest(logits)
    assert manifest.family == "gated_pixelcnn" and manifest.entry_point == "logits"
    assert [t.name for t in manifest.inputs] == ["images", "labels"]
    assert set(manifest.artifacts) == {"1/model.onnx", "1/model.pt"}
    assert parse((logits / "config.pbtxt").read_text()).backend == "python"
    # version 2 of the native flavour: Triton's onnxruntime backend, both versions' hashes kept
    export_checkpoint(checkpoint, tmp_path / "repo", ExportOptions(version=2, flavour="native"))
    native = parse((logits / "config.pbtxt").read_text())
    assert native.backend == "onnxruntime" and native.default_model_filename == "model.onnx"
    assert set(load_manifest(logits).artifacts) == {"1/model.onnx", "1/model.pt", "2/model.onnx", "2/model.pt"}
    export_checkpoint(checkpoint, tmp_path / "pt", ExportOptions(flavour="native", native_backend="pytorch"))
    pytorch = parse((tmp_path / "pt" / "tiny_gated_pixelcnn_logits" / "config.pbtxt").read_text())
    assert pytorch.backend == "pytorch" and pytorch.output[0].name == "logits__0"


def test_a_tampered_artifact_is_refused(tmp_path):
    folders = export_checkpoint(load_checkpoint(tiny_checkpoint(tmp_path, "vae")), tmp_path / "repo")
    manifest = load_manifest(folders[0])
    OnnxEntryPoint.load(manifest)  # loads while intact
    artifact = folders[0] / "1" / "model.onnx"
    artifact.write_bytes(artifact.read_bytes() + b"\0")
    with pytest.raises(ArtifactIntegrityError, match="refusing to load"):
        OnnxEntryPoint.load(manifest)
    scripted_runner = TorchScriptEntryPoint.load(manifest)  # the TorchScript artifact is checked on its own
    assert scripted_runner.bytes_per_unit is None  # the tampered ONNX is not run to size its pieces either
    scripted = folders[0] / "1" / "model.pt"
    scripted.write_bytes(scripted.read_bytes() + b"\0")
    with pytest.raises(ArtifactIntegrityError, match="model.pt has sha256 .*refusing to load"):
        TorchScriptEntryPoint.load(manifest)


def test_merged_requests_give_the_same_rows_as_separate_runs(tmp_path):
    folders = export_checkpoint(load_checkpoint(tiny_checkpoint(tmp_path, "vae")), tmp_path / "repo")
    score = OnnxEntryPoint.load(load_manifest(folders[2]))  # images + eps (K free)
    rng = np.random.default_rng(0)

    def request(n, k):
        return {"images": rng.integers(0, 2, (n, 1, 8, 8)).astype(np.uint8),
                "eps": rng.standard_normal((n, k, 3)).astype(np.float32)}

    requests = [request(2, 4), request(1, 4), request(3, 6)]  # two can merge, one has another K
    merged = score.run_merged(requests)
    entry = entry_points(make_model("vae"))[2]  # the model that tiny_checkpoint saved
    for req, out in zip(requests, merged):
        alone = score.run(req)
        sigmas = rounding_sigma(entry.module, [torch.from_numpy(req[s.name]) for s in entry.inputs])
        for spec, sigma in zip(entry.outputs, sigmas):  # batch size changes only how MLAS blocks the work
            assert out[spec.name].shape == (len(req["images"]), 1)
            assert_within_rounding(out[spec.name], alone[spec.name], sigma, spec.name)


def test_large_merged_batches_run_in_pieces_of_bounded_work(tmp_path):
    # rows x importance samples per ONNX Runtime run stays within MAX_WORK_PER_RUN (memory grows with it)
    folders = export_checkpoint(load_checkpoint(tiny_checkpoint(tmp_path, "vae")), tmp_path / "repo")

    class Recording(OnnxEntryPoint):
        def run(self, feeds):
            self.works.append(feeds["eps"].shape[0] * feeds["eps"].shape[1])
            return super().run(feeds)

    manifest = load_manifest(folders[2])
    score = Recording(manifest, onnx_session(manifest.artifact("model.onnx")))
    score.works = []
    rng = np.random.default_rng(1)
    images = rng.integers(0, 2, (10, 1, 8, 8)).astype(np.uint8)
    eps = rng.standard_normal((10, 1000, 3)).astype(np.float32)
    (pieces,) = score.run_merged([{"images": images, "eps": eps}])
    assert score.works == [4000, 4000, 2000] and max(score.works) <= MAX_WORK_PER_RUN
    entry = entry_points(make_model("vae"))[2]
    sigmas = rounding_sigma(entry.module, [torch.from_numpy(images), torch.from_numpy(eps)])
    whole = score.session.run(None, {"images": images, "eps": eps})  # one run, as before the bound
    for spec, sigma, expected in zip(entry.outputs, sigmas, whole):
        assert_within_rounding(pieces[spec.name], expected, sigma, spec.name)


def test_a_runs_tensors_are_measured_on_one_unit_of_work(tmp_path):
    # A graph built by hand, its tensors' sizes worked out here: x (N, K, 4) → MatMul (4, 8) → Relu → MatMul
    # (8, 2) → ReduceSum over K, keepdims: at N = K = 1 the node outputs hold 8 + 8 + 2 + 2 floats.
    import onnx
    from onnx import TensorProto, helper

    weights = [helper.make_tensor(name, TensorProto.FLOAT, shape, np.ones(shape).ravel().tolist())
               for name, shape in (("w1", (4, 8)), ("w2", (8, 2)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["o"]),
             helper.make_node("ReduceSum", ["o", "axis"], ["y"], keepdims=1)]
    axis = helper.make_tensor("axis", TensorProto.INT64, (1,), [1])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "K", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 2])],
                              [*weights, axis])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    class Inputs:
        inputs = (TensorSpec("x", FP32, (-1, 4)),)

    assert intermediate_bytes(path, Inputs) == (8 + 8 + 2 + 2) * 4


def test_sessions_do_not_spin_after_a_run():
    # A server runs many sessions in turn; a pool spinning after its run takes the cores the next one needs
    # (measured in onnx_session's comment). Checked on the session's own options, as ONNX Runtime reads them.
    session = onnx_session(REPOSITORY / "vae_mnist_score" / "1" / "model.onnx")
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_merged_batches_of_heavy_entry_points_run_in_pieces_of_bounded_tensors(monkeypatch):
    # A PixelVAE score's importance sample is a whole PixelCNN pass: work alone (rows x K <= 4096) let one
    # run of it grow to gigabytes. Bounded to 3 rows' tensors per run, 8 rows of K = 20 run as 3 + 3 + 2,
    # and give what one run gives.
    manifest = load_manifest(REPOSITORY / "pixel_vae_mnist_score")
    score = OnnxEntryPoint.load(manifest)
    k = 20
    monkeypatch.setattr(entry_runner, "MAX_RUN_BYTES", 3 * k * score.bytes_per_unit)
    runs = []
    run = score.run
    monkeypatch.setattr(score, "run", lambda feeds: runs.append(len(feeds["images"])) or run(feeds))
    rng = np.random.default_rng(2)
    feeds = {"images": rng.integers(0, 2, (8, 1, 28, 28)).astype(np.uint8),
             "eps": rng.standard_normal((8, k, 16)).astype(np.float32)}
    (pieces,) = score.run_merged([feeds])
    assert runs == [3, 3, 2]
    whole = score.session.run(None, feeds)  # what one run gives; the rows do not interact
    for spec, expected in zip(manifest.outputs, whole):
        # The same rows through the same graph: only ONNX Runtime's blocking of another batch size could move
        # the float32 sums (~ -1,100 nats for these random images; equal bit for bit on the machine this was
        # written on): rtol 1e-5 allows ~80 float32 ulps.
        np.testing.assert_allclose(pieces[spec.name], expected, rtol=1e-5)


def test_a_row_heavier_than_a_run_runs_its_free_axis_in_pieces_reduced_as_the_manifest_says(monkeypatch):
    # One PixelVAE image scored with K = 1000 was 1000 PixelCNN passes in one run (2.2 GB resident, kept by
    # the arena). Its manifest says how the outputs reduce over K (ELBO: mean; IWAE: log-mean-exp), so a row
    # over the bound runs alone, K in pieces. Bounded to 6 importance samples' tensors, 2 rows of K = 20
    # run as 6 + 6 + 6 + 2 each, and give what one run gives.
    manifest = load_manifest(REPOSITORY / "pixel_vae_mnist_score")
    assert manifest.free_axis == {"elbo": "mean", "iwae": "log_mean_exp"}
    score = OnnxEntryPoint.load(manifest)
    monkeypatch.setattr(entry_runner, "MAX_RUN_BYTES", 6 * score.bytes_per_unit)
    runs = []
    run = score.run
    monkeypatch.setattr(score, "run", lambda feeds: runs.append(feeds["eps"].shape[:2]) or run(feeds))
    rng = np.random.default_rng(3)
    feeds = {"images": rng.integers(0, 2, (2, 1, 28, 28)).astype(np.uint8),
             "eps": rng.standard_normal((2, 20, 16)).astype(np.float32)}
    (pieces,) = score.run_merged([feeds])
    assert runs == [(1, 6), (1, 6), (1, 6), (1, 2)] * 2
    whole = score.session.run(None, feeds)
    for spec, expected in zip(manifest.outputs, whole):
        # The graph sums 20 float32 terms (mean, log-sum-exp) where the pieces sum 6 and then reduce in float64:
        # each order rounds by at most ~20 float32 ulps of the ~ -1,000-nat sum; rtol 1e-5 allows 8 times that.
        np.testing.assert_allclose(pieces[spec.name], expected, rtol=1e-5)


SUMS = REPOSITORY / "SHA256SUMS"


def test_the_generated_repository_matches_its_sums_and_every_manifest(tmp_path):
    # `make setup` writes model_repository/ by a fresh export (a new process: TorchScript numbers the
    # classes it traces per process) whenever a checkpoint or the exporting code changes, so these
    # files are what a fresh export gives today: the recorded sums hold exporting byte for byte.
    assert REPOSITORY.is_dir(), "model_repository/ is missing: run `make setup`"
    assert check_sums(REPOSITORY, SUMS) == []
    for folder in REPOSITORY.glob("*/genserve.json"):
        manifest = load_manifest(folder.parent)
        for key in manifest.artifacts:
            manifest.artifact(key.split("/", 1)[1], int(key.split("/", 1)[0]))
    manifest = json.loads((REPOSITORY / "vae_mnist_decode" / "genserve.json").read_text())
    assert manifest["metrics"]["iwae-100"]["is_bound"] is True


def test_check_sums_names_a_changed_a_missing_and_an_unlisted_file(tmp_path):
    from genserve.export.repository import write_sums

    repository = tmp_path / "repo"
    shutil.copytree(REPOSITORY / "pixelcnn_mnist_logits", repository / "pixelcnn_mnist_logits")
    sums = tmp_path / "SHA256SUMS"
    assert write_sums(repository, sums) == 5 and check_sums(repository, sums) == []
    config = repository / "pixelcnn_mnist_logits" / "config.pbtxt"
    config.write_bytes(config.read_bytes() + b" ")
    (repository / "pixelcnn_mnist_logits" / "1" / "model.py").unlink()
    (repository / "stray.txt").write_text("x")
    problems = check_sums(repository, sums)
    assert sorted(p.split(":")[0] for p in problems) == [
        "pixelcnn_mnist_logits/1/model.py", "pixelcnn_mnist_logits/config.pbtxt", "stray.txt"]
    assert any("missing" in p for p in problems) and any("not in SHA256SUMS" in p for p in problems)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(format="genserve-manifest/1"), r"format: expected 'genserve-manifest/2'.*re-export"),
        (lambda m: m["batching"].pop("max_batch_size"), r"batching\.max_batch_size: is missing"),
        (lambda m: m["inputs"][0].update(dtype="FP16"), r"inputs\[0\]\.dtype: unknown dtype 'FP16'"),
        (lambda m: m["inputs"][1].update(shape=[0]), r"inputs\[1\]\.shape: must list sizes >= 1 or -1"),
        (lambda m: m["step"].update(kind="kernels"), r"step\.kind: must be one of \('graphs', 'fused'\)"),
        (lambda m: m["step"].update(kind="graphs"), r"step\.fused: kind 'graphs' takes no fused section"),
        (lambda m: m["step"].pop("fused"), r"step\.fused: kind 'fused' needs fused section"),
        (lambda m: m["step"]["fused"].pop("weights"), r"step\.fused\.weights: is missing"),
        (lambda m: m["step"].update(span=5), r"step\.span: 5 must divide period 28"),
        (lambda m: m["step"]["graphs"]["step"]["outputs"].append("x"), r"step\.graphs: outputs \['x'\]"),
        (lambda m: m.update(flavour=3), r"flavour: must be str, got 3"),
        (lambda m: m.update(free_axis={"pixel": "sum"}), r"free_axis: must map every output to one of"),
    ],
)
def test_a_broken_manifest_is_refused_naming_the_file_and_the_field(tmp_path, change, message):
    folder = tmp_path / "gated_pixelcnn_mnist_sample"
    folder.mkdir()
    record = json.loads((REPOSITORY / folder.name / "genserve.json").read_text())
    change(record)
    (folder / "genserve.json").write_text(json.dumps(record))
    with pytest.raises(ManifestError, match=message) as caught:
        load_manifest(folder)
    assert str(caught.value).startswith(str(folder / "genserve.json"))


@pytest.mark.parametrize("name", ["gated_pixelcnn_mnist_sample", "pixel_vae_mnist_score"])  # a step, a free axis
def test_a_manifest_reads_back_as_it_was_written(name):
    text = (REPOSITORY / name / "genserve.json").read_text()
    manifest = load_manifest(REPOSITORY / name)
    assert json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n" == text
