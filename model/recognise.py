"""Did the model say the right word? Two closed-vocabulary judges of one-word answers.

- ``nearest_word`` (primary): dynamic time warping of the reply's log-mel frames
  against each candidate word as the model's own voice says it (model/conversations.py
  MODEL_VOICE); the nearest wins. The model was taught that voice, so its ceiling
  is ~1.0 and a wrong word, mumble or silence loses — a 21-way choice.
- ``recognise`` (independent): pocketsphinx (its English model ships inside the
  wheel) with a grammar of the candidate words. It does not hear every clean
  espeak-ng word right (16 of the 21 number words; 0.63 of reference replies in
  context), so it is reported beside its own ceiling, the reference track.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from model.interface import SAMPLE_RATE


def _features(audio: np.ndarray) -> np.ndarray:
    """Log-mel frames (12.5 ms hop), mean-normalised per channel, unit length per frame."""
    import torch

    from model import dmel

    samples = audio[: audio.size // dmel.HOP * dmel.HOP]
    frames = dmel.log_mel(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))[None])[0].numpy()
    frames = frames - frames.mean(axis=0, keepdims=True)
    return frames / (np.linalg.norm(frames, axis=1, keepdims=True) + 1e-6)


def dtw_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine distance along the best monotone alignment of two frame sequences."""
    cost = 1.0 - a @ b.T
    n, m = cost.shape
    total = np.full((n + 1, m + 1), np.inf)
    total[0, 0] = 0.0
    for i in range(1, n + 1):
        row, prev = total[i], total[i - 1]
        for j in range(1, m + 1):
            row[j] = cost[i - 1, j - 1] + min(prev[j], row[j - 1], prev[j - 1])
    return float(total[n, m] / (n + m))


@functools.cache
def _templates(vocabulary: tuple[str, ...]) -> dict[str, np.ndarray]:
    from model.conversations import MODEL_VOICE, speak

    return {word: _features(speak(f"{word}.", MODEL_VOICE)) for word in vocabulary}


def nearest_word(audio: np.ndarray, vocabulary: Sequence[str]) -> str:
    """The vocabulary word whose model-voice rendering ``audio`` is nearest to ("" if silent)."""
    from model.conversations import trim_silence

    speech = trim_silence(audio)
    if speech.size < SAMPLE_RATE // 10:
        return ""
    heard = _features(speech)
    distances = {word: dtw_distance(heard, template) for word, template in _templates(tuple(vocabulary)).items()}
    return min(distances, key=distances.__getitem__)


def available() -> bool:
    try:
        import pocketsphinx  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _decoder(vocabulary: tuple[str, ...]):  # type: ignore[no-untyped-def]
    from pocketsphinx import Decoder

    decoder = Decoder(samprate=SAMPLE_RATE, lm=None, logfn="/dev/null")
    grammar = "#JSGF V1.0;\ngrammar answer;\npublic <answer> = " + " | ".join(vocabulary) + ";\n"
    decoder.add_jsgf_string("answer", grammar)
    decoder.activate_search("answer")
    return decoder


def recognise(audio: np.ndarray, vocabulary: Sequence[str]) -> str:
    """The vocabulary word heard in ``audio`` (16 kHz mono float32), or "" for none."""
    decoder = _decoder(tuple(vocabulary))
    padded = np.concatenate([np.zeros(SAMPLE_RATE // 10, np.float32), audio, np.zeros(SAMPLE_RATE // 10, np.float32)])
    peak = float(np.abs(padded).max()) or 1.0
    pcm = (padded / peak * 0.5 * 32767).astype(np.int16).tobytes()  # level-normalised
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)
    decoder.end_utt()
    hypothesis = decoder.hyp()
    return hypothesis.hypstr.strip() if hypothesis is not None else ""
