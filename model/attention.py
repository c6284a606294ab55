"""Attention over one session's keys: first ``sinks`` tokens plus a sliding window.

Visibility is decided by absolute positions, not by where keys sit in memory, so
the KV pool can keep each session in a ring buffer:

    key visible to query  <=>  0 <= k_pos <= q_pos  and  (k_pos < sinks  or  k_pos > q_pos - window)

Two backends behind one rule, chosen at run time (``choose_backend``):

- ``sdpa`` (CPU, and CUDA without xformers): ``scaled_dot_product_attention`` with
  that rule as an explicit additive mask (never ``is_causal=True`` with a cache:
  PyTorch aligns it top-left, wrong when queries are the last tokens of a longer
  sequence).
- ``xformers`` (CUDA with the ``gpu`` extra): ``memory_efficient_attention``. While
  every session of a pass is shorter than ``sinks + window`` the rule is plain
  bottom-right causal attention over keys stored in position order, which is
  exactly ``BlockDiagonalCausalWithOffsetPaddedKeysMask``: queries packed back to
  back, each session's keys one padded block read in place from the KV pool. Once
  a session's ring has wrapped, keys are no longer in position order and the pass
  uses the same additive mask as SDPA as a tensor bias.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from model.config import ModelConfig

BACKENDS = ("sdpa", "xformers")
logger = logging.getLogger(__name__)


@functools.cache
def xformers_ops() -> Any | None:
    """``xformers.ops`` when it is installed and usable (it has CUDA kernels only), else None."""
    return None if xformers_unusable() else _import_xformers_ops()


def _import_xformers_ops() -> Any:
    import xformers.ops

    return xformers.ops


@functools.cache
def xformers_unusable() -> str | None:
    """Why xformers cannot run attention here, or None when it can. Importable is not
    enough: a wheel built for another torch or CUDA imports, warns, and then has no
    kernel for any input (xformers 0.0.35, built for torch 2.10 + CUDA 12.8, under
    torch 2.11 + CUDA 13 on a lent H200: docs/training.md). So one tiny attention runs:
    a check that kernels loaded at all, not that each of the engine's biases and shapes
    has one (tests/test_attention_backends.py checks those on a GPU)."""
    if not torch.cuda.is_available():
        return "no CUDA device (xformers has CUDA kernels only)"
    try:
        ops = _import_xformers_ops()
    except ImportError:
        return "xformers is not installed (pip install microturn[gpu])"
    except Exception as error:  # noqa: BLE001 - a build for another torch can fail to import in other ways
        return f"xformers failed to import: {error}"
    try:
        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
        ops.memory_efficient_attention_forward(q, q, q)
    except Exception as error:  # noqa: BLE001 - any failure here means "use SDPA"
        import xformers

        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return (f"xformers {xformers.__version__} has no working CUDA kernel under torch {torch.__version__} "
                f"({first_line}; `python -m xformers.info` shows what it was built for)")
    return None


def choose_backend(device: torch.device, requested: str | None = None) -> str:
    """``requested`` (or ``$MICROTURN_ATTENTION``) if given, else xformers on CUDA when
    installed, else SDPA. Asking for xformers where it cannot run is an error, not a
    silent fallback: benchmarks must know what they measured."""
    requested = requested or os.environ.get("MICROTURN_ATTENTION") or None
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose from {BACKENDS}")
    if requested == "xformers" and (device.type != "cuda" or xformers_ops() is None):
        reason = f"this engine is on {device.type}" if device.type != "cuda" else xformers_unusable()
        raise RuntimeError(f"the xformers backend needs a CUDA device and the 'gpu' extra "
                           f"(pip install microturn[gpu]): {reason}")
    if requested:
        return requested
    if device.type == "cuda" and xformers_ops() is None and importlib.util.find_spec("xformers") is not None:
        logger.warning("attention: SDPA, not xformers: %s", xformers_unusable())
    return "xformers" if device.type == "cuda" and xformers_ops() is not None else "sdpa"


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
    return torch.zeros(visible.shape, device=visible.device).masked_fill_(~visible, float("-inf"))


def causal_padded_bias(q_seqlen: Sequence[int], kv_padding: int, kv_seqlen: Sequence[int],
                       device: torch.device | None = None) -> Any:
    """xformers' ``BlockDiagonalCausalWithOffsetPaddedKeysMask``: block i's queries are
    the last ``q_seqlen[i]`` of its ``kv_seqlen[i]`` keys, which start at ``i·kv_padding``."""
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalWithOffsetPaddedKeysMask

    return BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        q_seqlen=list(q_seqlen), kv_padding=kv_padding, kv_seqlen=list(kv_seqlen), device=device)


def attend_xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Any) -> torch.Tensor:
    """q: (batch, queries, heads, dim); k, v: (batch, keys, kv heads, dim) -> like q.
    Grouped-query attention in xformers' 5-D form: each kv head broadcast (stride 0)
    over its group of query heads. ``bias``: an xformers bias, or an additive tensor
    (batch, 1, queries, keys) — best already through ``aligned_bias`` (once per pass,
    not per layer)."""
    ops = xformers_ops()
    batch, queries, heads, dim = q.shape
    groups = k.shape[2]
    per_group = heads // groups
    q5 = q.reshape(batch, queries, groups, per_group, dim)
    k5 = k.unsqueeze(3).expand(batch, k.shape[1], groups, per_group, dim)
    v5 = v.unsqueeze(3).expand(batch, v.shape[1], groups, per_group, dim)
    if isinstance(bias, torch.Tensor) and bias.dim() == 4:
        bias = aligned_bias(bias, groups, per_group)
    op = _xformers_op(q5, k5, v5, bias)
    return ops.memory_efficient_attention_forward(q5, k5, v5, attn_bias=bias, op=op).reshape(q.shape)


XFORMERS_OPS_USED: dict[str, str] = {}  # bias kind / dtype -> the kernel xformers chose (benchmarks report it)


def _xformers_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Any) -> Any:
    """xformers' own dispatch (what it would do with op=None, so no extra cost), made
    here so that the kernel benchmarks report is the one that ran."""
    from xformers.ops import fmha
    from xformers.ops.fmha.dispatch import _dispatch_fw

    op = _dispatch_fw(fmha.Inputs(query=q, key=k, value=v, attn_bias=bias), False)
    XFORMERS_OPS_USED[f"{type(bias).__name__}/{str(q.dtype).removeprefix('torch.')}"] = op.NAME
    return op


def aligned_bias(mask: torch.Tensor, groups: int, per_group: int) -> torch.Tensor:
    """An additive (batch, 1, queries, keys) mask as xformers' 5-D tensor bias. Its
    kernels want the key stride a multiple of 8: store padded, hand over a slice."""
    batch, _, queries, keys = mask.shape
    padded = mask.new_zeros(batch, 1, 1, queries, -(-keys // 8) * 8)
    padded[..., :keys] = mask[:, :, None]
    return padded[..., :keys].expand(batch, groups, per_group, queries, keys)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q: (batch, heads, queries, dim); k, v: (batch, kv heads, keys, dim); mask broadcastable
    to (batch, heads, queries, keys), additive. Always 4-D: for 3-D inputs PyTorch
    takes its math path instead of the flash kernel (about 2x slower here)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
