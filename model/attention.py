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


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    config: ModelConfig,
) -> torch.Tensor:
    """q: (queries, heads, dim); k, v: (keys, heads, dim) -> (queries, heads, dim)."""
    mask = visibility(query_positions, key_positions, config)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
    )
    return out.squeeze(0).transpose(0, 1)
