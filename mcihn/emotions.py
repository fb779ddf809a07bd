"""The seven emotion labels the starter recognizer speaks, and how other label sets map onto them.

MELD's seven emotions are the shared vocabulary: the FER2013 expression model has the same seven classes under
other names, and the text model is trained on MELD. Order matters: it is the order of every score vector.
"""

from __future__ import annotations

EMOTIONS: tuple[str, ...] = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")

# FER2013's classes, in the order of the mini-Xception's outputs, and their MELD names.
FER2013_LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FER2013_TO_EMOTION: dict[str, str] = {
    "angry": "anger", "disgust": "disgust", "fear": "fear", "happy": "joy", "sad": "sadness",
    "surprise": "surprise", "neutral": "neutral",
}
