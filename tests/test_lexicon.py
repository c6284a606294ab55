"""Lexicon-constrained decoding (model/lexicon.py): the model spells only words it was taught."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from model.config import NO_TEXT, TASK_CLOSE, TASK_OPEN, TEXT_VOCAB, preset
from model.conversations import generate
from model.evaluate import main as eval_main
from model.interaction import InteractionModel, choose_text
from model.interface import TURN_SAMPLES, TurnInput
from model.lexicon import Lexicon, words_written
from model.streaming import StreamingModel, load_engine
from model.text import encode
from model.vocoder import VocoderState
from model.weights import save_checkpoint

SHIPPED = "checkpoints/tiny"


def allowed_bytes(lexicon: Lexicon, node: int) -> set[str]:
    return {chr(i) for i in lexicon.mask([node])[0].nonzero().flatten().tolist() if i < 128}


def walk(lexicon: Lexicon, text: str) -> int:
    node = 0
    for token in encode(text):
        node = lexicon.advance(node, token)
    return node


def test_a_letter_only_continues_a_word_and_a_word_only_ends_where_one_does():
    lexicon = Lexicon(["five", "fifteen", "four", "it's"])
    root = allowed_bytes(lexicon, 0)
    assert {"f", "i"} <= root and not {"s", "t", "F"} & root  # words start only as some word does
    assert {".", " ", "1", ","} <= root  # outside a word, printable bytes that are no letter
    assert not lexicon.mask([0])[0, [0x00, 0x0A, 0x80, 0xE2]].any()  # no control bytes, no non-ASCII
    assert lexicon.mask([0])[0, [TASK_OPEN, TASK_CLOSE]].all()  # the model's requests
    assert allowed_bytes(lexicon, walk(lexicon, "fi")) == {"f", "v"}  # "fi": fifteen or five, nothing ends yet
    five = allowed_bytes(lexicon, walk(lexicon, "five"))
    assert "." in five and " " in five and not any(c.isalpha() for c in five)
    assert allowed_bytes(lexicon, walk(lexicon, "it")) == {"'"}  # the apostrophe is part of a word
    for node in (0, walk(lexicon, "fi"), walk(lexicon, "five")):
        assert lexicon.mask([node])[0, NO_TEXT]  # falling silent is always allowed, even mid-word
    # A word ends at anything that is no letter, and the next starts afresh; a silent
    # output inside a word keeps it (the engine ends it after a micro-turn without text).
    assert walk(lexicon, "five. f") == walk(lexicon, "f") != 0
    assert lexicon.advance(walk(lexicon, "four"), TASK_CLOSE) == 0
    assert lexicon.advance(walk(lexicon, "fo"), NO_TEXT) == walk(lexicon, "fo")


def test_a_lexicon_holds_words_only():
    with pytest.raises(ValueError, match="letters and apostrophes only"):
        Lexicon(["five", "5"])
    with pytest.raises(ValueError, match="empty lexicon"):
        Lexicon([])


def test_words_written_skips_a_reply_cut_off_mid_word():
    """In the data a barge-in cuts the text mid-word ("fou", then silence): no word."""
    ids = [*encode("one, two, fou"), NO_TEXT, NO_TEXT, *encode("calc: 12 + 3"), TASK_CLOSE, *encode("good")]
    rows = np.array(ids + [NO_TEXT] * (-len(ids) % 4)).reshape(-1, 4)
    assert words_written(rows) == {"one", "two", "calc"}  # "good" runs into silence as well


def test_choose_text_writes_the_likeliest_allowed_byte_and_decides_to_write_unconstrained():
    probs = torch.full((2, TEXT_VOCAB), 1e-9)
    # Row 0: a non-word's letter first ("x", 0.5), then "t" (0.3); silence 0.2.
    probs[0, ord("x")], probs[0, ord("t")], probs[0, NO_TEXT] = 0.5, 0.3, 0.2
    # Row 1: writing 0.6, all of it on a letter the lexicon forbids.
    probs[1, ord("x")], probs[1, NO_TEXT] = 0.6, 0.4
    logits = probs.log()
    allowed = torch.ones(2, TEXT_VOCAB, dtype=torch.bool)
    allowed[:, ord("x")] = False
    assert choose_text(logits, 0.5).tolist() == [ord("x"), ord("x")]
    chosen = choose_text(logits, 0.5, allowed).tolist()
    assert chosen[0] == ord("t")  # the likeliest byte the lexicon allows
    assert chosen[1] not in (NO_TEXT, ord("x"))  # it still writes: the decision was the model's
    greedy = choose_text(logits, None, allowed).tolist()  # greedy writes as it would have, an allowed byte
    assert greedy[0] == ord("t") and greedy[1] not in (NO_TEXT, ord("x"))
    probs[1, NO_TEXT] = 0.7
    assert choose_text(probs.log(), None, allowed).tolist()[1] == NO_TEXT  # and keeps quiet as it would have


def letters_model() -> InteractionModel:
    """An untrained model whose text head writes at every position, only lower-case
    letters, spaces and full stops, chosen by its hidden state: letter runs at random,
    almost none of them a word."""
    torch.manual_seed(0)
    model = InteractionModel(preset("tiny"))
    written = [*range(ord("a"), ord("z") + 1), ord(" "), ord(".")]
    with torch.no_grad():
        model.text_head.weight.zero_()
        model.text_head.bias.fill_(-30.0)
        model.text_head.weight[written] = torch.randn(len(written), model.config.d_model) * 3
        model.text_head.bias[written] = 0.0
    return model


def served_text(lexicon: Lexicon | None, turns: int = 30) -> str:
    model = letters_model()
    engine = StreamingModel(model, max_sessions=2, write_threshold=0.5, lexicon=lexicon)
    engine.open_session("s")
    rng = np.random.default_rng(0)
    return "".join(engine.step([TurnInput("s", t, rng.normal(0, 0.1, TURN_SAMPLES).astype(np.float32))])[0].text
                   for t in range(turns))


def test_the_served_text_spells_only_lexicon_words():
    lexicon = Lexicon(["five", "fifteen", "four", "hello", "it's", "calc"])
    free = served_text(None)
    constrained = served_text(lexicon)
    assert any(word not in lexicon.words for word in re.findall(r"[A-Za-z']+(?=[^A-Za-z'])", free)), \
        "the untrained model must spell non-words unconstrained, or this test shows nothing"
    assert_only_lexicon_words(constrained, lexicon)


def assert_only_lexicon_words(text: str, lexicon: Lexicon) -> None:
    finished = re.findall(r"[A-Za-z']+(?=[^A-Za-z'])", text)  # words something else ended
    assert finished and set(finished) <= set(lexicon.words), text
    trailing = re.search(r"[A-Za-z']+$", text)  # a word still being written: a prefix of one
    assert trailing is None or any(w.startswith(trailing.group()) for w in lexicon.words), text


def test_a_step_that_fails_puts_the_word_being_written_back():
    """All-or-nothing steps (model/streaming.py): the word being written is session
    state, so a step that fails after its text was chosen must put it back. The fault
    is tests/test_faults.py's: a vocoder state one bin short fails after every pass."""
    lexicon = Lexicon(["hello", "fifteen"])
    engine = StreamingModel(letters_model(), max_sessions=1, write_threshold=0.5, lexicon=lexicon)
    engine.open_session("s")
    chunk = np.zeros(TURN_SAMPLES, dtype=np.float32)
    session = engine._sessions["s"]
    text, turn = "", 0
    while session.word_node == 0 and turn < 20:  # until it is in the middle of a word
        text += engine.step([TurnInput("s", turn, chunk)])[0].text
        turn += 1
    assert session.word_node != 0, f"never stopped mid-word: {text!r}"
    before, good = session.word_node, session.vocoder
    session.vocoder = VocoderState(good.spectrum, good.magnitude[..., :-1], good.committed, good.opening)
    with pytest.raises(RuntimeError):
        engine.step([TurnInput("s", turn, chunk)])
    assert session.word_node == before
    session.vocoder = good
    for later in range(turn, turn + 5):  # the word goes on from where the text left it
        text += engine.step([TurnInput("s", later, chunk)])[0].text
    assert_only_lexicon_words(text, lexicon)


