"""The client verbs as a user runs them: real subprocesses against a real server on loopback."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from genserve.clients import Client
from genserve.clients.audio import read_audio
from genserve.serving.server import ServerThread
from genserve.serving.tritonserver import free_port
from tests.integration.server_fixtures import server_config


@pytest.fixture(scope="module")
def server():
    thread = ServerThread(server_config()).start()
    yield thread.address
    thread.stop()


def genserve(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genserve.clients.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_models_lists_every_served_model(server):
    result = genserve("models", "--server", server)
    assert result.returncode == 0, result.stderr
    for name in ("aae_mnist", "dcgan_mnist", "flow_gan_mnist", "gated_pixelcnn_mnist", "iaf_vae_mnist", "maf_mnist",
                 "pixel_vae_mnist", "pixelcnn_mnist", "pixelcnn_pp_mnist", "realnvp_mnist", "vae_gan_mnist",
                 "vae_mnist", "wavenet_speech"):
        assert name in result.stdout
    listed = json.loads(genserve("models", "--server", server, "--json").stdout)
    assert {m["name"]: m["capabilities"] for m in listed}["vae_mnist"] == ["sample", "encode", "decode", "score"]


def test_sample_writes_the_servers_images_as_npz_and_png(server, tmp_path):
    npz, png = tmp_path / "s.npz", tmp_path / "grid.png"
    result = genserve("sample", "gated_pixelcnn_mnist", "-n", "4", "--seed", "7", "-o", str(npz), "--server", server)
    assert result.returncode == 0, result.stderr
    assert "seed 7" in result.stdout
    with Client(server) as client:
        expected = client.sample("gated_pixelcnn_mnist", 4, seed=7).images
    np.testing.assert_array_equal(np.load(npz)["images"], expected)
    result = genserve("sample", "dcgan_mnist", "-n", "6", "--label", "3", "--temperature", "0.5", "-o", str(png),
                      "--server", server)
    assert result.returncode == 0, result.stderr
    assert Image.open(png).size[0] > 28 * 2


def test_audio_samples_are_written_as_wav_files_that_score_reads_back(server, tmp_path):
    result = genserve("sample", "wavenet_speech", "-n", "2", "--seed", "4", "--label", "3", "--no-progress",
                      "-o", str(tmp_path / "said.png"), "--server", server)
    assert result.returncode == 0, result.stderr
    assert "s of audio per second" in result.stdout and "2 WAV files" in result.stdout
    with Client(server) as client:
        clips = client.sample("wavenet_speech", 2, seed=4, labels=[3]).images  # (2, 1, 6400) mu-law codes
        expected = client.score("wavenet_speech", clips, labels=[3, 3])[0]
    assert Image.open(tmp_path / "said.png").size[1] > 2 * 64  # a strip per clip
    wavs = [str(tmp_path / f"said-{k}.wav") for k in range(2)]
    scored = json.loads(genserve("score", "wavenet_speech", *wavs, "--label", "3", "--label", "3", "--json",
                                 "--server", server).stdout)
    # The WAV files hold the codes' 16-bit decodings, which encode back to the same codes (tests/unit):
    # the same clips, so the same scores.
    np.testing.assert_allclose(scored[0]["values"], expected.values, rtol=1e-9)
    listed = genserve("models", "--server", server).stdout
    assert "1x6400 @ 8000 Hz" in listed
    job = genserve("batch", "wavenet_speech", "--num", "2", "--shard-size", "2", "--seed", "4", "--label", "3",
                   "--png", "--out", str(tmp_path / "job"), "--server", server, "--no-progress")
    assert job.returncode == 0, job.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "job" / "shard-00000.npz")["images"], clips)
    batch_wavs = sorted(str(p) for p in (tmp_path / "job" / "shard-00000").glob("*.wav"))
    np.testing.assert_array_equal(read_audio(batch_wavs, 256, 8000, 6400), clips)


def test_score_prints_nats_and_bits_per_dim_for_png_and_npz_images(server, tmp_path):
    with Client(server) as client:
        images = client.sample("vae_mnist", 3, seed=1).images
        expected = client.score("pixelcnn_mnist", images)[0]
    np.savez(tmp_path / "x.npz", images=images)
    for k in range(2):  # PNGs hold 0/255; the client quantises them back to the model's 2 levels
        Image.fromarray(images[k, 0] * 255).save(tmp_path / f"{k}.png")
    result = genserve("score", "pixelcnn_mnist", str(tmp_path / "x.npz"), "--server", server)
    assert result.returncode == 0, result.stderr
    assert "exact is the exact log p(x)" in result.stdout and "exact bits/dim" in result.stdout
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:]}
    assert float(rows["0"][0]) == pytest.approx(expected.values[0], abs=1e-3)
    assert float(rows["mean"][1]) == pytest.approx(expected.bits_per_dim.mean(), abs=1e-4)
    as_png = json.loads(genserve("score", "pixelcnn_mnist", str(tmp_path / "0.png"), str(tmp_path / "1.png"),
                                 "--json", "--server", server).stdout)
    np.testing.assert_allclose(as_png[0]["values"], expected.values[:2], rtol=1e-6)
    vae = genserve("score", "vae_mnist", str(tmp_path / "x.npz"), "--importance-samples", "4", "--server", server)
    assert "elbo is a lower bound on log p(x); iwae-4 is a lower bound on log p(x)" in vae.stdout
    gan = genserve("score", "dcgan_mnist", str(tmp_path / "x.npz"), "--label", "1", "--server", server)
    assert "discriminator is not a likelihood" in gan.stdout and "bits/dim" not in gan.stdout


def test_encode_then_decode_round_trips_a_flow(server, tmp_path):
    with Client(server) as client:
        images = client.sample("realnvp_mnist", 2, seed=3).images
    np.savez(tmp_path / "x.npz", images=images)
    latents, out = tmp_path / "z.npz", tmp_path / "back.npz"
    assert genserve("encode", "realnvp_mnist", str(tmp_path / "x.npz"), "-o", str(latents), "--server",
                    server).returncode == 0
    assert set(np.load(latents).files) == {"latents", "log_det"}
    result = genserve("decode", "realnvp_mnist", str(latents), "-o", str(out), "--server", server)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(out)["images"], images)


def test_decode_passes_the_seed_of_a_pixel_vae_decoder(server, tmp_path):
    latents = tmp_path / "z.npz"
    np.savez(latents, latents=np.zeros((2, 16), np.float32))
    for seed, out in (("5", "a.npz"), ("5", "b.npz"), ("6", "c.npz")):
        result = genserve("decode", "pixel_vae_mnist", str(latents), "--seed", seed, "-o", str(tmp_path / out),
                          "--server", server)
        assert result.returncode == 0, result.stderr
    with Client(server) as client:
        expected = client.decode("pixel_vae_mnist", np.zeros((2, 16), np.float32), seed=5).images
    drawn = {name: np.load(tmp_path / name)["images"] for name in ("a.npz", "b.npz", "c.npz")}
    np.testing.assert_array_equal(drawn["a.npz"], expected)
    np.testing.assert_array_equal(drawn["b.npz"], expected)
    assert not np.array_equal(drawn["c.npz"], expected)


def test_server_side_failures_are_one_line_errors(server, tmp_path):
    cases = [
        (["sample", "no_such_model", "--server", server], "NOT_FOUND"),
        (["sample", "vae_mnist", "--label", "3", "--server", server], "INVALID_ARGUMENT"),
        (["models", "--server", f"127.0.0.1:{free_port()}", "--retries", "0"], "UNAVAILABLE"),
        (["score", "vae_mnist", str(tmp_path / "missing.png"), "--server", server], "no such image file"),
    ]
    for args, message in cases:
        result = genserve(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_batch_job_survives_a_kill_and_resumes_to_the_same_images(server, tmp_path):
    out = tmp_path / "job"
    args = ["batch", "pixelcnn_mnist", "--num", "30", "--shard-size", "3", "--out", str(out), "--concurrency", "1",
            "--seed", "5", "--png", "--server", server, "--no-progress"]
    job = subprocess.Popen([sys.executable, "-m", "genserve.clients.cli", *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    give_up = time.monotonic() + 120
    while time.monotonic() < give_up:  # kill it once two shards are recorded
        manifest = out / "job.json"
        if manifest.exists() and len(json.loads(manifest.read_text()).get("shards", {})) >= 2:
            break
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    recorded = json.loads((out / "job.json").read_text())["shards"]
    assert 2 <= len(recorded) < 10, "the job must be cut short for this test to mean anything"
    damaged = next(iter(recorded.values()))["file"]
    (out / damaged).write_bytes(b"half a file")  # a shard that no longer matches its sha256

    result = genserve(*args)
    assert result.returncode == 0, result.stderr
    assert f"{len(recorded) - 1} of 10 shards verified" in result.stdout
    manifest = json.loads((out / "job.json").read_text())
    assert len(manifest["shards"]) == 10 and manifest["failed"] == {}
    with Client(server) as client:
        for k, shard in manifest["shards"].items():
            data = np.load(out / shard["file"])
            expected = client.sample("pixelcnn_mnist", 3, seed=5, start_index=3 * int(k)).images
            np.testing.assert_array_equal(data["images"], expected)
            assert data["indices"].tolist() == list(range(3 * int(k), 3 * int(k) + 3))
            assert len(list((out / f"shard-{int(k):05d}").glob("*.png"))) == 3


def test_a_batch_job_reports_failures_after_its_attempts(server, tmp_path):
    out = tmp_path / "job"
    result = genserve("batch", "dcgan_mnist", "--num", "4", "--shard-size", "2", "--out", str(out), "--label", "11",
                      "--attempts", "2", "--seed", "1", "--server", server, "--no-progress")
    assert result.returncode == 2 and "2 shards failed" in result.stderr
    assert "shard 0 failed after 2 attempts: INVALID_ARGUMENT" in result.stdout
    assert json.loads((out / "job.json").read_text())["failed"].keys() == {"0", "1"}
    other = genserve("batch", "vae_mnist", "--num", "4", "--out", str(out), "--server", server)
    assert other.returncode == 2 and "holds a different job" in other.stderr


def test_bench_sweeps_concurrency_and_writes_csv_json_and_a_plot(server, tmp_path):
    files = {k: tmp_path / f"bench.{k}" for k in ("csv", "json", "png")}
    result = genserve("bench", "vae_mnist", "--method", "decode", "--concurrency", "1,4", "--warmup", "0.2",
                      "--window", "0.3", "--max-windows", "4", "--csv", str(files["csv"]), "--json",
                      str(files["json"]), "--plot", str(files["png"]), "--server", server)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(files["csv"].open()))
    assert [r["Concurrency"] for r in rows] == ["1", "4"]
    assert all(int(r["p50 latency"]) > 0 and r["Errors"] == "0" for r in rows)
    report = json.loads(files["json"].read_text())
    assert [r["level"] for r in report["results"]] == [1, 4] and report["config"]["mode"] == "concurrency"
    assert all(r["requests_per_s"] > 0 for r in report["results"])
    assert Image.open(files["png"]).size[0] >= 600


def test_bench_request_rate_mode_offers_poisson_load(server):
    result = genserve("bench", "pixelcnn_mnist", "--method", "score", "--request-rate", "20,40", "--warmup", "0.2",
                      "--window", "0.5", "--max-windows", "3", "--server", server)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    table = lines[lines.index(next(line for line in lines if line.strip().startswith("Request Rate"))) + 1:]
    offered_and_achieved = [(float(line.split()[0]), float(line.split()[1])) for line in table[:2]]
    assert [offered for offered, _ in offered_and_achieved] == [20, 40]
    assert all(achieved > 0 for _, achieved in offered_and_achieved)


def test_bench_against_triton_calls_the_same_entry_point(triton):
    result = genserve("bench", "vae_mnist", "--method", "decode", "--concurrency", "2", "--warmup", "0.2",
                      "--window", "0.3", "--max-windows", "3", "--triton", triton)
    assert result.returncode == 0, result.stderr
    row = [line for line in result.stdout.splitlines() if line.strip().startswith("2 ")][0].split()
    assert float(row[1]) > 0 and row[7] == "0"
    missing = genserve("bench", "gated_pixelcnn_mnist", "--method", "encode", "--triton", triton)
    assert missing.returncode == 2 and "Triton serves none of gated_pixelcnn_mnist_encode" in missing.stderr
