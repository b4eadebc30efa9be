"""WaveNet: causality and receptive field, the per-layer queues, mu-law, WAV files, the spoken-digit corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genserve.clients.audio import mu_law_decode, mu_law_encode, read_audio, read_wav, write_audio, write_wav
from genserve.export.fused import fused_runner, packed_weights
from genserve.export.models import WaveNetConfig
from genserve.export.speech import CorpusSpec, load_corpus, to_clip
from genserve.export.steps import eager_runner, step_program
from genserve.serving import fused
from genserve.serving.artifacts import load_manifest
from genserve.serving.engine import EngineConfig, FusedStepRunner, SamplingEngine, load_step_runner
from genserve.serving.kernels.sampling import choose_at_temperature, noise_for
from tests.conftest import make_model
from tests.unit.test_export import REPOSITORY
from tests.unit.test_fused_ops import assert_call_matches_the_graph, assert_rows_on_any_thread_count
from tests.unit.test_sampling_engine import generate, labels_for, naive


def test_the_dilations_and_receptive_field_follow_the_config():
    c = WaveNetConfig(max_dilation=8, dilation_cycles=3)
    assert c.dilations == (1, 2, 4, 8) * 3
    assert c.receptive_field == 2 + 3 * 15
    assert c.sample_shape == (1, 6400) and c.dims == 6400


@pytest.mark.parametrize(
    "overrides, message",
    [(dict(max_dilation=6), "power of two"), (dict(channels=2), "mono"), (dict(length=100, frame=30), "frame"),
     (dict(residual_channels=0), "bad sizes"), (dict(pixel_levels=300), "pixel_levels")],
)
def test_bad_configs_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        WaveNetConfig(**overrides)


def test_a_prediction_sees_exactly_the_receptive_field_before_it():
    # Changing sample s must change the logits at t exactly when s < t <= s + receptive_field: the
    # prediction at t sees x_{t-RF} .. x_{t-1}, never x_t or later (causality), nothing older.
    model = make_model("wavenet", length=40).double()
    rf = model.config.receptive_field  # 2 + 2 * (1 + 2 + 4) = 16
    x = torch.randint(0, 5, (1, 1, 40))
    base = model.logits(x).detach()
    for s in (0, 7, 20):
        changed = x.clone()
        changed[0, 0, s] = (changed[0, 0, s] + 2) % 5
        moved = (model.logits(changed).detach() - base).abs().amax(dim=(0, 1, 2))  # (T,)
        expected = torch.zeros(40, dtype=torch.bool)
        expected[s + 1 : s + rf + 1] = True
        assert torch.equal(moved > 0, expected), s


def test_the_step_keeps_one_queue_per_layer_as_long_as_its_dilation():
    model = make_model("wavenet")
    program = step_program(model)
    shapes = {s.name: s.shape for s in program.states}
    assert shapes["recent"] == (1, 2)
    assert [shapes[f"queue{i}"] for i in range(6)] == [(4, d) for d in (1, 2, 4, 1, 2, 4)]
    assert program.refresh is None and program.span == 4 and program.length == 24


def test_mu_law_codes_survive_decoding_and_encoding_and_hit_the_ends():
    codes = np.arange(256)
    assert np.array_equal(mu_law_encode(mu_law_decode(codes)), codes)
    assert mu_law_encode(np.array([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
    audio = np.linspace(-1, 1, 1001)
    assert np.all(np.diff(mu_law_encode(audio)) >= 0)  # monotone
    # G.711's companding: small amplitudes get fine steps, large ones coarse.
    steps = np.diff(mu_law_decode(codes))
    assert steps[128] < steps[250] / 50


def test_wav_files_round_trip_to_16_bit_precision(tmp_path):
    audio = np.sin(np.linspace(0, 40, 800)) * 0.7
    write_wav(tmp_path / "a.wav", audio, 8000)
    back, rate = read_wav(tmp_path / "a.wav")
    assert rate == 8000 and back.shape == (800,)
    assert np.abs(back - audio).max() <= 0.5 / 32767 + 1e-12  # half a 16-bit step (+ float64 rounding)


def test_written_samples_read_back_as_the_same_codes(tmp_path):
    codes = np.random.default_rng(0).integers(0, 256, (3, 1, 50)).astype(np.uint8)
    written = write_audio(tmp_path / "out.wav", codes, 256, 8000)
    assert [p.name for p in written] == ["out-0.wav", "out-1.wav", "out-2.wav", "out.png"]
    assert np.array_equal(read_audio([str(p) for p in written[:3]], 256, 8000, 50), codes)
    npz = write_audio(tmp_path / "out.npz", codes, 256, 8000)
    assert np.array_equal(read_audio([str(npz[0])], 256, 8000, 50), codes)


@pytest.mark.parametrize("rate, length, message", [(16000, 50, "16000 Hz"), (8000, 60, "exactly 60")])
def test_audio_of_another_rate_or_length_is_refused(tmp_path, rate, length, message):
    write_wav(tmp_path / "a.wav", np.zeros(50), rate)
    with pytest.raises(ValueError, match=message):
        read_audio([str(tmp_path / "a.wav")], 256, 8000, length)


def test_a_clip_is_resampled_trimmed_and_placed_after_the_lead():
    spec = CorpusSpec(length=4000, lead=100)
    rate = 22050
    t = np.arange(int(0.2 * rate)) / rate
    tone = np.concatenate([np.zeros(500), 0.3 * np.sin(2 * np.pi * 440 * t), np.zeros(700)])  # 0.2 s of A4
    clip = to_clip(tone, rate, spec)
    audio = mu_law_decode(clip)
    assert clip.shape == (4000,) and clip.dtype == np.uint8
    assert np.all(clip[:100] == 128)  # the lead is silence (mu-law code of 0)
    loud = np.flatnonzero(np.abs(audio) > 0.05)
    assert 100 <= loud[0] < 110 and 1590 <= loud[-1] < 1700  # 0.2 s at 8 kHz = 1600 samples, trimmed
    assert abs(np.abs(audio).max() - spec.peak) < 0.02  # normalised to the peak (within a mu-law step)
    crossings = np.flatnonzero(np.diff(np.sign(audio[110:1590])) != 0)
    assert abs(len(crossings) / 2 / (1480 / 8000) - 440) < 10  # still a 440 Hz tone after resampling


def test_the_committed_corpus_matches_its_spec_and_digest(tmp_path):
    corpus = load_corpus()  # checks the recorded digest
    spec = CorpusSpec()
    assert corpus["audio"].shape == (10 * len(spec.voices) * len(spec.speeds) * len(spec.pitches), 1, spec.length)
    assert np.array_equal(np.bincount(corpus["labels"]), [54] * 10)
    assert int(corpus["sample_rate"]) == 8000
    tampered = dict(corpus, audio=corpus["audio"].copy())
    tampered["audio"][0, 0, 1000] ^= 1  # one bit of one sample
    np.savez(tmp_path / "tampered.npz", **tampered)
    with pytest.raises(ValueError, match="does not hold the recorded corpus"):
        load_corpus(tmp_path / "tampered.npz")
    assert load_corpus(tmp_path / "tampered.npz", expected=None)["audio"][0, 0, 1000] != corpus["audio"][0, 0, 1000]


@pytest.fixture(scope="module")
def eager_clip(shipped):
    """Sample 0 of seed 2 at temperature 0.8, label 5, from the eager step program (naive sampling of a
    6,400-sample clip is 6,400 full passes; the program is exact against it on tiny models), and the
    program's logits at every sample, (6400, 256)."""
    runner = eager_runner(shipped("wavenet_speech").model)
    step, recorded = runner.graphs["step"], []

    def recording(logits, noise, divisor, greedy):
        recorded.append(logits[0, :, 0].detach().clone())
        return choose_at_temperature(logits, noise, divisor, greedy)

    step.choose = recording
    clip = SamplingEngine(runner, EngineConfig(num_slots=1)).generate(2, 1, 0.8, [5]).reshape(6400)
    return clip, torch.stack(recorded)


