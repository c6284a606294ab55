"""Checkpoints: weights in safetensors, the config beside them as JSON.

A checkpoint is a directory holding ``model.safetensors`` and ``config.json``, and
optionally ``decoding.json``: how it is best decoded (like a generation config),
e.g. ``{"write_threshold": 0.4, "lexicon": "lexicon.txt"}`` (see
``model.interaction.choose_text`` and ``model.lexicon``; the lexicon is a word list
in the checkpoint directory). ``microturn train`` writes both for the checkpoint it
makes (``model.train.save_decoding``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.interaction import InteractionModel

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DECODING_FILE = "decoding.json"
DECODING_KEYS = {"write_threshold", "lexicon", "sink_distance"}
# Weight-name prefixes of the parts ``with_parts`` may add to a trained model.
GROWABLE = ("listen_head.", "audio_encoder.", "audio_context.", "audio_in_fine.")


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to, renamed to ``path`` once written
    whole: a process killed mid-write leaves the previous file, never a torn one (as
    ``model.train.load_examples`` caches). One name per process, so two writers never
    share a partial file; no fsync, like the cache: this guards against a kill, not a
    power cut."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # gone once renamed; left by a failed write


def save_checkpoint(model: InteractionModel, directory: str | Path, dtype: torch.dtype | None = None,
                    step: int | None = None) -> Path:
    """``dtype`` (e.g. bf16, for a checkpoint's trip off a GPU machine) casts the floating
    parameters; buffers such as the experts' routing biases keep their precision.
    ``load_checkpoint`` reads either back into the model's own float32. ``step``: the
    training step the weights are from, kept in the weights file's metadata
    (``checkpoint_step``) so a resumed run can tell them from another save's."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    parameters = {name for name, _ in model.named_parameters()}
    state = {name: (tensor.to(dtype) if dtype and name in parameters and tensor.is_floating_point() else tensor)
             .detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    metadata = {"config": model.config.to_json()} | ({} if step is None else {"step": str(step)})
    with replacing(directory / WEIGHTS_FILE) as partial:
        save_file(state, partial, metadata=metadata)
    with replacing(directory / CONFIG_FILE) as partial:
        partial.write_text(model.config.to_json() + "\n")
    return directory


def checkpoint_step(directory: str | Path) -> int | None:
    """The training step ``save_checkpoint`` stamped on the weights (None: not stamped,
    e.g. saved before steps were, or averaged)."""
    with safe_open(Path(directory) / WEIGHTS_FILE, framework="pt") as weights:
        step = (weights.metadata() or {}).get("step")
    return None if step is None else int(step)


def load_checkpoint(directory: str | Path, expect: ModelConfig | None = None,
                    map_location: str | torch.device = "cpu") -> InteractionModel:
    """Load a checkpoint; ``expect`` (if given) must match the stored config."""
    directory = Path(directory)
    config = ModelConfig.from_json((directory / CONFIG_FILE).read_text())
    if expect is not None and expect != config:
        differ = [
            f"{f.name}: checkpoint {getattr(config, f.name)!r}, expected {getattr(expect, f.name)!r}"
            for f in dataclasses.fields(ModelConfig)
            if getattr(config, f.name) != getattr(expect, f.name)
        ]
        raise ValueError(f"checkpoint {directory} has another config: " + "; ".join(differ))
    model = InteractionModel(config)
    state = load_file(directory / WEIGHTS_FILE, device=str(map_location))
    own = model.state_dict()
    problems = [f"missing {name}" for name in own if name not in state]
    problems += [f"unexpected {name}" for name in state if name not in own]
    problems += [
        f"{name}: checkpoint {tuple(state[name].shape)}, config {tuple(own[name].shape)}"
        for name in own
        if name in state and state[name].shape != own[name].shape
    ]
    if problems:
        raise ValueError(f"checkpoint {directory} does not fit its config.json: " + "; ".join(problems[:8]))
    model.load_state_dict(state)
    return model


def widen_kv_heads(model: InteractionModel, n_kv_heads: int) -> InteractionModel:
    """The same function with more key/value heads: each old head's projection is
    repeated for the query heads it served, so outputs are unchanged and training
    can then let the copies part. (With one shared head, every attention head of a
    layer must look up by the same keys — a previous-token head and a content
    lookup cannot both form.)"""
    old = model.config
    if n_kv_heads % old.n_kv_heads or old.n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads {n_kv_heads}: must be a multiple of {old.n_kv_heads} and divide {old.n_heads}")
    wider = InteractionModel(dataclasses.replace(old, n_kv_heads=n_kv_heads))
    state = model.state_dict()
    repeat, q_rows, kv_rows = n_kv_heads // old.n_kv_heads, old.n_heads * old.head_dim, old.n_kv_heads * old.head_dim
    for name, tensor in list(state.items()):
        if name.endswith(".qkv.weight"):
            q, k, v = tensor.split([q_rows, kv_rows, kv_rows])
            # SDPA's grouped-query attention serves query head h from kv head h // group:
            # repeat_interleave keeps every query head on (a copy of) its old kv head.
            k, v = (w.view(old.n_kv_heads, old.head_dim, -1).repeat_interleave(repeat, 0).flatten(0, 1) for w in (k, v))
            state[name] = torch.cat([q, k, v])
    wider.load_state_dict(state)
    return wider


def deepen(model: InteractionModel, n_layers: int) -> InteractionModel:
    """The same function with more trunk blocks: the new ones go in before the last
    block, each starting as an identity (its attention and MoE write nothing into the
    residual stream), so the stream entering the last block — the one the listening
    head reads (``model.listening.LAYER``) — is unchanged too. A capacity lever for a
    trained model that no longer fits its own training data; at a fine-tuning
    learning rate the zeroed projections grow slowly, so ``microturn train
    --new-lr-scale`` trains them faster (docs/eval.md, sessions 21–22)."""
    old = model.config
    if n_layers <= old.n_layers:
        raise ValueError(f"n_layers {n_layers}: the model already has {old.n_layers} blocks")
    deeper = InteractionModel(dataclasses.replace(old, n_layers=n_layers))
    state = deeper.state_dict()
    added = n_layers - old.n_layers
    prefix = "trunk.blocks."
    for name, tensor in model.state_dict().items():
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            moved = int(index) + (added if int(index) == old.n_layers - 1 else 0)  # the last block stays last
            name = f"{prefix}{moved}.{rest}"
        state[name] = tensor
    for index in deepened_blocks(old.n_layers, n_layers):
        block = f"{prefix}{index}."
        for written in ("attn.out.weight", "ffn.w_down", "ffn.shared.down.weight"):
            state[block + written] = torch.zeros_like(state[block + written])
    deeper.load_state_dict(state)
    return deeper


def deepened_blocks(n_layers: int, deeper: int) -> range:
    """The indices of the blocks ``deepen`` adds going from ``n_layers`` to ``deeper``:
    in before the last, which stays last."""
    return range(n_layers - 1, deeper - 1)


def with_window(model: InteractionModel, window: int) -> InteractionModel:
    """The same weights attending over another span (``ModelConfig.window``): the
    span is a rule of the attention mask, not a weight shape."""
    narrowed = InteractionModel(dataclasses.replace(model.config, window=window))
    narrowed.load_state_dict(model.state_dict())
    return narrowed


def with_parts(model: InteractionModel, **changes: Any) -> InteractionModel:
    """The same weights in a config that adds parts (``listen_head=True``, the user
    audio's encoder blocks, context or finer bins); each new part starts so that the
    outputs are unchanged."""
    return _rebuilt(model.state_dict(), dataclasses.replace(model.config, **changes), GROWABLE, f"add {changes}")


def with_audio_head(model: InteractionModel, audio_head: str) -> InteractionModel:
    """The same trunk and text head with a fresh audio head of another kind
    (``"classify"`` or ``"flow"``): a trained trunk that a new head learns to voice."""
    kept = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith("audio_head.")}
    return _rebuilt(kept, dataclasses.replace(model.config, audio_head=audio_head), ("audio_head.",),
                    "swap the audio head")


def without_own_voice(model: InteractionModel) -> InteractionModel:
    """The same weights, the model's own voice no longer fed back with its text
    (``ModelConfig.hears_own_voice``): its embedding is dropped, so the outputs change
    and the model must be trained on (docs/eval.md, session 40)."""
    kept = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith("audio_out.")}
    return _rebuilt(kept, dataclasses.replace(model.config, hears_own_voice=False), (), "stop hearing its own voice")


