"""Audio through the API: the shipped WaveNet on both runtimes, its clips (N, 1, T), progress by frame.

Expected values come from the eager model: its step program run by the engine for samples (the
program is exact against naive sampling, tests/unit/test_sampling_engine.py; naive sampling of a
6,400-sample clip is 6,400 full passes) and its own `log_prob` for scores, on real held-out clips
of the spoken-digit corpus.
"""

from __future__ import annotations

import io
import math

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from genserve.export.data import load_dataset
from genserve.export.steps import cached_sample
from genserve.serving.tensors import to_numpy
from genserve.v1 import generative_pb2 as pb
from tests.integration.server_fixtures import tensor
from tests.rounding import assert_within_rounding, rounding_sigma

MODEL = "wavenet_speech"


@pytest.fixture(scope="module")
def expected_clip(shipped):
    """Sample 1 of seed 5 at temperature 0.9, label 7, from the fused operator in this process (the eager
    step program where it is not built)."""
    return cached_sample(shipped(MODEL).model, 2, 5, 0.9, torch.tensor([7, 7]))[1:].numpy()


def clips_of(tensor_pb) -> np.ndarray:
    return to_numpy(tensor_pb, "images", pb.DATA_TYPE_UINT8, (None, None, None))


def test_model_info_describes_the_audio(api):
    info = api.stub.GetModel(pb.GetModelRequest(model=MODEL))
    assert (info.family, info.modality, info.sample_rate, list(info.image_shape), info.pixel_levels,
            info.num_classes) == ("wavenet", "audio", 8000, [1, 6400], 256, 10)
    image = api.stub.GetModel(pb.GetModelRequest(model="pixelcnn_mnist"))
    assert (image.modality, image.sample_rate) == ("image", 0)


def test_a_streamed_clip_arrives_frame_by_frame_and_equals_the_eager_engines(api, expected_clip):
    request = pb.SampleRequest(model=MODEL, num_samples=1, seed=5, start_index=1, temperature=0.9, labels=[7],
                               return_png=True)
    events = list(api.stub.SampleStream(request))
    progress = [e.progress for e in events if e.HasField("progress")]
    assert progress and all(p.rows_total == 20 for p in progress)  # 6,400 samples in frames of 320
    done = [p.rows_done[0] for p in progress]
    assert done == sorted(done) and done[-1] == 20
    partial = clips_of(progress[0].partial_images)
    assert partial.shape == (1, 1, 6400)
    frames = 320 * done[0]
    np.testing.assert_array_equal(partial[..., :frames], expected_clip[..., :frames])  # finished frames are final
    assert not partial[..., frames:].any()  # the rest not yet drawn
    np.testing.assert_array_equal(clips_of(events[-1].result.images), expected_clip)
    (png,) = events[-1].result.png  # a picture of the waveform
    picture = Image.open(io.BytesIO(png))
    assert picture.size == (640, 72) and np.asarray(picture).min() == 0  # one strip, with the trace drawn


@pytest.fixture(scope="module")
def held_out_clips(shipped):
    """3 held-out clips, their labels, the model's eager log p(x) of each and its rounding σ: once for
    both runtimes (the σ alone is 17 runs of the model over the clips)."""
    model = shipped(MODEL).model
    held = load_dataset("spoken_digits").held_out
    x, labels = held.images[:3], held.labels[:3]
    with torch.inference_mode():
        expected = model.log_prob(x.long(), labels).numpy()
    (sigma,) = rounding_sigma(lambda clips: [model.log_prob(clips, labels)], [x.long()])
    return x, labels, expected, sigma


def test_scores_are_the_models_exact_log_likelihood_per_clip(api, held_out_clips):
    x, labels, expected, sigma = held_out_clips
    response = api.stub.Score(pb.ScoreRequest(model=MODEL, images=tensor(x.numpy()), labels=labels.tolist()))
    (score,) = response.scores
    assert score.method == "exact" and pb.ScoreKind.Name(score.kind) == "SCORE_KIND_EXACT"
    assert_within_rounding(np.asarray(score.values), expected, sigma, "log p(x)")
    np.testing.assert_allclose(score.bits_per_dim, -np.asarray(score.values) / (math.log(2) * 6400))


@pytest.mark.parametrize("request_pb, code, words", [
    (pb.ScoreRequest(model=MODEL, images=tensor(np.zeros((1, 1, 6399), np.uint8)), labels=[1]),
     grpc.StatusCode.INVALID_ARGUMENT, "images"),
    (pb.ScoreRequest(model=MODEL, images=tensor(np.zeros((1, 1, 6400), np.uint8))),
     grpc.StatusCode.INVALID_ARGUMENT, "labels"),
    (pb.SampleRequest(model=MODEL, num_samples=1, labels=[10]), grpc.StatusCode.INVALID_ARGUMENT, "labels"),
    (pb.EncodeRequest(model=MODEL, images=tensor(np.zeros((1, 1, 6400), np.uint8))),
     grpc.StatusCode.NOT_FOUND, "encode"),
])
def test_bad_audio_requests_name_the_field_and_the_server_keeps_serving(api, request_pb, code, words):
    method = {pb.ScoreRequest: api.stub.Score, pb.SampleRequest: api.stub.Sample, pb.EncodeRequest: api.stub.Encode}
    with pytest.raises(grpc.RpcError) as error:
        method[type(request_pb)](request_pb)
    assert error.value.code() == code and words in error.value.details()
    assert api.stub.GetModel(pb.GetModelRequest(model=MODEL)).ready
