"""The fused sampling operators (serving/fused): exact against the network, naive sampling and the graphs.

`make setup` builds the operator library, so these tests run it for real; the fallback tests
take the library away from one process to check what a machine without a build does.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from genserve.export.fused import fused_runner, gated_weights, packed_weights
from genserve.export.steps import has_step_program, step_program
from genserve.serving import fused
from genserve.serving.artifacts import load_manifest
from genserve.serving.engine import (
    EngineConfig,
    FusedStepRunner,
    OnnxStepRunner,
    SamplingEngine,
    TorchStepRunner,
    load_step_runner,
)
from genserve.serving.engine import program as engine_program
from genserve.serving.engine.jobs import JobStatus
from genserve.serving.engine.program import fused_unavailable
from genserve.serving.fused.weights import FUSED_OPS
from tests.conftest import TINY, make_model
from tests.rounding import assert_within_rounding, rounding_sigma
from tests.unit.test_export import REPOSITORY
from tests.unit.test_sampling_engine import (
    MODELS,
    full_logits,
    generate,
    labels_for,
    latents_for,
    mirrored,
    naive,
    submit,
    tiny,
)

# A PixelVAE's decoder is a Gated PixelCNN conditioned on m(z): the gated operators with the map.
FUSED_MODELS = sorted(name for name, (family, _) in MODELS.items()
                      if family in ("pixelcnn", "gated_pixelcnn", "pixel_vae"))

SAMPLER = REPOSITORY / "gated_pixelcnn_mnist_sample"


@pytest.mark.parametrize("family", sorted(TINY))
def test_every_family_that_samples_through_the_engine_exports_fused_operators(family):
    # The exported step program is where the fused operators fall back to; the others sample in one pass.
    model = make_model(family)
    packed = packed_weights(model)
    assert (packed is not None) == has_step_program(model)
    if packed is not None:
        op, weights = packed
        assert tuple(weights) == FUSED_OPS[op].weights


def test_a_pixel_vae_exports_the_gated_operators_with_its_conditioning():
    # Its decoder is a Gated PixelCNN whose every layer adds 1x1s of m(z) to both stacks: the gated weights,
    # then those 1x1s split by stack as the layer splits them (vertical, then horizontal).
    model = tiny("pixel_vae")
    op, weights = packed_weights(model)
    assert op == "conditioned_gated_pixelcnn" and step_program(model).section().kind == "graphs"
    layer = model.pixelcnn.layers[1]
    c2 = 2 * model.config.decoder_channels
    weight, bias = layer.condition.weight[:, :, 0, 0], layer.condition.bias  # (4C, Cc), (4C,)
    assert torch.equal(weights["cond_w"][1, 0], weight[:c2].t())
    assert torch.equal(weights["cond_w"][1, 1], weight[c2:].t())
    assert torch.equal(weights["cond_b"][1].flatten(), bias)
    assert list(weights)[:len(gated_weights(model.pixelcnn))] == list(gated_weights(model.pixelcnn))


def test_the_operator_library_is_built_and_loads():
    status = fused.load_ops()
    assert status, status.reason  # `make setup` builds it; a failure here means setup did not
    for op in ("gated_refresh", "gated_step", "pixelcnn_refresh", "pixelcnn_step", "pixelcnn_pp_refresh",
               "pixelcnn_pp_step", "maf_step", "wavenet_step"):
        assert hasattr(torch.ops.genserve, op), op


def assert_teacher_forced_logits_equal_the_network(model, runner) -> None:
    # The exactness claim: fed a given image, the fused step's logits at every pixel equal the
    # full network's there, within the float32 rounding of the network (tests/rounding.py).
    n = 3
    labels = labels_for(model, n)
    label_tensor = None if labels is None else torch.tensor(labels)
    image = torch.from_numpy(naive(model, n, seed=4, labels=labels))  # (n, C, H, W)
    logits = full_logits(model, seed=0)  # a PixelVAE's given seed 0's latents, as the job below is
    full = logits(image, label_tensor).detach()  # (n, L, C, H, W)
    run, recorded = runner.run, []

    def teacher_forced(graph, feeds):
        if graph == "step":  # one job of n samples in n slots: slot k holds sample k
            taken = feeds["positions"] + torch.arange(runner.spec.span)  # (n, span)
            feeds = dict(feeds, teacher=image.flatten(1).gather(1, taken).unsqueeze(2))
        outputs = run(graph, feeds)
        if graph == "step":
            recorded.append(outputs["logits"])  # (n, span, L)
        return outputs

    runner.run = teacher_forced
    runner.row_inputs, runner.runs_rows = (), False  # every call through `run`, where the teacher is fed
    engine = SamplingEngine(runner, EngineConfig(num_slots=n))
    job = engine.submit(0, n, labels=labels, latents=latents_for(model, 0, n))
    engine.run_until_idle()
    steps = torch.cat(recorded, 1).permute(0, 2, 1).reshape(full.shape)
    (sigma,) = rounding_sigma(logits, [image, label_tensor])
    assert_within_rounding(steps.numpy(), full.numpy(), sigma, "fused logits")
    assert np.array_equal(job.images, image.numpy())


def assert_call_matches_the_graph(runner, model, graph: str, n: int, span: int | None = None,
                                  positions: torch.Tensor | None = None) -> None:
    # Call by call on the same inputs (the exporter's examples: slots at different rows, random
    # caches, unless `positions` are given): what the engine may swap between. Tolerance: the
    # rounding of the eager graph itself.
    entry = getattr(step_program(model, span), graph)
    inputs = entry.example(n)
    if positions is not None:
        inputs = tuple(positions if s.name == "positions" else value for s, value in zip(entry.inputs, inputs))
    want = entry.module(*inputs)
    want = want if isinstance(want, tuple) else (want,)
    feeds = {s.name: value.to(runner.device) for s, value in zip(entry.inputs, inputs)}
    got = {name: value.cpu() for name, value in runner.run(graph, feeds).items()}
    for spec, value, sigma in zip(entry.outputs, want, rounding_sigma(entry.module, inputs)):
        if spec.name == "pixel":  # the chosen pixels: exact, as for the images
            assert torch.equal(got["pixel"], value)
        else:
            assert_within_rounding(got[spec.name].numpy(), value.detach().numpy(), sigma, spec.name)


def assert_row_call_equals_refresh_then_step(runner, model) -> None:
    # The engine's one-call path for slots that all start a row must leave exactly the states and
    # pixels the two calls give (the same kernels, so bit for bit).
    program, n, c = step_program(model), 4, model.config
    generator = torch.Generator().manual_seed(1)
    states = {s.name: torch.randn(n, *s.shape, generator=generator) for s in program.states}
    controls = {
        "pixels": torch.randint(0, c.pixel_levels, (n, 1, c.image_size, c.image_size), dtype=torch.uint8,
                                generator=generator),
        "positions": torch.tensor([[0], [1], [2], [5]]) * c.image_size,  # row starts
        "labels": torch.tensor([[k % (c.num_classes or 1)] for k in range(n)]),
        "noise": torch.rand(n, c.image_size, 1, generator=generator),
        "temperature": torch.tensor([[1.0], [0.5], [0.0], [2.0]]),
    }
    refreshed = runner.run("refresh", {**controls, **states})
    after_refresh = {**states, **{k.removeprefix("next_"): v for k, v in refreshed.items()}}
    stepped = runner.run("step", {**controls, **after_refresh})
    want = {**after_refresh, **{k.removeprefix("next_"): v for k, v in stepped.items() if k != "pixel"}}
    in_place = {name: value.clone() for name, value in states.items()}
    pixel = runner.run_row(controls, [in_place[s.name] for s in program.states])
    assert torch.equal(pixel, stepped["pixel"])
    for s in program.states:
        assert torch.equal(in_place[s.name], want[s.name]), s.name


@pytest.mark.parametrize("name", FUSED_MODELS)
@pytest.mark.parametrize("span", [1, None])  # None: a whole row
def test_teacher_forced_fused_logits_equal_the_full_network(name, span):
    model = tiny(name)
    assert_teacher_forced_logits_equal_the_network(model, fused_runner(model, span))


@pytest.mark.parametrize("name", FUSED_MODELS)
@pytest.mark.parametrize("span", [1, 2, None])
def test_fused_sampling_equals_naive_sampling_on_many_seeds(name, span):
    # Exact equality of images, for the reason test_sampling_engine gives for the step graphs.
    # (The pixelcnn models cover an image row cache with 3 levels and kernel 5, and plain 3x3.)
    model = tiny(name)
    n = 6
    labels = labels_for(model, n)
    engine = SamplingEngine(fused_runner(model, span), EngineConfig(num_slots=4))
    for seed in range(10):
        assert np.array_equal(generate(engine, model, seed, n, labels=labels), naive(model, n, seed, labels=labels))
    assert np.array_equal(generate(engine, model, 3, n, 0.0, labels), naive(model, n, 3, 0.0, labels))  # argmax
    assert np.array_equal(generate(engine, model, 3, n, 0.5, labels), naive(model, n, 3, 0.5, labels))


@pytest.mark.parametrize("name", FUSED_MODELS)
def test_row_calls_on_slots_mirrored_as_on_a_gpu_sample_exactly(name):
    # A row-span program makes one in-place row call per step: it reads the mirror's pixels and noise.
    model = tiny(name)
    n = 6
    labels = labels_for(model, n)
    engine = mirrored(SamplingEngine(fused_runner(model), EngineConfig(num_slots=4)))
    for seed in range(3):
        assert np.array_equal(generate(engine, model, seed, n, labels=labels), naive(model, n, seed, labels=labels))


@pytest.mark.parametrize("name", FUSED_MODELS)
@pytest.mark.parametrize("graph", ["refresh", "step"])
def test_each_fused_call_matches_the_step_graph_it_replaces(name, graph):
    model = tiny(name)
    assert_call_matches_the_graph(fused_runner(model), model, graph, n=5)


def slots_at_different_columns(model, span: int) -> torch.Tensor:
    """Positions of five slots for one step call of `span` pixels, each at another column: with a
    span shorter than the row, a sample that joins while others are mid-row steps from its own
    column in the same call. The last slot ends its image."""
    width = model.config.image_size
    return torch.tensor([[0], [span], [width + 2 * span], [3 * width + span], [width * width - span]])


@pytest.mark.parametrize("name", FUSED_MODELS)
def test_a_step_call_on_slots_at_different_columns_matches_the_step_graph(name):
    model, span = tiny(name), 2
    assert_call_matches_the_graph(fused_runner(model, span), model, "step", n=5, span=span,
                                  positions=slots_at_different_columns(model, span))


@pytest.mark.parametrize("name", FUSED_MODELS)
def test_the_in_place_row_call_equals_refresh_then_step(name):
    model = tiny(name)
    assert_row_call_equals_refresh_then_step(fused_runner(model), model)


def row_call_arguments(model, n: int = 3, seed: int = 2):
    """A row call's controls and states for slots at rows 0, 1 and 3 (then again) of random images, as the
    engine keeps them (positions (n, 1), the whole images' noise (n, H * W, 1)), and the program's states
    (random)."""
    program, c = step_program(model), model.config
    generator = torch.Generator().manual_seed(seed)
    width = c.image_size
    controls = {
        "pixels": torch.randint(0, c.pixel_levels, (n, 1, width, width), dtype=torch.uint8, generator=generator),
        "positions": torch.tensor([[(0, 1, 3)[k % 3] * width] for k in range(n)]),
        "labels": torch.tensor([[k % c.num_classes] for k in range(n)]) if c.num_classes else None,
        "noise": torch.rand(n, width * width, 1, generator=generator),
        "temperature": torch.tensor([[(1.0, 0.5, 0.0)[k % 3]] for k in range(n)]),
    }
    states = [torch.randn(n, *s.shape, generator=generator) for s in program.states]
    return controls, states


def by_row_calls(runner, controls, states, rows: int):
    """What `rows` row calls with the engine's Python around each do to copies of `controls` and `states`: the
    row's noise picked at each slot's position, its pixels written into the images, the positions advanced."""
    controls = {k: None if v is None else v.clone() for k, v in controls.items()}
    states = [state.clone() for state in states]
    n, width = controls["pixels"].shape[0], controls["pixels"].shape[-1]
    slots = torch.arange(n)[:, None]
    for _ in range(rows):
        taken = controls["positions"] + torch.arange(width)  # (n, W): this row's pixels
        feeds = {**controls, "noise": controls["noise"][slots, taken]}
        pixel = runner.run_row(feeds, states)  # (n, W, 1)
        controls["pixels"].view(n, -1)[slots, taken] = pixel[..., 0].to(torch.uint8)
        controls["positions"] += width
    return controls, states


@pytest.mark.parametrize("name", FUSED_MODELS)
def test_a_multi_row_call_equals_row_calls_with_the_engines_bookkeeping(name):
    # run_rows(k) must do exactly what k row calls do with the engine's Python around each.
    model = tiny(name)
    runner = fused_runner(model)
    assert runner.runs_rows
    controls, states = row_call_arguments(model)
    want_controls, want_states = by_row_calls(runner, controls, states, 2)
    runner.run_rows(controls, states, 2)
    for key in ("pixels", "positions"):
        assert torch.equal(controls[key], want_controls[key]), key
    for got, want in zip(states, want_states):
        assert torch.equal(got, want)


@contextlib.contextmanager
def intra_op_threads(count: int):
    """torch's intra-op threads (the operators' too) set to `count` for the block: the suite's xdist
    workers run on one thread each (tests/conftest.py), which would leave the threaded paths untested."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_rows_on_any_thread_count(runner, controls, states, rows: int, want_pixels, want_positions,
                                    want_states) -> None:
    """run_rows(rows) on copies of `controls` and `states`, on 1 and on 3 threads: each time exactly the wanted
    images, positions and states (what step calls with the engine's bookkeeping around them gave)."""
    for threads in (1, 3):
        got_controls = {k: None if v is None else v.clone() for k, v in controls.items()}
        got_states = [state.clone() for state in states]
        with intra_op_threads(threads):
            runner.run_rows(got_controls, got_states, rows)
        assert torch.equal(got_controls["pixels"], want_pixels), threads
        assert torch.equal(got_controls["positions"], want_positions), threads
        for k, (got, want) in enumerate(zip(got_states, want_states)):
            assert torch.equal(got, want), (threads, k)


