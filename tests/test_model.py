"""The interaction model: streaming equals full forward, batch invariance, MoE paths,
dMel and vocoder round trips, checkpoints, flat memory."""

from __future__ import annotations

import dataclasses
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from model import dmel
from model.config import NO_TEXT, TEXT_VOCAB, ModelConfig, preset
from model.interaction import ROLE_OUTPUT, InteractionModel, choose_text
from model.interface import TURN_SAMPLES, TurnInput
from model.kv import KVPool
from model.streaming import StreamingModel
from model.transformer import ROPE_NEAR, MoE, Segment, StreamBatch, Transformer, pad_rows, rope
from model.vocoder import LAG_SAMPLES, VocoderState, griffin_lim, seam_bends, spectral_convergence, vocode_chunk
from model.weights import deepen, load_checkpoint, save_checkpoint, widen_kv_heads, with_parts, without_own_voice

SPEECH = Path(__file__).parent / "data" / "speech.wav"
# A small config whose window is shorter than the test conversations, so the
# ring buffer wraps and the sinks matter.
SMALL = preset("tiny", d_model=64, n_layers=2, n_heads=4, expert_hidden=64, shared_hidden=64,
               window=48, sinks=4, flow_hidden=64)


def speech_audio() -> torch.Tensor:
    with wave.open(str(SPEECH)) as wav:
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
    audio = torch.from_numpy(pcm.astype(np.float32) / 32768)
    return audio[: audio.numel() // TURN_SAMPLES * TURN_SAMPLES]


def turn_audio(rng: np.random.Generator, speech: torch.Tensor, turn: int) -> np.ndarray:
    """A turn of real speech (looped) with a little noise, so every session differs."""
    start = (turn * TURN_SAMPLES + int(rng.integers(0, 16000))) % (speech.numel() - TURN_SAMPLES)
    chunk = speech[start : start + TURN_SAMPLES].numpy()
    return (chunk + rng.normal(0, 0.003, TURN_SAMPLES)).astype(np.float32)


# -- dMel ----------------------------------------------------------------------------


def test_dmel_shape_range_and_streaming_equals_whole_utterance():
    audio = speech_audio()[None, : 10 * TURN_SAMPLES]
    whole = dmel.dmel(audio)
    assert whole.shape == (1, 160, dmel.N_MELS)  # 16 frames per 200 ms
    assert whole.min() >= 0 and whole.max() < dmel.N_BINS
    assert len(torch.unique(whole)) >= 8, "speech uses most of the bins"
    context = torch.zeros(1, dmel.CONTEXT)
    parts = []
    for turn in range(10):
        bins, context = dmel.dmel_chunk(context, audio[:, turn * TURN_SAMPLES : (turn + 1) * TURN_SAMPLES])
        parts.append(bins)
    assert torch.equal(torch.cat(parts, dim=1), whole)


def test_finer_dmel_levels_nest_exactly_in_the_coarse_bins_and_stream_as_a_whole():
    """A model that hears 64 levels reads the 16 coarse bins off the fine ones: every
    fine bin must lie inside the coarse bin the shipped model would have seen."""
    audio = speech_audio()[None, : 10 * TURN_SAMPLES]
    fine = dmel.dmel(audio, 64)
    assert fine.min() >= 0 and fine.max() < 64
    assert torch.equal(dmel.coarsen(fine, 64), dmel.dmel(audio))
    noisy = torch.randn(400_000) * 3 - 2  # boundaries of every kind, not just speech
    assert torch.equal(dmel.coarsen(dmel.quantize(noisy, 64), 64), dmel.quantize(noisy))
    assert torch.equal(dmel.coarsen(dmel.quantize(noisy, 64), 64, 32), dmel.quantize(noisy, 32))
    context, parts = torch.zeros(1, dmel.CONTEXT), []
    for turn in range(10):
        bins, context = dmel.dmel_chunk(context, audio[:, turn * TURN_SAMPLES : (turn + 1) * TURN_SAMPLES], 64)
        parts.append(bins)
    assert torch.equal(torch.cat(parts, dim=1), fine)
    # Within-speech detail the coarse bins lose: more distinct values per channel.
    speaking = fine[0, :, 20:40]
    assert len(torch.unique(speaking)) > 2 * len(torch.unique(dmel.coarsen(speaking, 64)))
    for bad in (48, 512, 20):
        with pytest.raises(ValueError, match="times a power of two"):
            dmel.quantize(noisy[:10], bad)


def test_dmel_dequantize_returns_bin_centres_within_half_a_bin():
    audio = speech_audio()[None, : 5 * TURN_SAMPLES]
    log_mel = dmel.log_mel(torch.nn.functional.pad(audio, (dmel.CONTEXT, 0)))
    restored = dmel.dequantize(dmel.quantize(log_mel))
    inside = (log_mel > dmel.LOG_MIN) & (log_mel < dmel.LOG_MAX)
    assert (restored - log_mel)[inside].abs().max() <= dmel.BIN_WIDTH / 2 + 1e-5


# -- vocoder ----------------------------------------------------------------------------


def vocode_stream(log_mel: torch.Tensor) -> torch.Tensor:
    """Chunk by chunk as served, moved to griffin_lim's alignment (WINDOW − HOP behind)."""
    state, parts = VocoderState.silence(), []
    for start in range(0, log_mel.shape[1], 16):
        chunk, state = vocode_chunk(state, log_mel[:, start : start + 16])
        assert chunk.shape == (1, TURN_SAMPLES)
        parts.append(chunk)
    streamed = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(streamed, (dmel.CONTEXT - LAG_SAMPLES, 0))[:, : streamed.shape[1]]


def test_streaming_griffin_lim_is_close_to_whole_utterance_griffin_lim():
    audio = speech_audio()[None, : 20 * TURN_SAMPLES]
    log_mel = dmel.log_mel(torch.nn.functional.pad(audio, (dmel.CONTEXT, 0)))
    whole = griffin_lim(log_mel, iterations=64)
    streamed = vocode_stream(log_mel)
    whole_sc, streamed_sc = spectral_convergence(whole, log_mel), spectral_convergence(streamed, log_mel)
    # Measured: whole 0.10; streamed 0.13 with 8 fast-Griffin-Lim iterations per chunk,
    # 8 frames of context and 12.5 ms held back (0.12 holding back 37.5 ms, before session 12).
    assert whole_sc < 0.15
    assert streamed_sc < whole_sc + 0.05, (whole_sc, streamed_sc)
    assert streamed.abs().max() < 2.0


def test_the_vocoder_gives_each_session_the_same_bits_in_any_batch():
    """A row's audio must not depend on its batch (the engine retries halves of a failed
    batch and expects the same bits). Spans of 27 frames did, by up to 3e-4, in batches
    of 3 on two threads: vectorised and scalar tails of elementwise ops round differently,
    and 27 × 401 bins is odd. The span is 24 frames (5 + 16 + 3 guessed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        log_mel = torch.rand(3, 64, dmel.N_MELS) * 3 - 2
        alone, together = [VocoderState.silence() for _ in range(3)], VocoderState.silence(3)
        for start in range(0, 64, 16):
            batch, together = vocode_chunk(together, log_mel[:, start : start + 16])
            for row in range(3):
                audio, alone[row] = vocode_chunk(alone[row], log_mel[row : row + 1, start : start + 16])
                assert torch.equal(audio[0], batch[row]), (start, row)
    finally:
        torch.set_num_threads(threads)


def test_streamed_chunks_join_without_a_jump():
    """Where one chunk's audio meets the next, the waveform bends no more sharply than
    speech around it: the second difference at each seam, against its neighbourhood's
    median (measured: mean 1.0, max 2.2; without the fade from the last chunk's
    estimate, mean 2.6, max 5.0)."""
    audio = speech_audio()[None, : 20 * TURN_SAMPLES]
    streamed = vocode_stream(dmel.log_mel(torch.nn.functional.pad(audio, (dmel.CONTEXT, 0))))[0]
    ratios = seam_bends(streamed, TURN_SAMPLES + dmel.CONTEXT - LAG_SAMPLES, TURN_SAMPLES)
    assert len(ratios) >= 8
    assert np.mean(ratios) < 2 and max(ratios) < 4, np.round(ratios, 1)


# -- MoE ------------------------------------------------------------------------------------


def test_moe_gather_and_grouped_paths_agree():
    torch.manual_seed(0)
    moe = MoE(preset("tiny"))
    moe.route_bias.copy_(torch.randn(moe.route_bias.shape) * 0.02)  # selection-only bias in play
    x = torch.randn(37, moe.router.in_features)
    chosen, weights = moe.route(x)
    assert chosen.shape == (37, 2) and torch.allclose(weights.sum(-1), torch.ones(37))
    assert len(torch.unique(chosen)) >= 6, "the tokens spread over the experts"
    gathered, grouped = moe(x, path="gather"), moe(x, path="grouped")
    torch.testing.assert_close(gathered, grouped, rtol=1e-5, atol=1e-5)


def test_route_bias_changes_selection_but_not_the_weighting_formula():
    torch.manual_seed(1)
    moe = MoE(preset("tiny"))
    x = torch.randn(64, moe.router.in_features)
    before, _ = moe.route(x)
    moe.route_bias[3] = 10.0  # force expert 3 into every top-k
    after, weights = moe.route(x)
    assert (after == 3).any(-1).all() and not (before == 3).any(-1).all()
    scores = torch.sigmoid(moe.router(x)).gather(-1, after)
    torch.testing.assert_close(weights, scores / scores.sum(-1, keepdim=True))


# -- streaming = full forward ------------------------------------------------------------------


def stream_tokens(trunk: Transformer, tokens: torch.Tensor, pool: KVPool) -> tuple[list[torch.Tensor], int]:
    """Stream (tokens, d) through a fresh slot pass by pass, as served: the first turn's
    inputs and outputs, then each turn's previous output + inputs and its outputs.
    The hidden states of each pass, and the slot."""
    config = trunk.config
    slot = pool.open(f"s{pool.open_sessions}")
    streamed, start = [], 0
    sizes = [config.input_tokens] + [1] * config.out_positions
    sizes += [config.max_append, 1, 1, 1] * (tokens.shape[0] // config.tokens_per_turn + 1)
    with torch.no_grad():
        for size in sizes:
            if start >= tokens.shape[0]:
                break
            size = min(size, tokens.shape[0] - start)
            index, positions = pool.reserve(slot, size)
            rows = pad_rows(tokens[start : start + size])
            row_positions = torch.zeros(rows.shape[0], dtype=torch.int64)
            row_positions[:size] = positions
            batch = StreamBatch([Segment(slot, 0, size, index)], row_positions)
            streamed.append(trunk.forward_stream(rows, batch, pool)[:size])
            start += size
    return streamed, slot


def test_appending_chunk_by_chunk_equals_one_full_forward():
    """Streamed with the sinks where training puts them (at their absolute positions:
    never moved), a sequence longer than sinks + window is its full forward."""
    torch.manual_seed(2)
    config = SMALL
    trunk = Transformer(config).eval()
    tokens = torch.randn(10 * config.tokens_per_turn, config.d_model)
    with torch.no_grad():
        full = trunk.forward_full(tokens[None])[0]
    streamed, _ = stream_tokens(trunk, tokens, KVPool(config, max_sessions=2, sink_distance=10**9))
    assert tokens.shape[0] > config.window + config.sinks, "the window must be exercised"
    # fp32, different matmul shapes: equal to within rounding.
    torch.testing.assert_close(torch.cat(streamed), full, rtol=1e-4, atol=1e-4)


def test_sinks_stay_within_the_distance_training_spans_however_long_the_session():
    """Past ``sink_distance`` the sinks' keys are rotated to sit that far before each
    pass's first query: until then a session streams exactly as with sinks never
    moved; after, what a query computes no longer depends on how long ago the session
    began. One layer, so that a key depends on its token alone: two sessions with the
    same first tokens and the same last window, one twice as long in between, end
    the same (and differently with sinks at their absolute positions)."""
    torch.manual_seed(4)
    config = dataclasses.replace(SMALL, n_layers=1)
    trunk = Transformer(config).eval()
    per_turn, span = config.tokens_per_turn, config.sinks + config.window
    tokens = torch.randn(20 * per_turn, config.d_model)
    moved, _ = stream_tokens(trunk, tokens, pool := KVPool(config, max_sessions=2))
    fixed, _ = stream_tokens(trunk, tokens, KVPool(config, max_sessions=2, sink_distance=10**9))
    firsts = np.cumsum([0] + [len(hidden) for hidden in moved])[:-1]  # each pass's first position
    passes_before = int((firsts <= pool.sink_distance).sum())
    assert pool.sink_distance == span - 1 and passes_before < len(moved)
    for a, b in zip(moved[:passes_before], fixed[:passes_before], strict=True):
        assert torch.equal(a, b)  # the first sinks + window tokens: nothing moved yet
    assert not torch.allclose(torch.cat(moved), torch.cat(fixed), atol=1e-4)
    assert pool.sink_shift[0] == tokens.shape[0] - 1 - pool.sink_distance  # the last pass: one token

    turns_between = 12  # the sinks' turn, then 12 or 24 turns, then the same last window
    last = tokens[-4 * per_turn:]
    short = torch.cat([tokens[:per_turn], tokens[per_turn : (1 + turns_between) * per_turn], last])
    long = torch.cat([tokens[:per_turn], tokens[per_turn : (1 + 2 * turns_between) * per_turn], last])
    for sink_distance, same in ((None, True), (10**9, False)):
        ends = [stream_tokens(trunk, sequence, KVPool(config, max_sessions=1, sink_distance=sink_distance))[0][-1]
                for sequence in (short, long)]
        assert torch.allclose(*ends, atol=1e-4) == same, sink_distance


def test_rotary_attention_depends_on_distance_alone_however_long_the_session():
    """A query's score against a key depends on how far apart they are, not on where:
    a session hours or months long attends as in its first minute (an fp32 angle
    alone is off by whole radians after days). Below ROPE_NEAR it is the plain fp32
    rotation every training window used, bit for bit."""
    torch.manual_seed(5)
    base, distance = SMALL.rope_base, 37
    q, k = torch.randn(64, 2, SMALL.head_dim), torch.randn(64, 2, SMALL.head_dim)

    def scores(at: int, rotate=rope) -> torch.Tensor:
        positions = torch.arange(at, at + 64)
        return (rotate(q, positions, base) * rotate(k, positions - distance, base)).sum(-1)

    def exact(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
        half = x.shape[-1] // 2
        angles = positions.double()[:, None] * base ** (-torch.arange(half).double() / half)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        x1, x2 = x[..., :half].double(), x[..., half:].double()
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    truth = scores(distance, exact).float()  # by distance alone, in float64
    for at in (distance, 2_000, 300_000, 10**7, 10**9):  # the start, ~25 s, an hour, 35 hours, 5 months
        torch.testing.assert_close(scores(at), truth, rtol=0, atol=2e-3, msg=f"at position {at}")

    def fp32_alone(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
        half = x.shape[-1] // 2
        inv_freq = base ** (-torch.arange(half, dtype=torch.float32) / half)
        angles = positions.float()[:, None] * inv_freq
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        return torch.cat([x[..., :half] * cos - x[..., half:] * sin, x[..., :half] * sin + x[..., half:] * cos], -1)

    near = torch.arange(ROPE_NEAR)
    assert torch.equal(rope(q.repeat(64, 1, 1), near, base), fp32_alone(q.repeat(64, 1, 1), near, base))
    assert not torch.allclose(scores(10**7, fp32_alone), truth, atol=2e-3)  # what this guards against


def test_the_audio_context_streams_turn_by_turn_as_it_trains_over_a_window():
    """Training encodes a window's user audio in one call; serving, one micro-turn
    at a time with each session's carried context. Both must give the same tokens,
    and a token must see exactly its ``audio_context`` predecessors, across turns."""
    torch.manual_seed(7)
    model = InteractionModel(dataclasses.replace(SMALL, audio_context=3)).eval()
    torch.nn.init.normal_(model.audio_context.out.weight, std=0.1)  # as if trained
    per_turn = SMALL.frames_per_turn
    bins = torch.randint(0, dmel.N_BINS, (2, 6 * per_turn, dmel.N_MELS))
    with torch.no_grad():
        whole, _ = model.encode_audio(bins)
        past, streamed = None, []
        for turn in range(6):
            tokens, past = model.encode_audio(bins[:, turn * per_turn : (turn + 1) * per_turn], past)
            streamed.append(tokens)
        torch.testing.assert_close(torch.cat(streamed, 1), whole, rtol=1e-5, atol=1e-5)
        changed = bins.clone()
        changed[:, per_turn - 4 : per_turn] = 0  # turn 0's last token (token 3) goes silent
        after, _ = model.encode_audio(changed)
    assert torch.equal(after[:, :3], whole[:, :3])  # causal: earlier tokens untouched
    assert not torch.allclose(after[:, 4], whole[:, 4])  # turn 1's first token hears it...
    assert not torch.allclose(after[:, 6], whole[:, 6])  # ... and so does the third after it
    assert torch.equal(after[:, 7:], whole[:, 7:])  # the fourth after it is out of reach


class RecordingModel(StreamingModel):
    """Keeps what each pass fed a session and the hidden state it returned."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fed: list[torch.Tensor] = []
        self.returned: list[torch.Tensor] = []

    def _forward(self, sessions, tokens):
        hidden = super()._forward(sessions, tokens)
        self.fed.append(tokens[0].clone())
        self.returned.append(hidden[0].clone())
        return hidden


def test_a_streamed_session_equals_the_full_forward_of_its_sequence():
    """(With the sinks never moved, as in a training window: the sequence outgrows
    sinks + window, where served sinks would otherwise move.)"""
    torch.manual_seed(3)
    model = InteractionModel(SMALL)
    engine = RecordingModel(model, max_sessions=1, sink_distance=10**9)
    engine.open_session("s")
    rng, speech = np.random.default_rng(0), speech_audio()
    for turn in range(6):
        engine.step([TurnInput("s", turn, turn_audio(rng, speech, turn), "hello" if turn == 1 else "")])
    sequence = torch.cat(engine.fed)
    # Passes feed exactly the interleaved layout: tokens_per_turn per micro-turn.
    assert sequence.shape[0] == 6 * SMALL.tokens_per_turn - 1
    with torch.no_grad():
        full = model.trunk.forward_full(sequence[None])[0]
    ends = torch.cumsum(torch.tensor([t.shape[0] for t in engine.fed]), 0) - 1
    torch.testing.assert_close(torch.stack(engine.returned), full[ends], rtol=1e-4, atol=1e-4)


def test_finer_input_bins_grown_onto_a_model_change_nothing_until_trained():
    """``with_parts(audio_in_bins=64)``: the fine table starts at zero, so the grown
    model's tokens from 64-level bins equal the old model's from 16-level bins; once
    the table moves, a step inside one coarse bin changes the token."""
    torch.manual_seed(10)
    model = InteractionModel(dataclasses.replace(SMALL, audio_context=2)).eval()
    torch.nn.init.normal_(model.audio_context.out.weight, std=0.1)
    grown = with_parts(model, audio_in_bins=64).eval()
    assert grown.config.audio_in_bins == 64 and not grown.audio_in_fine.table.any()
    fine = torch.randint(0, 64, (2, 2 * SMALL.frames_per_turn, dmel.N_MELS))
    with torch.no_grad():
        before, _ = model.encode_audio(dmel.coarsen(fine, 64))
        after, _ = grown.encode_audio(fine)
        torch.testing.assert_close(after, before, rtol=0, atol=0)
        grown.audio_in_fine.table.normal_(std=0.02)  # as if trained
        nudged = fine.clone()
        nudged[:, 0, 0] = nudged[:, 0, 0] // 4 * 4 + (nudged[:, 0, 0] % 4 + 1) % 4  # same coarse bin
        assert torch.equal(dmel.coarsen(nudged, 64), dmel.coarsen(fine, 64))
        moved, _ = grown.encode_audio(nudged)
    assert not torch.allclose(moved[:, 0], after[:, 0])
    with pytest.raises(ValueError, match="times a power of two"):
        with_parts(model, audio_in_bins=48)


def test_the_engine_feeds_a_fine_bin_model_the_bins_it_was_trained_on():
    """Serving must quantise the user's audio at the model's levels, as training does."""
    torch.manual_seed(11)
    model = with_parts(InteractionModel(SMALL), audio_in_bins=64).eval()
    torch.nn.init.normal_(model.audio_in_fine.table, std=0.05)
    engine = RecordingModel(model, max_sessions=1)
    engine.open_session("s")
    rng, speech = np.random.default_rng(0), speech_audio()
    audio = [turn_audio(rng, speech, turn) for turn in range(3)]
    for turn, chunk in enumerate(audio):
        engine.step([TurnInput("s", turn, chunk)])
    bins = dmel.dmel(torch.from_numpy(np.concatenate(audio))[None], 64)
    with torch.no_grad():
        expected, _ = model.encode_audio(bins)
    k, passes = SMALL.audio_in_tokens, len(engine.fed) // 3  # each step: inputs, then one pass per output
    firsts = engine.fed[::passes]  # the pass carrying the turn's inputs, after the last output fed back
    fed = torch.stack([firsts[0][:k], *(tokens[1 : 1 + k] for tokens in firsts[1:])])
    torch.testing.assert_close(fed.reshape(-1, SMALL.d_model), expected[0], rtol=1e-5, atol=1e-5)


# -- batch invariance ------------------------------------------------------------------------


@pytest.mark.parametrize("audio_head, encoder, context, levels",
                         [("classify", 0, 0, 16), ("flow", 0, 0, 16), ("classify", 2, 3, 64)])
def test_a_session_is_bit_identical_alone_or_beside_seven_others(audio_head, encoder, context, levels):
    """Alone; among 7 busy sessions of other lengths (attention reads the pool in
    place); among 7 idle ones (it gathers its slot); and while others leave (slots
    are compacted under it). Outputs must be the same bits in every case."""
    config = dataclasses.replace(SMALL, audio_head=audio_head, window=96, audio_encoder_layers=encoder,
                                 audio_context=context, audio_in_bins=levels)
    torch.manual_seed(4)
    model = InteractionModel(config)
    if encoder:  # its blocks start as identities: make them count
        for block in model.audio_encoder.blocks:
            torch.nn.init.normal_(block.down.weight, std=0.1)
    if context:  # so does the context's projection
        torch.nn.init.normal_(model.audio_context.out.weight, std=0.1)
    if levels > dmel.N_BINS:  # and the finer bins' table
        torch.nn.init.normal_(model.audio_in_fine.table, std=0.05)
    speech = speech_audio()
    temperature = 1.0 if audio_head == "flow" else 0.0

    def run(crowd: str) -> list:
        engine = StreamingModel(model, max_sessions=8, temperature=temperature)
        rng = np.random.default_rng(5)
        others = [f"other{i}" for i in range(7)] if crowd != "alone" else []
        for name in others:
            engine.open_session(name)
        # The others get a head start of different lengths.
        for warmup in range(9):
            batch = [TurnInput(name, warmup, turn_audio(rng, speech, warmup)) for j, name in enumerate(others) if j <= warmup]
            if batch:
                engine.step(batch)
        engine.open_session("me")
        mine = np.random.default_rng(6)
        outputs = []
        for turn in range(5):
            if crowd == "leaving" and turn in (2, 3):
                # "me" holds the last slot: the first close moves it (and its cache).
                engine.close_session(others.pop(0))
            batch = [TurnInput("me", turn, turn_audio(mine, speech, turn), "hi" if turn == 2 else "")]
            if crowd in ("busy", "leaving"):
                batch += [TurnInput(name, 100 + turn, turn_audio(rng, speech, turn)) for name in others]
            rng.shuffle(batch)  # position in the batch must not matter either
            outputs += [out for out in engine.step(batch) if out.session_id == "me"]
        return outputs

    alone = run("alone")
    for crowd in ("busy", "idle", "leaving"):
        for a, b in zip(alone, run(crowd), strict=True):
            assert a.text == b.text, crowd
            assert np.array_equal(a.audio, b.audio), f"{crowd}: turn {a.turn} differs by {np.abs(a.audio - b.audio).max()}"


# -- checkpoints -----------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_mismatch_errors(tmp_path):
    torch.manual_seed(7)
    model = InteractionModel(SMALL)
    directory = save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(directory, expect=SMALL)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="d_model: checkpoint 64, expected 128"):
        load_checkpoint(directory, expect=dataclasses.replace(SMALL, d_model=128))
    # Weights that do not fit the config beside them.
    (directory / "config.json").write_text(dataclasses.replace(SMALL, n_experts=4).to_json())
    with pytest.raises(ValueError, match="does not fit its config.json"):
        load_checkpoint(directory)
    with pytest.raises(ValueError, match="unknown config fields"):
        ModelConfig.from_json('{"d_model": 64, "colour": "blue"}')


