"""The starter recognizer: what `mcihn-live` runs without a checkpoint. Real weights only, scores that mean something.

Three experts over the same seven emotions (mcihn.emotions.EMOTIONS, MELD's), fused late:
- face: a real face detector and the FER2013 mini-Xception expression model on the detected face only
  (engines/face.py); its probabilities, averaged over the faces in the window, are the vision modality's scores.
- text: real Whisper tiny.en (faster-whisper) -> the sentence being spoken -> real all-MiniLM-L6-v2 token features
  -> MCIHN's classification head trained here on MELD with `mcihn train`, text present and the other modalities
  absent (realtime/assets/text-emotion, docs/results.md).
- voice: no real voice-emotion model can be had, so none: presence (voiced or not) only.
Late fusion (mcihn/late_fusion.py) weights each present expert by its reliability on held-out data. This is not
MCIHN's joint fusion, which needs tri-modal training data; docs/models.md is the model card.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from mcihn.emotions import EMOTIONS

TEXT_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "text-emotion"
FACE_FRAMES = 10  # face results in the window (one every window_s / FACE_FRAMES seconds)
# The face expert's weight: the FER2013 mini-Xception's accuracy on FER2013's held-out test set as its authors
# published it (oarriaga/face_classification: 66 %). No labelled face data exists here to re-measure it, and no
# calibration temperature can be fitted without one: it stays 1.
FACE_WEIGHT = 0.66
FACE_WEIGHT_SOURCE = "FER2013 public test accuracy, as published by the model's authors (not re-measured here)"


class FaceScores:
    """The face expert as the vision worker drives it (the interface of engines.vision.VisionExtractor): each frame
    gives its expression probabilities (EMOTIONS order) in place of an embedding, and its face box; a frame without
    a face is absent, and the expression model never sees it."""

    labels = EMOTIONS
    frames = FACE_FRAMES

    def __init__(self, expert):
        self.expert = expert

    @property
    def model(self) -> str:
        return self.expert.model

    def embed_frames(self, frames: list[np.ndarray]):
        from engines.vision import FrameEmbeddings

        probs = np.zeros((len(frames), len(self.labels)), np.float32)
        boxes, present = [], np.zeros(len(frames), bool)
        for i, frame in enumerate(frames):
            result = self.expert.analyze(frame)
            boxes.append(result.box if result is not None else None)
            if result is not None:
                probs[i] = [result.scores[label] for label in self.labels]
                present[i] = True
        return FrameEmbeddings(probs, boxes, present)


def load_starter(config):
    """The starter's Stack: the shipped text model through the checkpoint path, the face expert, late fusion."""
    from engines.face import FaceExpert
    from mcihn.late_fusion import Expert, LateFusion
    from realtime.config import ConfigError
    from realtime.stack import load_checkpoint_stack

    if not (TEXT_CHECKPOINT / "config.json").is_file():
        raise ConfigError(f"the starter's text model is missing from the install ({TEXT_CHECKPOINT}); reinstall "
                          f"mcihn-live")
    stack = load_checkpoint_stack(TEXT_CHECKPOINT, config, config.asr)
    if tuple(stack.labels) != EMOTIONS:
        raise ConfigError(f"the starter's text model has labels {stack.labels}, expected {list(EMOTIONS)}")
    meta = stack.metadata
    text_weight = float(meta["valid_weighted_f1"])  # written by `mcihn compare --export`
    text_temperature = float(meta.get("calibration", {}).get("temperature", 1.0))
    face = None
    if config.source != "devices" or config.use_camera:
        if stack.server is not None:  # the face expert runs on the inference server too (realtime/remote.py)
            from realtime.remote import RemoteFace

            stack.server.check(["face"])
            face = FaceScores(RemoteFace(stack.server))
        else:
            face = FaceScores(FaceExpert())
    text_model = f"{meta.get('name', 'mcihn-text-emotion')} on {stack.models['text']}"
    experts = {"text": Expert(text_weight, text_temperature, text_model, "MELD dev weighted F1")}
    if face is not None:
        experts["vision"] = Expert(FACE_WEIGHT, 1.0, face.model, FACE_WEIGHT_SOURCE)
    fusion = LateFusion(EMOTIONS, experts)
    models = {"vision": face.model if face is not None else None, "text": text_model, "audio": None}
    return replace(stack, face=face, late_fusion=fusion, models=models, fusion_name=fusion.describe(),
                   text_scope="utterance", untrained=False)
