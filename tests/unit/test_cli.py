"""The `genserve` command as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from genserve.clients.cli import load_verbs
from tests.unit.test_export import REPOSITORY


def genserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "genserve.clients.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_every_verb_is_registered_and_documented():
    verbs = load_verbs()
    assert {"train", "evaluate", "sample-local", "export", "triton", "triton-bench", "bench-sampler", "serve",
            "bench-serve"} <= set(verbs)
    assert all(verb.help for verb in verbs.values())
    result = genserve("--help")
    assert result.returncode == 0
    assert all(name in result.stdout for name in verbs)


def test_sample_writes_a_png_grid_and_an_npz(tmp_path):
    png, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    result = genserve("sample-local", "dcgan_mnist", "-n", "6", "--seed", "3", "-o", str(png))
    assert result.returncode == 0, result.stderr
    assert "seed 3" in result.stdout
    assert Image.open(png).size[0] > 28
    result = genserve("sample-local", "dcgan_mnist", "-n", "6", "--seed", "3", "--label", "4", "-o", str(npz))
    assert result.returncode == 0
    arrays = np.load(npz)
    assert arrays["images"].shape == (6, 1, 28, 28) and arrays["images"].dtype == np.uint8
    assert arrays["labels"].tolist() == [4] * 6


def test_sampling_a_pixelcnn_uses_the_cached_engine_and_draws_the_naive_images(tmp_path):
    cached, slow = tmp_path / "cached.npz", tmp_path / "naive.npz"
    for path, extra in ((cached, []), (slow, ["--naive"])):
        result = genserve("sample-local", "pixelcnn_mnist", "-n", "2", "--seed", "11", *extra, "-o", str(path))
        assert result.returncode == 0, result.stderr
    assert np.array_equal(np.load(cached)["images"], np.load(slow)["images"])


def test_bench_sampler_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = genserve("bench-sampler", "gated_pixelcnn_mnist", "--batch", "2", "--naive-steps", "2", "--slots", "2",
                      "--requests", "3", "--max-request-size", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    (row,) = report["speedup"]
    assert row["batch"] == 2 and row["naive_ms_per_image"] > 0 and row["step_ms_per_image"] > 0
    assert row["fused_ms_per_image"] > 0 and report["machine"]["fused"] == "fused operators timed"
    assert report["batching_runner"] == "fused operators"
    assert [r["batching"] for r in report["batching"]] == ["static", "continuous"]
    assert all(r["requests"] == 3 and r["p99_ms"] >= r["p50_ms"] > 0 for r in report["batching"])
    assert [r["batching"] for r in report["modelled_batching"]] == ["static", "continuous"]
    assert report["modelled_call_ms"] > 0 and all(r["p99_ms"] >= r["p50_ms"] > 0 for r in report["modelled_batching"])
    assert "step/fused" in result.stdout and "continuous vs static" in result.stdout
    assert "the most admission alone gains on this trace" in result.stdout
    # Without the fused operators the table says why and batching runs on the step graphs.
    result = genserve("bench-sampler", "pixelcnn_mnist", "--batch", "2", "--naive-steps", "2", "--slots", "2",
                      "--requests", "2", "--max-request-size", "1", "--min-seconds", "0", "--no-fused", "--json", "-")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["speedup"][0]["fused_ms_per_image"] is None and report["batching_runner"] == "step graphs"
    assert report["machine"]["fused"] == "not asked for (--no-fused)"
    bad = genserve("bench-sampler", "--runtime", "onnx", "--device", "cuda")
    assert bad.returncode == 2 and "needs --runtime torchscript" in bad.stderr


def test_user_mistakes_are_one_line_errors_not_tracebacks(tmp_path):
    cases = [
        (["sample-local", "no_such_model"], "no checkpoint at 'no_such_model'"),
        (["sample-local", "vae_mnist", "-n", "0"], "-n must be >= 1, got 0"),
        (["sample-local", "vae_mnist", "--label", "3"], "is unconditional; drop --label"),
        (["sample-local", "vae_mnist", "-o", str(tmp_path / "x.jpg")], "output must end in .png or .npz"),
        (["train", "vae", "--out", str(tmp_path), "--epochs", "0"], "epochs and batch_size must be >= 1"),
        (["train", "vae", "--out", str(tmp_path), "--set", "nokey"], "--set expects KEY=VALUE"),
    ]
    for args, message in cases:
        result = genserve(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_evaluate_prints_nats_and_bits_per_dim(tmp_path):
    result = genserve("evaluate", "pixelcnn_mnist", "--samples", str(tmp_path / "s.png"), "--num-samples", "2")
    assert result.returncode == 0, result.stderr
    assert "exact:" in result.stdout and "nats" in result.stdout and "bits/dim" in result.stdout
    assert (tmp_path / "s.png").exists()


def test_export_writes_a_triton_repository(tmp_path):
    repository = tmp_path / "repo"
    result = genserve("export", "dcgan_mnist", "--repository", str(repository), "--version", "3")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in repository.iterdir()) == ["dcgan_mnist_discriminate", "dcgan_mnist_generate"]
    assert sorted(p.name for p in (repository / "dcgan_mnist_generate" / "3").iterdir()) == [
        "model.onnx", "model.pt", "model.py"
    ]
    bad = genserve("export", "dcgan_mnist", "--repository", str(repository), "--version", "0")
    assert bad.returncode == 2 and "version must be >= 1, got 0" in bad.stderr


def test_train_then_resume_from_the_command_line(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", images=images)
    out = tmp_path / "ckpt"
    args = ["train", "vae", "--data", str(tmp_path / "mine.npz"), "--out", str(out), "--batch-size", "16",
            "--set", "hidden_units=8", "--set", "latent_dim=2", "--set", "hidden_channels=2"]
    first = genserve(*args, "--epochs", "1")
    assert first.returncode == 0, first.stderr
    assert "vae epoch 1/1" in first.stderr  # the progress bar
    second = genserve(*args, "--epochs", "2")
    assert second.returncode == 0, second.stderr
    assert "epoch 2/2" in second.stderr and "epoch 1/2" not in second.stderr  # resumed, not restarted
    record = json.loads((out / "config.json").read_text())
    assert record["training"]["epochs_done"] == 2 and record["model"]["latent_dim"] == 2


def test_bench_sampler_stops_at_the_first_batch_size_that_runs_out_of_memory(monkeypatch):
    # On a GPU the table goes up to the largest batch that fits. No GPU here: from batch 4 on, the
    # engine's timing raises what torch raises when a device's memory runs out.
    from genserve.serving.engine import bench

    timed = bench.time_cached

    def time_cached(runner, batch, seed, min_seconds):
        if batch >= 4:
            raise torch.OutOfMemoryError("out of memory. Tried to allocate 2.00 GiB")
        return timed(runner, batch, seed, min_seconds)

    monkeypatch.setattr(bench, "time_cached", time_cached)
    config = bench.BenchConfig(model="pixelcnn_mnist", repository=str(REPOSITORY), batches=(1, 2, 4, 8),
                               naive_steps=2, min_seconds=0, slots=2, requests=2, max_request_size=1)
    progress = []
    report = bench.run_benchmark(config, progress=progress.append)
    assert [row.batch for row in report.speedup] == [1, 2] and report.out_of_memory_at == 4
    assert "batch 4: out of cpu memory; larger batch sizes skipped" in progress
    assert "batch 4 ran out of cpu memory" in bench.format_report(report)
    assert len(report.batching) == 2  # the batching comparison still runs


def test_bench_serve_compares_batching_on_and_off_and_writes_json(tmp_path):
    out = tmp_path / "serve.json"
    result = genserve("bench-serve", "--no-triton", "--concurrency", "4", "--duration", "0.5", "--warmup", "0.2",
                      "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "throughput ratio on/off" in result.stdout and "in-process ONNX Runtime call" in result.stdout
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"batching on c4", "batching off c4", "embedded c1"}
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in report["results"].values())


def test_serve_refuses_bad_flags_in_one_line(tmp_path):
    result = genserve("serve", "--runtime", "triton", "--port", "0")
    assert result.returncode == 2 and "triton_url" in result.stderr and "Traceback" not in result.stderr
    result = genserve("serve", "--repository", str(tmp_path / "missing"), "--port", "0")
    assert result.returncode == 2 and "no model repository" in result.stderr
    result = genserve("serve", "--call-budget-ms", "-1", "--port", "0")
    assert result.returncode == 2 and "call_budget_ms must be >= 0" in result.stderr


def test_serve_says_in_one_line_when_triton_does_not_answer():
    from genserve.serving.tritonserver import free_port

    result = genserve("serve", "--runtime", "triton", "--triton-url", f"127.0.0.1:{free_port()}", "--port", "0",
                      "--metrics-port", "-1")
    assert result.returncode == 2 and "unavailable" in result.stderr and "Traceback" not in result.stderr
