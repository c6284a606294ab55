"""The listening head: the user's words as targets, a CTC loss that trains, a probe that leaves the trunk alone."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from model import conversations as conv
from model import listening
from model.config import preset
from model.evaluate import listen_probe, read_by_ear
from model.interaction import InteractionModel
from model.interface import SAMPLE_RATE
from model.train import build_parser, crop, predictor_states, to_example, train
from model.weights import load_checkpoint, save_checkpoint, with_parts, without_parts


@pytest.fixture(scope="module")
def sample() -> list[conv.Conversation]:
    return conv.generate([0, 1, 2]) + conv.generate([0], drill="delegation") + conv.generate([1_000_000], held_out=True)


def test_numbers_are_spelled_as_espeak_says_them_and_strange_words_refused():
    assert listening.spoken_words("what is 57 times 70?") == ["what", "is", "fifty", "seven", "times", "seventy"]
    assert listening.spoken_words("That's enough") == ["that's", "enough"]
    assert listening.spoken_words("um nineteen?") == ["um", "nineteen"]
    with pytest.raises(ValueError, match="banana"):
        listening.spoken_words("what comes after banana")
    with pytest.raises(ValueError):
        listening.number_words(100)


def test_every_utterance_is_in_the_vocabulary_and_where_the_user_is_loud(sample):
    checked_loudness = 0
    for conversation in sample:
        assert conversation.user_words, conversation.seed
        targets = listening.word_targets(conversation.user_words)
        frames = conversation.user_audio[: conversation.user_audio.size // 800 * 800].reshape(-1, 800)
        # Most of a conversation is not the user talking. The held-out rooms can be
        # noisy (speech 1.5x the floor there); a span off the speech reads ~1.0x. The
        # noisiest rooms (noise 15 dB under the speech's peak, about its RMS) leave
        # loudness nothing to tell: there even the loudest frames are < 1.5x the floor.
        rms = np.sqrt(np.mean(frames**2, axis=1))
        floor = np.median(rms)
        audible = np.percentile(rms, 95) > 1.5 * floor
        checked_loudness += audible
        for (start_s, end_s, text), row in zip(conversation.user_words, targets.tolist(), strict=True):
            spoken = conversation.user_audio[int(start_s * SAMPLE_RATE) : int(end_s * SAMPLE_RATE)]
            assert not audible or np.sqrt(np.mean(spoken**2)) > 1.4 * floor, (conversation.seed, text)
            assert row[0] == int(start_s * 80) and row[1] >= (end_s + listening.LAG_S) * 80
            words = [listening.WORDS[i - 1] for i in row[2:] if i != listening.BLANK]
            assert words == listening.spoken_words(text)
    assert checked_loudness >= len(sample) - 1  # one noisy room in the sample at most


def test_a_crop_keeps_the_whole_utterances_in_it_and_moves_them(sample):
    example = to_example(sample[0], preset("tiny"))
    spans = example.user_words[:, :2]
    cropped = crop(example, 60, random.Random(3))
    shift = random.Random(3).randint(0, example.turns - 60) * 16  # where crop starts, in frames
    assert torch.equal(cropped.user_bins, example.user_bins[shift : shift + 60 * 16])
    inside = (spans[:, 0] >= shift) & (spans[:, 1] <= shift + 60 * 16)
    assert 0 < len(cropped.user_words) == int(inside.sum()) < len(spans)
    assert torch.equal(cropped.user_words[:, :2], spans[inside] - shift)
    assert torch.equal(cropped.user_words[:, 2:], example.user_words[inside, 2:])


def test_adding_the_head_an_audio_encoder_or_audio_context_changes_no_output():
    torch.manual_seed(0)
    model = InteractionModel(preset("tiny", audio_encoder_layers=0)).eval()
    listening_model = with_parts(model, listen_head=True).eval()
    encoding_model = with_parts(model, audio_encoder_layers=2).eval()
    assert listening_model.config.listen_head and not model.config.listen_head
    example = to_example(conv.generate([5])[0], model.config)
    with torch.no_grad():
        before = predictor_states(model, [example])
        assert torch.equal(before, predictor_states(listening_model, [example]))
        assert torch.equal(before, predictor_states(encoding_model, [example]))
        context_model = with_parts(model, audio_context=3).eval()
        assert torch.equal(before, predictor_states(context_model, [example]))
        context_model.audio_context.out.weight.normal_(0, 0.05)  # as if trained
        assert not torch.equal(before, predictor_states(context_model, [example]))
        for block in encoding_model.audio_encoder.blocks:  # as if trained: no longer identities
            block.down.weight.normal_(0, 0.05)
        trained = predictor_states(encoding_model, [example])
        deeper = with_parts(encoding_model, audio_encoder_layers=4).eval()  # 2 more blocks on trained ones
        assert not torch.equal(before, trained) and torch.equal(trained, predictor_states(deeper, [example]))
    with pytest.raises(ValueError, match="cannot add"):
        with_parts(model, n_layers=5)  # a fifth block is not a part that starts as an identity
    with pytest.raises(ValueError, match="cannot drop"):
        without_parts(model, n_layers=3)  # nor is the fourth one a part to drop


def test_the_probe_trains_the_head_alone_and_the_joint_loss_reaches_the_trunk(tmp_path):
    shipped = load_checkpoint("checkpoints/tiny")  # it has a trained head: start from one without
    without_head = without_parts(shipped, listen_head=False)
    save_checkpoint(without_head, tmp_path / "without_head")
    common = ["--batch", "2", "--turns", "80", "--conversations", "3", "--drills", "1", "--cache",
              str(tmp_path / "cache"), "--warmup", "2", "--save-every", "100"]
    probe = train(build_parser().parse_args(common + [
        "--init", str(tmp_path / "without_head"), "--out", str(tmp_path / "probe"), "--steps", "30", "--lr", "1e-2",
        "--listen-probe"]))
    assert np.mean(probe[-5:]) < 0.5 * np.mean(probe[:5]), probe
    probed = load_checkpoint(tmp_path / "probe")
    assert probed.config.listen_head
    probed_state = probed.state_dict()
    assert all(torch.equal(tensor, probed_state[name]) for name, tensor in without_head.state_dict().items())

    joint = train(build_parser().parse_args(common + [
        "--init", str(tmp_path / "probe"), "--out", str(tmp_path / "joint"), "--steps", "2", "--lr", "1e-3",
        "--listen-weight", "0.5"]))
    assert len(joint) == 2
    trunk = "trunk.blocks.0.attn.qkv.weight"
    assert not torch.equal(load_checkpoint(tmp_path / "joint").state_dict()[trunk], probed_state[trunk])

    conversations = conv.generate([0, 1, 2])
    heard = listen_probe({c.seed: read_by_ear(probed, c) for c in conversations}, conversations)
    assert heard["utterances"] == sum(len(c.user_words) for c in conversations)
    assert heard["with_numbers"] > 0 and 0 <= heard["numbers_right"] <= 1 and 0 <= heard["words_right"] <= 1
