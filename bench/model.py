"""Model serving benchmarks: step time by session count, streaming vs recomputing,
batched vs one-at-a-time. Median of ``--repeats`` runs of each measurement.

    microturn bench model [--json] [--preset tiny] [--repeats 5] [--device cuda] [--attention sdpa|xformers] [--window N]
                       [--layers N] [--audio-encoder N] [--audio-context N] [--write-threshold P|greedy]
                       [--lexicon FILE]

On CUDA with xformers installed it also runs the step-by-sessions sweep with SDPA
in the same process and reports the ratio and the xformers kernels that ran.

Sessions start with ``--context-s`` seconds of context already in their caches
(marked as appended; the values do not change the cost). Attention always spans a
session's whole cache slot (see model/transformer.py), so the step time is the
same early and late in a conversation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from model.arguments import lexicon_file, write_threshold
from model.attention import XFORMERS_OPS_USED, xformers_unusable
from model.config import preset
from model.interaction import InteractionModel
from model.interface import TURN_SAMPLES, TurnInput
from model.lexicon import Lexicon
from model.streaming import StreamingModel

TURNS_PER_SECOND = 5


def median_ms(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


class Sessions:
    """``count`` open sessions of one engine, each ``context_s`` seconds into a conversation."""

    def __init__(self, engine: StreamingModel, count: int, context_s: float, tag: str) -> None:
        self.engine = engine
        self.ids = [f"{tag}-{i}" for i in range(count)]
        self.turn = 0
        self.rng = np.random.default_rng(0)
        tokens = int(context_s * TURNS_PER_SECOND) * engine.config.tokens_per_turn
        for session_id in self.ids:
            engine.open_session(session_id)
            if tokens:
                engine.pool.pretend_appended(engine.pool.slot(session_id), tokens)
        self.step()  # first step: feeds no pending output, warms up

    def step(self) -> None:
        batch = [TurnInput(s, self.turn, self.rng.normal(0, 0.05, TURN_SAMPLES).astype(np.float32)) for s in self.ids]
        self.engine.step(batch)
        self.turn += 1

    def close(self) -> None:
        for session_id in self.ids:
            self.engine.close_session(session_id)


def step_sweep(engine: StreamingModel, counts: tuple[int, ...], context_s: float, repeats: int) -> dict[str, float]:
    step_ms: dict[str, float] = {}
    for count in counts:
        sessions = Sessions(engine, count, context_s, f"n{count}")
        step_ms[str(count)] = round(median_ms(lambda s=sessions: (s.step(), synchronize(engine)), repeats), 2)
        sessions.close()
    return step_ms


def synchronize(engine: StreamingModel) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def run(preset_name: str = "tiny", repeats: int = 5, context_s: float = 60.0,
        counts: tuple[int, ...] = (1, 8, 32, 64), device: str = "cpu",
        attention: str | None = None, window: int = 0, audio_encoder: int | None = None,
        audio_context: int | None = None, layers: int | None = None,
        write_threshold: float | None = None, lexicon: Lexicon | None = None) -> dict[str, object]:
    torch.manual_seed(0)
    overrides: dict[str, int] = {"window": window} if window else {}
    if audio_encoder is not None:
        overrides["audio_encoder_layers"] = audio_encoder
    if audio_context is not None:
        overrides["audio_context"] = audio_context
    if layers is not None:
        overrides["n_layers"] = layers
    model = InteractionModel(preset(preset_name, **overrides)).eval()
    config = model.config
    engine = StreamingModel(model, max_sessions=max(counts) + 1, device=device, attention=attention,
                            write_threshold=write_threshold, lexicon=lexicon)
    results: dict[str, object] = {
        "preset": preset_name,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "device": torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu",
        "attention": engine.pool.backend,
        "window": config.window,  # with the sinks, the keys each session's queries attend over
        "n_layers": config.n_layers,
        "audio_encoder_layers": config.audio_encoder_layers,
        "audio_context": config.audio_context,
        "decoding": engine.decoding,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "context_s": context_s,
        "repeats": repeats,
    }

    step_ms = step_sweep(engine, counts, context_s, repeats)
    results["step_ms_by_sessions"] = step_ms
    if engine.pool.backend == "xformers":
        results["xformers_ops"] = dict(XFORMERS_OPS_USED)
        sdpa = StreamingModel(model, max_sessions=max(counts) + 1, device=device, attention="sdpa",
                              write_threshold=write_threshold, lexicon=lexicon)
        sdpa_ms = step_sweep(sdpa, counts, context_s, repeats)
        del sdpa
        results["sdpa_step_ms_by_sessions"] = sdpa_ms
        results["sdpa_over_xformers_step_ratio"] = {n: round(sdpa_ms[n] / step_ms[n], 2) for n in step_ms}
    elif engine.device.type == "cuda":  # say why there is no comparison (a wheel for another torch, say)
        results["xformers_unusable"] = xformers_unusable()
    results["batch32_throughput_ratio"] = round(32 * step_ms["1"] / step_ms["32"], 2) if "32" in step_ms else None

    # Streaming a micro-turn at 2 minutes of context vs recomputing those 2 minutes.
    two_minutes = 120 * TURNS_PER_SECOND * config.tokens_per_turn
    sessions = Sessions(engine, 1, 120.0, "stream")
    stream_ms = median_ms(lambda: (sessions.step(), synchronize(engine)), repeats)
    sessions.close()
    tokens = torch.randn(1, two_minutes + config.tokens_per_turn, config.d_model, device=engine.device)
    with torch.inference_mode(), engine.autocast:
        recompute_ms = median_ms(lambda: (model.trunk.forward_full(tokens), synchronize(engine)), max(1, repeats // 2))
    results["stream_step_ms_2min"] = round(stream_ms, 2)
    results["recompute_ms_2min"] = round(recompute_ms, 2)
    results["append_vs_recompute_ratio_2min"] = round(recompute_ms / stream_ms, 1)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="microturn bench model", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--context-s", type=float, default=60.0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--attention", choices=["sdpa", "xformers"], default=None,
                        help="attention backend (default: xformers on CUDA when installed, else SDPA)")
    parser.add_argument("--window", type=int, default=0, help="attention window in tokens (default: the preset's)")
    parser.add_argument("--audio-encoder", type=int, default=None, metavar="BLOCKS",
                        help="encoder blocks on the user's audio tokens (default: the preset's)")
    parser.add_argument("--audio-context", type=int, default=None, metavar="TOKENS",
                        help="earlier audio tokens each user audio token mixes in (default: the preset's)")
    parser.add_argument("--layers", type=int, default=None, metavar="BLOCKS",
                        help="trunk blocks (default: the preset's)")
    parser.add_argument("--write-threshold", type=write_threshold, default=None, metavar="P",
                        help="decode text in two stages with this threshold (default: greedy; the shipped "
                             "checkpoint's decoding.json says 0.5)")
    parser.add_argument("--lexicon", type=lexicon_file, default=None, metavar="FILE",
                        help="spell only this word list's words (model/lexicon.py; default: any bytes)")
    args = parser.parse_args(argv)
    results = run(args.preset, args.repeats, args.context_s, device=args.device, attention=args.attention,
                  window=args.window, audio_encoder=args.audio_encoder, audio_context=args.audio_context,
                  layers=args.layers, write_threshold=args.write_threshold,
                  lexicon=Lexicon.load(args.lexicon) if args.lexicon else None)
    if args.json:
        print(json.dumps(results))
        return
    for key, value in results.items():
        print(f"{key:32s} {value}")


if __name__ == "__main__":
    main()
