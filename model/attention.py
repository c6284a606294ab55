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


def visibility(query_positions: torch.Tensor, key_positions: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """(queries, keys) boolean mask; key positions < 0 mark empty cache slots."""
    q = query_positions[:, None]
    k = key_positions[None, :]
    return (k >= 0) & (k <= q) & ((k < config.sinks) | (k > q - config.window))


def additive_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """``visibility`` as 0 / −inf to add to the scores: computed once per pass and
    shared by every layer (a boolean mask would be converted again in each call)."""
    visible = visibility(query_positions, key_positions, config)
    return torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q: (heads, queries, dim); k, v: (heads, keys, dim); mask: (queries, keys) -> (heads, queries, dim)."""
    # With a leading batch dimension PyTorch takes its flash kernel (about 2x faster
    # here than the math path it uses for 3-D inputs).
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]
