"""How faithfully an audio head voices the trunk's states, teacher forced.

The closed loop feeds the model's own audio back as dMel bins, so a head whose
rendering, quantised, is not what the trunk was trained to hear drives the trunk
off its training distribution (the flow head "never went quiet", issue 5). This
measures that rendering on its own: with the reference history fed in, each
output patch (``frames_per_output`` frames of ``N_MELS`` bins) is sampled from
the head and quantised as serving quantises it, then compared with the reference
patch — silent patches apart from speech.

    python -m model.voicing --checkpoint checkpoints/tiny --conversations 10
"""

from __future__ import annotations

import argparse
import json

import torch

from model import dmel
from model.conversations import generate
from model.interaction import InteractionModel
from model.train import Example, predictor_states, to_example
from model.weights import load_checkpoint


@torch.no_grad()
def voicing_fidelity(model: InteractionModel, examples: list[Example], temperature: float = 0.0,
                     seed: int = 0) -> dict[str, float | int]:
    """Rendered against reference bins: of the silent patches, how many come out
    silent (every bin at the floor) and their mean bin; of the speech patches, the
    bins rendered exactly and the mean distance in bins. ``temperature`` > 0 samples
    (seeded); 0 decodes as serving does by default."""
    model.eval()
    config = model.config
    silent_total = silent_kept = speech_total = 0
    silent_level = speech_exact = speech_distance = 0.0
    for index, example in enumerate(examples):
        hidden = predictor_states(model, [example])
        generators = None
        if temperature > 0:
            generators = [torch.Generator().manual_seed(seed * 1_000_003 + index * 10_007 + row)
                          for row in range(hidden.shape[0])]
        rendered = dmel.quantize(model.audio_head.sample(hidden, generators, temperature)).long()
        reference = example.model_bins.long().view(-1, config.frames_per_output, dmel.N_MELS)
        speaking = reference.flatten(1).amax(-1) > 0  # bin 0 is the silence floor
        quiet = rendered[~speaking]
        silent_total += quiet.shape[0]
        silent_kept += int((quiet.flatten(1).amax(-1) == 0).sum())
        silent_level += float(quiet.float().sum())
        said, meant = rendered[speaking], reference[speaking]
        speech_total += said.shape[0]
        speech_exact += float((said == meant).float().sum())
        speech_distance += float((said - meant).abs().float().sum())
    bins_per_patch = config.frames_per_output * dmel.N_MELS
    return {
        "silent_patches": silent_total,
        "silent_kept_silent": round(silent_kept / max(silent_total, 1), 3),
        "silent_mean_bin": round(silent_level / max(silent_total * bins_per_patch, 1), 3),
        "speech_patches": speech_total,
        "speech_bins_exact": round(speech_exact / max(speech_total * bins_per_patch, 1), 3),
        "speech_mean_bin_distance": round(speech_distance / max(speech_total * bins_per_patch, 1), 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.voicing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--conversations", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=1_000_000, help="held-out seeds start here")
    parser.add_argument("--temperature", type=float, action="append",
                        help="sampling temperature (repeatable; default: 0, as served)")
    args = parser.parse_args(argv)
    model = load_checkpoint(args.checkpoint)
    seeds = list(range(args.first_seed, args.first_seed + args.conversations))
    examples = [to_example(conversation, model.config) for conversation in generate(seeds, held_out=True)]
    report = {f"temperature {t:g}": voicing_fidelity(model, examples, t) for t in args.temperature or [0.0]}
    print(json.dumps({"checkpoint": args.checkpoint, "audio_head": model.config.audio_head,
                      "conversations": len(examples), **report}, indent=1))


if __name__ == "__main__":
    main()
