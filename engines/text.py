"""Text features: BERT token features (36 x 768 with bert-base-uncased), attention mask carried through.

Any BERT-like encoder loadable by transformers' AutoModel works (bert-base-chinese for Chinese, the real
all-MiniLM-L6-v2 weights for the offline experiment in docs/results.md). Text is cut on the left when it is
longer than the window, so the newest words are kept: the live text window is the last committed ASR words,
and datasets are extracted the same way (train/serve parity).

Dialogue context (`context_turns` > 0, `mcihn extract-text --context K`; docs/mcn_cl.md, "Dialogue context"):
the encoder reads `[CLS] target [SEP] context [SEP]`, the context being the K preceding utterances of the
dialogue, newest first, cut on the right (the oldest words go first) to fit `context_window` tokens; the target
is cut only as without context (its newest seq_len - 2 wordpieces). Only the target's positions ([CLS], its
wordpieces, its [SEP]) are kept: the features have the same (seq_len, hidden) shape and the same length as
without context, their values conditioned on the context by the encoder's attention.
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

    def __init__(self, model_id: str = "bert-base-uncased", seq_len: int = 36, revision: str | None = None,
                 context_turns: int = 0, context_window: int = 128):
        super().__init__()
        if context_turns < 0 or (context_turns and context_window < seq_len + 2):
            raise ValueError(f"context needs turns >= 0 and a window of at least seq_len + 2 = {seq_len + 2} "
                             f"tokens, got turns {context_turns}, window {context_window}")
        self.context_turns, self.context_window = context_turns, context_window
        from transformers import AutoModel, AutoTokenizer

        self.source: ModelSource = resolve_model(model_id, revision)
        self.seq_len = seq_len
        self.tokenizer = load_pretrained(AutoTokenizer, self.source)
        self.tokenizer.truncation_side = "left"  # keep the newest words
        self.encoder = load_pretrained(AutoModel, self.source).eval()
        hidden = int(self.encoder.config.hidden_size)
        self.spec = ModalitySpec(dim=hidden, seq_len=seq_len, extractor=self.source.model_id,
                                 revision=self.source.revision, layer="last_hidden_state",
                                 preprocessing=f"wordpiece(max={seq_len},truncate=left)"
                                 + (context_preprocessing(context_turns, context_window) if context_turns else ""))
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

    def tokenize_with_context(self, texts: list[str], contexts: list[list[str]]) -> dict[str, np.ndarray]:
        """(B, W) int64 input_ids and attention_mask of `[CLS] target [SEP] context [SEP]` (W: the longest row, at
        most context_window); the target as `tokenize` cuts it (its newest seq_len - 2 wordpieces), the context
        (turns newest first, joined by [SEP]) cut on the right to what is left of the window. A text without
        context, or without words, is encoded as `tokenize` encodes it."""
        tok = self.tokenizer
        rows = []
        for text, context in zip(texts, contexts, strict=True):
            target = tok(text, add_special_tokens=False)["input_ids"][-(self.seq_len - 2):] if text else []
            turns = [t.strip() for t in context[: self.context_turns] if t.strip()]
            room = self.context_window - len(target) - 3
            joined = f" {tok.sep_token} ".join(turns)
            second = tok(joined, add_special_tokens=False)["input_ids"][:room] if turns else []
            # BERT's pair layout (the encoders here are BERT-like: AutoModel over wordpieces).
            first = [tok.cls_token_id, *target, tok.sep_token_id]
            rows.append([*first, *second, tok.sep_token_id] if second and target else first)
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), tok.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        return {"input_ids": ids, "attention_mask": mask}

    def extract_batch(self, texts: list[str], contexts: list[list[str]] | None = None) -> list[Features]:
        """Several texts in one encoder call (dataset extraction); `contexts`: each text's preceding utterances,
        newest first (only with context_turns > 0)."""
        if not texts:
            return []
        if contexts is not None and not self.context_turns:
            raise ValueError("contexts given to a text extractor made without context_turns")
        texts = [t.strip() for t in texts]
        if self.context_turns:
            inputs = self.tokenize_with_context(texts, contexts if contexts is not None else [[]] * len(texts))
            # The target's positions: [CLS], its wordpieces, [SEP] (the first segment of every row).
            targets = self.tokenize(texts)
            hidden = self.backend.run(inputs)["features"][:, : self.seq_len]  # (B, <= seq_len, H)
            inputs = {"attention_mask": targets["attention_mask"]}
        else:
            inputs = self.tokenize(texts)
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


def context_preprocessing(turns: int, window: int) -> str:
    """The spec's record of dialogue context (appended to the text preprocessing; `context_turns` reads it)."""
    return f"+context(turns={turns},window={window},newest-first,second-segment,target-positions)"