@pytest.mark.parametrize("name", FUSED_MODELS)
def test_a_multi_row_call_gives_the_same_bits_on_one_thread_or_several(name):
    # The operators hand their work out as tasks to whichever thread is free: the step in blocks of 8
    # slots and, while it runs, the next row's refresh part per layer and slot; the rest of the refresh
    # in blocks of (slot, column) rows. No task's arithmetic may depend on the thread count or on
    # which thread takes it. 11 slots: two step blocks, the second partial; 3 threads, more than the cores.
    model = tiny(name)
    controls, states = row_call_arguments(model, n=11)
    results = []
    for threads in (1, 3):
        got_controls = {k: None if v is None else v.clone() for k, v in controls.items()}
        got_states = [state.clone() for state in states]
        with intra_op_threads(threads):
            fused_runner(model).run_rows(got_controls, got_states, 2)
        results.append([got_controls["pixels"], got_controls["positions"], *got_states])
    one, several = results
    assert not torch.equal(one[0], controls["pixels"])  # it sampled
    for got, want in zip(several, one):
        assert torch.equal(got, want)


# PixelCNNs whose rows a multi-row call steps at once (below): the images' rows 14 wide, so that rows
# overlap; the input layer's window reaching 6 columns right of a pixel, or the blocks' 2.
WAVEFRONT_MODELS = {"image_reaches_far": dict(image_size=14, first_kernel_size=13),
                    "blocks_reach_far": dict(image_size=14, first_kernel_size=3, kernel_size=5, pixel_levels=3)}