def test_a_model_that_does_not_hear_its_own_voice_is_steered_by_its_text_alone(tmp_path):
    """``hears_own_voice=False``: what the model said comes back as its text only, so a
    different sound under the same bytes feeds the trunk the same tokens, served or
    teacher forced; a model that hears it is fed different ones."""
    torch.manual_seed(11)
    hearing = InteractionModel(SMALL)
    deaf = without_own_voice(hearing)
    assert not deaf.config.hears_own_voice and not hasattr(deaf, "audio_out")
    text = torch.tensor([ord("t"), NO_TEXT])
    shape = (2, SMALL.frames_per_output, dmel.N_MELS)
    quiet, loud = torch.full(shape, dmel.LOG_MIN), torch.zeros(shape)  # log-mel: the silence floor; loud everywhere
    with torch.no_grad():
        assert not torch.allclose(hearing.embed_outputs(text, quiet), hearing.embed_outputs(text, loud))
        torch.testing.assert_close(deaf.embed_outputs(text, quiet), deaf.embed_outputs(text, loud), rtol=0, atol=0)
        bins = torch.randint(0, dmel.N_BINS, (2, SMALL.frames_per_output, dmel.N_MELS))
        torch.testing.assert_close(deaf.embed_output_targets(text, bins),
                                   deaf.embed_output_targets(text, torch.zeros_like(bins)), rtol=0, atol=0)
        # The rest of the weights are the hearing model's.
        torch.testing.assert_close(deaf.embed_outputs(text, quiet),
                                   hearing.text(text) + hearing.roles.weight[ROLE_OUTPUT])
    loaded = load_checkpoint(save_checkpoint(deaf, tmp_path / "deaf"))
    assert loaded.config == deaf.config and "audio_out.table" not in loaded.state_dict()


