"""A tiny random Whisper converted to CTranslate2, so faster-whisper runs offline through its real code path.

No Whisper weights can be downloaded on our machines (docs/design.md, "faster-whisper offline"). Tests,
`mcihn-live --demo` and `mcihn bench` build this stand-in instead: a byte-level BPE trained on a few sentences
with the Whisper special tokens appended in Whisper's order, a randomly initialised
`WhisperForConditionalGeneration` with the real positional limits (1500 audio frames, 448 text tokens) and the
real `WhisperFeatureExtractor`, converted with CTranslate2's TransformersConverter exactly as real checkpoints
are. `faster_whisper.WhisperModel(folder)` loads it and transcribes gibberish: the words are meaningless, the
timing, VAD, word timestamps and decoding code are the real ones.
"""

from __future__ import annotations

from pathlib import Path

# In Whisper's order: faster-whisper finds them by name, and the timestamp tokens must follow <|notimestamps|>.
SPECIAL_TOKENS = ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
                  "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>")
TIMESTAMP_TOKENS = tuple(f"<|{i * 0.02:.2f}|>" for i in range(1501))  # <|0.00|> .. <|30.00|>

_CORPUS = (
    "hello world this is a test of the streaming speech recognizer.",
    "the quick brown fox jumps over the lazy dog!",
    "how are you feeling today? i feel happy, and a little tired.",
    "we watched a good movie and talked about the story for a long time.",
)

# Files of a converted model; all present means built (model.bin is moved in last).
_BUILT = ("model.bin", "config.json", "tokenizer.json", "preprocessor_config.json")


# Model sizes: "tiny" for tests and the demo; "base" has Whisper base's encoder and decoder sizes (its vocabulary
# is still the small BPE above, so the decoder's output layer is cheaper than the real one's): for timing.
SIZES = {
    "tiny": {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
             "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64},
    "base": {"d_model": 512, "encoder_layers": 6, "decoder_layers": 6, "encoder_attention_heads": 8,
             "decoder_attention_heads": 8, "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048},
}


def build_tiny_whisper(folder: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Build (or reuse, when already built) the tiny CTranslate2 Whisper in `folder`; returns the folder.

    The folder is what `faster_whisper.WhisperModel(folder, device="cpu", compute_type="int8")` and
    `realtime.asr.AsrOptions(model=str(folder))` take.
    """
    folder = Path(folder)
    if all((folder / name).is_file() for name in _BUILT):
        return folder
    import shutil
    import tempfile

    import ctranslate2
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tf.utils.logging.disable_progress_bar()  # no "Writing model shards" bars in test logs

    # Byte-level BPE, as Whisper's tokenizer: any text encodes, so prompts and punctuation always work.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(_CORPUS, trainer)
    bpe.add_special_tokens(list(SPECIAL_TOKENS) + list(TIMESTAMP_TOKENS))  # ids in order, after the BPE pieces
    ids = {t: bpe.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab_size = bpe.get_vocab_size()
    assert ids["<|notimestamps|>"] + 1 == bpe.token_to_id("<|0.00|>") and vocab_size == ids["<|endoftext|>"] + 1509

    torch.manual_seed(seed)
    config = tf.WhisperConfig(
        vocab_size=vocab_size, num_mel_bins=80, **SIZES[size],
        max_source_positions=1500, max_target_positions=448,  # the real limits: 30 s of audio, 448 tokens
        pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"], suppress_tokens=[], begin_suppress_tokens=[],
    )
    with tempfile.TemporaryDirectory() as tmp:
        tf.WhisperForConditionalGeneration(config).eval().save_pretrained(tmp)
        tf.WhisperFeatureExtractor(feature_size=80).save_pretrained(tmp)
        tf.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(tmp)
        converter = ctranslate2.converters.TransformersConverter(
            tmp, copy_files=["tokenizer.json", "preprocessor_config.json"])
        out = Path(converter.convert(str(Path(tmp) / "ct2")))
        # Into place with model.bin last, so an interrupted build is never taken for a finished one.
        folder.mkdir(parents=True, exist_ok=True)
        for f in sorted(out.iterdir(), key=lambda f: f.name == "model.bin"):
            shutil.move(f, folder / f.name)
    return folder