@pytest.mark.parametrize("name", ["pixelcnn", *WAVEFRONT_MODELS, "pixelcnn_mnist"])
@pytest.mark.parametrize("n", [1, 5, 8, 11, 19])
def test_pixelcnn_rows_stepped_at_once_give_the_row_calls_bits_on_any_threads(shipped, name, n):
    # PixelCNN's multi-row call steps several rows of a group of up to 8 slots at once, a thread each,
    # each pixel waiting only until the group's row above is far enough ahead: as far as its windows reach
    # into the row above (the input layer's), and for each 6 pixels' rows-above parts of the blocks' masked
    # layers as far as theirs reach past them; each block's rows in a ring per group, a row written where
    # one no longer read was. However many threads take the rows (one takes them all; two or three at once,
    # more than the cores) and however they interleave, the images, positions and caches must be the bits
    # row calls give. Ten calls per thread count, each on other images and caches: a thread that read a
    # column of the row above too soon would find what the call before left there, or the zero the row
    # starts as. Slots at rows 0, 1 and 3, every row left to all of them taken in one call; 11 and 19
    # slots in two and three groups, the last partial.
    if name == "pixelcnn_mnist":
        model = shipped(name).model
        runner = load_step_runner(load_manifest(REPOSITORY / f"{name}_sample"))
    else:
        model = make_model("pixelcnn", **WAVEFRONT_MODELS[name]) if name in WAVEFRONT_MODELS else tiny(name)
        runner = fused_runner(model)
    rows = model.config.image_size - 3
    for threads in (1, 2, 3):
        for seed in range(10):
            controls, states = row_call_arguments(model, n, seed)
            want_controls, want_states = by_row_calls(runner, controls, states, rows)
            assert not torch.equal(want_controls["pixels"], controls["pixels"])  # it sampled
            with intra_op_threads(threads):
                runner.run_rows(controls, states, rows)
            for key in ("pixels", "positions"):
                assert torch.equal(controls[key], want_controls[key]), (threads, seed, key)
            for k, (got, want) in enumerate(zip(states, want_states)):
                assert torch.equal(got, want), (threads, seed, k)


