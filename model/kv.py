"""The KV pool: every session's keys and values, in preallocated ring buffers.

A session takes a slot on ``open`` and gives it back on ``close``. Open sessions
always occupy slots 0..n−1 (closing one moves the last session into its place),
so a pass over every open session reads the pool in place, without a gather.
Each slot holds
``sinks`` permanent entries (the session's first tokens) and a ring for the rest,
sized ``window + tokens_per_turn``: while a step appends its micro-turn's tokens
(over several passes), no key that one of them still needs (see
attention.visibility) has been overwritten, so a failed step's ``rollback`` loses
nothing a retry would see. (``window + max_append``, one pass, was enough for the
appends, but a retried step then found two of its visible keys zeroed.)
Memory is fixed at construction: a session's cost is the same after a minute or a day.

The sinks' keys are also kept before their rotary rotation (``raw_sinks``): a
long session would otherwise attend to them across distances no training window
ever spanned (rotary angles the model never saw). ``transformer.place_sinks``
rotates them to sit at most ``sink_distance`` before each pass's first query.
"""

from __future__ import annotations

import torch

from model.attention import choose_backend
from model.config import ModelConfig


class KVPool:
    def __init__(self, config: ModelConfig, max_sessions: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, backend: str | None = None,
                 sink_distance: int | None = None) -> None:
        self.config = config
        self.backend = choose_backend(torch.device(device), backend)  # "sdpa" or "xformers"
        self.capacity = config.sinks + config.window + config.tokens_per_turn
        # (layer, slot, entry, kv head, dim): one layout for both attention backends.
        # xformers reads a run of packed slots as one padded key sequence (a view);
        # SDPA reads the same memory transposed to (slot, head, entry, dim), in place.
        shape = (config.n_layers, max_sessions, self.capacity, config.n_kv_heads, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.positions = torch.full((max_sessions, self.capacity), -1, dtype=torch.int64, device=device)
        self.lengths = [0] * max_sessions  # tokens appended so far = the next position
        # The sinks' keys unrotated, and the shift their stored (rotated) keys were
        # placed at: position i is rotated as i + shift (``transformer.place_sinks``).
        self.raw_sinks = torch.zeros(shape[:2] + (config.sinks,) + shape[3:], device=device, dtype=dtype)
        self.sink_shift = [0] * max_sessions
        # The farthest a pass's first query sees the first sink; the default is the
        # span every training window covers (``train.check_trained_span``).
        nearest = config.sinks + config.window - 1
        self.sink_distance = nearest if sink_distance is None else sink_distance
        if self.sink_distance < nearest:
            raise ValueError(f"sink_distance {self.sink_distance}: at least sinks + window - 1 ({nearest}), "
                             "or a sink would be placed inside the window")
        self._slots: dict[str, int] = {}
        self._owners: list[str] = []  # session id of each occupied slot, in slot order

    @property
    def max_sessions(self) -> int:
        return len(self.lengths)

    @property
    def open_sessions(self) -> int:
        return len(self._slots)

    def slot(self, session_id: str) -> int:
        return self._slots[session_id]

    def open(self, session_id: str) -> int:
        if session_id in self._slots:
            raise ValueError(f"session {session_id} already has a slot")
        if len(self._owners) == self.max_sessions:
            raise RuntimeError(f"the KV pool is full ({self.max_sessions} sessions)")
        slot = len(self._owners)
        self.positions[slot] = -1
        self.lengths[slot] = 0
        # Old entries are masked, but a masked NaN still poisons attention (its weight
        # is 0, and 0·NaN is NaN): a new session starts from zeros.
        self.keys[:, slot] = 0
        self.values[:, slot] = 0
        self.raw_sinks[:, slot] = 0
        self.sink_shift[slot] = 0
        self._slots[session_id] = slot
        self._owners.append(session_id)
        return slot

    def close(self, session_id: str) -> None:
        slot = self._slots.pop(session_id, None)
        if slot is None:
            return
        last = len(self._owners) - 1
        moved = self._owners.pop()
        if slot != last:  # keep slots packed: the last session takes the freed slot
            self.keys[:, slot] = self.keys[:, last]
            self.values[:, slot] = self.values[:, last]
            self.positions[slot] = self.positions[last]
            self.lengths[slot] = self.lengths[last]
            self.raw_sinks[:, slot] = self.raw_sinks[:, last]
            self.sink_shift[slot] = self.sink_shift[last]
            self._owners[slot] = moved
            self._slots[moved] = slot

    def reserve(self, slot: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Claim cache entries for ``count`` new tokens: (cache indices, positions)."""
        if count > self.config.max_append:
            raise ValueError(f"at most {self.config.max_append} tokens per pass, got {count}")
        start = self.lengths[slot]
        positions = torch.arange(start, start + count, device=self.positions.device)
        index = self._entry_index(positions)
        self.positions[slot, index] = positions
        self.lengths[slot] = start + count
        return index, positions

    def mark(self, slots: list[int]) -> tuple[list[int], torch.Tensor]:
        """What ``rollback`` needs to undo the appends of passes over ``slots``."""
        return [self.lengths[slot] for slot in slots], self.positions[slots]  # advanced indexing: a copy

    def rollback(self, slots: list[int], mark: tuple[list[int], torch.Tensor]) -> None:
        """Undo appends since ``mark`` (a failed step of at most one micro-turn). The
        entries written were empty or held keys no later query can see (the ring is
        sized so): they get their old positions back, zeroed, so they stay masked and
        finite whatever was written."""
        lengths, positions = mark
        rows, entries = (self.positions[slots] != positions).nonzero(as_tuple=True)
        touched = torch.tensor(slots, dtype=torch.int64, device=rows.device)[rows]
        self.keys[:, touched, entries] = 0
        self.values[:, touched, entries] = 0
        # Raw sinks need no undoing: a retry rewrites them long before any shift reads them.
        self.positions[slots] = positions
        for slot, length in zip(slots, lengths, strict=True):
            self.lengths[slot] = length

    def pretend_appended(self, slot: int, count: int) -> None:
        """Mark ``count`` tokens as already in a session's cache, as if appended (for
        benchmarks that need long contexts without spending minutes building them)."""
        start = self.lengths[slot]
        positions = torch.arange(start, start + count, device=self.positions.device)
        ring = self.capacity - self.config.sinks
        keep = positions[(positions < self.config.sinks) | (positions >= start + count - ring)]
        self.positions[slot, self._entry_index(keep)] = keep
        self.lengths[slot] = start + count

    def _entry_index(self, positions: torch.Tensor) -> torch.Tensor:
        """Where each position lives in a slot: sinks first, then the ring."""
        sinks, ring = self.config.sinks, self.capacity - self.config.sinks
        return torch.where(positions < sinks, positions, sinks + (positions - sinks) % ring)

    def write(self, layer: int, slots: torch.Tensor, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values (rows, kv heads, dim); row i goes to slot slots[i], entry index[i]."""
        self.keys[layer, slots, index] = k
        self.values[layer, slots, index] = v

    def write_raw_sinks(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor) -> None:
        """Keep sink keys (rows at positions < sinks) before their rotation."""
        self.raw_sinks[layer, slots, positions] = k
