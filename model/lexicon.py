"""Lexicon-constrained text decoding: the model writes only words it was taught.

The text head writes bytes, so a model unsure of a word can spell one that does not
exist ("tifteen", "fiur"). With a lexicon (the words of the model's side of the
training data), a letter may only continue a known word, and a word may only end
where a known word ends; everything that is not a letter (digits, spaces,
punctuation, markers) and silence (NO_TEXT) stay free. It changes which byte is
written, never whether one is: the decision to write is still the model's own
(``model.interaction.choose_text``). The voice follows a changed byte only from the
next output on, since each output's audio comes from the same hidden state as its
byte (docs/eval.md, session 33: written answers up, speech unchanged).

State per session is one trie node: 0 outside a word, else the word prefix written so
far. Any other byte ends a word, and so does a micro-turn with no text at all (in
the data a reply cut off mid-word is followed by silence, and the next word starts
afresh); a silent output inside a micro-turn does not, so a word the model pauses in
goes on where it stopped. Words are case-sensitive, letters and apostrophes. Outside
a word only printable ASCII and the task/result markers may be written: the data
has nothing else, so anything else is never the word the model meant.

    python -m model.lexicon --conversations 400 --drills 100 --out checkpoints/tiny/lexicon.txt

``microturn train`` writes one from its own examples' text at every save.
"""

from __future__ import annotations

import argparse
import copy
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from model.arguments import at_least
from model.config import NO_TEXT, RESULT_CLOSE, RESULT_OPEN, TASK_CLOSE, TASK_OPEN, TEXT_VOCAB

LETTERS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'")
# What may end a word or stand between words: printable ASCII and the markers.
BETWEEN_WORDS = frozenset(range(0x20, 0x7F)) - LETTERS | {TASK_OPEN, TASK_CLOSE, RESULT_OPEN, RESULT_CLOSE}
_WORD = re.compile(r"[A-Za-z']+")  # what the lexicon holds


class Lexicon:
    """A byte trie over ``words`` with, per node, the text ids allowed next."""

    def __init__(self, words: Iterable[str]) -> None:
        self.words = sorted({w for w in words if w})
        bad = [w for w in self.words if not _WORD.fullmatch(w)]
        if bad:
            raise ValueError(f"lexicon words are letters and apostrophes only, not {bad[:5]}")
        if not self.words:
            raise ValueError("an empty lexicon would forbid every letter")
        children: list[dict[int, int]] = [{}]
        complete = [False]
        for word in self.words:
            node = 0
            for byte in word.encode():
                if byte not in children[node]:
                    children[node][byte] = len(children)
                    children.append({})
                    complete.append(False)
                node = children[node][byte]
            complete[node] = True
        # next_node[node, id]: where writing ``id`` leads (0: out of any word; silence
        # stays put), so a batch of sessions advances in one gather on the engine's device.
        next_node = torch.zeros(len(children), TEXT_VOCAB, dtype=torch.int64)
        next_node[:, NO_TEXT] = torch.arange(len(children))
        for node, next_bytes in enumerate(children):
            next_node[node, list(next_bytes)] = torch.tensor(list(next_bytes.values()), dtype=torch.int64)
        self.next_node = next_node
        allowed = torch.zeros(len(children), TEXT_VOCAB, dtype=torch.bool)
        allowed[:, NO_TEXT] = True  # staying silent is always the model's choice
        for node, (next_bytes, ends_word) in enumerate(zip(children, complete, strict=True)):
            allowed[node, list(next_bytes)] = True
            if node == 0 or ends_word:
                allowed[node, list(BETWEEN_WORDS)] = True
        self.allowed = allowed  # (nodes, TEXT_VOCAB)

    def __len__(self) -> int:
        return len(self.words)

    def on(self, device: torch.device) -> Lexicon:
        """The same lexicon with its tables on ``device`` (where an engine chooses text)."""
        moved = copy.copy(self)
        moved.allowed, moved.next_node = self.allowed.to(device), self.next_node.to(device)
        return moved

    def mask(self, nodes: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """(n, TEXT_VOCAB) bool: which ids each session may write next."""
        return self.allowed[torch.as_tensor(nodes, device=self.allowed.device)]

    def advance(self, nodes: torch.Tensor | int, ids: torch.Tensor | int) -> torch.Tensor:
        """The nodes after writing ``ids``: deeper in a word, or 0 once it ends (the
        engine also ends it after a micro-turn without text)."""
        device = self.next_node.device
        return self.next_node[torch.as_tensor(nodes, device=device), torch.as_tensor(ids, device=device)]

    def save(self, path: str | Path) -> None:
        Path(path).write_text("".join(f"{word}\n" for word in self.words))

    @classmethod
    def load(cls, path: str | Path) -> Lexicon:
        return cls(Path(path).read_text().split())


def words_written(text_out: Iterable[Sequence[int]]) -> set[str]:
    """The whole words in a conversation's model text ids: letter runs ended by another
    byte or a marker. A run ended by silence is a reply cut off mid-word ("fou"), not a word."""
    words, run = set(), bytearray()
    for token in (token for row in text_out for token in row):
        if token in LETTERS:
            run.append(token)
            continue
        if run and token != NO_TEXT:
            words.add(run.decode())
        run.clear()
    return words


def from_data(seeds: Sequence[int], drill_seeds: Sequence[int] = ()) -> Lexicon:
    """The words the model writes in these training conversations and drills."""
    from model.conversations import generate  # espeak-ng: only when building one

    words: set[str] = set()
    for conversation in [*generate(list(seeds)), *generate(list(drill_seeds), drill="delegation")]:
        words |= words_written(conversation.text_out)
    return Lexicon(words)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.lexicon", description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=at_least(1), default=400)
    parser.add_argument("--drills", type=at_least(0), default=100)
    parser.add_argument("--first-seed", type=at_least(0), default=0)
    parser.add_argument("--out", required=True, help="word list to write (e.g. CHECKPOINT/lexicon.txt)")
    args = parser.parse_args(argv)
    lexicon = from_data(range(args.first_seed, args.first_seed + args.conversations),
                        range(args.first_seed, args.first_seed + args.drills))
    lexicon.save(args.out)
    print(f"{len(lexicon)} words -> {args.out}")


if __name__ == "__main__":
    main()
