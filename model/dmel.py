"""dMel: log-mel channels quantised to a few bins — the model's audio alphabet.

16 kHz audio, 50 ms Hann window (800 samples), 12.5 ms hop (200 samples), so one
200 ms micro-turn is exactly 16 frames. 80 mel channels over 80–7600 Hz of the magnitude spectrum, log10,
clamped to [-7, 2] and cut into 16 uniform bins.

Frames are causal: frame *i* covers samples [200·i − 600, 200·i + 200), i.e. it
ends where its hop ends, and the stream starts with 600 samples of silence. So a
chunk's 16 frames need only the chunk plus the 600 samples before it, and
streaming (``dmel_chunk``) computes exactly what the whole utterance would.

The user's audio may be heard at a finer step than the model speaks in
(``ModelConfig.audio_in_bins``): speech fills only about four of the 16 bins (~11 dB
each; docs/eval.md, session 26). Finer bins nest in the coarse ones — fine bin f lies
in coarse bin f // (levels // N_BINS) — so a model can grow them onto trained weights.
"""

from __future__ import annotations

import torch

SAMPLE_RATE = 16_000
WINDOW = 800  # 50 ms
HOP = 200  # 12.5 ms
N_FFT = 1024  # the window zero-padded to a power of two
N_MELS = 80
F_MIN, F_MAX = 80.0, 7600.0
LOG_MIN, LOG_MAX = -7.0, 2.0
N_BINS = 16
BIN_WIDTH = (LOG_MAX - LOG_MIN) / N_BINS
FINE_BINS = 64  # the finest input step training data keeps (2.8 dB); N_BINS times a power of two
CONTEXT = WINDOW - HOP  # samples of left context a frame needs beyond its hop


def _hz_to_mel(hz: float | torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(hz, dtype=torch.float64) / 700.0)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank() -> torch.Tensor:
    """Triangular filters, shape (N_MELS, N_FFT // 2 + 1), HTK mel scale, unit peak."""
    edges = _mel_to_hz(torch.linspace(float(_hz_to_mel(F_MIN)), float(_hz_to_mel(F_MAX)), N_MELS + 2))
    freqs = torch.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1, dtype=torch.float64)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs - lower) / (centre - lower)
    falling = (upper - freqs) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).to(torch.float32)


_FILTERBANK = mel_filterbank()
_WINDOW_FN = torch.hann_window(WINDOW, periodic=True, dtype=torch.float32)


def log_mel(audio: torch.Tensor) -> torch.Tensor:
    """Log10 mel frames of ``audio`` that already carries its 600-sample left context.

    audio: (..., CONTEXT + HOP·n) float32 -> (..., n, N_MELS), clamped to [LOG_MIN, LOG_MAX].
    """
    frames = audio.unfold(-1, WINDOW, HOP) * _WINDOW_FN  # (..., n, WINDOW)
    # Magnitude (not power): full-scale speech then peaks near 10^2 and digital
    # silence sits at the 10^-7 floor, which is the range the bins cover.
    magnitude = torch.fft.rfft(frames, n=N_FFT).abs()
    mel = magnitude @ _FILTERBANK.T
    return torch.log10(mel.clamp_min(1e-10)).clamp(LOG_MIN, LOG_MAX)


def quantize(log_mel_frames: torch.Tensor, levels: int = N_BINS) -> torch.Tensor:
    """Log-mel -> bin indices in [0, levels), int64 (``levels``: N_BINS times a power of two)."""
    check_levels(levels)
    # BIN_WIDTH scaled by a power of two is exact, so fine bins nest exactly in coarse ones.
    bins = torch.floor((log_mel_frames - LOG_MIN) / (BIN_WIDTH * N_BINS / levels)).to(torch.int64)
    return bins.clamp(0, levels - 1)


def check_levels(levels: int) -> None:
    ratio = levels // N_BINS
    if levels % N_BINS or ratio & (ratio - 1) or levels > 256:
        raise ValueError(f"levels must be {N_BINS} times a power of two, at most 256 (uint8), not {levels}")


def coarsen(bins: torch.Tensor, levels: int, to: int = N_BINS) -> torch.Tensor:
    """Bins at ``levels`` -> the bins at ``to`` levels that hold them (exact nesting)."""
    if levels % to:
        raise ValueError(f"{levels} levels do not nest in {to}")
    return bins // (levels // to) if levels != to else bins


def dequantize(bins: torch.Tensor) -> torch.Tensor:
    """Bin indices -> the log-mel value at each bin's centre (for the vocoder)."""
    return LOG_MIN + (bins.to(torch.float32) + 0.5) * BIN_WIDTH


def dmel(audio: torch.Tensor, levels: int = N_BINS) -> torch.Tensor:
    """Whole-utterance dMel: (..., samples) with samples a multiple of HOP -> (..., frames, N_MELS)."""
    if audio.shape[-1] % HOP:
        raise ValueError(f"audio length must be a multiple of {HOP} samples")
    padded = torch.nn.functional.pad(audio, (CONTEXT, 0))
    return quantize(log_mel(padded), levels)


def dmel_chunk(context: torch.Tensor, chunk: torch.Tensor, levels: int = N_BINS) -> tuple[torch.Tensor, torch.Tensor]:
    """Streaming dMel: one chunk per stream, given each stream's left context.

    context: (batch, CONTEXT) — the stream's previous 600 samples (zeros at the start);
    chunk: (batch, HOP·n). Returns (bins (batch, n, N_MELS), the next context).
    Consecutive calls give exactly ``dmel`` of the whole stream.
    """
    audio = torch.cat([context, chunk], dim=-1)
    return quantize(log_mel(audio), levels), audio[:, -CONTEXT:].clone()
