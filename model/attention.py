"""Attention over one session's keys: first ``sinks`` tokens plus a sliding window.

Visibility is decided by absolute positions, not by where keys sit in memory, so
the KV pool can keep each session in a ring buffer:

    key visible to query  <=>  0 <= k_pos <= q_pos  and  (k_pos < sinks  or  k_pos > q_pos - window)

On CPU this is ``scaled_dot_product_attention`` with that explicit boolean mask
(never ``is_causal=True`` with a cache: PyTorch aligns it top-left, which is wrong
when queries are the last tokens of a longer sequence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.config import ModelConfig


def visibility(q: torch.Tensor, k: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Boolean mask from broadcastable query and key positions (key positions < 0
    mark empty cache entries), e.g. q (queries, 1) and k (1, keys)."""
    return (k >= 0) & (k <= q) & ((k < config.sinks) | (k > q - config.window))


def additive_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """``visibility`` as 0 / −inf to add to the scores: computed once per pass and
    shared by every layer (a boolean mask would be converted again in each call)."""
    return to_additive(visibility(query_positions[:, None], key_positions[None, :], config))


def to_additive(visible: torch.Tensor) -> torch.Tensor:
    """A boolean visibility mask as 0 / −inf to add to attention scores."""
    return torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q: (batch, heads, queries, dim); k, v: (batch, kv heads, keys, dim); mask broadcastable
    to (batch, heads, queries, keys), additive. Always 4-D: for 3-D inputs PyTorch
    takes its math path instead of the flash kernel (about 2x slower here)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
