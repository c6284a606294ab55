"""The transformer trunk: RMSNorm, RoPE, windowed attention over a KV pool, and MoE.

Two ways through the same weights:
- ``forward_full``: a batch of whole sequences (training, and the reference the
  streaming path is tested against);
- ``forward_stream``: new tokens of many sessions, each appended to its own cache
  in the KV pool, all in one pass.

Batch invariance (a session's bits do not depend on who shares its batch) is kept
by construction, not by luck: on this CPU a matmul's rows come out bit-identical
for any row count that is a multiple of 8, but not otherwise (measured; gemv and
odd-sized gemm take other kernels). So every matmul here sees a row count padded
to ``ROW_MULTIPLE``, attention runs per session over that session's own keys,
and the MoE pads each expert's group of rows the same way.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import (
    additive_mask,
    aligned_bias,
    attend,
    attend_xformers,
    causal_padded_bias,
    to_additive,
    visibility,
)
from model.config import ModelConfig
from model.kv import KVPool

ROW_MULTIPLE = 16


def pad_rows(x: torch.Tensor, multiple: int = ROW_MULTIPLE) -> torch.Tensor:
    extra = (-x.shape[0]) % multiple
    return F.pad(x, (0, 0, 0, extra)) if extra else x


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.weight


ROPE_NEAR = 4096  # positions below this rotate in fp32 alone, as before session 43 (tiny trains on 1,280)
Rotation = tuple[torch.Tensor, torch.Tensor]  # cos and sin, (tokens, 1, head_dim / 2) fp32


def rotation(positions: torch.Tensor, head_dim: int, base: float) -> Rotation:
    """The rotary angles of ``positions``, once for every layer and head.

    A served session runs for hours (80 tokens a second: 288,000 positions an hour),
    and an fp32 angle ``position × frequency`` is off by up to half an ulp of the
    angle (at the highest frequency, 0.016 rad after an hour, whole radians after
    days), which the relative angle a query sees a key at inherits. So the angle is
    split: the position's part below ``ROPE_NEAR`` in fp32, exactly as it was computed
    before (and for every checkpoint shipped: tiny trains on 1,280 positions); the rest
    in float64, joined by the angle-addition formulas. Below ``ROPE_NEAR`` the far part
    is 0 (cos 1, sin 0), which leaves the fp32 values bit for bit as they were."""
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    near = positions % ROPE_NEAR
    angles = near.to(torch.float32)[:, None] * inv_freq  # (tokens, half)
    far = (positions - near).to(torch.float64)[:, None] * inv_freq.to(torch.float64)
    cos_far, sin_far = far.cos().to(torch.float32), far.sin().to(torch.float32)
    cos_near, sin_near = angles.cos(), angles.sin()
    return ((cos_near * cos_far - sin_near * sin_far)[:, None, :],
            (sin_near * cos_far + cos_near * sin_far)[:, None, :])


def rotate(x: torch.Tensor, cos_sin: Rotation) -> torch.Tensor:
    """Rotate (..., tokens, heads, head_dim) by a ``rotation`` of its tokens' positions."""
    cos, sin = cos_sin
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()  # rotate in fp32 (bf16 on CUDA)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate (..., tokens, heads, head_dim) by each token's absolute position."""
    return rotate(x, rotation(positions, x.shape[-1], base))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class MoE(nn.Module):
    """Routed SwiGLU experts (top-k, sigmoid scores) plus an always-on shared expert.

    ``route_bias`` shifts which experts are *selected* (load balancing, adjusted
    by training) but not how their outputs are *weighted*.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e, d, h = config.n_experts, config.d_model, config.expert_hidden
        self.top_k = config.top_k
        self.router = nn.Linear(d, e, bias=False)
        self.register_buffer("route_bias", torch.zeros(e))
        self.w_gate_up = nn.Parameter(torch.randn(e, 2 * h, d) / math.sqrt(d))
        self.w_down = nn.Parameter(torch.randn(e, d, h) / math.sqrt(h))
        self.shared = SwiGLU(d, config.shared_hidden)
        self.last_load: torch.Tensor | None = None  # tokens per expert, last training step

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids (N, k), weights (N, k)) for each row of x (N, d)."""
        scores = torch.sigmoid(self.router(x))
        chosen = torch.topk(scores + self.route_bias, self.top_k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        return chosen, weights / weights.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor, path: str = "grouped") -> torch.Tensor:
        chosen, weights = self.route(x)
        if self.training:
            self.last_load = torch.bincount(chosen.reshape(-1), minlength=self.w_down.shape[0]).detach()
        routed = self.routed_grouped(x, chosen) if path == "grouped" else self.routed_gather(x, chosen)
        return self.shared(x) + (routed * weights.unsqueeze(-1)).sum(1)

    def routed_gather(self, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Decode path: gather each token's k experts' weights, one small matmul each."""
        n, k = chosen.shape
        rows = x.repeat_interleave(k, dim=0).unsqueeze(1)  # (n·k, 1, d)
        flat = chosen.reshape(-1)
        gate, up = torch.bmm(rows, self.w_gate_up[flat].transpose(1, 2)).chunk(2, dim=-1)
        out = torch.bmm(F.silu(gate) * up, self.w_down[flat].transpose(1, 2))
        return out.reshape(n, k, -1)

    def routed_grouped(self, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Prefill/training path: sort (token, expert) pairs by expert, one grouped matmul.

        Each expert's group is padded to ROW_MULTIPLE rows (see the module docstring).
        """
        n, k = chosen.shape
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.w_down.shape[0])
        padded_counts = (counts + ROW_MULTIPLE - 1) // ROW_MULTIPLE * ROW_MULTIPLE
        group_starts = torch.cumsum(padded_counts, 0) - padded_counts
        sorted_experts = flat[order]
        rank_in_group = torch.arange(order.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
        slots = group_starts[sorted_experts] + rank_in_group  # where each pair lands, padded layout
        total = int(padded_counts.sum())
        rows = x.new_zeros(total, x.shape[1])
        rows[slots] = x[order // k]
        offsets = torch.cumsum(padded_counts, 0).to(torch.int32)
        gate, up = F.grouped_mm(rows, self.w_gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        out = F.grouped_mm(F.silu(gate) * up, self.w_down.transpose(1, 2), offs=offsets)
        result = x.new_empty(n * k, x.shape[1])
        result[order] = out[slots]
        return result.reshape(n, k, -1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.d_model, (config.n_heads + 2 * config.n_kv_heads) * config.head_dim, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (rows, d) -> queries, keys and values per head, not yet rotated."""
        c = self.config
        return self.qkv(x).view(x.shape[0], -1, c.head_dim).split([c.n_heads, c.n_kv_heads, c.n_kv_heads], dim=1)

    def forward_stream(self, x: torch.Tensor, batch: StreamBatch, pool: KVPool, layer: int) -> torch.Tensor:
        """x: (rows, d), the new tokens of every session in ``batch``, in order."""
        q, k, v = self._qkv(x)
        if batch.sink_rows is not None:  # a session's first tokens: kept unrotated too (place_sinks)
            rows, slots, positions = batch.sink_rows
            pool.write_raw_sinks(layer, slots, positions, k[rows])
        assert batch.rotation is not None, "Transformer.forward_stream rotates a pass's rows once for every layer"
        q, k = rotate(q, batch.rotation), rotate(k, batch.rotation)
        real = batch.real_rows
        pool.write(layer, batch.row_slots, batch.row_cache_index, k[:real], v[:real])
        out = q.new_zeros(q.shape)
        out[:real] = batch.plan(pool).attend(q[:real], pool, layer)  # one call for every session
        return self.out(out.reshape(x.shape[0], -1))

    def forward_full(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: Rotation) -> torch.Tensor:
        """x: (batch, tokens, d), every sequence starting at position 0; ``cos_sin``: the
        ``rotation`` of ``positions``."""
        b, t, d = x.shape
        q, k, v = (z.reshape(b, t, z.shape[1], -1) for z in self._qkv(x.reshape(b * t, d)))
        q, k = rotate(q, cos_sin), rotate(k, cos_sin)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        out = attend(q, k, v, additive_mask(positions, positions, self.config))
        return self.out(out.transpose(1, 2).reshape(b * t, d)).view(b, t, d)


@dataclass(frozen=True, slots=True)
class Segment:
    """One session's new tokens in a streaming pass."""

    slot: int  # the session's KV pool slot
    start: int  # first row in the pass
    count: int  # rows (tokens) it appends
    cache_index: torch.Tensor  # where they go in the session's cache


@dataclass
class StreamBatch:
    """The rows of one streaming pass: every session's new tokens, then padding."""

    segments: list[Segment]
    row_positions: torch.Tensor  # absolute position of every row (padding rows: 0)
    # The rotation of row_positions, once a pass for every layer (set by Transformer.forward_stream).
    rotation: Rotation | None = field(default=None, init=False, repr=False, compare=False)
    # Rows at sink positions, with their slots and positions (set by place_sinks; None: none).
    sink_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, init=False)
    _plan: AttentionPlan | PackedPlan | None = field(default=None, init=False, repr=False, compare=False)

    @functools.cached_property
    def real_rows(self) -> int:
        return sum(seg.count for seg in self.segments)

    @functools.cached_property
    def row_slots(self) -> torch.Tensor:
        device = self.segments[0].cache_index.device
        return torch.cat([torch.full((seg.count,), seg.slot, dtype=torch.int64, device=device) for seg in self.segments])

    @functools.cached_property
    def row_cache_index(self) -> torch.Tensor:
        return torch.cat([seg.cache_index for seg in self.segments])

    def plan(self, pool: KVPool) -> AttentionPlan | PackedPlan:
        """How this pass lays its queries out against the pool; the same for every layer."""
        if self._plan is None:
            if pool.backend == "xformers" and PackedPlan.applies(self, pool):
                self._plan = PackedPlan.build(self, pool)
            else:
                self._plan = AttentionPlan.build(self, pool, xformers=pool.backend == "xformers")
        return self._plan


@dataclass(frozen=True)
class AttentionPlan:
    """Queries of one streaming pass, arranged for a single batched attention call.

    Every session attends over its whole cache slot (``capacity`` entries, empty
    ones masked), and queries are padded to a fixed count per pass kind, so the
    shape each session sees never depends on who else is in the batch (batch
    invariance) and the call costs what a full window costs from the first turn.
    When the pass covers most open sessions, the pool is read in place (slots are
    packed) and idle sessions' rows are computed and dropped; otherwise the
    batch's slots are gathered.
    """

    sessions: int  # leading dimension of the attention call
    queries: int  # query rows per session (fixed per pass kind)
    row_session: torch.Tensor  # (real rows,) which attention row each token is
    row_query: torch.Tensor  # (real rows,) which query within it
    gather: torch.Tensor | None  # slots to gather, or None to read slots 0..sessions−1
    mask: torch.Tensor  # (sessions, 1, queries, capacity) additive (for xformers: aligned_bias of it)
    xformers: bool = False  # the same layout and mask through xformers (wrapped rings on CUDA)

    @classmethod
    def build(cls, batch: StreamBatch, pool: KVPool, xformers: bool = False) -> AttentionPlan:
        segments = batch.segments
        queries = 1 if all(seg.count == 1 for seg in segments) else pool.config.max_append
        slots = torch.tensor([seg.slot for seg in segments])
        in_place = 2 * len(segments) >= pool.open_sessions
        sessions = pool.open_sessions if in_place else len(segments)
        row_session = torch.repeat_interleave(slots if in_place else torch.arange(len(segments)),
                                              torch.tensor([seg.count for seg in segments]))
        row_query = torch.cat([torch.arange(seg.count) for seg in segments])
        device = pool.positions.device
        row_session, row_query = row_session.to(device), row_query.to(device)
        query_positions = torch.full((sessions, queries), -1, dtype=torch.int64, device=device)
        query_positions[row_session, row_query] = batch.row_positions[: batch.real_rows]
        key_positions = pool.positions[:sessions] if in_place else pool.positions[slots]
        visible = visibility(query_positions[:, :, None], key_positions[:, None, :], pool.config)
        # Padding queries and idle sessions see nothing; let them see everything
        # instead (their output is dropped) so no row is all −inf (NaN).
        visible |= ~visible.any(-1, keepdim=True)
        mask = to_additive(visible).unsqueeze(1).to(pool.keys.dtype)
        if xformers:  # its 5-D, stride-aligned form, built once for every layer of the pass
            config = pool.config
            mask = aligned_bias(mask, config.n_kv_heads, config.n_heads // config.n_kv_heads)
        return cls(sessions, queries, row_session, row_query, None if in_place else slots.to(device), mask, xformers)

    def attend(self, q: torch.Tensor, pool: KVPool, layer: int) -> torch.Tensor:
        """q: (real rows, heads, dim) -> attention output, same shape."""
        if self.gather is None:
            keys, values = pool.keys[layer, : self.sessions], pool.values[layer, : self.sessions]
        else:
            keys, values = pool.keys[layer].index_select(0, self.gather), pool.values[layer].index_select(0, self.gather)
        if self.xformers:  # (sessions, queries, heads, dim), keys as stored
            queries = q.new_zeros(self.sessions, self.queries, q.shape[1], q.shape[2])
            queries[self.row_session, self.row_query] = q
            return attend_xformers(queries, keys, values, self.mask)[self.row_session, self.row_query]
        queries = q.new_zeros(self.sessions, q.shape[1], self.queries, q.shape[2])
        queries[self.row_session, :, self.row_query] = q
        attended = attend(queries, keys.transpose(1, 2), values.transpose(1, 2), self.mask)
        return attended[self.row_session, :, self.row_query]


@dataclass(frozen=True)
class PackedPlan:
    """xformers on CUDA while no session of the pass has outgrown ``sinks + window``:
    every session sees all its earlier keys, stored in position order, so the rule is
    ``BlockDiagonalCausalWithOffsetPaddedKeysMask`` — queries packed with no padding,
    each session's slot one key block (``capacity`` entries, the first ``length`` used)."""

    sessions: int
    order: torch.Tensor  # (real rows,) the pass's rows with sessions in slot order
    gather: torch.Tensor | None  # slots to gather, or None: the pass is slots 0..n−1, read in place
    bias: object  # BlockDiagonalCausalWithOffsetPaddedKeysMask

    @staticmethod
    def applies(batch: StreamBatch, pool: KVPool) -> bool:
        limit = pool.config.sinks + pool.config.window
        return all(pool.lengths[seg.slot] <= limit for seg in batch.segments)

    @classmethod
    def build(cls, batch: StreamBatch, pool: KVPool) -> PackedPlan:
        segments = sorted(batch.segments, key=lambda seg: seg.slot)
        slots = [seg.slot for seg in segments]
        order = torch.cat([torch.arange(seg.start, seg.start + seg.count) for seg in segments])
        bias = causal_padded_bias([seg.count for seg in segments], pool.capacity,
                                  [pool.lengths[slot] for slot in slots], device=pool.keys.device)
        gather = None if slots == list(range(len(slots))) else torch.tensor(slots, device=pool.keys.device)
        return cls(len(slots), order.to(pool.keys.device), gather, bias)

    def attend(self, q: torch.Tensor, pool: KVPool, layer: int) -> torch.Tensor:
        keys, values = pool.keys[layer], pool.values[layer]
        if self.gather is None:
            keys, values = keys[: self.sessions], values[: self.sessions]
        else:
            keys, values = keys.index_select(0, self.gather), values.index_select(0, self.gather)
        packed_keys = keys.reshape(1, -1, *keys.shape[2:])  # a view when read in place
        packed_values = values.reshape(1, -1, *values.shape[2:])
        out = attend_xformers(q[self.order][None], packed_keys, packed_values, self.bias)[0]
        result = torch.empty_like(out)
        result[self.order] = out
        return result


def place_sinks(batch: StreamBatch, pool: KVPool, rope_base: float) -> None:
    """Before a pass: note which of its rows are sink positions, and rotate each
    session's sink keys to sit at most ``pool.sink_distance`` before the pass's first
    query. Training windows start at position 0, so a query there sees the sinks at
    most a window's length away; served for minutes, a query at absolute positions
    would see them at rotary distances no window ever spanned. Shifted, the sinks
    stay where training put them relative to the queries (StreamingLLM, Xiao et al.
    2023, does the same by numbering positions within the cache); until a session is
    ``sink_distance`` tokens long nothing moves. A sink key is a function of its raw
    key and its shift, so a pass that fails is simply redone."""
    sinks = pool.config.sinks
    firsts = [pool.lengths[seg.slot] - seg.count for seg in batch.segments]  # reserved already
    if any(first < sinks for first in firsts):
        rows = (batch.row_positions[: batch.real_rows] < sinks).nonzero().flatten()
        batch.sink_rows = rows, batch.row_slots[rows], batch.row_positions[rows]
    moved = [(seg.slot, shift) for seg, first in zip(batch.segments, firsts, strict=True)
             if (shift := max(0, first - pool.sink_distance)) != pool.sink_shift[seg.slot]]
    if not moved:
        return
    slots, shifts = torch.tensor(moved, device=pool.keys.device).T
    raw = pool.raw_sinks[:, slots]  # (layers, sessions, sinks, kv heads, dim)
    positions = (torch.arange(sinks, device=raw.device)[None] + shifts[:, None]).flatten()  # the same in every layer
    placed = rope(raw.flatten(1, 2), positions, rope_base)
    pool.keys[:, slots, :sinks] = placed.view(raw.shape)
    for slot, shift in moved:
        pool.sink_shift[slot] = shift


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model)
        self.ffn = MoE(config)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model)

    def forward_full(self, x: torch.Tensor, moe_path: str = "grouped") -> torch.Tensor:
        """x: (batch, tokens, d) embeddings from position 0 -> hidden states, same shape."""
        return self.norm(self.forward_layers(x, moe_path)[-1])

    def forward_layers(self, x: torch.Tensor, moe_path: str = "grouped") -> list[torch.Tensor]:
        """The residual stream after each block (before the final norm), from embeddings x."""
        b, t, d = x.shape
        positions = torch.arange(t, device=x.device)
        cos_sin = rotation(positions, self.config.head_dim, self.config.rope_base)
        layers = []
        for block in self.blocks:
            x = x + block.attn.forward_full(block.attn_norm(x), positions, cos_sin)
            flat = x.reshape(b * t, d)
            x = (flat + block.ffn(block.ffn_norm(flat), moe_path)).view(b, t, d)
            layers.append(x)
        return layers

    def forward_stream(self, x: torch.Tensor, batch: StreamBatch, pool: KVPool, moe_path: str = "grouped") -> torch.Tensor:
        """x: (rows, d) new tokens, rows a multiple of ROW_MULTIPLE -> hidden states (rows, d)."""
        place_sinks(batch, pool, self.config.rope_base)
        batch.rotation = rotation(batch.row_positions, self.config.head_dim, self.config.rope_base)
        for layer, block in enumerate(self.blocks):
            x = x + block.attn.forward_stream(block.attn_norm(x), batch, pool, layer)
            x = x + block.ffn(block.ffn_norm(x), moe_path)
        return self.norm(x)