@pytest.mark.parametrize("name", FUSED_MODELS)
@pytest.mark.parametrize("n", [3, 11])
def test_fused_sampling_on_several_threads_equals_naive_sampling(name, n):
    # All rows after the first in one call (an unbounded time budget): each row's step runs while the
    # next row's refresh part is prepared on the other threads (Gated PixelCNN), or rows run a few
    # columns apart, a thread each (PixelCNN).
    model = tiny(name)
    labels = labels_for(model, n)
    engine = SamplingEngine(fused_runner(model), EngineConfig(num_slots=n, call_budget_ms=1e9))
    with intra_op_threads(3):
        images = generate(engine, model, 6, n, labels=labels)
    assert engine.steps_run == 2
    assert np.array_equal(images, naive(model, n, 6, labels=labels))


def test_a_multi_row_call_refuses_slots_off_a_row_start_or_out_of_rows():
    model = tiny("gated")
    runner, width = fused_runner(model), model.config.image_size
    controls, states = row_call_arguments(model)
    with pytest.raises(RuntimeError, match="positions: slot 2 at 18 does not start one of 4 rows left"):
        runner.run_rows(controls, states, 4)  # slot 2 is at row 3 of 6
    controls["positions"][1] += 1
    with pytest.raises(RuntimeError, match="positions: slot 1 at 7 does not start"):
        runner.run_rows(controls, states, 1)
    controls["positions"][1] -= 1
    with pytest.raises(RuntimeError, match=r"pixels, noise: expected \(n, 1, H, W\) and \(n, H \* W, 1\)"):
        runner.run_rows({**controls, "noise": controls["noise"][:, :width].contiguous()}, states, 1)
    with pytest.raises(RuntimeError, match="rows: must be >= 0"):
        runner.run_rows(controls, states, -1)
    pixelcnn = tiny("pixelcnn")
    controls, states = row_call_arguments(pixelcnn)
    with pytest.raises(RuntimeError, match="labels: PixelCNN is unconditional"):
        fused_runner(pixelcnn).run_rows({**controls, "labels": torch.zeros(3, 1, dtype=torch.long)}, states, 1)