@pytest.mark.parametrize("runtime", ["onnx", "torchscript"])
def test_the_committed_step_artifacts_draw_what_the_eager_program_does(runtime, eager_clip, shipped):
    # Call by call at the shipped sizes (random queues, 4 samples per call, 3 slots): the samples exactly,
    # the states within rounding.
    runner = load_step_runner(load_manifest(REPOSITORY / "wavenet_speech_sample"), runtime, fused=False)
    assert runner.spec.sample_shape == (1, 20, 320)  # the engine's rows: frames of 320 samples
    assert_call_matches_the_graph(runner, shipped("wavenet_speech").model, "step", n=3)
    # A whole clip through the engine: the same samples up to the first that parts, if one does, and that
    # one only where its noise lies within the rounding of a CDF edge, where two implementations may
    # choose either side (this machine: none in this clip, 1 in 8 others). The edge's rounding: a cumulative
    # sum of up to 255 float32 probabilities errs by at most 255 * 2**-24 = 1.5e-5, and the logits' own
    # rounding moves it less than that again.
    clip = SamplingEngine(runner, EngineConfig(num_slots=1)).generate(2, 1, 0.8, [5]).reshape(6400)
    want, logits = eager_clip
    parted = np.flatnonzero(clip != want)
    if len(parted):
        first = parted[0]
        cdf = torch.softmax(logits[first] / 0.8, 0).cumsum(0)[:-1]
        noise = noise_for([(2, 0)], (1, 6400))[0, 0, first]
        assert float((cdf - noise).abs().min()) < 3e-5, (first, clip[first], want[first])


def fused_models():
    """The tiny conditional WaveNet (frames of 8, dilations up to 4: every ring ends a call in order) and
    one whose 12-sample frames leave dilation 8 mid-ring at a call's end, to be rotated back."""
    return {"conditional": make_model("wavenet", num_classes=3),
            "rings": make_model("wavenet", length=48, frame=12, max_dilation=8, seed=1)}