def test_widening_the_key_value_heads_keeps_the_function_and_frees_the_copies():
    torch.manual_seed(8)
    model = InteractionModel(dataclasses.replace(SMALL, n_kv_heads=2)).eval()  # two distinct kv heads
    wider = widen_kv_heads(model, 4).eval()
    assert wider.config.n_kv_heads == 4
    sequence = torch.randn(1, 3 * SMALL.tokens_per_turn, SMALL.d_model)
    with torch.no_grad():
        before, after = model.trunk.forward_full(sequence), wider.trunk.forward_full(sequence)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # each query head kept its kv head
    # The copies are separate weights now: moving one changes the output.
    with torch.no_grad():
        qkv = wider.trunk.blocks[0].attn.qkv.weight
        qkv[SMALL.n_heads * SMALL.head_dim :][: SMALL.head_dim] += 0.5  # kv head 0's keys only
        assert not torch.allclose(wider.trunk.forward_full(sequence), before, atol=1e-3)
    with pytest.raises(ValueError, match="must be a multiple of 2"):
        widen_kv_heads(model, 3)


def test_deepening_keeps_the_function_and_the_stream_the_listening_head_reads():
    torch.manual_seed(9)
    model = InteractionModel(SMALL).eval()
    deeper = deepen(model, SMALL.n_layers + 2).eval()
    assert deeper.config.n_layers == SMALL.n_layers + 2
    sequence = torch.randn(1, 3 * SMALL.tokens_per_turn, SMALL.d_model)
    with torch.no_grad():
        before, after = model.trunk.forward_layers(sequence), deeper.trunk.forward_layers(sequence)
        torch.testing.assert_close(after[-1], before[-1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(after[-2], before[-2], rtol=1e-5, atol=1e-5)  # entering the last block
        # The new blocks are real blocks: once they write, the output moves.
        deeper.trunk.blocks[SMALL.n_layers - 1].attn.out.weight.normal_()
        assert not torch.allclose(deeper.trunk.forward_layers(sequence)[-1], before[-1], atol=1e-3)
    with pytest.raises(ValueError, match="already has 2 blocks"):
        deepen(model, 2)


# -- memory ---------------------------------------------------------------------------------------


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_a_window_bounded_session_uses_flat_memory_for_30_minutes():
    config = preset("tiny", d_model=32, n_layers=1, n_heads=2, expert_hidden=32, shared_hidden=32,
                    n_experts=4, window=512, sinks=8)
    trunk = Transformer(config).eval()
    pool = KVPool(config, max_sessions=1)
    slot = pool.open("s")
    storage = [t.data_ptr() for t in (pool.keys, pool.values, pool.positions)]
    turns = 30 * 60 * 5  # 30 minutes of micro-turns
    sizes = [config.max_append] + [1] * (config.out_positions - 1)
    token = torch.randn(config.max_append, config.d_model)
    rows = pad_rows(token)
    samples = []
    with torch.no_grad():
        for turn in range(turns):
            for size in sizes:
                index, positions = pool.reserve(slot, size)
                row_positions = torch.zeros(rows.shape[0], dtype=torch.int64)
                row_positions[:size] = positions
                trunk.forward_stream(rows, StreamBatch([Segment(slot, 0, size, index)], row_positions), pool)
            if turn % 1000 == 999:
                samples.append(resident_bytes())
    assert pool.lengths[slot] == turns * config.tokens_per_turn
    assert [t.data_ptr() for t in (pool.keys, pool.values, pool.positions)] == storage
    visible = (pool.positions[slot] >= 0).sum()
    assert visible == pool.capacity
    # After the first minutes, resident memory does not grow.
    assert max(samples[2:]) - samples[2] < 8 * 2**20, [s // 2**20 for s in samples]


def test_the_model_benchmark_reports_what_the_docs_quote():
    from bench.model import run

    results = run(repeats=1, context_s=2.0, counts=(1, 2, 32), window=128, layers=3)
    assert results["window"] == 128 and results["n_layers"] == 3
    assert set(results["step_ms_by_sessions"]) == {"1", "2", "32"}
    assert all(ms > 0 for ms in results["step_ms_by_sessions"].values())
    for key in ("append_vs_recompute_ratio_2min", "batch32_throughput_ratio"):
        assert results[key] > 0


def test_video_frames_enter_the_model_without_depending_on_the_batch():
    config = dataclasses.replace(SMALL, video_size=80)
    torch.manual_seed(8)
    model = InteractionModel(config)
    frame = np.random.default_rng(9).integers(0, 256, (120, 160, 3), dtype=np.uint8)  # any size: resized
    silence = np.zeros(TURN_SAMPLES, dtype=np.float32)

    def run(with_video: bool, crowd: int) -> list:
        engine = StreamingModel(model, max_sessions=8)
        names = ["me"] + [f"o{i}" for i in range(crowd)]
        for name in names:
            engine.open_session(name)
        outputs = []
        for turn in range(3):
            batch = [TurnInput(name, turn, silence, video=frame if (with_video and name == "me") or name != "me" else None)
                     for name in names]
            outputs += [out for out in engine.step(batch) if out.session_id == "me"]
        return outputs

    with_video, crowded = run(True, 0), run(True, 5)
    for a, b in zip(with_video, crowded, strict=True):
        assert np.array_equal(a.audio, b.audio)
    blind = run(False, 0)
    assert not all(np.array_equal(a.audio, b.audio) for a, b in zip(with_video, blind, strict=True)), \
        "the camera frame must reach the model"


def test_write_threshold_decides_whether_to_write_before_which_byte():
    # Row 0: silence 0.4, writing 0.6 spread over three first letters (0.2 each).
    # Row 1: silence 0.7, one byte 0.3. Row 2: one byte clearly first.
    probs = torch.full((3, TEXT_VOCAB), 1e-9)
    probs[0, NO_TEXT], probs[0, ord("s")], probs[0, ord("e")], probs[0, ord("n")] = 0.4, 0.2, 0.2, 0.2
    probs[1, NO_TEXT], probs[1, ord("t")] = 0.7, 0.3
    probs[2, NO_TEXT], probs[2, ord("o")] = 0.1, 0.9
    logits = probs.log()
    assert choose_text(logits).tolist() == [NO_TEXT, NO_TEXT, ord("o")]  # greedy
    assert choose_text(logits, 0.5).tolist()[1:] == [NO_TEXT, ord("o")]
    assert choose_text(logits, 0.5)[0].item() in (ord("s"), ord("e"), ord("n"))
    assert choose_text(logits, 0.25).tolist()[1] == ord("t")
    assert choose_text(logits, 0.95).tolist() == [NO_TEXT] * 3


def test_write_threshold_reaches_the_served_text():
    """The engine applies it: a model whose text head always prefers silence but
    puts most of its mass on bytes writes with a threshold, and not without."""
    torch.manual_seed(0)
    model = InteractionModel(preset("tiny"))
    with torch.no_grad():
        model.text_head.weight.zero_()
        model.text_head.bias.fill_(0.0)
        model.text_head.bias[NO_TEXT] = 3.0  # e^3 ≈ 20 < 255 bytes of weight 1: writing ≈ 0.93
    outputs = {}
    for threshold in (None, 0.5):
        engine = StreamingModel(model, max_sessions=1, write_threshold=threshold)
        engine.open_session("s")
        outputs[threshold] = engine.step([TurnInput("s", 0, np.zeros(TURN_SAMPLES, dtype=np.float32))])[0].text
    assert outputs[None] == ""
    assert outputs[0.5] != ""


def test_a_checkpoints_decoding_json_sets_how_it_is_served(tmp_path):
    from model.streaming import load_engine

    torch.manual_seed(0)
    save_checkpoint(InteractionModel(preset("tiny")), tmp_path / "ckpt")
    assert load_engine(str(tmp_path / "ckpt"), max_sessions=1).decoding == "greedy"
    (tmp_path / "ckpt" / "decoding.json").write_text('{"write_threshold": 0.4}')
    engine = load_engine(str(tmp_path / "ckpt"), max_sessions=1)
    assert engine.write_threshold == 0.4 and engine.decoding == "write_threshold 0.4"
    assert load_engine(str(tmp_path / "ckpt"), max_sessions=1, write_threshold=None).write_threshold is None
    (tmp_path / "ckpt" / "decoding.json").write_text('{"write_treshold": 0.4}')
    with pytest.raises(ValueError, match="unknown decoding settings"):
        load_engine(str(tmp_path / "ckpt"), max_sessions=1)
    for nonsense in ("0", "1", "1.5", "-0.2", "NaN"):  # always write, never, or no meaning
        (tmp_path / "ckpt" / "decoding.json").write_text(f'{{"write_threshold": {nonsense}}}')
        with pytest.raises(ValueError, match="write_threshold: a probability between 0 and 1"):
            load_engine(str(tmp_path / "ckpt"), max_sessions=1)
    # How far before a query the sinks may sit: a whole number of tokens, at least
    # sinks + window - 1 (nearer, a sink would sit among the window's keys).
    (tmp_path / "ckpt" / "decoding.json").write_text('{"sink_distance": 1279}')
    assert load_engine(str(tmp_path / "ckpt"), max_sessions=1).pool.sink_distance == 1279
    for nonsense, refusal in (('"far"', "whole number"), ("639.5", "whole number"), ("true", "whole number"),
                              ("600", "at least sinks \\+ window - 1")):
        (tmp_path / "ckpt" / "decoding.json").write_text(f'{{"sink_distance": {nonsense}}}')
        with pytest.raises(ValueError, match=refusal):
            load_engine(str(tmp_path / "ckpt"), max_sessions=1)
