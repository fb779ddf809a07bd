"""Text features: BERT token features (36 x 768 with bert-base-uncased), attention mask carried through.

Any BERT-like encoder loadable by transformers' AutoModel works (bert-base-chinese for Chinese, the real
all-MiniLM-L6-v2 weights for the offline experiment in docs/results.md). Text is cut on the left when it is
longer than the window, so the newest words are kept: the live text window is the last committed ASR words,
and datasets are extracted the same way (train/serve parity).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from engines.extractor import EngineModel, Extractor, Features
from engines.hub import ModelSource, load_pretrained, resolve_model
from mcihn.spec import ModalitySpec


class _TokenFeatures(nn.Module):
    """input_ids (B, L) int64, attention_mask (B, L) int64 -> last_hidden_state (B, L, H)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class TextExtractor(Extractor):
    """Tokenizer + encoder. `extract(text)` -> Features (seq_len, hidden) with length = number of tokens
    (including [CLS] and [SEP]); text with no words gives length 0 (text absent)."""

    modality = "text"

    def __init__(self, model_id: str = "bert-base-uncased", seq_len: int = 36, revision: str | None = None):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.source: ModelSource = resolve_model(model_id, revision)
        self.seq_len = seq_len
        self.tokenizer = load_pretrained(AutoTokenizer, self.source)
        self.tokenizer.truncation_side = "left"  # keep the newest words
        self.encoder = load_pretrained(AutoModel, self.source).eval()
        hidden = int(self.encoder.config.hidden_size)
        self.spec = ModalitySpec(dim=hidden, seq_len=seq_len, extractor=self.source.model_id,
                                 revision=self.source.revision, layer="last_hidden_state",
                                 preprocessing=f"wordpiece(max={seq_len},truncate=left)")
        self._core = _TokenFeatures(self.encoder)

    def engine_model(self) -> EngineModel:
        ids = np.zeros((1, self.seq_len), dtype=np.int64)
        return EngineModel(
            name="text-encoder",
            module=self._core,
            example_inputs={"input_ids": ids, "attention_mask": np.ones_like(ids)},
            output_names=("features",),
            dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "features": {0: "batch"}},
            shape_profile={n: ((1, self.seq_len), (1, self.seq_len), (32, self.seq_len))
                           for n in ("input_ids", "attention_mask")},
        )

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        """(B, seq_len) int64 input_ids and attention_mask, padded to the window (static shapes)."""
        enc = self.tokenizer(texts, max_length=self.seq_len, truncation=True, padding="max_length",
                             return_tensors="np")
        return {name: enc[name].astype(np.int64) for name in ("input_ids", "attention_mask")}

    def extract_batch(self, texts: list[str]) -> list[Features]:
        """Several texts in one encoder call (dataset extraction)."""
        if not texts:
            return []
        inputs = self.tokenize([t.strip() for t in texts])
        hidden = self.backend.run(inputs)["features"]  # (B, seq_len, H)
        results = []
        for text, row, mask in zip(texts, hidden, inputs["attention_mask"], strict=True):
            length = int(mask.sum()) if text.strip() else 0
            values = np.zeros((self.seq_len, row.shape[-1]), dtype=np.float32)
            values[:length] = row[:length]
            results.append(Features(values, length, {"text": text.strip(), "tokens": length}))
        return results

    def extract(self, text: str) -> Features:
        return self.extract_batch([text])[0]
