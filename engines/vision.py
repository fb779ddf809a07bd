"""Vision features: CLIP image embeddings of the face in each frame (10 x 512 with CLIP ViT-B/32).

A frame goes through: face detection (BlazeFace by default, engines/face.py; OpenCV's Haar cascade for checkpoints
that recorded it) -> crop the largest face with a margin -> CLIP's
preprocessing, re-done in numpy/OpenCV (resize the shortest side, center-crop, normalise) -> the CLIP vision
tower's projected `image_embeds`. Frames are embedded one at a time as they enter the live window
(`embed_frames`), and a window of embeddings becomes the modality's Features (`window`). A frame without a face
is never embedded (the background is not an emotion): it is marked absent, and a window without any face has
length 0 (vision absent). Dataset extraction (`extract`) runs the same code on a clip's sampled frames.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from engines.extractor import EngineModel, Extractor, Features, pack_window

# The face detectors live in engines/face.py (they are re-exported here for older imports).
from engines.face import Box, FaceDetector, check_frame, face_detector_named  # noqa: F401
from engines.hub import ModelSource, load_pretrained, resolve_model
from mcihn.spec import ModalitySpec

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def expand_box(box: Box, margin: float, height: int, width: int) -> tuple[int, int, int, int]:
    """The box grown by `margin` of its size on each side, clipped to the frame: (x0, y0, x1, y1)."""
    x, y, w, h = box
    dx, dy = margin * w, margin * h
    return (max(0, round(x - dx)), max(0, round(y - dy)), min(width, round(x + w + dx)), min(height, round(y + h + dy)))


@dataclass(frozen=True)
class ClipPreprocess:
    """CLIPImageProcessor's steps in numpy/OpenCV: RGB uint8 (H, W, 3) -> (3, crop_h, crop_w) float32.

    Resize so the shortest side is `shortest_edge` (or to exactly `resize_hw`), center-crop to `crop_hw`, scale
    to 0..1, normalise by mean/std. Matches transformers' PIL implementation to within about one grey level.
    """

    shortest_edge: int | None = 224
    resize_hw: tuple[int, int] | None = None
    crop_hw: tuple[int, int] | None = (224, 224)
    rescale_factor: float = 1 / 255
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    _scale: np.ndarray = field(init=False, repr=False, compare=False)
    _offset: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # (x * f - mean) / std == x * (f / std) - mean / std: one multiply-add per pixel.
        std = np.asarray(self.std, np.float32)
        object.__setattr__(self, "_scale", (np.float32(self.rescale_factor) / std).reshape(3, 1, 1))
        object.__setattr__(self, "_offset", (np.asarray(self.mean, np.float32) / std).reshape(3, 1, 1))

    @classmethod
    def from_folder(cls, folder: str | Path) -> ClipPreprocess:
        """The settings of the folder's preprocessor_config.json (CLIPImageProcessor); OpenAI CLIP's without one."""
        path = Path(folder) / "preprocessor_config.json"
        return cls.from_config(json.loads(path.read_text()) if path.is_file() else {})

    @classmethod
    def from_config(cls, cfg: dict) -> ClipPreprocess:
        size = cfg.get("size", 224) if cfg.get("do_resize", True) else None
        crop = cfg.get("crop_size", 224) if cfg.get("do_center_crop", True) else None
        shortest, resize_hw = None, None
        if isinstance(size, int):  # older configs (openai/clip-vit-base-patch32): an int is the shortest edge
            shortest = size
        elif isinstance(size, dict) and "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        elif isinstance(size, dict):
            resize_hw = (int(size["height"]), int(size["width"]))
        crop_hw = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"])) if crop else None
        mean = cfg.get("image_mean", OPENAI_CLIP_MEAN) if cfg.get("do_normalize", True) else (0.0, 0.0, 0.0)
        std = cfg.get("image_std", OPENAI_CLIP_STD) if cfg.get("do_normalize", True) else (1.0, 1.0, 1.0)
        factor = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        return cls(shortest, resize_hw, crop_hw, factor, tuple(float(m) for m in mean), tuple(float(s) for s in std))

    @property
    def output_hw(self) -> tuple[int, int]:
        if self.crop_hw is not None:
            return self.crop_hw
        if self.resize_hw is not None:
            return self.resize_hw
        raise ValueError("preprocessing without a crop or a fixed resize has no fixed output size")

    def describe(self) -> str:
        h, w = self.output_hw
        return f"clip-{h}" if h == w else f"clip-{h}x{w}"

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        if self.resize_hw is not None:
            new_h, new_w = self.resize_hw
        elif self.shortest_edge is not None:
            # As transformers: the long side is truncated, not rounded.
            short, long = (h, w) if h <= w else (w, h)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
        else:
            new_h, new_w = h, w
        if (new_h, new_w) != (h, w):
            # PIL's bicubic (what transformers uses) widens its kernel when shrinking (antialiasing); OpenCV's
            # INTER_CUBIC does not, and aliases. INTER_AREA is the closer match when shrinking, INTER_CUBIC when
            # enlarging (face crops usually are): both within ~1 grey level of PIL on average.
            shrink = new_h * new_w < h * w
            rgb = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
        if self.crop_hw is not None:
            rgb = _center_crop(rgb, *self.crop_hw)
        chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
        return chw * self._scale - self._offset


def _center_crop(image: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """As transformers' center_crop: top/left = (size - crop) // 2, zero padding where the image is smaller."""
    h, w = image.shape[:2]
    if h < crop_h or w < crop_w:
        padded = np.zeros((max(h, crop_h), max(w, crop_w), image.shape[2]), image.dtype)
        top, left = -(-(padded.shape[0] - h) // 2), -(-(padded.shape[1] - w) // 2)
        padded[top:top + h, left:left + w] = image
        image, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return image[top:top + crop_h, left:left + crop_w]


@dataclass
class FrameEmbeddings:
    """Per-frame results of `VisionExtractor.embed_frames`, N frames.

    embeddings: (N, dim) float32, zeros for absent frames; boxes: the face (x, y, w, h) found in each frame (None
    without a face, or when face cropping is off); present: (N,) bool, whether the frame was embedded.
    """

    embeddings: np.ndarray
    boxes: list[Box | None]
    present: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)


