"""Listening: an auxiliary CTC loss that teaches the trunk to hear the user's words.

Trained on its outputs alone, the model learns to hear only through its answers:
"what is 57 plus 71" teaches the operands through one task request, a few bytes in
a 24 s conversation. Its errors were hearing errors — the two-digit operands, the
number words in unseen voices (docs/eval.md, sessions 6-12). So every user
utterance also supervises the states of the audio tokens that heard it: a head
(RMSNorm, then linear) over a small word vocabulary (the conversations' grammar, numbers as
the words espeak-ng says) reads them with CTC, which needs the words but not where
each one is. The states are causal, so a span runs ``LAG_S`` past the
utterance's end: the last word is read once it has been heard.

It reads the residual stream entering the last block (``LAYER``), not the final
hidden states: an audio token's final state feeds no other token, so words learnt
only there would be invisible to the answer; entering the last block they are in
the keys and values every later output attends to.

The head is in the checkpoint (``ModelConfig.listen_head``) and costs one matmul
on the audio tokens; serving does not use it. ``microturn eval`` reads it for the
``heard`` figures: what the model heard, apart from what it said.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from model.conversations import NUMBER_WORDS, TENS_WORDS, number_words

FRAMES_PER_SECOND = 80  # dMel frames (12.5 ms hop)
LAG_S = 0.3  # the span read for an utterance ends this long after it
LAYER = -2  # index into Transformer.forward_layers: the stream entering the last block
MAX_WORDS = 8  # the longest user utterance: "what is fifty seven times seventy one"

_UNITS = NUMBER_WORDS[:20]  # zero .. nineteen
_GRAMMAR = ("hello hi there good morning what comes after count to is plus minus times um uh hmm "
            "stop wait okay thanks that's enough time it").split()
WORDS: tuple[str, ...] = tuple(_GRAMMAR + _UNITS + TENS_WORDS)
NUMBERS = frozenset(_UNITS + TENS_WORDS)
BLANK = 0  # CTC blank; word i is id i + 1
VOCAB = len(WORDS) + 1
_IDS = {word: i + 1 for i, word in enumerate(WORDS)}


def spoken_words(text: str) -> list[str]:
    """The words of a user utterance as heard: lower case, no punctuation, digits spelled."""
    words: list[str] = []
    for token in re.findall(r"[a-z']+|\d+", text.lower()):
        words += number_words(int(token)) if token.isdigit() else [token]
    unknown = [w for w in words if w not in _IDS]
    if unknown:
        raise ValueError(f"{unknown} not in the listening vocabulary (model/listening.py)")
    return words


def word_targets(user_words: list[tuple[float, float, str]]) -> torch.Tensor:
    """(start s, end s, text) per utterance -> (n, 2 + MAX_WORDS) int64: first dMel
    frame, frame after the span (``LAG_S`` past the end), word ids padded with BLANK."""
    rows = torch.zeros(len(user_words), 2 + MAX_WORDS, dtype=torch.int64)
    for row, (start_s, end_s, text) in zip(rows, user_words, strict=True):
        ids = [_IDS[w] for w in spoken_words(text)]
        if len(ids) > MAX_WORDS:
            raise ValueError(f"{text!r} has more than {MAX_WORDS} words")
        row[0] = int(start_s * FRAMES_PER_SECOND)
        row[1] = math.ceil((end_s + LAG_S) * FRAMES_PER_SECOND)
        row[2 : 2 + len(ids)] = torch.tensor(ids)
    return rows


def crop_targets(targets: torch.Tensor, first_frame: int, frames: int) -> torch.Tensor:
    """The utterances whose whole span lies in frames [first_frame, first_frame + frames), shifted."""
    inside = (targets[:, 0] >= first_frame) & (targets[:, 1] <= first_frame + frames)
    kept = targets[inside].clone()
    kept[:, :2] -= first_frame
    return kept


def spans(targets: list[torch.Tensor], frames_per_token: int) -> tuple[list[tuple[int, int, int]], torch.Tensor]:
    """Per example's targets -> [(example, first token, tokens)] and the padded word ids."""
    found, words = [], []
    for example, rows in enumerate(targets):
        for row in rows.tolist():
            first = row[0] // frames_per_token
            found.append((example, first, -(-row[1] // frames_per_token) - first))
            words.append(row[2:])
    return found, torch.tensor(words, dtype=torch.int64).view(-1, MAX_WORDS)


def listen_logits(head: torch.nn.Module, audio_hidden: torch.Tensor,
                  found: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """audio states (b, audio tokens, d) -> log-probs (longest span, utterances, VOCAB), lengths."""
    longest = max(n for _, _, n in found)
    d = audio_hidden.shape[-1]
    gathered = audio_hidden.new_zeros(len(found), longest, d)
    lengths = torch.zeros(len(found), dtype=torch.int64)  # a span can run past the window's end
    for i, (example, first, n) in enumerate(found):
        piece = audio_hidden[example, first : first + n]
        gathered[i, : piece.shape[0]] = piece
        lengths[i] = piece.shape[0]
    return F.log_softmax(head(gathered).float(), -1).transpose(0, 1), lengths


def ctc_loss(head: torch.nn.Module, audio_hidden: torch.Tensor, targets: list[torch.Tensor],
             frames_per_token: int) -> torch.Tensor | None:
    """Mean CTC loss per word over every utterance in the batch; None if there is none."""
    found, words = spans(targets, frames_per_token)
    if not found:
        return None
    log_probs, lengths = listen_logits(head, audio_hidden, found)
    word_lengths = (words != BLANK).sum(-1)
    # zero_infinity: a span too short for its words (never seen in the data) adds nothing.
    return F.ctc_loss(log_probs, words, lengths, word_lengths, blank=BLANK, reduction="mean", zero_infinity=True)


def greedy_words(log_probs: torch.Tensor, length: int) -> list[str]:
    """Best path of one span's (tokens, VOCAB) log-probs, repeats merged and blanks dropped."""
    best = log_probs[:length].argmax(-1).tolist()
    words, previous = [], BLANK
    for token in best:
        if token != previous and token != BLANK:
            words.append(WORDS[token - 1])
        previous = token
    return words
