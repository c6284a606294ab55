"""A checkpoint whose weights are the mean of others' (``microturn average``).

Fine-tunes of one checkpoint stay in its basin, so the points between them are models
too, often better than either end (weight averaging, "model soups"). Session 37 found
the midpoint of the shipped V8 and its fine-tune on its own rendered voice kept V8's
turn-taking and most of the fine-tune's answers (docs/eval.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from model.interaction import InteractionModel
from model.lexicon import Lexicon
from model.train import save_decoding
from model.weights import load_checkpoint, load_decoding, save_checkpoint


def average(sources: list[Path], weights: list[float] | None = None) -> InteractionModel:
    """The ``weights``-weighted mean (default: uniform) of ``sources``' weights, which
    must share one config. Tensors that are not floating point (none in this model
    today) must be equal in all."""
    if len(sources) < 2:
        raise ValueError("averaging needs two checkpoints or more")
    weights = weights or [1.0] * len(sources)
    if len(weights) != len(sources) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"one weight of 0 or more per checkpoint, not all 0: got {weights} for {len(sources)}")
    models = [load_checkpoint(sources[0])]
    models += [load_checkpoint(source, expect=models[0].config) for source in sources[1:]]
    states = [model.state_dict() for model in models]
    mean: dict[str, torch.Tensor] = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            mean[name] = sum(w * state[name] for w, state in zip(weights, states, strict=True)) / sum(weights)
        elif all(torch.equal(first, state[name]) for state in states[1:]):
            mean[name] = first
        else:
            raise ValueError(f"{name} ({first.dtype}) differs between the checkpoints and cannot be averaged")
    models[0].load_state_dict(mean)
    return models[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="microturn average", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint directories, one config")
    parser.add_argument("--out", required=True, type=Path, help="where the averaged checkpoint goes")
    parser.add_argument("--weights", nargs="+", type=float, default=None,
                        help="one per checkpoint (default: equal)")
    args = parser.parse_args(argv)
    if args.out.resolve() in {c.resolve() for c in args.checkpoints}:
        parser.error("--out must not be one of the checkpoints averaged")
    try:
        model = average(args.checkpoints, args.weights)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    save_checkpoint(model, args.out)
    # Decoded as the first checkpoint is, written as training writes it: its settings and lexicon.
    settings = load_decoding(args.checkpoints[0])
    lexicon = settings.pop("lexicon", None)
    save_decoding(args.out, settings, set(Lexicon.load(str(lexicon)).words) if lexicon else set())
    print(f"{args.out}: mean of {', '.join(map(str, args.checkpoints))}"
          + (f" weighted {args.weights}" if args.weights else ""))