@pytest.mark.parametrize("name", FUSED_MODELS)
def test_several_rows_per_call_sample_exactly_as_samples_join_mid_image(name):
    # With an unbounded time budget a call runs until the first slot finishes, unless a sample waits for a
    # free slot. The late job's first sample joins the first job's 3 a row in, and the call runs the
    # rows the first job has left (its slots at row 1, the joiner's at row 0); the late job's second
    # sample joins then, with the first one a row from its end.
    model = tiny(name)
    width = height = model.config.image_size
    engine = SamplingEngine(fused_runner(model), EngineConfig(num_slots=4, call_budget_ms=1e9))
    first = submit(engine, model, 3, 3, 0.5)
    engine.step()  # one row: no time per row is known yet
    late = submit(engine, model, 4, 2)
    engine.step()
    assert first.status is JobStatus.FINISHED and engine.slots.positions[:engine.active].tolist() == [
        (height - 1) * width]
    engine.run_until_idle()
    assert first.error is None and late.error is None
    assert engine.steps_run < height  # one row per call would take a call per row of the first job alone
    assert np.array_equal(first.images, naive(model, 3, 3, 0.5, labels_for(model, 3)))
    assert np.array_equal(late.images, naive(model, 2, 4, 1.0, labels_for(model, 2)))


