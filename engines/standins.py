"""Randomly initialised stand-ins for the pretrained extractors, saved like real ones.

Real weights cannot be downloaded on our machines, so tests, `mcihn-live --demo` and `mcihn bench` build
stand-ins with the real architectures' classes, `save_pretrained` them to a folder, and load them through the
exact code path real weights take (engines/hub.py). Two sizes:
- "tiny": a few thousand parameters, features of small dims; for tests and the offline demo.
- "base": the paper's real architectures (CLIP ViT-B/32 -> 512, BERT-base -> 768, Wav2Vec2-base -> 512) with
  random weights; right for timing, meaningless for scores.
"""

from __future__ import annotations

from pathlib import Path

SIZES = ("tiny", "base")

# A small English vocabulary: enough word pieces that any lower-case ASCII text tokenizes (letters and
# digits as single pieces and ## continuations), plus frequent words so tokens are not all single letters.
_WORDS = (
    "the a an and or but i you he she it we they is are was were be been have has had do does did not no yes "
    "this that what how why good bad great happy sad angry fear love hate like very really so just well okay "
    "movie film story time people think know feel thing make go see say get one two"
).split()


def tiny_vocab() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    punct = list(".,!?'\"-:;()")
    return specials + chars + ["##" + c for c in chars] + punct + _WORDS


def build_vision(folder: str | Path, size: str = "tiny") -> Path:
    """CLIPVisionModelWithProjection + CLIPImageProcessor (OpenAI's CLIP preprocessing) in `folder`."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    if size == "tiny":
        config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=224, patch_size=32, projection_dim=32)
    else:  # ViT-B/32, as openai/clip-vit-base-patch32
        config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, image_size=224, patch_size=32, projection_dim=512)
    folder = Path(folder)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def build_text(folder: str | Path, size: str = "tiny") -> Path:
    """BertModel + BertTokenizer (a small hand-written vocabulary) in `folder`."""
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = tiny_vocab()
    if size == "tiny":
        config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=128)
    else:  # bert-base-uncased's architecture (its vocabulary size; our small vocab uses the first ids)
        config = BertConfig(vocab_size=30522)
    folder = Path(folder)
    BertModel(config).save_pretrained(folder)
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(folder)
    return folder


def build_audio(folder: str | Path, size: str = "tiny") -> Path:
    """Wav2Vec2Model + Wav2Vec2FeatureExtractor in `folder`. The convolutional feature encoder keeps the real
    strides and kernels (50 frames/s at 16 kHz) whatever the size."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    if size == "tiny":
        config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    else:  # facebook/wav2vec2-base's architecture
        config = Wav2Vec2Config()
    folder = Path(folder)
    Wav2Vec2Model(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(folder)
    return folder


def build_standins(root: str | Path, size: str = "tiny", seed: int = 0) -> dict[str, Path]:
    """All three stand-ins under `root` (reused when already there). Returns modality -> model folder."""
    import torch

    if size not in SIZES:
        raise ValueError(f"unknown stand-in size {size!r}; use one of {', '.join(SIZES)}")
    root = Path(root)
    builders = {"vision": build_vision, "text": build_text, "audio": build_audio}
    folders = {}
    for modality, build in builders.items():
        folder = root / f"{size}-{modality}"
        if not (folder / "config.json").is_file():
            torch.manual_seed(seed)
            build(folder, size)
        folders[modality] = folder
    return folders
