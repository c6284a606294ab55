"""The interaction model as a serving engine: many sessions, one batched step.

Implements ``model.interface.MicroTurnModel``. Each session owns a KV pool slot
and a little streaming state (dMel left context, vocoder phase, the output token
waiting to be fed, queued input text, its own random generator). A step runs
``out_positions`` forward passes over the whole batch: the first appends every
session's new input tokens to its cache, each later one a single output token.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from model import dmel
from model.config import NO_TEXT, preset
from model.interaction import InteractionModel
from model.interface import TurnInput, TurnOutput
from model.kv import KVPool
from model.text import Decoder, encode
from model.transformer import ROW_MULTIPLE, Segment, StreamBatch, pad_rows
from model.vocoder import VocoderState, vocode_chunk
from model.weights import load_checkpoint


@dataclass
class _Session:
    session_id: str  # its KV slot can move (the pool keeps slots packed): look it up
    generator: torch.Generator
    dmel_context: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dmel.CONTEXT))
    vocoder: VocoderState = field(default_factory=VocoderState.silence)
    pending: torch.Tensor | None = None  # (1, d): last output of the previous micro-turn
    text_queue: list[int] = field(default_factory=list)  # input text ids waiting for a slot
    decoder: Decoder = field(default_factory=Decoder)


class StreamingModel:
    """The ``model`` engine. Every method is called from the engine thread only."""

    name = "model"

    def __init__(self, model: InteractionModel, max_sessions: int = 64, seed: int = 0,
                 temperature: float = 0.0, weights: str = "random", device: str = "cpu",
                 attention: str | None = None) -> None:
        # On CUDA: weights fp32, compute and the KV pool in bf16 (autocast). Features,
        # sampling generators and the vocoder stay on the CPU: small per-session work.
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else contextlib.nullcontext())
        self.pool = KVPool(self.config, max_sessions, self.device,
                           torch.bfloat16 if self.device.type == "cuda" else torch.float32, attention)
        self.seed = seed
        self.temperature = temperature
        self.weights = weights  # what the page shows: "random" or the checkpoint's name
        self._sessions: dict[str, _Session] = {}

    def open_session(self, session_id: str) -> None:
        self.pool.open(session_id)
        # Seeded from the session id (not Python's salted hash): reproducible runs.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(session_id.encode()))
        self._sessions[session_id] = _Session(session_id, generator)

    def close_session(self, session_id: str) -> None:
        if self._sessions.pop(session_id, None) is not None:
            self.pool.close(session_id)

    @torch.inference_mode()
    def step(self, batch: Sequence[TurnInput]) -> list[TurnOutput]:
        with self.autocast:
            return self._step(batch)

    def _step(self, batch: Sequence[TurnInput]) -> list[TurnOutput]:
        sessions = [self._sessions[chunk.session_id] for chunk in batch]
        model, config = self.model, self.config
        n = len(batch)

        audio = torch.from_numpy(np.stack([chunk.audio for chunk in batch]))
        contexts = torch.cat([s.dmel_context for s in sessions])
        bins, contexts = dmel.dmel_chunk(contexts, audio)
        for i, session in enumerate(sessions):
            session.dmel_context = contexts[i : i + 1]
        text = self._take_text(batch, sessions)
        video, has_video = self._video(batch)
        device = self.device
        inputs = model.embed_inputs(bins.to(device), text.to(device), video if video is None else video.to(device),
                                    has_video if has_video is None else has_video.to(device))

        first = [inputs[i] if s.pending is None else torch.cat([s.pending, inputs[i]]) for i, s in enumerate(sessions)]
        hidden = self._forward(sessions, first)
        texts, mels = [], []
        for position in range(config.out_positions):
            text_ids = model.text_head(pad_rows(hidden))[:n].argmax(-1)
            mel = model.audio_head.sample(hidden, [s.generator for s in sessions], self.temperature)
            texts.append(text_ids)
            mels.append(mel)
            fed_back = model.embed_outputs(text_ids, mel)
            if position + 1 < config.out_positions:
                hidden = self._forward(sessions, [fed_back[i : i + 1] for i in range(n)])
        for i, session in enumerate(sessions):
            session.pending = fed_back[i : i + 1].clone()

        voice, states = vocode_chunk(VocoderState.stack([s.vocoder for s in sessions]),
                                     torch.cat(mels, dim=1).float().cpu())
        for session, state in zip(sessions, states.unstack(), strict=True):
            session.vocoder = state
        spoken = torch.stack(texts, dim=1).cpu()  # (n, out_positions)
        return [
            TurnOutput(chunk.session_id, chunk.turn, voice[i].clamp(-1, 1).numpy().astype(np.float32),
                       session.decoder.decode(spoken[i].tolist()))
            for i, (chunk, session) in enumerate(zip(batch, sessions, strict=True))
        ]

    def _forward(self, sessions: list[_Session], tokens: list[torch.Tensor]) -> torch.Tensor:
        """Append each session's new tokens; return each session's last hidden state (n, d)."""
        segments, positions, start = [], [], 0
        for session, new in zip(sessions, tokens, strict=True):
            slot = self.pool.slot(session.session_id)
            index, pos = self.pool.reserve(slot, new.shape[0])
            segments.append(Segment(slot, start, new.shape[0], index))
            positions.append(pos)
            start += new.shape[0]
        rows = pad_rows(torch.cat(tokens))
        row_positions = torch.zeros(rows.shape[0], dtype=torch.int64, device=rows.device)
        row_positions[:start] = torch.cat(positions)
        hidden = self.model.trunk.forward_stream(rows, StreamBatch(segments, row_positions), self.pool)
        return hidden[[seg.start + seg.count - 1 for seg in segments]]

    def _take_text(self, batch: Sequence[TurnInput], sessions: list[_Session]) -> torch.Tensor:
        """Up to ``text_in_slots`` queued bytes per session; the rest waits for later turns."""
        slots = self.config.text_in_slots
        ids = torch.full((len(batch), slots), NO_TEXT, dtype=torch.int64)
        for i, (chunk, session) in enumerate(zip(batch, sessions, strict=True)):
            if chunk.text:
                session.text_queue += encode(chunk.text)
            taken = session.text_queue[:slots]
            del session.text_queue[:slots]
            ids[i, : len(taken)] = torch.tensor(taken, dtype=torch.int64)
        return ids

    def _video(self, batch: Sequence[TurnInput]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.config.video_tokens or all(chunk.video is None for chunk in batch):
            return None, None
        size = self.config.video_size
        frames = torch.zeros(len(batch), 3, size, size)
        has_video = torch.zeros(len(batch), dtype=torch.bool)
        for i, chunk in enumerate(batch):
            if chunk.video is not None:
                rgb = torch.from_numpy(np.ascontiguousarray(chunk.video)).permute(2, 0, 1).float() / 255
                frames[i] = self.model.resize_video(rgb)
                has_video[i] = True
        extra = (-len(batch)) % ROW_MULTIPLE  # keep the stem's matmuls batch-invariant
        return torch.cat([frames, frames.new_zeros(extra, 3, size, size)]), torch.cat(
            [has_video, has_video.new_zeros(extra)])


def load_engine(checkpoint: str | None = None, max_sessions: int = 64, device: str = "cpu") -> StreamingModel:
    """The interaction model as an engine: a checkpoint directory, or the tiny
    preset with seeded random weights when there is none."""
    if checkpoint:
        return StreamingModel(load_checkpoint(checkpoint), max_sessions,
                              weights=os.path.basename(checkpoint.rstrip("/")), device=device)
    torch.manual_seed(0)
    return StreamingModel(InteractionModel(preset("tiny")), max_sessions, weights="random", device=device)