def test_a_static_batch_runs_several_rows_per_call_while_a_job_waits_for_it_to_end():
    # Static batching admits nothing into a running batch, so a waiting job does not cut calls to a row.
    model = tiny("gated")
    height = model.config.image_size
    engine = SamplingEngine(fused_runner(model), EngineConfig(num_slots=3, batching="static", call_budget_ms=1e9))
    first = engine.submit(1, 2)
    engine.step()  # one row: no time per row is known yet
    second = engine.submit(2, 1)
    engine.step()  # the rest of the first batch in one call, a slot free and the second job waiting
    assert first.status is JobStatus.FINISHED and engine.steps_run == 2
    engine.run_until_idle()  # the second job whole in one call: 3 calls, where a row per call makes 2 * height
    assert engine.steps_run == 3 < 2 * height and second.status is JobStatus.FINISHED
    assert np.array_equal(first.images, naive(model, 2, 1)) and np.array_equal(second.images, naive(model, 1, 2))


def test_progress_after_a_multi_row_call_reports_its_rows_with_the_partial_image():
    model = tiny("pixelcnn")
    height = model.config.image_size
    engine = SamplingEngine(fused_runner(model), EngineConfig(num_slots=2, call_budget_ms=1e9))
    seen = []
    job = engine.submit(5, 2, on_progress=lambda j: seen.append((j.rows_done.copy(), j.images.copy())))
    engine.run_until_idle()
    assert [rows.tolist() for rows, _ in seen] == [[1, 1], [height, height]]  # a row, then all the rest
    rows, partial = seen[0]
    assert np.array_equal(partial[:, :, :1], job.images[:, :, :1]) and not partial[:, :, 1:].any()
    assert np.array_equal(job.images, naive(model, 2, 5))


def test_a_zero_time_budget_runs_one_row_per_call():
    model = tiny("gated")
    engine = SamplingEngine(fused_runner(model), EngineConfig(num_slots=2, call_budget_ms=0))
    images = engine.generate(5, 2)
    assert engine.steps_run == model.config.image_size
    assert np.array_equal(images, naive(model, 2, 5))


