"""Shared fixtures: tiny stand-in extractor models, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def standin_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random CLIP / BERT / Wav2Vec2 saved with save_pretrained: modality -> model folder."""
    from engines.standins import build_standins

    return build_standins(tmp_path_factory.mktemp("standins"), "tiny")
