"""A stream of a model on CUDA (``infer.stream``): the frames of the same model on the CPU. Its
own module, importing nothing the GPU image lacks (soundfile, soxr, webdataset: make gpu-check
collects every module with a ``gpu`` test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infer.stream import Stream
from model import build_model
from pipeline.convert.synthetic import make_take
from train.predict import Predictor


@pytest.mark.gpu
def test_a_stream_of_a_model_on_cuda_gives_the_cpu_frames():
    torch.manual_seed(0)
    model = build_model("sequence", "sequence", n_mels=32, hidden=16, lookahead_seconds=0.05)
    model = model.eval()
    audio = make_take(77, 5, seconds=2.5)[0].astype(np.float32)
    want = Predictor(model, "sequence", 16000, 30.0, 300, torch.device("cpu")).predict(audio)
    p = Predictor(model.cuda(), "sequence", 16000, 30.0, 300, torch.device("cuda"))
    stream, got = Stream(p), []
    for at in range(0, len(audio), 533):
        got.append(stream.push(audio[at : at + 533]))
    got.append(stream.flush())
    np.testing.assert_allclose(np.concatenate(got), want, rtol=0, atol=1e-3)
