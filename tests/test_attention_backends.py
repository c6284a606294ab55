"""The two attention backends implement one rule (model/attention.py).

The CUDA comparison needs a GPU and the ``gpu`` extra; the check that xformers'
packed causal bias *is* our visibility rule needs only xformers importable (it
builds and materialises the bias on the CPU). Both are skipped, with the reason,
where those are missing — CI's CPU machine has neither.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from model.attention import choose_backend, visibility, xformers_ops, xformers_unusable
from model.config import preset
from model.kv import KVPool
from model.transformer import PackedPlan, Segment, StreamBatch, Transformer, pad_rows

SMALL = preset("tiny", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, expert_hidden=64, shared_hidden=64,
               window=48, sinks=4)
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None
needs_xformers = pytest.mark.skipif(not HAS_XFORMERS, reason="xformers (the 'gpu' extra) is not installed")
needs_cuda_xformers = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_XFORMERS and xformers_ops() is not None),
    reason=f"needs a CUDA GPU and a working 'gpu' extra: {xformers_unusable()}")


def test_the_backend_is_chosen_at_run_time_and_a_wrong_request_is_an_error(monkeypatch):
    monkeypatch.delenv("MICROTURN_ATTENTION", raising=False)
    assert choose_backend(torch.device("cpu")) == "sdpa"
    with pytest.raises(RuntimeError, match="CUDA device and the .gpu. extra.*this engine is on cpu"):
        choose_backend(torch.device("cpu"), "xformers")
    monkeypatch.setenv("MICROTURN_ATTENTION", "flash")
    with pytest.raises(ValueError, match="unknown attention backend"):
        KVPool(SMALL, max_sessions=1)


def append(trunk: Transformer, pool: KVPool, counts: dict[str, int], generator: torch.Generator) -> torch.Tensor:
    """One streaming pass: each session appends ``counts[id]`` random tokens; returns the outputs."""
    segments, positions, start = [], [], 0
    for session, count in counts.items():
        slot = pool.slot(session)
        index, pos = pool.reserve(slot, count)
        segments.append(Segment(slot, start, count, index))
        positions.append(pos)
        start += count
    tokens = torch.randn(start, trunk.config.d_model, generator=generator).to(pool.keys.device, pool.keys.dtype)
    rows = pad_rows(tokens)
    row_positions = torch.zeros(rows.shape[0], dtype=torch.int64, device=rows.device)
    row_positions[:start] = torch.cat(positions)
    with torch.no_grad():
        return trunk.forward_stream(rows, StreamBatch(segments, row_positions), pool)[:start]


@needs_xformers
def test_the_packed_xformers_bias_is_the_visibility_rule():
    """BlockDiagonalCausalWithOffsetPaddedKeysMask, materialised, equals visibility()
    laid out the packed way — for sessions inside ``sinks + window``."""
    trunk = Transformer(SMALL).eval()
    pool = KVPool(SMALL, max_sessions=4)
    generator = torch.Generator().manual_seed(0)
    for session in "abc":
        pool.open(session)
    append(trunk, pool, {"a": 13, "b": 1, "c": 13}, generator)
    append(trunk, pool, {"c": 13, "a": 5}, generator)
    # A pass over c, a (out of slot order) and not b: gathered, reordered by slot.
    counts = {"c": 13, "a": 1}
    segments, start = [], 0
    row_positions = []
    for session, count in counts.items():
        index, pos = pool.reserve(pool.slot(session), count)
        segments.append(Segment(pool.slot(session), start, count, index))
        row_positions.append(pos)
        start += count
    batch = StreamBatch(segments, torch.cat(row_positions))
    assert PackedPlan.applies(batch, pool)
    plan = PackedPlan.build(batch, pool)
    by_slot = sorted(zip(counts, row_positions, strict=True), key=lambda item: pool.slot(item[0]))
    expected = torch.zeros(start, len(by_slot) * pool.capacity, dtype=torch.bool)
    row = 0
    for block, (session, positions) in enumerate(by_slot):
        keys = pool.positions[pool.slot(session)]
        expected[row : row + positions.numel(), block * pool.capacity : (block + 1) * pool.capacity] = visibility(
            positions[:, None], keys[None, :], SMALL)
        row += positions.numel()
    materialised = plan.bias.materialize((start, len(by_slot) * pool.capacity)) == 0
    assert torch.equal(materialised, expected)

    # Past sinks + window the ring wraps: that pass cannot use the packed bias.
    for _ in range(5):
        append(trunk, pool, {"a": 13}, generator)
    index, pos = pool.reserve(pool.slot("a"), 1)
    assert not PackedPlan.applies(StreamBatch([Segment(pool.slot("a"), 0, 1, index)], pos), pool)


@needs_cuda_xformers
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
def test_xformers_and_sdpa_agree_on_cuda(dtype, tolerance):
    """Same weights, same tokens, two pools on the GPU: every pass's outputs agree,
    before and after the sessions' rings wrap (packed bias, then the tensor bias)."""
    torch.manual_seed(0)
    trunk = Transformer(SMALL).to("cuda", dtype).eval()
    pools = {name: KVPool(SMALL, 4, device="cuda", dtype=dtype, backend=name) for name in ("sdpa", "xformers")}
    for pool in pools.values():
        for session in "abc":
            pool.open(session)
    schedule = [{"a": 13, "b": 13, "c": 13}] + [{"a": 13, "b": 1, "c": 5}, {"a": 1, "c": 1}] * 12
    for step, counts in enumerate(schedule):
        outputs = {name: append(trunk, pool, counts, torch.Generator().manual_seed(step))
                   for name, pool in pools.items()}
        torch.testing.assert_close(outputs["xformers"].float(), outputs["sdpa"].float(),
                                   rtol=tolerance, atol=tolerance)
    assert max(pools["sdpa"].lengths) > SMALL.sinks + SMALL.window, "the wrapped-ring path ran too"


@needs_cuda_xformers
def test_the_engine_steps_sessions_on_cuda_with_xformers():
    """The serving engine on the GPU: bf16, the xformers backend, several sessions."""
    import numpy as np

    from model.interaction import InteractionModel
    from model.interface import TURN_SAMPLES, TurnInput
    from model.streaming import StreamingModel

    engine = StreamingModel(InteractionModel(SMALL), max_sessions=4, device="cuda")
    assert engine.pool.backend == "xformers" and engine.pool.keys.dtype == torch.bfloat16
    for session in "abc":
        engine.open_session(session)
    rng = np.random.default_rng(0)
    for turn in range(20):  # past sinks + window: both xformers plans run
        outputs = engine.step([TurnInput(s, turn, rng.normal(0, 0.05, TURN_SAMPLES).astype(np.float32))
                               for s in "abc"])
        assert all(o.audio.shape == (TURN_SAMPLES,) and np.isfinite(o.audio).all() for o in outputs)
    assert max(engine.pool.lengths) > SMALL.sinks + SMALL.window