def test_a_checkpoints_decoding_json_names_its_lexicon(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(InteractionModel(preset("tiny")), tmp_path / "ckpt")
    Lexicon(["five", "four"]).save(tmp_path / "ckpt" / "lexicon.txt")
    (tmp_path / "ckpt" / "decoding.json").write_text('{"write_threshold": 0.5, "lexicon": "lexicon.txt"}')
    engine = load_engine(str(tmp_path / "ckpt"), max_sessions=1)
    assert engine.lexicon is not None and engine.lexicon.words == ["five", "four"]
    assert engine.decoding == "write_threshold 0.5, lexicon of 2 words"
    assert load_engine(str(tmp_path / "ckpt"), max_sessions=1, lexicon=None).lexicon is None  # eval --lexicon none
    (tmp_path / "ckpt" / "decoding.json").write_text('{"lexicon": "words.txt"}')
    with pytest.raises(ValueError, match="lexicon 'words.txt' is not a file"):
        load_engine(str(tmp_path / "ckpt"), max_sessions=1)


def test_eval_refuses_a_lexicon_that_is_no_file(capsys, tmp_path):
    with pytest.raises(SystemExit):
        eval_main(["--lexicon", str(tmp_path / "missing.txt")])
    assert "argument --lexicon: 'none' or a word list file" in capsys.readouterr().err


def test_the_shipped_lexicon_holds_every_word_the_data_teaches():
    """checkpoints/tiny spells only its lexicon's words (its decoding.json): a word the
    data teaches but the list lacks could never be written. Fresh conversations, held
    out and in the training voices, and a delegation drill, must hold no other word."""
    engine = load_engine(SHIPPED, max_sessions=1)
    assert engine.lexicon is not None and engine.decoding.endswith(f"lexicon of {len(engine.lexicon)} words")
    conversations = [*generate([1_000_000, 1_000_001], held_out=True), *generate([5_000_000]),
                     *generate([5_000_000], drill="delegation")]
    taught = set().union(*(words_written(c.text_out) for c in conversations))
    assert {"fifteen", "calc", "moment"} <= taught  # answers, requests and holding phrases were all seen
    assert taught <= set(engine.lexicon.words), taught - set(engine.lexicon.words)


def test_a_micro_turn_without_text_ends_the_word():
    """A barge-in cuts a reply mid-word ("fou") and silence follows: the next word must
    start afresh, not be forced to go on as "four"."""
    lexicon = Lexicon(["hello", "fifteen"])
    model = letters_model()
    engine = StreamingModel(model, max_sessions=1, write_threshold=0.5, lexicon=lexicon)
    engine.open_session("s")
    chunk = np.zeros(TURN_SAMPLES, dtype=np.float32)
    session, turn = engine._sessions["s"], 0
    while session.word_node == 0 and turn < 20:
        engine.step([TurnInput("s", turn, chunk)])
        turn += 1
    assert session.word_node != 0
    with torch.no_grad():
        model.text_head.bias[NO_TEXT] = 100.0  # it falls silent for a whole micro-turn
    assert engine.step([TurnInput("s", turn, chunk)])[0].text == ""
    assert session.word_node == 0
