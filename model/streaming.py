"""The interaction model as a serving engine: many sessions, one batched step.

Implements ``model.interface.MicroTurnModel``. Each session owns a KV pool slot
and a little streaming state (dMel left context, the user audio tokens its next
ones mix in, vocoder phase, the output token waiting to be fed, queued input text,
its own random generator). A step runs
``out_positions`` forward passes over the whole batch: the first appends every
session's new input tokens to its cache, each later one a single output token.

Faults stay with their session. A step is all-or-nothing: if it raises, every
session of the batch is put back as it was (``_Saved``), so the engine can retry
the batch's sessions in smaller groups to find the one that broke it. A session
whose hidden state turns non-finite (NaN/Inf) is caught after each pass: it gets
silence and no text for the turn, its model state is reset (a fresh conversation)
and ``faults`` says so. Nothing mixes rows across sessions (per-row matmuls and
norms, attention over each session's own slot), so its NaN reaches no one else
(tests/test_faults.py, on the SDPA backend).
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from model import dmel
from model.arguments import check_write_threshold
from model.config import NO_TEXT, preset
from model.interaction import InteractionModel, choose_text
from model.interface import TurnInput, TurnOutput
from model.kv import KVPool
from model.lexicon import Lexicon
from model.text import Decoder, encode
from model.transformer import ROW_MULTIPLE, Segment, StreamBatch, pad_rows
from model.vocoder import VocoderState, vocode_chunk
from model.weights import load_checkpoint, load_decoding


@dataclass
class _Session:
    session_id: str  # its KV slot can move (the pool keeps slots packed): look it up
    generator: torch.Generator
    audio_past: torch.Tensor  # (1, span, d): the user audio tokens ``AudioContext`` mixes in next
    dmel_context: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dmel.CONTEXT))
    vocoder: VocoderState = field(default_factory=VocoderState.silence)
    pending: torch.Tensor | None = None  # (1, d): last output of the previous micro-turn
    text_queue: list[int] = field(default_factory=list)  # input text ids waiting for a slot
    decoder: Decoder = field(default_factory=Decoder)
    word_node: int = 0  # the word being written, as a lexicon node (0: none; no lexicon: always 0)


@dataclass(slots=True)
class _Saved:
    """A session as it was before a step, to put back if the step raises. Tensors the
    step replaces (rather than writes into) are kept by reference, so saving is cheap;
    the decoder is left out because it is only touched once nothing can fail."""

    session: _Session
    dmel_context: torch.Tensor
    audio_past: torch.Tensor
    vocoder: VocoderState
    pending: torch.Tensor | None
    text_queue: list[int]
    word_node: int
    generator_state: torch.Tensor

    @classmethod
    def of(cls, session: _Session) -> _Saved:
        return cls(session, session.dmel_context, session.audio_past, session.vocoder, session.pending,
                   list(session.text_queue), session.word_node, session.generator.get_state())

    def restore(self) -> None:
        session = self.session
        session.dmel_context, session.audio_past = self.dmel_context, self.audio_past
        session.vocoder, session.pending = self.vocoder, self.pending
        session.text_queue, session.word_node = self.text_queue, self.word_node
        session.generator.set_state(self.generator_state)


NON_FINITE = "the model's state for this session turned non-finite (NaN/Inf); it was reset"


class StreamingModel:
    """The ``model`` engine. Every method is called from the engine thread only."""

    name = "model"

    def __init__(self, model: InteractionModel, max_sessions: int = 64, seed: int = 0,
                 temperature: float = 0.0, weights: str = "random", device: str = "cpu",
                 attention: str | None = None, write_threshold: float | None = None,
                 lexicon: Lexicon | None = None, sink_distance: int | None = None) -> None:
        # On CUDA: weights fp32, compute and the KV pool in bf16 (autocast). Features,
        # sampling generators and the vocoder stay on the CPU: small per-session work.
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else contextlib.nullcontext())
        # sink_distance: how far before a query its sinks may sit (kv.KVPool; a checkpoint's
        # decoding.json may set the span its training windows covered).
        self.pool = KVPool(self.config, max_sessions, self.device,
                           torch.bfloat16 if self.device.type == "cuda" else torch.float32, attention, sink_distance)
        self.seed = seed
        self.temperature = temperature
        if write_threshold is not None:  # a checkpoint's decoding.json or a command line
            check_write_threshold(write_threshold)
        self.write_threshold = write_threshold  # see ``choose_text``; None: greedy
        # The words text may spell (``model.lexicon``), its tables where text is chosen; None: any bytes.
        self.lexicon = lexicon.on(self.device) if lexicon is not None else None
        self.weights = weights  # what the page shows: "random" or the checkpoint's name
        self._sessions: dict[str, _Session] = {}
        # Sessions whose state the last ``step`` had to reset, and why (the engine
        # reads it after each step; models without it report no faults).
        self.faults: Mapping[str, str] = {}

    @property
    def decoding(self) -> str:
        """How text is chosen, as /healthz reports it (a checkpoint's decoding.json sets it)."""
        chosen = "greedy" if self.write_threshold is None else f"write_threshold {self.write_threshold:g}"
        return chosen if self.lexicon is None else f"{chosen}, lexicon of {len(self.lexicon)} words"

    def open_session(self, session_id: str) -> None:
        self.pool.open(session_id)  # its cache zeroed: no NaN survives a reset
        # Seeded from the session id (not Python's salted hash): reproducible runs.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(session_id.encode()))
        self._sessions[session_id] = _Session(session_id, generator, self.model.audio_context.start(1, self.device))

    def close_session(self, session_id: str) -> None:
        if self._sessions.pop(session_id, None) is not None:
            self.pool.close(session_id)

    @torch.inference_mode()
    def step(self, batch: Sequence[TurnInput]) -> list[TurnOutput]:
        self.faults = {}
        sessions = [self._sessions[chunk.session_id] for chunk in batch]
        saved = [_Saved.of(session) for session in sessions]
        slots = [self.pool.slot(chunk.session_id) for chunk in batch]
        mark = self.pool.mark(slots)
        try:
            with self.autocast:
                outputs, faulted = self._step(batch, sessions)
        except BaseException:
            for state in saved:
                state.restore()
            self.pool.rollback(slots, mark)
            raise
        for i in faulted:
            session_id = batch[i].session_id
            self.close_session(session_id)
            self.open_session(session_id)
            outputs[i].text_waiting = 0  # its queued text went with its state
        self.faults = {batch[i].session_id: NON_FINITE for i in faulted}
        return outputs

    def _step(self, batch: Sequence[TurnInput], sessions: list[_Session]) -> tuple[list[TurnOutput], list[int]]:
        """The batch's outputs, and which of its rows faulted (non-finite)."""
        model, config = self.model, self.config
        n = len(batch)

        audio = torch.from_numpy(np.stack([chunk.audio for chunk in batch]))
        contexts = torch.cat([s.dmel_context for s in sessions])
        bins, contexts = dmel.dmel_chunk(contexts, audio, config.audio_in_bins)
        for i, session in enumerate(sessions):
            session.dmel_context = contexts[i : i + 1]
        text = self._take_text(batch, sessions)
        video, has_video = self._video(batch)
        device = self.device
        audio, past = model.encode_audio(bins.to(device), torch.cat([s.audio_past for s in sessions]))
        for i, session in enumerate(sessions):
            session.audio_past = past[i : i + 1]
        inputs = model.embed_inputs(audio, text.to(device), video if video is None else video.to(device),
                                    has_video if has_video is None else has_video.to(device))

        first = [inputs[i] if s.pending is None else torch.cat([s.pending, inputs[i]]) for i, s in enumerate(sessions)]
        hidden = self._forward(sessions, first)
        finite = torch.ones(n, dtype=torch.bool, device=device)
        words = (None if self.lexicon is None  # each session's lexicon node (model.lexicon)
                 else torch.tensor([s.word_node for s in sessions], dtype=torch.int64, device=device))
        texts, mels = [], []
        for position in range(config.out_positions):
            finite &= hidden.isfinite().all(-1)
            # A faulted row goes on with zeros: the heads then cannot raise on it
            # (e.g. sampling from NaN probabilities); its outputs are discarded.
            hidden = torch.where(finite[:, None], hidden, 0.0)
            allowed = None if words is None else self.lexicon.mask(words)
            text_ids = choose_text(model.text_head(pad_rows(hidden))[:n], self.write_threshold, allowed)
            if words is not None:
                words = self.lexicon.advance(words, text_ids)
            mel = model.audio_head.sample(hidden, [s.generator for s in sessions], self.temperature)
            finite &= mel.isfinite().flatten(1).all(-1)
            texts.append(text_ids)
            mels.append(mel)
            fed_back = model.embed_outputs(text_ids, mel)
            if position + 1 < config.out_positions:
                hidden = self._forward(sessions, [fed_back[i : i + 1] for i in range(n)])
        for i, session in enumerate(sessions):
            session.pending = fed_back[i : i + 1].clone()
        written = torch.stack(texts, dim=1)  # (n, out_positions)
        if words is not None:
            silent = (written == NO_TEXT).all(1)  # a micro-turn without text ends a word
            for session, node in zip(sessions, torch.where(silent, 0, words).tolist(), strict=True):
                session.word_node = node

        faulted = (~finite).nonzero().flatten().tolist()
        mel_chunk = torch.cat(mels, dim=1).float().cpu()
        if faulted:  # the vocoder's rows are independent; this only keeps its input finite
            mel_chunk[faulted] = dmel.LOG_MIN
        voice, states = vocode_chunk(VocoderState.stack([s.vocoder for s in sessions]), mel_chunk)
        for session, state in zip(sessions, states.unstack(), strict=True):
            session.vocoder = state
        spoken = written.cpu()
        voices = [voice[i].clamp(-1, 1).numpy().astype(np.float32) for i in range(n)]
        for i in faulted:
            voices[i] = np.zeros_like(voices[i])
        # Decoding changes the decoders, so it comes last, where nothing can fail.
        texts_out = ["" if i in faulted else session.decoder.decode(spoken[i].tolist())
                     for i, session in enumerate(sessions)]
        return [TurnOutput(chunk.session_id, chunk.turn, voices[i], texts_out[i], len(sessions[i].text_queue))
                for i, chunk in enumerate(batch)], faulted

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


def load_engine(checkpoint: str | None = None, max_sessions: int = 64, device: str = "cpu",
                **decoding: float | str | None) -> StreamingModel:
    """The interaction model as an engine: a checkpoint directory (decoded as its
    ``decoding.json`` says, unless ``decoding`` overrides it: ``write_threshold``, and
    ``lexicon`` as a word list's path or None for none), or the tiny preset with
    seeded random weights when there is none."""
    settings = {**(load_decoding(checkpoint) if checkpoint else {}), **decoding}
    lexicon = settings.pop("lexicon", None)
    settings["lexicon"] = Lexicon.load(lexicon) if lexicon else None
    if checkpoint:
        return StreamingModel(load_checkpoint(checkpoint), max_sessions,
                              weights=os.path.basename(checkpoint.rstrip("/")), device=device, **settings)
    torch.manual_seed(0)
    return StreamingModel(InteractionModel(preset("tiny")), max_sessions, weights="random", device=device,
                          **settings)
