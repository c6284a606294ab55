"""The streaming vocoder's quality on held-out reference tracks, as served.

    python -m bench.vocoder [--conversations 20] [--first-seed 1000000]

Each conversation's own model track is binned to dMel (what the model emits), then
vocoded chunk by chunk exactly as a served session is. Prints one JSON object: the
lag, spectral convergence against the binned target, the seams (second difference at a
chunk boundary against its neighbourhood's median, in speech), the vocoder's cost per
chunk, and — through ``model.evaluate``'s own scoring — the reference's response
latency as heard and its one-word answers as DTW and pocketsphinx hear them.
"""

from __future__ import annotations

import argparse
import json
import time

from model.arguments import at_least


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=at_least(1), default=20)
    parser.add_argument("--first-seed", type=at_least(0), default=1_000_000)
    args = parser.parse_args(argv)
    # Imported here: conversation workers re-import this module (torch at import in a
    # forked child can deadlock; model/conversations.py).
    import numpy as np
    import torch

    from model import dmel
    from model.conversations import generate
    from model.evaluate import aggregate, data_text, score, vocoded_timeline
    from model.interface import TURN_SAMPLES
    from model.vocoder import LAG_SAMPLES, VocoderState, seam_bends, spectral_convergence, vocode_chunk

    conversations = generate(list(range(args.first_seed, args.first_seed + args.conversations)), held_out=True)
    convergence, seams, seconds, records = [], [], [], []
    for conversation in conversations:
        audio = torch.from_numpy(conversation.model_audio.astype(np.float32))[None]
        target = dmel.dequantize(dmel.dmel(audio))
        state, chunks = VocoderState.silence(), []
        for start in range(0, target.shape[1], 16):
            began = time.perf_counter()
            chunk, state = vocode_chunk(state, target[:, start : start + 16])
            seconds.append(time.perf_counter() - began)
            chunks.append(chunk)
        emitted = torch.cat(chunks, dim=1)
        # griffin_lim's alignment (WINDOW − HOP behind the frames), which the measure expects.
        aligned = torch.nn.functional.pad(emitted, (dmel.CONTEXT - LAG_SAMPLES, 0))[:, : emitted.shape[1]]
        convergence.append(spectral_convergence(aligned, target))
        seams += seam_bends(emitted[0], TURN_SAMPLES, TURN_SAMPLES)
        records += score(conversation, vocoded_timeline(emitted[0].numpy(), data_text(conversation)))
    scores = aggregate(records)
    print(json.dumps({
        "conversations": args.conversations,
        "lag_ms": 1000 * LAG_SAMPLES / dmel.SAMPLE_RATE,
        "spectral_convergence": round(float(np.mean(convergence)), 4),
        "seams_in_speech": len(seams),
        "seam_bend_median": round(float(np.median(seams)), 2) if seams else None,
        "seam_bend_max": round(max(seams), 1) if seams else None,
        "seams_over_5x": round(float(np.mean(np.array(seams) > 5)), 3) if seams else None,
        "ms_per_chunk_median": round(1000 * float(np.median(seconds)), 2),
        "response_latency_s_median": scores["response_latency_s_median"],
        "spoken_word_accuracy": scores["spoken_word_accuracy"],
        "spoken_word_accuracy_asr": scores["spoken_word_accuracy_asr"],
    }))


if __name__ == "__main__":
    main()
