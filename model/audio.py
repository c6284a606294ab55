"""Whole-signal resampling: PyAV (the library the server streams through) by default,
or a windowed-sinc resampler in numpy where PyAV is not installed.

The lent GPU machine has no PyAV, and its 35.8 MB wheel would crowd out the weights a
continued training run carries there (bench/gpu_check.sh), so the conversations made
there set ``MICROTURN_RESAMPLER=sinc``. The two agree to within a fraction of a percent
of the signal (tests/test_audio_resampling.py) but not bit for bit, so the training cache
keeps what each makes apart (``model.train.cache_name``), and evaluation refuses the
numpy one, so that every figure in docs/eval.md is of the same sound.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

import numpy as np

RESAMPLERS = ("av", "sinc")


def resampler() -> str:
    """The resampler this process uses, from ``MICROTURN_RESAMPLER`` (default ``av``)."""
    name = os.environ.get("MICROTURN_RESAMPLER", "av")
    if name not in RESAMPLERS:
        raise ValueError(f"MICROTURN_RESAMPLER={name!r}: expected one of {', '.join(RESAMPLERS)}")
    return name


def require_pyav(what: str) -> None:
    """Refuse the numpy resampler where ``what`` is evaluated: every figure in
    docs/eval.md is of PyAV-resampled sound."""
    if (name := resampler()) != "av":
        raise ValueError(f"MICROTURN_RESAMPLER={name}: {what} are made with PyAV, "
                         "so that every evaluation is of the same sound; unset it to evaluate")


def resample_mono(audio: np.ndarray, rate_in: int, rate_out: int, fmt: str = "flt") -> np.ndarray:
    """Mono ``audio`` (float, [-1, 1]) from ``rate_in`` to ``rate_out``, as ``fmt``
    ("flt": float32, "s16": int16), the resampler's tail flushed."""
    if rate_in == rate_out and fmt == "flt":
        return audio.astype(np.float32)
    if resampler() == "sinc":
        out = audio.astype(np.float32) if rate_in == rate_out else resample_sinc(audio, rate_in, rate_out)
        return out if fmt == "flt" else np.clip(np.round(out * 32768), -32768, 32767).astype(np.int16)
    import av  # here, not at the top: training from a full cache needs no PyAV (bench/gpu_check.sh)

    frame = av.AudioFrame.from_ndarray(audio.astype(np.float32).reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = rate_in
    converter = av.AudioResampler(format=fmt, layout="mono", rate=rate_out)
    parts = [o.to_ndarray()[0] for o in (*converter.resample(frame), *converter.resample(None))]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32 if fmt == "flt" else np.int16)


def resample_sinc(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling with a Kaiser-windowed sinc (``_sinc_filters``). No
    delay, and ``ceil(n * rate_out / rate_in)`` samples out, as PyAV gives (to one)."""
    audio = np.asarray(audio, dtype=np.float64)
    common = math.gcd(rate_in, rate_out)
    up, down = rate_out // common, rate_in // common
    n_out = -(-audio.size * up // down)  # ceil, in integers
    filters = _sinc_filters(up, down)
    reach = filters.shape[1] // 2
    # Output j sits at input time j * down / up: sample (j * down) // up plus one of
    # `up` phases, each with its own filter.
    position = np.arange(n_out, dtype=np.int64) * down
    padded = np.pad(audio, (reach, reach + 1))  # padded[i + reach] is audio[i], zeros beyond
    out = np.empty(n_out, np.float64)
    for first in range(0, n_out, 8192):  # in blocks: the gathered taps stay a few MB
        block = position[first : first + 8192]
        taps = (block // up)[:, None] + np.arange(2 * reach + 1)[None, :]  # audio[nearest - reach ...]
        out[first : first + block.size] = np.einsum("ij,ij->i", padded[taps], filters[block % up])
    return out.astype(np.float32)


@lru_cache(maxsize=8)  # a conversation uses two rate pairs: espeak-ng's, and its voice's stretch
def _sinc_filters(up: int, down: int, zero_crossings: int = 16, cutoff: float = 0.97,
                  beta: float = 8.6) -> np.ndarray:
    """(up, taps) filters, one per output phase, for resampling by ``up / down``: the
    low-pass at ``cutoff`` of the lower rate's Nyquist, ``zero_crossings`` lobes each side."""
    band = cutoff * min(up, down) / down  # the pass band, as a fraction of the input's Nyquist
    half_width = zero_crossings / band  # in input samples, each side
    reach = math.ceil(half_width)
    distance = np.arange(up)[:, None] / up - np.arange(-reach, reach + 1)[None, :]
    window = np.i0(beta * np.sqrt(np.clip(1 - (distance / half_width) ** 2, 0, None))) / np.i0(beta)
    filters = band * np.sinc(band * distance) * window * (np.abs(distance) <= half_width)
    filters.flags.writeable = False  # shared by every call through the cache
    return filters
