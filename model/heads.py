"""Output heads: a text byte and an audio patch (several mel frames) per output position.

Two audio heads behind one interface (``loss`` for training, ``sample`` for
serving), chosen by ``ModelConfig.audio_head``:
- ``ClassifyHead``: each (frame, mel channel) is a 16-way softmax over the dMel bins;
- ``FlowHead``: flow matching on normalised log-mel — a small MLP conditioned on
  the hidden state through adaLN, sampled with a few Euler steps.
Sampling takes one generator per session, so a session's draw never depends on
who else is in the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model import dmel
from model.config import ModelConfig
from model.transformer import pad_rows

# Log-mel is normalised to roughly unit scale for the flow head.
_MEL_CENTRE = (dmel.LOG_MIN + dmel.LOG_MAX) / 2
_MEL_SCALE = (dmel.LOG_MAX - dmel.LOG_MIN) / 2


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (n,), each counted ``weights`` (n,) times (plain mean if None)."""
    if weights is None:
        return values.mean()
    return (values * weights).sum() / weights.sum()


class ClassifyHead(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.frames = config.frames_per_output
        self.proj = nn.Linear(config.d_model, self.frames * dmel.N_MELS * dmel.N_BINS)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden).view(-1, self.frames, dmel.N_MELS, dmel.N_BINS)

    def loss(self, hidden: torch.Tensor, target_bins: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (n, d), target_bins (n, frames, mels) -> cross-entropy, averaged per
        row with ``weights`` (n,) if given."""
        per_bin = F.cross_entropy(self.logits(hidden).reshape(-1, dmel.N_BINS), target_bins.reshape(-1),
                                  reduction="none")
        return weighted_mean(per_bin.view(hidden.shape[0], -1).mean(-1), weights)

    def sample(self, hidden: torch.Tensor, generators: list[torch.Generator] | None = None,
               temperature: float = 0.0) -> torch.Tensor:
        """-> log-mel (n, frames, mels)."""
        logits = self.logits(pad_rows(hidden))[: hidden.shape[0]]
        if temperature <= 0 or generators is None:
            bins = logits.argmax(-1)
        else:
            # Sessions' generators live on the CPU (reproducible on any device): sample there.
            probs = torch.softmax(logits.float() / temperature, -1).cpu()
            bins = torch.stack([
                torch.multinomial(p.reshape(-1, dmel.N_BINS), 1, generator=g).view(p.shape[:-1])
                for p, g in zip(probs, generators, strict=True)
            ]).to(hidden.device)
        return dmel.dequantize(bins)


class _AdaLNLayer(nn.Module):
    def __init__(self, width: int, cond: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.modulation = nn.Linear(cond, 3 * width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(cond).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class FlowHead(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.frames = config.frames_per_output
        self.steps = config.flow_steps
        self.silence_gate = config.flow_silence_gate
        size = self.frames * dmel.N_MELS
        width = config.flow_hidden
        self.inp = nn.Linear(size, width)
        self.cond = nn.Linear(config.d_model + width, width)
        self.layers = nn.ModuleList(_AdaLNLayer(width, width) for _ in range(config.flow_layers))
        self.out = nn.Linear(width, size)
        self.time_width = width

    def _time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        half = self.time_width // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
        angles = t[:, None] * 1000.0 * freqs
        return torch.cat([angles.sin(), angles.cos()], -1)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        cond = F.silu(self.cond(torch.cat([hidden, self._time_embedding(t)], -1)))
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h, cond)
        return self.out(h)

    def loss(self, hidden: torch.Tensor, target_bins: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
        target = (dmel.dequantize(target_bins).flatten(1) - _MEL_CENTRE) / _MEL_SCALE
        noise = torch.randn_like(target)
        t = torch.rand(target.shape[0], device=target.device)
        x_t = (1 - t[:, None]) * noise + t[:, None] * target
        per_row = (self.velocity(x_t, t, hidden) - (target - noise)).pow(2).mean(-1)
        return weighted_mean(per_row, weights)

    def sample(self, hidden: torch.Tensor, generators: list[torch.Generator] | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        n, size = hidden.shape[0], self.frames * dmel.N_MELS
        if generators is None:
            x = torch.zeros(n, size, device=hidden.device)
        else:
            x = torch.stack([torch.randn(size, generator=g) for g in generators]).to(hidden.device)
        # Rows padded like the trunk's (batch invariance, see transformer.py).
        x, hidden = pad_rows(x * temperature), pad_rows(hidden)
        for i in range(self.steps):
            t = torch.full((x.shape[0],), i / self.steps, device=hidden.device)
            x = x + self.velocity(x, t, hidden) / self.steps
        mel = (x[:n] * _MEL_SCALE + _MEL_CENTRE).clamp(dmel.LOG_MIN, dmel.LOG_MAX).view(n, self.frames, dmel.N_MELS)
        if self.silence_gate > 0:  # near-floor patches become the floor, as the classify head renders it
            quiet = dmel.quantize(mel).float().flatten(1).mean(-1) < self.silence_gate
            mel = torch.where(quiet[:, None, None], dmel.dequantize(torch.zeros_like(mel)), mel)
        return mel


def make_audio_head(config: ModelConfig) -> nn.Module:
    return ClassifyHead(config) if config.audio_head == "classify" else FlowHead(config)