@pytest.mark.parametrize("name", ["gated_pixelcnn_mnist", "pixel_vae_mnist"])
def test_the_shipped_sampler_runs_fused_and_reproduces_naive_sampling(shipped, name):
    # The PixelVAE's start graph (latents → m(z)) runs in ONNX Runtime beside the operators.
    runner = load_step_runner(load_manifest(REPOSITORY / f"{name}_sample"))
    assert isinstance(runner, FusedStepRunner)
    model = shipped(name).model
    engine = SamplingEngine(runner, EngineConfig(num_slots=2))
    assert np.array_equal(generate(engine, model, 21, 3), naive(model, 3, 21))


def test_without_the_operators_the_graphs_run_and_one_line_says_why(monkeypatch, caplog):
    manifest = load_manifest(SAMPLER)
    monkeypatch.setattr(engine_program, "load_ops", lambda: fused.OpsStatus(False, "no operator library at /x"))
    with caplog.at_level(logging.INFO, logger="genserve.engine"):
        runner = load_step_runner(manifest, "torchscript")
    assert isinstance(runner, TorchStepRunner)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "exported torchscript step graphs: no operator library at /x" in line


def test_fused_can_be_declined_and_cuda_needs_a_device(monkeypatch):
    manifest = load_manifest(SAMPLER)
    assert isinstance(load_step_runner(manifest, "onnx", fused=False), OnnxStepRunner)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on CI, also on a GPU machine
    assert fused_unavailable(manifest, "cuda") == "no CUDA device in this process"
    pixelcnn = load_manifest(REPOSITORY / "pixelcnn_mnist_sample")
    assert pixelcnn.step.fused.op == "pixelcnn" and isinstance(load_step_runner(pixelcnn), FusedStepRunner)
    vae = load_manifest(REPOSITORY / "vae_mnist_decode")
    assert fused_unavailable(vae, "cpu") == "the model was exported without fused operators"


