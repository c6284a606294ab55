"""The KV pool: every session's keys and values, in preallocated ring buffers.

A session takes a slot on ``open`` and gives it back on ``close``. Each slot holds
``sinks`` permanent entries (the session's first tokens) and a ring for the rest,
sized ``window + max_append`` so that while a pass appends its tokens, no key
that one of them still needs (see attention.visibility) has been overwritten.
Memory is fixed at construction: a session's cost is the same after a minute or a day.
"""

from __future__ import annotations

import torch

from model.config import ModelConfig


class KVPool:
    def __init__(self, config: ModelConfig, max_sessions: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.config = config
        self.capacity = config.sinks + config.window + config.max_append
        # (layer, slot, head, entry, dim): a session's keys of one head are contiguous,
        # so attention reads them in place.
        shape = (config.n_layers, max_sessions, config.n_heads, self.capacity, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.positions = torch.full((max_sessions, self.capacity), -1, dtype=torch.int64, device=device)
        self.lengths = [0] * max_sessions  # tokens appended so far = the next position
        self._free = list(range(max_sessions - 1, -1, -1))
        self._slots: dict[str, int] = {}

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
        if not self._free:
            raise RuntimeError(f"the KV pool is full ({self.max_sessions} sessions)")
        slot = self._free.pop()
        self.positions[slot] = -1
        self.lengths[slot] = 0
        self._slots[session_id] = slot
        return slot

    def close(self, session_id: str) -> None:
        slot = self._slots.pop(session_id, None)
        if slot is not None:
            self._free.append(slot)

    def reserve(self, slot: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Claim cache entries for ``count`` new tokens: (cache indices, positions)."""
        if count > self.config.max_append:
            raise ValueError(f"at most {self.config.max_append} tokens per pass, got {count}")
        start = self.lengths[slot]
        positions = torch.arange(start, start + count, device=self.positions.device)
        sinks, ring = self.config.sinks, self.capacity - self.config.sinks
        index = torch.where(positions < sinks, positions, sinks + (positions - sinks) % ring)
        self.positions[slot, index] = positions
        self.lengths[slot] = start + count
        return index, positions

    def pretend_appended(self, slot: int, count: int) -> None:
        """Mark ``count`` tokens as already in a session's cache, as if appended (for
        benchmarks that need long contexts without spending minutes building them)."""
        start = self.lengths[slot]
        positions = torch.arange(start, start + count, device=self.positions.device)
        sinks, ring = self.config.sinks, self.capacity - self.config.sinks
        keep = positions[(positions < sinks) | (positions >= start + count - ring)]
        index = torch.where(keep < sinks, keep, sinks + (keep - sinks) % ring)
        self.positions[slot, index] = keep
        self.lengths[slot] = start + count

    def write(self, layer: int, slots: torch.Tensor, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values (rows, heads, dim); row i goes to slot slots[i], entry index[i]."""
        self.keys[layer, slots, :, index] = k
        self.values[layer, slots, :, index] = v

    def read(self, layer: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled part of a session's cache in one layer: keys, values (heads, n, dim)."""
        used = min(self.lengths[slot], self.capacity)
        return self.keys[layer, slot, :, :used], self.values[layer, slot, :, :used]

    def read_positions(self, slot: int) -> torch.Tensor:
        """The position of each filled cache entry (n,), in the order ``read`` returns them."""
        return self.positions[slot, : min(self.lengths[slot], self.capacity)]
