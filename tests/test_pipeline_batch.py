"""Embedding batched across cameras: pipelines sharing one EmbedBatch fill each embedder call."""

from itertools import zip_longest

import numpy as np
import pytest

from app.config import AppConfig
from app.embed import Embedder
from app.match import Matcher
from app.pipeline import EmbedBatch, FacePipeline
from app.source import open_source
from app.yunet import FaceDetector

pytestmark = pytest.mark.unit


class RecordingBatch(EmbedBatch):
    """The real batch, remembering which cameras each embedder call served."""

    def __init__(self, embedder):
        super().__init__(embedder)
        self.calls: list[set[str]] = []

    def run(self, times):
        if self.items:
            self.calls.append({p.camera for p, _ in self.items})
        super().run(times)


def test_one_embedder_call_serves_several_cameras(data_dir, yunet_path, tiny_model_dir):
    cfg = AppConfig()
    embedder = Embedder.from_config(str(tiny_model_dir), "onnxruntime", batch_size=8)
    detector = FaceDetector(yunet_path)
    batch = RecordingBatch(embedder)
    empty = Matcher([], np.zeros((0, 512), np.float32), 0.5)
    pipes = {cam: FacePipeline(cam, cfg, detector, embedder, lambda: empty, batch=batch)
             for cam in ("classroom", "walking")}
    clips = {"classroom": "intel_classroom.mp4", "walking": "intel_face-demographics-walking.mp4"}
    streams = [open_source(str(data_dir / "videos" / clips[c]), c) for c in pipes]
    events = []
    for frames in zip_longest(*streams):
        for frame in frames:
            if frame is not None:
                events += pipes[frame.camera].push(frame).events
    for p in pipes.values():
        events += p.flush()
    assert any(len(cams) == 2 for cams in batch.calls)  # one call carried both cameras
    assert sum(p.aggregator.embedded_total for p in pipes.values()) == embedder.crops_embedded
    assert {e.camera for e in events} == set(pipes)
