"""Vision and audio extractors on tiny stand-in models loaded through the real from_pretrained path."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch

from engines.audio import SAMPLE_RATE, AudioExtractor, conv_geometry, to_16k_mono
from engines.extractor import Features
from engines.extractors import ExtractorOptions
from engines.hub import ModelNotAvailableError
from engines.vision import ClipPreprocess, FaceDetector, FrameEmbeddings, VisionExtractor

ASTRONAUT_FACE = (177, 66, 95, 95)  # OpenCV 4.x's frontal-face cascade on skimage's astronaut (docs/design.md)
BLAZEFACE_ASTRONAUT = (178, 81, 94, 94)  # BlazeFace short range (the default detector): brows to chin


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)  # skimage gives RGB; frames are BGR


@pytest.fixture(scope="module")
def blank() -> np.ndarray:
    return np.full((480, 640, 3), 127, np.uint8)


@pytest.fixture(scope="module")
def vision(standin_models) -> VisionExtractor:
    return VisionExtractor(str(standin_models["vision"]), face_crop=True, seq_len=4)


@pytest.fixture(scope="module")
def audio(standin_models) -> AudioExtractor:
    return AudioExtractor(str(standin_models["audio"]), layer="conv", seq_len=128)


def _clip_embeds(extractor: VisionExtractor, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return extractor.model(pixel_values=torch.from_numpy(pixels)).image_embeds.numpy()


# -- face detection ---------------------------------------------------------------------------------------------


def test_face_detector_finds_the_astronaut_and_nothing_in_a_blank_frame(astronaut, blank):
    detector = FaceDetector()
    assert detector.detect(astronaut) == ASTRONAUT_FACE
    assert detector.detect(cv2.cvtColor(astronaut, cv2.COLOR_BGR2GRAY)) == ASTRONAUT_FACE
    assert detector.detect(blank) is None


def test_face_detector_maps_boxes_back_from_a_downscaled_search(astronaut):
    big = cv2.resize(astronaut, (1280, 1280), interpolation=cv2.INTER_CUBIC)  # searched at 640x640
    box = FaceDetector(max_side=640).detect(big)
    assert box is not None
    expected = np.array(ASTRONAUT_FACE) * 2.5
    assert np.abs(np.array(box) - expected).max() <= 0.1 * expected[2]


@pytest.mark.parametrize("frame, what", [
    (np.zeros((8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 4), np.uint8), "shape"),
    (np.zeros((8,), np.uint8), "shape"),
    ([[0, 0], [0, 0]], "numpy"),
])
def test_face_detector_rejects_frames_it_cannot_read(frame, what):
    with pytest.raises(ValueError, match=what):
        FaceDetector().detect(frame)


# -- vision features --------------------------------------------------------------------------------------------


def test_vision_features_have_the_declared_shape_and_are_clip_image_embeds(standin_models):
    extractor = VisionExtractor(str(standin_models["vision"]), face_crop=False, seq_len=5)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(3)]
    feats = extractor.extract(frames)
    assert isinstance(feats, Features)
    assert feats.values.shape == (5, extractor.model.config.projection_dim) and feats.values.dtype == np.float32
    assert feats.length == 3 and feats.info == {"faces": [], "frames": 3}  # no crop: every frame is present
    assert not feats.values[3:].any()
    expected = _clip_embeds(extractor, np.stack([extractor.pixel_values(f) for f in frames]))
    np.testing.assert_allclose(feats.values[:3], expected, atol=1e-5)


def test_vision_embeds_the_face_crop_and_never_the_background(vision, astronaut, blank):
    emb = vision.embed_frames([astronaut, blank])
    assert isinstance(emb, FrameEmbeddings) and len(emb) == 2
    assert emb.boxes == [BLAZEFACE_ASTRONAUT, None]
    assert emb.present.tolist() == [True, False]
    assert not emb.embeddings[1].any()
    face = vision.pixel_values(astronaut, BLAZEFACE_ASTRONAUT)
    np.testing.assert_allclose(emb.embeddings[0], _clip_embeds(vision, face[None])[0], atol=1e-5)
    whole = _clip_embeds(vision, vision.pixel_values(astronaut)[None])[0]
    assert np.abs(emb.embeddings[0] - whole).max() > 1e-3  # the crop, not the whole frame


def test_vision_is_absent_without_a_face(vision, blank):
    feats = vision.extract([blank, blank])
    assert feats.length == 0 and not feats.present
    assert feats.values.shape == (4, vision.dim) and not feats.values.any()
    assert feats.info == {"faces": [], "frames": 2}


def test_a_window_mixing_face_and_blank_frames_counts_the_faces(vision, astronaut, blank):
    feats = vision.extract([blank, astronaut, blank, astronaut, astronaut])
    assert feats.length == 3
    assert feats.info == {"faces": [list(BLAZEFACE_ASTRONAUT)] * 3, "frames": 5}
    assert feats.values[:3].any(axis=1).all() and not feats.values[3:].any()


def test_window_keeps_the_newest_present_frames(vision):
    n = 7
    emb = FrameEmbeddings(np.arange(n, dtype=np.float32)[:, None].repeat(vision.dim, axis=1),
                          [(i, 0, 10, 10) if i % 3 else None for i in range(n)],
                          np.array([i % 3 != 0 for i in range(n)]))
    feats = vision.window(emb)  # present: 1 2 4 5; seq_len 4 keeps all; with 8 frames it keeps the last 4
    assert feats.length == 4 and feats.values[:, 0].tolist() == [1, 2, 4, 5]
    emb8 = FrameEmbeddings(np.vstack([emb.embeddings, np.full((1, vision.dim), 7, np.float32)]),
                           emb.boxes + [(7, 0, 10, 10)], np.append(emb.present, True))
    feats = vision.window(emb8)
    assert feats.length == 4 and feats.values[:, 0].tolist() == [2, 4, 5, 7]
    assert [box[0] for box in feats.info["faces"]] == [2, 4, 5, 7] and feats.info["frames"] == 8


def test_batches_larger_than_the_engine_profile_are_split(standin_models):
    extractor = VisionExtractor(str(standin_models["vision"]), face_crop=False, seq_len=1)
    extractor.max_batch = 2
    sizes = []
    run = extractor.backend.run
    extractor.backend.run = lambda inputs: sizes.append(len(inputs["pixel_values"])) or run(inputs)
    frames = [np.full((64, 64, 3), 40 * i, np.uint8) for i in range(5)]
    emb = extractor.embed_frames(frames)
    assert sizes == [2, 2, 1] and emb.present.all()
    assert len({tuple(e.round(5)) for e in emb.embeddings}) == 5


# -- CLIP preprocessing -----------------------------------------------------------------------------------------


def test_preprocessing_matches_transformers_clip_image_processor(standin_models, astronaut):
    import warnings

    from transformers import CLIPImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = CLIPImageProcessor.from_pretrained(str(standin_models["vision"]))  # the PIL fallback here
    ours = ClipPreprocess.from_folder(standin_models["vision"])
    rgb = cv2.cvtColor(astronaut, cv2.COLOR_BGR2RGB)
    x, y, w, h = ASTRONAUT_FACE
    cases = {"shrink": rgb, "enlarge (a face crop)": rgb[y - 19:y + h + 19, x - 19:x + w + 19],
             "not square": np.ascontiguousarray(rgb[:, 60:460]), "wide": np.ascontiguousarray(rgb[100:400])}
    for name, image in cases.items():
        expected = reference(images=image, return_tensors="np")["pixel_values"][0]
        got = ours(image)
        assert got.shape == expected.shape == (3, 224, 224), name
        assert got.dtype == np.float32
        # Resampling kernels differ slightly (PIL vs OpenCV): about one grey level (0.015 here) on average.
        assert np.abs(got - expected).mean() < 0.03, name
    flat = np.full((300, 200, 3), (10, 128, 250), np.uint8)  # resizing a flat image is exact: normalisation is
    np.testing.assert_allclose(ours(flat), reference(images=flat, return_tensors="np")["pixel_values"][0], atol=1e-5)


def test_preprocessing_reads_old_and_new_config_forms(tmp_path):
    assert ClipPreprocess.from_folder(tmp_path) == ClipPreprocess()  # no file: OpenAI CLIP's settings
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 256, "crop_size": 240,
                                                                   "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    pre = ClipPreprocess.from_folder(tmp_path)
    assert (pre.shortest_edge, pre.crop_hw, pre.mean, pre.std) == (256, (240, 240), (0.5,) * 3, (0.5,) * 3)
    assert pre(np.zeros((300, 400, 3), np.uint8)).shape == (3, 240, 240) and pre.describe() == "clip-240"
    pre = ClipPreprocess.from_config({"size": {"height": 32, "width": 48}, "do_center_crop": False})
    assert pre(np.zeros((300, 400, 3), np.uint8)).shape == (3, 32, 48)


# -- audio ------------------------------------------------------------------------------------------------------


def _conv_features(extractor: AudioExtractor, wave16k: np.ndarray, layer: str = "extract_features") -> np.ndarray:
    wave = (wave16k - wave16k.mean()) / np.sqrt(wave16k.var() + 1e-7)
    with torch.no_grad():
        return getattr(extractor.model(input_values=torch.from_numpy(wave[None].astype(np.float32))), layer)[0].numpy()


def test_one_second_of_44k_stereo_int16_gives_49_valid_frames(audio):
    rng = np.random.default_rng(0)
    stereo = (rng.standard_normal((44_100, 2)) * 3000).astype(np.int16)
    feats = audio.extract(stereo, 44_100)
    assert feats.values.shape == (128, 32) and feats.values.dtype == np.float32
    assert feats.length == (16_000 - 400) // 320 + 1 == 49
    assert not feats.values[49:].any()
    expected = _conv_features(audio, to_16k_mono(stereo, 44_100))  # the model's own extract_features output
    np.testing.assert_allclose(feats.values[:49], expected, atol=1e-4)


def test_long_audio_keeps_the_last_window(audio):
    assert conv_geometry(audio.model.config.conv_kernel, audio.model.config.conv_stride) == (400, 320)
    assert audio.window_samples == 127 * 320 + 400
    wave = np.random.default_rng(1).standard_normal(5 * SAMPLE_RATE).astype(np.float32) * 0.1
    feats = audio.extract(wave, SAMPLE_RATE)
    assert feats.length == 128 and feats.values.any(axis=1).all()
    np.testing.assert_allclose(feats.values, _conv_features(audio, wave[-audio.window_samples:]), atol=1e-4)


def test_hidden_layer_gives_hidden_size_features(standin_models):
    extractor = AudioExtractor(str(standin_models["audio"]), layer="hidden", seq_len=16)
    wave = np.random.default_rng(2).standard_normal(SAMPLE_RATE // 2).astype(np.float32) * 0.1
    feats = extractor.extract(wave, SAMPLE_RATE)
    assert extractor.spec.dim == extractor.model.config.hidden_size
    assert feats.values.shape == (16, extractor.model.config.hidden_size) and feats.length == 16
    np.testing.assert_allclose(feats.values, _conv_features(extractor, wave[-extractor.window_samples:],
                                                            "last_hidden_state"), atol=1e-4)


@pytest.mark.parametrize("samples, rate", [(np.zeros(0, np.int16), 44_100), (np.zeros((0, 2), np.float32), 48_000),
                                           (np.zeros(399, np.float32), SAMPLE_RATE)])
def test_empty_or_too_short_audio_is_absent(audio, samples, rate):
    feats = audio.extract(samples, rate)
    assert feats.length == 0 and not feats.present
    assert feats.values.shape == (128, 32) and not feats.values.any()


def test_unknown_audio_layer_is_refused(standin_models):
    with pytest.raises(ValueError, match="conv, hidden"):
        AudioExtractor(str(standin_models["audio"]), layer="attention")


def test_to_16k_mono_keeps_a_sines_frequency():
    rate, freq = 44_100, 440.0
    t = np.arange(rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)
    out = to_16k_mono(np.stack([tone, tone], axis=1), rate)
    assert out.dtype == np.float32 and out.ndim == 1 and len(out) == SAMPLE_RATE
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    peak = np.fft.rfftfreq(len(out), 1 / SAMPLE_RATE)[spectrum.argmax()]
    assert abs(peak - freq) <= 1.0
    assert abs(np.abs(out[1000:-1000]).max() - 0.5) < 0.01  # int16 scaled by 1/32768


def test_to_16k_mono_scaling_channels_and_errors():
    assert to_16k_mono(np.array([16384, -32768], np.int16), SAMPLE_RATE).tolist() == [0.5, -1.0]
    np.testing.assert_allclose(to_16k_mono(np.array([[0.2, 0.4], [1.0, 0.0]]), SAMPLE_RATE), [0.3, 0.5])
    assert len(to_16k_mono(np.zeros(48_000, np.float32), 48_000)) == SAMPLE_RATE
    assert len(to_16k_mono(np.zeros(0, np.int16), 22_050)) == 0
    with pytest.raises(ValueError, match="shape"):
        to_16k_mono(np.zeros((2, 3, 4)), SAMPLE_RATE)
    with pytest.raises(ValueError, match="sample rate"):
        to_16k_mono(np.zeros(10), 0)


def test_audio_engine_model_runs_any_length_after_onnx_export(audio, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from engines.backends import create_backend

    em = audio.engine_model()
    assert em.input_names == ("input_values",) and em.output_names == ("features",)
    assert em.example_inputs["input_values"].shape == (1, audio.window_samples)
    assert em.dynamic_axes["input_values"] == {0: "batch", 1: "samples"}
    assert em.shape_profile["input_values"] == ((1, 400), (1, audio.window_samples), (1, audio.window_samples))
    ort = create_backend(em, "onnxruntime", "cpu", cache_dir=tmp_path)
    for n in (400, SAMPLE_RATE, audio.window_samples):
        wave = np.random.default_rng(n).standard_normal((1, n)).astype(np.float32)
        out = ort.run({"input_values": wave})["features"]
        assert out.shape == (1, audio.frames_for(n), audio.dim)
        np.testing.assert_allclose(out, audio.backend.run({"input_values": wave})["features"], atol=1e-4)


# -- loading and specs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [VisionExtractor, AudioExtractor])
def test_missing_models_raise_a_clear_error(cls, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "no-such-model"
    with pytest.raises(ModelNotAvailableError, match="no-such-model"):
        cls(str(folder))
    with pytest.raises(ModelNotAvailableError, match="mcihn-tests/not-a-real-model"):
        cls("mcihn-tests/not-a-real-model")


def test_specs_record_what_the_checkpoint_needs(standin_models, vision, audio):
    assert vision.spec.extractor == str(standin_models["vision"]) and vision.spec.revision == vision.source.revision
    assert vision.spec.revision.startswith("local:")
    assert (vision.spec.layer, vision.spec.dim, vision.spec.seq_len, vision.spec.sample_rate) == ("image_embeds", 32,
                                                                                                  4, 0)
    assert vision.spec.preprocessing == "blazeface-face-crop(margin=0.2)+clip-224"
    # The detector is part of the features: a checkpoint made with the Haar cascade gets the Haar cascade back.
    from mcihn.spec import FeatureSpec

    haar_spec = dataclasses.replace(vision.spec, preprocessing="haar-face-crop(margin=0.2)+clip-224")
    options = ExtractorOptions.from_spec(FeatureSpec(haar_spec, audio.spec, audio.spec))
    assert options.face_detector == "haar"
    assert ExtractorOptions.from_spec(FeatureSpec(vision.spec, audio.spec, audio.spec)).face_detector == "blazeface"
    no_crop = VisionExtractor(str(standin_models["vision"]), face_crop=False)
    assert no_crop.spec.preprocessing == "clip-224" and no_crop.spec.seq_len == 10
    assert audio.spec.extractor == str(standin_models["audio"]) and audio.spec.revision == audio.source.revision
    assert (audio.spec.layer, audio.spec.dim, audio.spec.seq_len) == ("extract_features", 32, 128)
    assert (audio.spec.preprocessing, audio.spec.sample_rate) == ("resample-16k+normalise", 16_000)
    hidden = AudioExtractor(str(standin_models["audio"]), layer="hidden")
    assert (hidden.spec.layer, hidden.spec.dim) == ("last_hidden_state", hidden.model.config.hidden_size)
    # A checkpoint's spec rebuilds the same options (face crop and audio layer included).
    from mcihn.spec import FeatureSpec, ModalitySpec

    for v, a in [(vision, audio), (no_crop, hidden)]:
        options = ExtractorOptions.from_spec(FeatureSpec(vision=v.spec, text=ModalitySpec(8, 36, "bert"), audio=a.spec))
        assert (options.vision, options.face_crop, options.vision_frames) == (v.spec.extractor, v.face_crop, v.seq_len)
        assert (options.audio, options.audio_layer, options.audio_frames) == (a.spec.extractor, a.layer, a.seq_len)


def test_vision_engine_model_interface(vision):
    em = vision.engine_model()
    assert em.name == "clip-vision" and em.input_names == ("pixel_values",) and em.output_names == ("image_embeds",)
    assert em.example_inputs["pixel_values"].shape == (1, 3, 224, 224)
    assert em.example_inputs["pixel_values"].dtype == np.float32
    assert em.dynamic_axes == {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}
    assert em.shape_profile["pixel_values"] == ((1, 3, 224, 224), (4, 3, 224, 224), (32, 3, 224, 224))
    with torch.no_grad():
        out = em.module(torch.from_numpy(em.example_inputs["pixel_values"]))
    assert tuple(out.shape) == (1, vision.dim)
