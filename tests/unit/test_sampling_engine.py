"""The sampling engine: exact cached steps, per-sample determinism, continuous batching, cancellation."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from genserve.export.models.maf import MAF
from genserve.export.models.pixel_vae import PixelVAE, prior_latents
from genserve.export.steps import eager_runner, step_program
from genserve.serving.artifacts import GraphSignature, load_manifest
from genserve.serving.engine import (
    ContinuousScheduler,
    EngineConfig,
    JobStatus,
    SampleJob,
    SamplingEngine,
    StaticScheduler,
    load_step_runner,
)
from genserve.serving.engine.runner import SlotRunner
from genserve.serving.kernels.sampling import noise_for
from tests.conftest import make_model
from tests.rounding import assert_within_rounding, rounding_sigma
from tests.unit.test_export import REPOSITORY

MODELS = {
    "gated": ("gated_pixelcnn", dict(image_size=6, first_kernel_size=5, kernel_size=3, num_layers=3)),
    "gated_conditional_3_levels": (
        "gated_pixelcnn",
        dict(image_size=6, first_kernel_size=3, kernel_size=5, num_layers=2, num_classes=4, pixel_levels=3),
    ),
    "pixelcnn": ("pixelcnn", dict(image_size=6)),
    "pixelcnn_3_levels": ("pixelcnn", dict(image_size=6, pixel_levels=3, first_kernel_size=5, kernel_size=5)),
    "pixel_vae": ("pixel_vae", dict(decoder_layers=3, first_kernel_size=5)),  # the decoder, z per slot
    "pixelcnn_pp": ("pixelcnn_pp", dict(image_size=4, pixel_levels=4)),  # three resolutions, 4x4 → 1x1
    "wavenet_conditional": ("wavenet", dict(num_classes=3)),  # audio: 3 frames of 8, dilations 1..4 twice
}


def make_engine(model, span=None, **config) -> SamplingEngine:
    """An engine over the eager step modules of `model` (the same modules the exporters trace)."""
    return SamplingEngine(eager_runner(model, span), EngineConfig(**config))


def tiny(name: str):
    family, overrides = MODELS[name]
    return make_model(family, **overrides)


def labels_for(model, n):
    return [k % model.config.num_classes for k in range(n)] if model.config.num_classes else None


def latents_for(model, seed, n, temperature=1.0):
    """The prior draws a PixelVAE's or a MAF's `sample` makes (what its Sample feeds the engine; a MAF's
    temperature scales them); None for the others."""
    if isinstance(model, MAF):
        return model.prior_latents(seed, range(n), temperature).numpy()
    return prior_latents(model, seed, range(n)).numpy() if isinstance(model, PixelVAE) else None


def generate(engine, model, seed, n, temperature=1.0, labels=None):
    images = engine.generate(seed, n, temperature, labels, latents=latents_for(model, seed, n, temperature))
    return images.reshape(n, *model.config.sample_shape)  # the engine's rows: audio comes as frames


def naive(model, n, seed, temperature=1.0, labels=None):
    return model.sample(n, seed, temperature, None if labels is None else torch.tensor(labels)).numpy()


def full_logits(model, seed):
    """The full network's logits function of pixel values and labels (z of `seed`'s samples for a PixelVAE)."""
    if isinstance(model, PixelVAE):
        return lambda image, labels: model.pixel_logits(image, prior_latents(model, seed, range(image.shape[0])))
    return model.logits


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("span", [1, None])
def test_teacher_forced_step_logits_equal_the_full_network(name, span):
    # The exactness claim itself: fed a given image pixel by pixel, the cached step's logits at
    # every position equal the full network's logits at that position (float rounding only).
    model = tiny(name)
    n, c = 3, model.config
    labels = labels_for(model, n)
    image = torch.from_numpy(naive(model, n, seed=4, labels=labels))  # (n, C, H, W) or (n, C, T)
    logits = full_logits(model, seed=0)
    full = logits(image, None if labels is None else torch.tensor(labels)).detach()  # (n, L, C, ...)
    engine = make_engine(model, span, num_slots=n)
    recorded = []

    def forced(logits, noise, divisor, greedy):  # record the logits, choose the given image's pixel
        position = len(recorded)
        recorded.append(logits.detach().clone())
        return image.flatten(2)[:, :, position].long()

    engine.runner.graphs["step"].choose = forced
    job = engine.submit(0, n, labels=labels, latents=latents_for(model, 0, n))
    engine.run_until_idle()
    steps = torch.stack(recorded, -1).view(n, c.pixel_levels, *c.sample_shape)
    # The same function computed another way: within the rounding of the full network.
    (sigma,) = rounding_sigma(logits, [image, None if labels is None else torch.tensor(labels)])
    assert_within_rounding(steps.numpy(), full.numpy(), sigma, f"{name} step logits")
    assert np.array_equal(job.images.reshape(image.shape), image.numpy())  # every forced pixel in place


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("span", [1, 2, None])
def test_cached_sampling_equals_naive_sampling_on_many_seeds(name, span):
    # Exact equality: both paths choose pixels by inverse CDF from the same per-sample noise and
    # their logits agree to ~1e-7, so an image could differ only if a noise value fell within
    # float error of a CDF edge (probability ~1e-7 per pixel); over these 450 images it did not.
    model = tiny(name)
    n = 6
    labels = labels_for(model, n)
    engine = make_engine(model, span, num_slots=4)  # fewer slots than samples: requests are split
    for seed in range(10):
        assert np.array_equal(generate(engine, model, seed, n, labels=labels), naive(model, n, seed, labels=labels))
    assert np.array_equal(generate(engine, model, 3, n, 0.0, labels), naive(model, n, 3, 0.0, labels))  # argmax
    assert np.array_equal(generate(engine, model, 3, n, 0.5, labels), naive(model, n, 3, 0.5, labels))


def test_a_pixel_vae_decodes_given_latents_and_joins_a_running_batch_exactly():
    # Decode: the engine from given z, against the model's naive decode of the same z; samples of
    # another job join midway (their conditioning maps made at admission must not touch the others').
    model = tiny("pixel_vae")
    with torch.no_grad():  # a conditioning strong enough that z visibly changes the images
        for layer in model.pixelcnn.layers:
            layer.condition.weight.mul_(30.0)
    z = torch.randn(3, model.config.latent_dim)
    engine = make_engine(model, span=2, num_slots=5)
    decoded = engine.submit(11, 3, latents=z.numpy())
    for _ in range(5):
        engine.step()
    sampled = engine.submit(4, 4, latents=latents_for(model, 4, 4))
    engine.run_until_idle()
    assert np.array_equal(decoded.images, model.decode(z, seed=11).numpy())
    assert np.array_equal(sampled.images, naive(model, 4, 4))
    assert not np.array_equal(decoded.images, model.decode(-z, seed=11).numpy())  # and z reaches the pixels


@pytest.mark.parametrize(
    "latents, message",
    [(None, r"needs latents of shape \(2, 3\)"), (np.zeros((2, 4), np.float32), "latents: expected"),
     (np.full((2, 3), np.nan, np.float32), "latents: expected finite")],
)
def test_a_pixel_vae_engine_refuses_missing_or_malformed_latents(latents, message):
    engine = make_engine(tiny("pixel_vae"), num_slots=2)
    with pytest.raises(ValueError, match=message):
        engine.submit(1, 2, latents=latents)
    assert engine.active == 0 and not engine.step()


def test_a_program_without_latents_refuses_them():
    with pytest.raises(ValueError, match="takes no latents"):
        make_engine(tiny("gated")).submit(1, 1, latents=np.zeros((1, 3), np.float32))


def test_a_sample_is_the_same_alone_batched_or_joining_midway():
    model = tiny("gated_conditional_3_levels")
    engine = make_engine(model, span=1, num_slots=5)
    first = engine.submit(7, 4, labels=[0, 1, 2, 3])
    for _ in range(9):  # the first job is 9 pixels in when the second joins
        engine.step()
    second = engine.submit(8, indices=[5, 2, 9], labels=[3, 3, 1])
    engine.step()
    assert engine.active == 5  # the second job joined at a step boundary, one of its samples waits
    engine.run_until_idle()
    assert first.error is None and second.error is None
    alone = make_engine(model, span=1, num_slots=1)
    for job in (first, second):
        for k, index in enumerate(job.indices):
            single = alone.submit(job.seed, indices=[index], labels=[job.labels[k]])
            alone.run_until_idle()
            assert np.array_equal(single.images[0], job.images[k]), (job.seed, index)
    assert np.array_equal(first.images, naive(model, 4, 7, labels=[0, 1, 2, 3]))


def mirrored(engine: SamplingEngine) -> SamplingEngine:
    """`engine` with its pixels and noise mirrored on the runner's device, as a GPU engine keeps them
    (runner.py): here the device is the CPU, so the suite runs that bookkeeping without a GPU."""
    engine.slots = SlotRunner(engine.runner, engine.config.num_slots, mirror=True)
    return engine


def submit(engine, model, seed, n, temperature=1.0):
    return engine.submit(seed, n, temperature, labels_for(model, n), latents=latents_for(model, seed, n, temperature))


@pytest.mark.parametrize("name, span", [("gated_conditional_3_levels", 1), ("gated", None), ("pixelcnn", 2),
                                        ("pixel_vae", 2)])
def test_mirrored_slots_sample_exactly_through_joins_and_cancellations(name, span):
    # The cancelled job holds the first slots, so the kept job's samples move into them mid-image;
    # the late job joins mid-row of the others, so a refresh runs on some slots only.
    # After every step each slot's controls on the device are its own: the position the host counts,
    # its temperature and its sample's noise.
    model = tiny(name)
    engine = mirrored(make_engine(model, span, num_slots=5))
    slots = engine.slots
    temperatures = {3: 1.0, 4: 0.5, 5: 0.8}

    def step_and_compare() -> bool:
        stepped = engine.step()
        n = slots.active
        assert np.array_equal(slots.controls["positions"][:n, 0].numpy(), slots.positions[:n])
        for slot, (job, k) in enumerate(slots.slot_jobs[:n]):
            noise = noise_for([(job.seed, job.indices[k])], (model.config.channels, slots.spec.length))
            assert torch.equal(slots.controls["noise"][slot], noise[0].T), (slot, job.seed, k)
            assert slots.controls["temperature"][slot, 0] == temperatures[job.seed]
        return stepped

    doomed, kept = (submit(engine, model, seed, n, temperatures[seed]) for seed, n in ((3, 2), (4, 3)))
    for _ in range(5):
        step_and_compare()
    doomed.cancel()
    step_and_compare()
    late = submit(engine, model, 5, 2, temperatures[5])
    while step_and_compare():
        pass
    assert doomed.error == "cancelled" and kept.error is None and late.error is None
    shape = (-1, *model.config.sample_shape)
    assert np.array_equal(kept.images.reshape(shape), naive(model, 3, 4, 0.5, labels_for(model, 3)))
    assert np.array_equal(late.images.reshape(shape), naive(model, 2, 5, 0.8, labels_for(model, 2)))


def test_static_batching_admits_only_into_an_empty_engine():
    model = tiny("gated")
    engine = make_engine(model, num_slots=8, batching="static")
    first = engine.submit(1, 2)
    engine.step()
    second = engine.submit(2, 2)
    while not first.done.is_set():  # free slots, yet the second waits for the whole running batch
        assert engine.active == 2 and second.rows_done.sum() == 0 and second._admitted == 0
        engine.step()
    engine.run_until_idle()
    assert np.array_equal(first.images, naive(model, 2, 1)) and np.array_equal(second.images, naive(model, 2, 2))


def test_cancelling_frees_the_slots_within_one_step_and_spares_the_others():
    model = tiny("pixelcnn")
    engine = make_engine(model, span=1, num_slots=6)
    doomed, kept = engine.submit(3, 4), engine.submit(4, 2)
    for _ in range(5):
        engine.step()
    doomed.cancel()
    engine.step()
    assert engine.active == 2 and doomed.done.is_set() and doomed.error == "cancelled"
    engine.run_until_idle()
    assert kept.error is None and np.array_equal(kept.images, naive(model, 2, 4))


def test_a_cancellation_predicate_frees_every_slot_of_its_job_at_once_and_counts_runs():
    # The predicate (Triton's request.is_cancelled) is asked once per job per step: here it turns
    # True between two asks, as a cancellation arriving mid-step does; no slot may outlive its job.
    model = tiny("pixelcnn")
    engine = make_engine(model, span=1, num_slots=6)
    asks = []
    seen_active = []
    doomed = engine.submit(3, 4, cancelled=lambda: asks.append(1) or len(asks) > 3,
                           on_done=lambda job: seen_active.append(engine.active))
    kept = engine.submit(4, 2)
    for _ in range(3):
        engine.step()
    assert engine.active == 6 and len(asks) == 3  # one ask per step, not per slot
    engine.step()
    assert engine.active == 2 and doomed.error == "cancelled" and seen_active == [2]
    late = engine.submit(5, 1)  # joins the running engine: the same run
    engine.run_until_idle()
    assert engine.runs == 1 and engine.samples_finished == 3
    assert np.array_equal(kept.images, naive(model, 2, 4)) and np.array_equal(late.images, naive(model, 1, 5))
    engine.submit(6, 1)  # an idle engine admitting samples starts a second run
    engine.run_until_idle()
    assert engine.runs == 2


def test_a_job_past_its_deadline_is_dropped():
    model = tiny("pixelcnn")
    engine = make_engine(model, num_slots=2)
    late = engine.submit(1, 3, deadline=time.monotonic() - 1)
    on_time = engine.submit(2, 1)
    engine.run_until_idle()
    assert late.error == "deadline exceeded" and late.rows_done.sum() == 0
    assert on_time.error is None and np.array_equal(on_time.images, naive(model, 1, 2))


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "mirrored"])
def test_progress_is_reported_per_row_with_the_partial_image(on_device):
    model = tiny("gated")
    engine = make_engine(model, span=2, num_slots=2)
    engine = mirrored(engine) if on_device else engine
    seen = []
    job = engine.submit(5, 2, on_progress=lambda j: seen.append((j.rows_done.copy(), j.images.copy())))
    engine.run_until_idle()
    height = model.config.image_size
    assert [rows.tolist() for rows, _ in seen] == [[r, r] for r in range(1, height + 1)]
    for rows, partial in seen:  # finished rows are final; rows not yet done are still empty
        assert np.array_equal(partial[:, :, : rows[0]], job.images[:, :, : rows[0]])
        assert not partial[:, :, rows[0] :].any()


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "mirrored"])
def test_rows_nobody_watches_leave_the_slots_once_with_their_image(on_device):
    # On a GPU every copy out waits for the device: a job without progress must cost one copy per
    # batch of finishing samples, not one per row. The late job finishes a row later than the first.
    model = tiny("gated")
    engine = make_engine(model, num_slots=3)
    engine = mirrored(engine) if on_device else engine
    copies = []
    copy_images = engine.slots.images
    engine.slots.images = lambda slots: copies.append(sorted(slots.tolist())) or copy_images(slots)
    first = engine.submit(5, 2)
    engine.step()
    late = engine.submit(6, 1)
    height = model.config.image_size
    for _ in range(height - 1):
        engine.step()
    assert first.rows_done.tolist() == [height] * 2 and late.rows_done.tolist() == [height - 1]
    assert not late.images.any() and copies == [[0, 1]]  # rows done, none copied out while unfinished
    engine.run_until_idle()
    assert copies == [[0, 1], [0]]  # the late sample moved into slot 0 when the first job's left
    assert np.array_equal(first.images, naive(model, 2, 5))
    assert np.array_equal(late.images, naive(model, 1, 6))


def test_the_engine_thread_serves_concurrent_submissions():
    model = tiny("gated")
    engine = make_engine(model, num_slots=3)
    engine.start()
    try:
        jobs = [engine.submit(seed, 2) for seed in range(4)]
        assert all(job.wait(timeout=60) for job in jobs)
        with pytest.raises(RuntimeError, match="generate"):
            engine.generate(0, 1)
    finally:
        engine.stop()
    for seed, job in enumerate(jobs):
        assert np.array_equal(job.images, naive(model, 2, seed)) and job.latency > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seed=-1, count=1), "seed"),
        (dict(seed=1, count=0), "count"),
        (dict(seed=1, count=2, indices=[0]), "count"),
        (dict(seed=1, count=1, temperature=float("nan")), "temperature"),
        (dict(seed=1, count=1, temperature=-0.5), "temperature"),
        (dict(seed=1, count=2), "labels"),
        (dict(seed=1, count=2, labels=[0, 4]), r"labels must lie in \[0, 4\)"),
    ],
)
def test_bad_submissions_name_the_field(kwargs, message):
    engine = make_engine(tiny("gated_conditional_3_levels"), num_slots=2)
    with pytest.raises(ValueError, match=message):
        engine.submit(**kwargs)
    assert engine.active == 0 and not engine.step()  # nothing was queued


def test_an_unconditional_model_refuses_labels():
    with pytest.raises(ValueError, match="unconditional"):
        make_engine(tiny("gated")).submit(1, 1, labels=[0])


def test_a_step_section_with_unknown_outputs_or_spans_is_refused():
    model = tiny("gated")
    section = step_program(model).section()
    bad_graphs = {**section.graphs, "step": GraphSignature((), ("pixel", "x"))}
    with pytest.raises(ValueError, match="neither 'pixel' nor next_"):
        dataclasses.replace(section, graphs=bad_graphs)
    with pytest.raises(ValueError, match="span: 4 must divide period 6"):
        dataclasses.replace(section, span=4)
    with pytest.raises(ValueError, match="span must divide the image width"):
        step_program(model, span=4)


@pytest.fixture(scope="module")
def shipped_naive_samples(shipped):
    return naive(shipped("gated_pixelcnn_mnist").model, 2, 21)  # ~10 s of full recomputation, shared


@pytest.mark.parametrize("runtime", ["onnx", "torchscript"])
def test_the_committed_step_artifacts_reproduce_naive_sampling_of_the_shipped_model(runtime, shipped_naive_samples):
    # The engine on the exported step graphs (what `genserve serve` and Triton run where the fused
    # operators are not built) against the eager model's naive loop; exact for the reason above.
    runner = load_step_runner(load_manifest(REPOSITORY / "gated_pixelcnn_mnist_sample"), runtime, fused=False)
    engine = SamplingEngine(runner, EngineConfig(num_slots=2))
    assert np.array_equal(engine.generate(21, 2), shipped_naive_samples)


@pytest.mark.parametrize("runtime", ["onnx", "torchscript"])
def test_the_committed_pixel_vae_sampler_reproduces_its_naive_decoding(runtime, shipped):
    # The shipped PixelVAE's start/refresh/step graphs in the engine, z from the prior as Sample draws it.
    model = shipped("pixel_vae_mnist").model
    runner = load_step_runner(load_manifest(REPOSITORY / "pixel_vae_mnist_sample"), runtime, fused=False)
    assert "start" in runner.spec.graphs and runner.spec.latent_shape == (model.config.latent_dim,)
    engine = SamplingEngine(runner, EngineConfig(num_slots=3))
    assert np.array_equal(generate(engine, model, 21, 3, temperature=0.9), naive(model, 3, 21, temperature=0.9))


def _job(count: int) -> SampleJob:
    return SampleJob(seed=0, indices=tuple(range(count)), temperature=1.0, labels=None, latents=None,
                     images=np.zeros((count, 1, 2, 2), np.uint8), rows_done=np.zeros(count, np.int64))


def test_schedulers_fill_free_slots_in_arrival_order_and_static_waits_for_an_empty_engine():
    first, second = _job(3), _job(2)
    plan = ContinuousScheduler().plan([first, second], active=1, num_slots=6)
    assert [(a.job, a.samples) for a in plan.admit] == [(first, range(0, 3)), (second, range(0, 2))]
    plan = ContinuousScheduler().plan([first, second], active=2, num_slots=6)
    assert [(a.job, a.samples) for a in plan.admit] == [(first, range(0, 3)), (second, range(0, 1))]
    assert plan.admitted == 4
    assert StaticScheduler().plan([first, second], active=1, num_slots=6).admit == ()
    assert StaticScheduler().plan([first, second], active=0, num_slots=4).admitted == 4
    assert ContinuousScheduler().joins_running_batch(active=3, num_slots=4)
    assert not ContinuousScheduler().joins_running_batch(active=4, num_slots=4)
    assert not StaticScheduler().joins_running_batch(active=1, num_slots=4)


def test_a_job_ends_with_the_status_of_how_it_ended():
    model = tiny("gated")
    engine = make_engine(model, num_slots=1)
    kept, doomed, late = engine.submit(1, 1), engine.submit(2, 1), engine.submit(3, 1, deadline=time.monotonic() - 1)
    assert kept.status is JobStatus.WAITING
    doomed.cancel()
    engine.step()
    assert kept.status is JobStatus.RUNNING
    engine.run_until_idle()
    assert (kept.status, doomed.status, late.status) == (
        JobStatus.FINISHED, JobStatus.CANCELLED, JobStatus.DEADLINE_EXCEEDED)
    assert all(job.done.is_set() for job in (kept, doomed, late))