class _ImageEmbeds(nn.Module):
    """pixel_values (B, 3, H, W) float32 -> image_embeds (B, projection_dim)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).image_embeds


class VisionExtractor(Extractor):
    """Face crop + CLIP vision tower. `extract(frames)` -> Features (seq_len, projection_dim) whose length is the
    number of frames with a face (0: vision absent); `embed_frames` and `window` split that for the live app."""

    modality = "vision"

    def __init__(self, model_id: str = "openai/clip-vit-base-patch32", face_crop: bool = True, seq_len: int = 10,
                 face_margin: float = 0.2, revision: str | None = None, detector: FaceDetector | None = None,
                 face_detector: str = "blazeface"):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        if face_margin < 0:
            raise ValueError(f"face_margin must be >= 0 (a fraction of the face box), got {face_margin}")
        self.source: ModelSource = resolve_model(model_id, revision)
        self.seq_len = seq_len
        self.face_crop = face_crop
        self.face_margin = face_margin
        self.detector = (detector or face_detector_named(face_detector)) if face_crop else None
        self.preprocess = ClipPreprocess.from_folder(self.source.path)
        self.model = load_pretrained(CLIPVisionModelWithProjection, self.source).eval()
        self.dim = int(self.model.visual_projection.out_features)
        # Batches up to this size go through the engine at once (the top of a compiled engine's shape profile).
        self.max_batch = max(2 * seq_len, 32)
        crop = f"{face_detector}-face-crop(margin={face_margin:g})+" if face_crop else ""
        self.spec = ModalitySpec(dim=self.dim, seq_len=seq_len, extractor=self.source.model_id,
                                 revision=self.source.revision, layer="image_embeds",
                                 preprocessing=crop + self.preprocess.describe(), sample_rate=0)
        self._core = _ImageEmbeds(self.model)

    def engine_model(self) -> EngineModel:
        h, w = self.preprocess.output_hw
        return EngineModel(
            name="clip-vision",
            module=self._core,
            example_inputs={"pixel_values": np.zeros((1, 3, h, w), dtype=np.float32)},
            output_names=("image_embeds",),
            dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
            shape_profile={"pixel_values": ((1, 3, h, w), (self.seq_len, 3, h, w), (self.max_batch, 3, h, w))},
        )

    def pixel_values(self, frame: np.ndarray, box: Box | None = None) -> np.ndarray:
        """One frame (uint8 BGR or grey), cropped to `box` plus the margin when given -> (3, H, W) float32."""
        frame = check_frame(frame)
        if box is not None:
            x0, y0, x1, y1 = expand_box(box, self.face_margin, *frame.shape[:2])
            frame = frame[y0:y1, x0:x1]
        rgb = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB if frame.ndim == 2 else cv2.COLOR_BGR2RGB)
        return self.preprocess(rgb)

    def embed_frames(self, frames: list[np.ndarray]) -> FrameEmbeddings:
        """Embed each frame's face (or the whole frame without face cropping), batched through the backend."""
        boxes: list[Box | None] = []
        pixels: list[np.ndarray] = []
        for frame in frames:
            box = self.detector.detect(frame) if self.detector is not None else None
            boxes.append(box)
            if box is not None or not self.face_crop:
                pixels.append(self.pixel_values(frame, box))
        present = np.array([b is not None or not self.face_crop for b in boxes], dtype=bool)
        embeddings = np.zeros((len(boxes), self.dim), dtype=np.float32)
        if pixels:
            batches = [np.stack(pixels[i:i + self.max_batch]) for i in range(0, len(pixels), self.max_batch)]
            embeddings[present] = np.concatenate([self.backend.run({"pixel_values": b})["image_embeds"]
                                                  for b in batches])
        return FrameEmbeddings(embeddings, boxes, present)

    def window(self, emb: FrameEmbeddings) -> Features:
        """The present frames' embeddings, newest last, packed to (seq_len, dim); the newest seq_len are kept."""
        values, length = pack_window(emb.embeddings[emb.present], self.seq_len)
        kept = [b for b, p in zip(emb.boxes, emb.present, strict=True) if p]
        kept = kept[len(kept) - length:]  # the frames pack_window kept (the newest)
        # As realtime.windows.VisionWindow: face boxes as lists (JSON), none when face cropping is off.
        return Features(values, length, {"faces": [list(b) for b in kept if b is not None], "frames": len(emb)})

    def extract(self, frames: list[np.ndarray]) -> Features:
        return self.window(self.embed_frames(frames))