def _rebuilt(state: dict[str, torch.Tensor], config: ModelConfig, fresh: tuple[str, ...],
             what: str) -> InteractionModel:
    """A model of ``config`` holding ``state``; only parameters under ``fresh`` may be
    new (they keep their initialisation), and nothing in ``state`` may go unused."""
    model = InteractionModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not name.startswith(fresh) for name in missing):
        raise ValueError(f"cannot {what}: missing {missing}, unexpected {unexpected}")
    return model


def without_parts(model: InteractionModel, **changes: Any) -> InteractionModel:
    """The inverse of ``with_parts``: the same weights in a config that drops parts
    (``listen_head=False``, ``audio_encoder_layers=0``) — a checkpoint as it was before."""
    smaller = InteractionModel(dataclasses.replace(model.config, **changes))
    kept = smaller.state_dict().keys()
    dropped = [name for name in model.state_dict() if name not in kept]
    if any(not name.startswith(GROWABLE) for name in dropped):
        raise ValueError(f"cannot drop {changes}: it would drop {dropped}")
    smaller.load_state_dict({name: tensor for name, tensor in model.state_dict().items() if name in kept})
    return smaller


def load_decoding(directory: str | Path) -> dict[str, float | str]:
    """The checkpoint's decoding settings (``{}`` when it has none); a lexicon's file
    name comes back as its path."""
    path = Path(directory) / DECODING_FILE
    if not path.exists():
        return {}
    settings = json.loads(path.read_text())
    unknown = set(settings) - DECODING_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown decoding settings {sorted(unknown)}; known: {sorted(DECODING_KEYS)}")
    distance = settings.get("sink_distance")
    if distance is not None and (not isinstance(distance, int) or isinstance(distance, bool)):
        raise ValueError(f"{path}: sink_distance is a whole number of tokens, not {distance!r}")
    if "lexicon" in settings:
        lexicon = Path(directory) / str(settings["lexicon"])
        if not lexicon.is_file():
            raise ValueError(f"{path}: lexicon {settings['lexicon']!r} is not a file in {directory}")
        settings["lexicon"] = str(lexicon)
    return settings
