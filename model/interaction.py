"""The interaction model: early-fused inputs, MoE trunk, text and audio heads.

One micro-turn of one session, as tokens (ModelConfig gives the sizes):

    [audio_in × 4] [text_in × 4] [video × 4] | [out_0] [out_1] [out_2] [out_3]
     16 dMel frames  bytes/markers  40×40 patches  each: one text byte + one audio patch

Output tokens are generated one after another: the hidden state of a token predicts
the next output. The last input token predicts out_0; out_0's embedding (its own
byte and audio patch) predicts out_1; and so on. The last output is fed at the
start of the next micro-turn, so the sequence is the same as ``layout`` builds
for training: in_0, out_0, in_1, out_1, ...
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model import dmel, listening
from model.config import NO_TEXT, TEXT_VOCAB, ModelConfig
from model.heads import make_audio_head
from model.transformer import RMSNorm, SwiGLU, Transformer

ROLE_AUDIO_IN, ROLE_TEXT_IN, ROLE_VIDEO, ROLE_OUTPUT = range(4)


class AudioBag(nn.Module):
    """A token from several dMel frames: the sum of one embedding per (frame, channel, bin)."""

    def __init__(self, frames: int, dim: int, levels: int = dmel.N_BINS, std: float = 0.02) -> None:
        super().__init__()
        self.frames = frames
        self.table = nn.Parameter(torch.randn(frames * dmel.N_MELS * levels, dim) * std)
        offsets = torch.arange(frames * dmel.N_MELS) * levels
        self.register_buffer("offsets", offsets, persistent=False)

    def forward(self, bins: torch.Tensor) -> torch.Tensor:
        """bins (..., frames·k, mels) -> (..., k, dim)."""
        lead = bins.shape[:-2]
        grouped = bins.reshape(-1, self.frames * dmel.N_MELS) + self.offsets
        return F.embedding_bag(grouped, self.table, mode="sum").view(*lead, -1, self.table.shape[1])


class AudioContext(nn.Module):
    """Mixes each user audio token with the ``span`` tokens before it: a causal
    depthwise convolution in time, so a sound longer than one 50 ms token can be
    formed before the trunk. Streaming carries the last ``span`` (normed) tokens from
    one micro-turn to the next. The output projection starts at zero: grown onto a
    trained model, it changes no output until it is trained."""

    def __init__(self, dim: int, span: int) -> None:
        super().__init__()
        self.span, self.dim = span, dim
        if span:
            self.norm = RMSNorm(dim)
            self.taps = nn.Parameter(torch.randn(span + 1, dim) / (span + 1) ** 0.5)  # oldest first
            self.out = nn.Linear(dim, dim, bias=False)
            nn.init.zeros_(self.out.weight)

    def start(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """The context before a conversation's first token: (n, span, dim) zeros."""
        return torch.zeros(n, self.span, self.dim, device=device)

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (n, k, d), past (n, span, d) from the previous call (None: the start)
        -> (x with its context mixed in, the past the next call needs)."""
        if not self.span:
            return x, x[:, :0]
        if past is None:
            past = self.start(x.shape[0], x.device)
        seen = torch.cat([past.to(x.dtype), self.norm(x)], dim=1)  # (n, span + k, d)
        k = x.shape[1]
        # A sum of shifted copies, not Conv1d: elementwise, so each row's result does
        # not depend on the batch around it (batch invariance, as the trunk keeps).
        mixed = sum(self.taps[j] * seen[:, j : j + k] for j in range(self.span + 1))
        return x + self.out(F.silu(mixed)), seen[:, k:]


class AudioEncoder(nn.Module):
    """Pre-norm residual SwiGLU blocks applied to each audio token on its own (no mixing
    in time, so streaming needs no state). Each block's output projection starts at
    zero: added to a trained model, the encoder changes no output until it is trained."""

    def __init__(self, dim: int, layers: int, hidden: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(RMSNorm(dim) for _ in range(layers))
        self.blocks = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(layers))
        for block in self.blocks:
            nn.init.zeros_(block.down.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block in zip(self.norms, self.blocks, strict=True):
            x = x + block(norm(x))
        return x


class VideoStem(nn.Module):
    """hMLP stem: each 40×40 patch -> one token, in three non-overlapping stages
    (4×4, then 2×2, then 5×5 pixels; kernel = stride, so patches never mix).
    LayerNorm, not BatchNorm: a frame's tokens never depend on the rest of the batch."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.d_model // 4, config.d_model // 4, config.d_model]
        self.stages = nn.ModuleList()
        channels = 3
        for kernel, width in zip((4, 2, 5), widths, strict=True):
            self.stages.append(nn.ModuleDict({
                "proj": nn.Linear(channels * kernel * kernel, width),
                "norm": nn.LayerNorm(width),
            }))
            channels = width
        self.kernels = (4, 2, 5)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (n, 3, S, S) in [0, 1] -> (n, (S/40)², d)."""
        n, s = frames.shape[0], self.config.video_size
        grid = s // self.config.patch
        x = frames.permute(0, 2, 3, 1)  # (n, S, S, C)
        for kernel, stage in zip(self.kernels, self.stages, strict=True):
            h, w, c = x.shape[1] // kernel, x.shape[2] // kernel, x.shape[3]
            x = x.reshape(n, h, kernel, w, kernel, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, -1)
            x = F.gelu(stage["norm"](stage["proj"](x)))
        return x.reshape(n, grid * grid, -1)


class InteractionModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.audio_in = AudioBag(config.frames_per_audio_token, d)
        if config.audio_in_bins > dmel.N_BINS:  # starts at zero: grown onto a model, changes nothing yet
            self.audio_in_fine = AudioBag(config.frames_per_audio_token, d, config.audio_in_bins, std=0.0)
        # Off (span 0, 0 layers), each holds no weights and passes tokens through.
        self.audio_context = AudioContext(d, config.audio_context)
        self.audio_encoder = AudioEncoder(d, config.audio_encoder_layers, config.audio_encoder_hidden)
        if config.hears_own_voice:
            self.audio_out = AudioBag(config.frames_per_output, d)
        self.text = nn.Embedding(TEXT_VOCAB, d)
        self.roles = nn.Embedding(4, d)
        if config.video_tokens:
            self.video = VideoStem(config)
            self.no_video = nn.Parameter(torch.zeros(config.video_tokens, d))
        self.trunk = Transformer(config)
        self.text_head = nn.Linear(d, TEXT_VOCAB)
        self.audio_head = make_audio_head(config)
        if config.listen_head:
            self.listen_head = nn.Sequential(RMSNorm(d), nn.Linear(d, listening.VOCAB))
        nn.init.normal_(self.text.weight, std=0.02)

    def resize_video(self, frame: torch.Tensor) -> torch.Tensor:
        """(3, H, W) float in [0, 1] -> (3, S, S), the model's video size."""
        size = self.config.video_size
        return F.interpolate(frame[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]

    def encode_audio(self, bins: torch.Tensor, past: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """User audio tokens: bins (n, frames·k, mels) at ``config.audio_in_bins`` levels
        -> ((n, k, d), the context the next call needs). ``past`` is the previous call's
        (None: a conversation's start); one call over many micro-turns equals one call
        per micro-turn."""
        levels = self.config.audio_in_bins
        tokens = self.audio_in(dmel.coarsen(bins, levels))
        if levels > dmel.N_BINS:
            tokens = tokens + self.audio_in_fine(bins)
        tokens, past = self.audio_context(tokens, past)
        return self.audio_encoder(tokens) + self.roles.weight[ROLE_AUDIO_IN], past

    def embed_inputs(self, audio: torch.Tensor, text: torch.Tensor, video: torch.Tensor | None,
                     has_video: torch.Tensor | None = None) -> torch.Tensor:
        """One micro-turn's inputs for n sessions -> (n, input_tokens, d).

        audio (n, audio_in_tokens, d) from ``encode_audio``; text (n, text_in_slots)
        ids; video (n, 3, S, S) or None; has_video (n,) bool: rows without a camera
        frame get the learned "no video".
        """
        roles = self.roles.weight
        parts = [audio, self.text(text) + roles[ROLE_TEXT_IN]]
        if self.config.video_tokens:
            n = audio.shape[0]
            tokens = self.no_video.expand(n, -1, -1)
            if video is not None:
                seen = self.video(video)[:n]  # the caller may pad the batch (batch invariance)
                mask = has_video[:n].view(n, 1, 1) if has_video is not None else torch.ones(n, 1, 1, dtype=torch.bool)
                tokens = torch.where(mask, seen, tokens)
            parts.append(tokens + roles[ROLE_VIDEO])
        return torch.cat(parts, dim=1)

    def embed_outputs(self, text: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
        """Generated outputs fed back: text ids (n,), log-mel (n, frames, mels) -> (n, d)."""
        embedded = self.text(text) + self.roles.weight[ROLE_OUTPUT]
        if not self.config.hears_own_voice:
            return embedded
        return embedded + self.audio_out(dmel.quantize(mel)).squeeze(-2)

    def embed_output_targets(self, text: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: text (..., k) ids and bins (..., k·frames, mels) -> (..., k, d)."""
        embedded = self.text(text) + self.roles.weight[ROLE_OUTPUT]
        if not self.config.hears_own_voice:
            return embedded
        return embedded + self.audio_out(bins)

    def layout(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """Interleave micro-turns into one sequence (training, and the streaming reference).

        inputs (b, turns, input_tokens, d) and outputs (b, turns, out_positions, d)
        -> (b, turns·tokens_per_turn, d): in_0, out_0, in_1, out_1, ...
        """
        b, turns = inputs.shape[:2]
        return torch.cat([inputs, outputs], dim=2).reshape(b, turns * self.config.tokens_per_turn, -1)

    def predictor_positions(self, turns: int) -> torch.Tensor:
        """(turns, out_positions): the sequence index whose hidden state predicts each output."""
        c = self.config
        base = torch.arange(turns)[:, None] * c.tokens_per_turn + c.input_tokens - 1
        return base + torch.arange(c.out_positions)[None, :]

    def audio_positions(self, turns: int) -> torch.Tensor:
        """(turns·audio_in_tokens,): the sequence index of every audio input token, in time order."""
        c = self.config
        base = torch.arange(turns)[:, None] * c.tokens_per_turn
        return (base + torch.arange(c.audio_in_tokens)[None, :]).reshape(-1)


def no_text(n: int, slots: int) -> torch.Tensor:
    return torch.full((n, slots), NO_TEXT, dtype=torch.int64)


def choose_text(logits: torch.Tensor, write_threshold: float | None = None,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Text ids from text-head logits (n, vocab): greedy, or in two stages.

    Greedy keeps quiet (NO_TEXT) whenever NO_TEXT beats every single byte, so at
    the start of an answer whose probability is spread over several first letters
    ('s' for six, 'e' for eight) silence wins even when writing is likelier in all.
    With ``write_threshold`` the model first decides whether to write — when all
    bytes together have at least that probability — and then writes the likeliest
    byte: a threshold on "take the turn", as turn-taking detectors use.
    ``allowed`` (n, vocab) bool, from ``model.lexicon``, limits which byte is
    written; whether to write is decided on the model's own logits first, either way.
    """
    if write_threshold is None:
        if allowed is None:
            return logits.argmax(-1)
        writing = logits.argmax(-1) != NO_TEXT
    else:
        writing = 1 - torch.softmax(logits.float(), -1)[:, NO_TEXT] >= write_threshold
    bytes_only = logits.clone() if allowed is None else logits.masked_fill(~allowed, float("-inf"))
    bytes_only[:, NO_TEXT] = float("-inf")
    return torch.where(writing, bytes_only.argmax(-1), NO_TEXT)
