"""Model configuration: one frozen dataclass, two presets, and the token layout it implies."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

from model import dmel

# Text is bytes plus a few markers; no downloaded tokenizer.
NO_TEXT = 256  # "nothing to say in text" at an output position / an empty input slot
TASK_OPEN, TASK_CLOSE = 257, 258  # the model's request to the background model
RESULT_OPEN, RESULT_CLOSE = 259, 260  # a background result entering as text input
TEXT_VOCAB = 264  # 261 used, rounded up


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "custom"
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 1  # grouped-query attention: heads sharing each key/value head
    # Mixture of experts: routed SwiGLU experts (top-k of n) plus one shared expert.
    n_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 256
    shared_hidden: int = 256
    # Token layout of one micro-turn (16 dMel frames).
    frames_per_audio_token: int = 4
    text_in_slots: int = 4  # input text bytes per micro-turn; the rest waits its turn
    out_positions: int = 4  # output positions, each one text byte + one audio patch
    video_size: int = 80  # camera frames are resized to this square; 0 disables video
    patch: int = 40
    # Streaming memory: attention sees the first ``sinks`` tokens plus the last ``window``.
    # Keep sinks + window within the training windows (``microturn train --turns`` ×
    # ``tokens_per_turn``): served further back than it was trained, the tiny model
    # missed half the questions asked more than 8 s into a session (docs/eval.md).
    window: int = 624  # + 16 sinks = 640 tokens = 40 micro-turns = 8 s
    sinks: int = 16
    rope_base: float = 10_000.0
    # Audio output head: per-channel bin classification, or flow matching on log-mel.
    audio_head: Literal["classify", "flow"] = "classify"
    flow_hidden: int = 256
    flow_layers: int = 3
    flow_steps: int = 4
    # A flow-sampled patch whose mean quantised level is below this many bins is
    # rendered as the floor (0: never). Sampled flow silence lands near, not on, the
    # floor; fed back, that reads as speech to the trunk (docs/eval.md, session 32).
    flow_silence_gate: float = 1.0
    # A CTC head reading the user's words off the audio tokens (model/listening.py):
    # a training signal for hearing, and the eval's ``heard`` figures. Not served.
    listen_head: bool = False
    # Residual SwiGLU blocks on each user audio token before the trunk (0: none). The
    # dMel bag is additive over (frame, channel, bin); these let a token combine them
    # into sounds without spending the trunk's few layers on it (docs/eval.md, session 15).
    audio_encoder_layers: int = 0
    audio_encoder_hidden: int = 256
    # Earlier user audio tokens (50 ms each) that each token mixes in before those
    # blocks (0: none): a word spans several tokens, and the per-token blocks cannot
    # see past their own 50 ms. Streaming keeps that many tokens per session.
    audio_context: int = 0
    # Levels the user's audio is quantised to (dmel.quantize): N_BINS, or finer — speech
    # fills ~4 of the 16 bins, so more levels let the model hear 2.8 dB steps, not 11 dB.
    # The finer bins add to the coarse bins' embedding (a table starting at zero).
    audio_in_bins: int = dmel.N_BINS
    # Outputs by which the model's text leads its voice (0: a byte and the first sound
    # of it come from the same output). The data writes each byte with its sound; a
    # model trained with a lead writes it that many outputs (50 ms each) earlier, so
    # which word to say is chosen in text, and the voice follows the word already
    # written rather than sounding a blend of the candidates (docs/eval.md, session 36).
    text_lead: int = 0
    # Whether the model's own voice is fed back with its text (False: only the text).
    # Fed back, each output's sound steers the next: a word begun as a blend of the
    # candidates is finished as whichever the blend sounded like, and the sound it
    # hears is its head's rendering, never the reference it was trained on (docs/eval.md,
    # sessions 36 and 40). Without it, the voice follows the word already written.
    hears_own_voice: bool = True

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError("d_model must be divisible by n_heads")
        if self.n_heads % self.n_kv_heads:
            raise ValueError("n_heads must be a multiple of n_kv_heads")
        if self.video_size and self.video_size % self.patch:
            raise ValueError("video_size must be a multiple of patch")
        if self.audio_head not in ("classify", "flow"):
            raise ValueError(f"unknown audio_head {self.audio_head!r}")
        if self.frames_per_turn % self.frames_per_audio_token:
            raise ValueError("frames_per_audio_token must divide the 16 frames of a micro-turn")
        if self.audio_context < 0:
            raise ValueError("audio_context must be >= 0")
        dmel.check_levels(self.audio_in_bins)
        if not 0 <= self.text_lead <= self.out_positions:
            raise ValueError(f"text_lead must be 0 to {self.out_positions} outputs (one micro-turn)")
        if self.frames_per_turn % self.out_positions:
            raise ValueError("out_positions must divide the 16 frames of a micro-turn")

    # -- derived layout ----------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def frames_per_turn(self) -> int:
        return 200 * dmel.SAMPLE_RATE // 1000 // dmel.HOP  # 16

    @property
    def audio_in_tokens(self) -> int:
        return self.frames_per_turn // self.frames_per_audio_token

    @property
    def video_tokens(self) -> int:
        return (self.video_size // self.patch) ** 2 if self.video_size else 0

    @property
    def input_tokens(self) -> int:
        return self.audio_in_tokens + self.text_in_slots + self.video_tokens

    @property
    def frames_per_output(self) -> int:
        return self.frames_per_turn // self.out_positions

    @property
    def tokens_per_turn(self) -> int:
        return self.input_tokens + self.out_positions

    @property
    def max_append(self) -> int:
        """Most tokens one forward pass appends: the previous turn's last output + inputs."""
        return 1 + self.input_tokens

    # -- persistence -----------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        data: dict[str, Any] = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        return cls(**data)


PRESETS: dict[str, ModelConfig] = {
    # Trains and serves on 2 CPU cores: 6.1M parameters, 3.5M active per token (+0.2M
    # on audio tokens: the encoder, added in session 15 as the shipped checkpoint has it).
    "tiny": ModelConfig(preset="tiny", audio_encoder_layers=2),
    # The capacity step between them, trained in minutes on one GPU and still evaluated
    # on the CPU: twice tiny's width, six blocks; 22.0M parameters (docs/training.md).
    "small": ModelConfig(
        preset="small",
        d_model=256,
        n_layers=6,
        n_heads=8,
        n_kv_heads=2,
        expert_hidden=384,
        shared_hidden=384,
        audio_encoder_layers=2,
        audio_encoder_hidden=384,
    ),
    # Sized for one H100: 569M parameters, 267M active per token.
    "gpu": ModelConfig(
        preset="gpu",
        d_model=1024,
        n_layers=16,
        n_heads=16,
        n_kv_heads=4,
        n_experts=8,
        top_k=2,
        expert_hidden=1024,
        shared_hidden=2048,
        text_in_slots=8,
        video_size=160,
        window=16_384,
        sinks=64,
        flow_hidden=1024,
        flow_layers=4,
        flow_steps=8,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
    return dataclasses.replace(base, **overrides)