@pytest.mark.parametrize("name", ["conditional", "rings"])
def test_fused_sampling_equals_naive_sampling(name):
    # The fused step runs a whole frame per call (its span is the frame, not the graphs' 4).
    model = fused_models()[name]
    runner = fused_runner(model)
    assert runner.spec.span == model.config.frame and runner.runs_rows
    n = 5
    labels = labels_for(model, n)
    engine = SamplingEngine(runner, EngineConfig(num_slots=3))
    for seed in range(6):
        assert np.array_equal(generate(engine, model, seed, n, labels=labels), naive(model, n, seed, labels=labels))
    for temperature in (0.5, 0.0):
        want = naive(model, n, 3, temperature, labels)
        assert np.array_equal(generate(engine, model, 3, n, temperature, labels), want)


@pytest.mark.parametrize("name", ["conditional", "rings"])
def test_the_fused_step_matches_the_step_graph_it_replaces(name):
    # On the exporter's examples (random queues, 4 samples per call): a 4-sample call leaves the rings of
    # dilation 8 half way round, so their rotation back into the states' order is checked here too.
    model = fused_models()[name]
    assert_call_matches_the_graph(fused_runner(model), model, "step", n=5)


def test_a_multi_frame_call_equals_frame_calls_on_any_thread_count():
    # run_rows(k) must do what k step calls of a frame do with the engine's Python around them (noise picked
    # at each slot's position, pixels written into the clips, positions advanced), bit for bit, and so on 3
    # threads as on 1. 11 slots: two tasks of 8 slots, the second partial.
    model = fused_models()["rings"]
    runner, frame, n = fused_runner(model), model.config.frame, 11
    program = step_program(model)
    generator = torch.Generator().manual_seed(4)
    controls = {
        "pixels": torch.zeros(n, 1, model.config.length // frame, frame, dtype=torch.uint8),
        "positions": torch.tensor([[(0, 1, 2)[k % 3] * frame] for k in range(n)]),
        "labels": None,
        "noise": torch.rand(n, model.config.length, 1, generator=generator),
        "temperature": torch.tensor([[(1.0, 0.5, 0.0)[k % 3]] for k in range(n)]),
    }
    states = [torch.randn(n, *spec.shape, generator=generator) for spec in program.states]
    want_pixels, want_positions = controls["pixels"].clone(), controls["positions"].clone()
    want = {spec.name: state.clone() for spec, state in zip(program.states, states)}
    slots = torch.arange(n)[:, None]
    for _ in range(2):
        taken = want_positions + torch.arange(frame)
        feeds = {**want, "noise": controls["noise"][slots, taken], "temperature": controls["temperature"]}
        out = runner.run("step", feeds)
        want.update({name.removeprefix("next_"): value for name, value in out.items() if name != "pixel"})
        want_pixels.view(n, -1)[slots, taken] = out["pixel"][..., 0].to(torch.uint8)
        want_positions += frame
    assert_rows_on_any_thread_count(runner, controls, states, 2, want_pixels, want_positions,
                                    [want[spec.name] for spec in program.states])


def test_the_fused_operator_refuses_what_it_cannot_run_naming_it():
    assert fused.load_ops()
    model = fused_models()["conditional"]
    weights = list(packed_weights(model)[1].values())
    noise, temperature, labels, recent, *queues = step_program(model).step.example(2)
    step = torch.ops.genserve.wavenet_step
    with pytest.raises(RuntimeError, match="labels: a conditional model needs labels"):
        step(noise, temperature, None, recent, queues, weights)
    with pytest.raises(RuntimeError, match=r"labels: 3 outside \[0, 3\)"):
        step(noise, temperature, labels + 2, recent, queues, weights)
    with pytest.raises(RuntimeError, match="queues: 5 for 6 layers"):
        step(noise, temperature, labels, recent, queues[:-1], weights)
    with pytest.raises(RuntimeError, match="queue: shape"):
        step(noise, temperature, labels, recent, [q[:, :2].contiguous() for q in queues], weights)
    with pytest.raises(RuntimeError, match="wavenet weights must be contiguous float32"):
        step(noise, temperature, labels, recent, queues, [w.double() for w in weights])
    unconditional = fused_models()["rings"]
    noise, temperature, recent, *queues = step_program(unconditional).step.example(2)
    with pytest.raises(RuntimeError, match="labels: this WaveNet is unconditional"):
        step(noise, temperature, labels, recent, queues, list(packed_weights(unconditional)[1].values()))


def test_the_shipped_sampler_runs_fused_a_frame_per_call(shipped):
    # At the shipped sizes (32 residual and 64 skip channels, dilations to 256, 256 levels), a call against
    # the step graph's module: the samples exactly, the states within rounding. Whole clips are not compared:
    # a 6,400-sample clip drawn by two implementations parts at the first sample whose noise falls within
    # their rounding of a CDF edge (here 2 of 16 clips between this operator and the graphs, and 1 of 8
    # between the graphs and the eager program, at sample 987 or 4064), and every sample after follows it.
    runner = load_step_runner(load_manifest(REPOSITORY / "wavenet_speech_sample"))
    assert isinstance(runner, FusedStepRunner) and runner.spec.span == 320 and runner.runs_rows
    model = shipped("wavenet_speech").model
    assert_call_matches_the_graph(fused_runner(model), model, "step", n=3)
