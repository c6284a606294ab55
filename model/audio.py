"""Whole-signal resampling with PyAV (the same library the server streams through)."""

from __future__ import annotations

import numpy as np


def resample_mono(audio: np.ndarray, rate_in: int, rate_out: int, fmt: str = "flt") -> np.ndarray:
    """Mono ``audio`` (float, [-1, 1]) from ``rate_in`` to ``rate_out``, as ``fmt``
    ("flt": float32, "s16": int16), the resampler's tail flushed."""
    if rate_in == rate_out and fmt == "flt":
        return audio.astype(np.float32)
    import av  # here, not at the top: training from a full cache needs no PyAV (bench/gpu_check.sh)

    frame = av.AudioFrame.from_ndarray(audio.astype(np.float32).reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = rate_in
    resampler = av.AudioResampler(format=fmt, layout="mono", rate=rate_out)
    parts = [o.to_ndarray()[0] for o in (*resampler.resample(frame), *resampler.resample(None))]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32 if fmt == "flt" else np.int16)
