"""The audio head's rendering, teacher forced (model/voicing.py), and the flow
head's silence gate: sampled silence must be the floor the trunk was trained on."""

from __future__ import annotations

import random

import pytest
import torch

from model import dmel
from model.config import preset
from model.conversations import generate
from model.heads import _MEL_CENTRE, _MEL_SCALE, FlowHead
from model.train import batch_loss, crop, rendered_history, to_example
from model.voicing import voicing_fidelity
from model.weights import load_checkpoint, with_audio_head


def constant_flow_head(gate: float, bins: torch.Tensor) -> FlowHead:
    """A flow head whose every sample (from zero noise) lands mid-way in ``bins``
    (frames, mels): a zero output layer whose bias is the one velocity it flows by."""
    config = preset("tiny", audio_head="flow", flow_silence_gate=gate)
    head = FlowHead(config)
    target = (dmel.dequantize(bins) - _MEL_CENTRE) / _MEL_SCALE
    with torch.no_grad():
        head.out.weight.zero_()
        head.out.bias.copy_(target.flatten())
    return head


@pytest.mark.parametrize("gate", [1.0, 0.0])
def test_near_floor_flow_samples_become_the_floor_and_speech_is_untouched(gate):
    frames = preset("tiny").frames_per_output
    near_floor = torch.zeros(frames, dmel.N_MELS, dtype=torch.int64)
    near_floor[:, ::3] = 1  # a third of the bins one step up: mean level 0.33
    speech = torch.full((frames, dmel.N_MELS), 9, dtype=torch.int64)
    speech[:, 40:] = 0  # quiet high channels: mean level still far above a bin
    hidden = torch.zeros(2, preset("tiny").d_model)

    quiet = dmel.quantize(constant_flow_head(gate, near_floor).sample(hidden, None, 0.0))
    loud = dmel.quantize(constant_flow_head(gate, speech).sample(hidden, None, 0.0))

    assert torch.equal(loud, speech.expand(2, -1, -1))
    if gate:
        assert quiet.max() == 0, "gated to the floor"
    else:
        assert torch.equal(quiet, near_floor.expand(2, -1, -1)), "no gate: rendered as sampled"


def test_fidelity_tells_a_trained_head_from_a_fresh_one():
    shipped = load_checkpoint("checkpoints/tiny")
    examples = [to_example(conversation, shipped.config) for conversation in generate([1_000_000], held_out=True)]
    trained = voicing_fidelity(shipped, examples)
    assert trained["silent_patches"] > 0 and trained["speech_patches"] > 0
    # Measured on ten held-out conversations: 0.999 silent kept, 0.915 of speech bins exact.
    assert trained["silent_kept_silent"] > 0.95 and trained["speech_bins_exact"] > 0.8, trained

    fresh = with_audio_head(shipped, "flow")
    fresh.audio_head.silence_gate = 0.0  # as sampled
    untrained = voicing_fidelity(fresh, examples)
    assert untrained["speech_patches"] == trained["speech_patches"]
    assert untrained["silent_kept_silent"] < 0.5 and untrained["speech_bins_exact"] < 0.5, untrained


def test_the_trunk_can_be_trained_on_its_head_rendered_history():
    """``--render-history`` feeds back what the head renders, one output ahead of the
    reference: for the shipped classify head nearly the reference (measured 0.977 of
    bins), and the trunk's text loss on it is higher than on the clean reference
    (measured 0.109 against 0.037): the gap serving opens and this trains across."""
    shipped = load_checkpoint("checkpoints/tiny")
    example = to_example(generate([1_000_001], held_out=True)[0], shipped.config)
    batch = [crop(example, 80, random.Random(0))]
    rendered = rendered_history(shipped, batch)
    reference = batch[0].model_bins.long()
    assert rendered.shape == (1, *reference.shape)
    agreement = float((rendered[0] == reference).float().mean())
    assert 0.9 < agreement < 1.0, agreement
    _, clean = batch_loss(shipped, batch, 0.0, 3, 2)
    _, served_like = batch_loss(shipped, batch, 0.0, 3, 2, render_history=True)
    assert served_like["text"] > clean["text"], (served_like, clean)