@pytest.mark.parametrize("state, reason", [
    ("missing", "no operator library at"),
    ("stale", "was built from other sources"),
])
def test_a_missing_or_stale_build_is_not_loaded(tmp_path, state, reason):
    # In a fresh process (a loaded library cannot be unloaded): point the package at another build folder.
    build = tmp_path / "_build"
    build.mkdir()
    if state == "stale":
        (build / fused.library_path().name).write_bytes(fused.library_path().read_bytes())
        (build / f"{fused.LIBRARY_NAME}.sha256").write_text("0" * 64 + "\n")
    code = ("from pathlib import Path; from genserve.serving import fused; "
            f"fused.BUILD_DIR = Path({str(build)!r}); s = fused.load_ops(); print(s.loaded, s.reason)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("False") and reason in result.stdout


def gated_step_arguments(model) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
    """Well-formed gated_step arguments for one slot (positions .. hidden_context), and the weights."""
    c = model.config
    links = torch.zeros(1, c.num_layers, 2 * c.hidden_channels, c.image_size)
    image_context = torch.zeros(1, c.first_kernel_size // 2 + 1)
    hidden_context = torch.zeros(1, c.num_layers - 1, (c.kernel_size // 2) * c.hidden_channels)
    good = (torch.zeros(1, 1, dtype=torch.long), torch.rand(1, 2, 1), torch.ones(1, 1), links, image_context,
            hidden_context)
    return good, list(gated_weights(model).values())


def test_the_operators_refuse_mismatched_tensors_naming_them():
    assert fused.load_ops()  # torch.ops.genserve.* exist once the library is loaded
    good, weights = gated_step_arguments(tiny("gated"))
    links = good[3]
    with pytest.raises(RuntimeError, match="links: shape"):
        torch.ops.genserve.gated_step(*good[:3], links[:, :-1], *good[4:], None, weights)
    with pytest.raises(RuntimeError, match="noise: expected a contiguous CPU tensor"):
        torch.ops.genserve.gated_step(good[0], good[1].double(), *good[2:], None, weights)
    with pytest.raises(RuntimeError, match="gated weights: expected 18 tensors"):
        torch.ops.genserve.gated_step(*good, None, weights[:-1])


def conditioned_refresh_arguments(n: int = 2):
    """gated_refresh's arguments for `n` slots of the tiny PixelVAE's decoder at row 1, and its weights."""
    model = tiny("pixel_vae")
    program = step_program(model)
    states = {s.name: torch.randn(n, *s.shape) for s in program.states}
    width = model.config.image_size
    pixels = torch.zeros(n, 1, width, width, dtype=torch.uint8)
    positions = torch.full((n, 1), width)
    return (pixels, positions, None, states["vertical"], states["condition"]), list(packed_weights(model)[1].values())


def assert_a_map_is_taken_exactly_where_the_network_has_one(namespace) -> None:
    """`namespace`'s gated_refresh and gated_row (the CPU operators, or the GPU launches) on the tiny PixelVAE."""
    (pixels, positions, labels, vertical, condition), weights = conditioned_refresh_arguments()
    refresh = namespace.gated_refresh
    links = refresh(pixels, positions, labels, vertical, condition, weights)[1]
    assert links.shape == (2, *step_program(tiny("pixel_vae")).states[1].shape)
    with pytest.raises(RuntimeError, match="condition: a conditioned network needs its conditioning map"):
        refresh(pixels, positions, labels, vertical, None, weights)
    with pytest.raises(RuntimeError, match=r"condition: expected \(2, 3, 8, 8\), got"):
        refresh(pixels, positions, labels, vertical, condition[:, :2].contiguous(), weights)
    with pytest.raises(RuntimeError, match="condition: this network takes no conditioning map"):
        refresh(pixels, positions, labels, vertical, condition, weights[:-2])  # the decoder's own weights alone
    states = [torch.zeros(2, *s.shape) for s in step_program(tiny("pixel_vae")).states]
    with pytest.raises(RuntimeError, match="states: expected vertical, links, image_context, hidden_context, "
                                           "condition; got 4 tensors"):
        namespace.gated_row(pixels, positions, labels, torch.rand(2, 8, 1), torch.ones(2, 1), states[:4], weights)


def test_the_refresh_takes_a_conditioning_map_exactly_where_the_network_has_one():
    assert fused.load_ops()
    assert_a_map_is_taken_exactly_where_the_network_has_one(torch.ops.genserve)


def test_the_pixelcnn_step_refuses_a_span_past_the_row_and_unmasked_kernels():
    # The step applies each masked kernel's rows above once per call, for the columns it steps, and
    # skips the centre row's taps right of the centre, which the mask zeroes.
    assert fused.load_ops()
    model = tiny("pixelcnn")
    positions, noise, temperature, image_rows, *blocks = step_program(model).step.example(2)  # a whole row each
    weights = list(packed_weights(model)[1].values())
    step = torch.ops.genserve.pixelcnn_step
    assert step(positions, noise, temperature, image_rows, blocks, None, weights)[0].shape == (2, 6, 1)
    with pytest.raises(RuntimeError, match="positions: slot 1 at 7 has fewer than 6 pixels left in its row"):
        step(positions + torch.tensor([[0], [1]]), noise, temperature, image_rows, blocks, None, weights)
    with pytest.raises(RuntimeError, match="block rows: 3 rows do not match the masked kernels' 48 taps"):
        three_rows = [torch.zeros(2, 8, 3, 10) for _ in blocks]
        step(positions, noise, temperature, image_rows, three_rows, None, weights)
    unmasked = [w.clone() for w in weights]
    unmasked[4][0, -1, 0] = 0.5  # block 0: the last channel's centre row, rightmost tap
    with pytest.raises(RuntimeError, match="masked_w: the centre row's taps right of the centre must be masked"):
        step(positions, noise, temperature, image_rows, blocks, None, unmasked)


def test_build_ops_check_reports_the_loaded_library():
    result = subprocess.run([sys.executable, "-m", "genserve.clients.cli", "build-ops", "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("loaded "), result.stdout + result.stderr
