"""Training: synthetic conversations (and recorded sessions, ``--recordings``) in, a
checkpoint out (``microturn train``).

Teacher forcing over the interleaved layout (``InteractionModel.layout``): every
micro-turn's inputs — the user's dMel, text input — and the model's own outputs —
its text bytes and dMel patches — in one sequence; the hidden state before each
output predicts it. Loss: text cross-entropy plus the audio head's loss.

CPU by default, bf16 autocast on CUDA, data-parallel under ``torchrun``. Resumable:
``--resume`` continues from ``OUT/train_state.pt`` (weights, optimiser, step and random
generators: a single-process run goes on as if never stopped). Generated conversations
are cached under ``--cache``/``cache_name()`` (dMel bins as uint8: ~0.3 MB a
conversation; the user's at ``dmel.FINE_BINS`` levels, which every
``ModelConfig.audio_in_bins`` nests in).

The model's own audio history is teacher-forced with light noise (``--history-noise``):
served closed-loop it hears its own imperfect output, not the clean reference. The
user's audio can be masked (``--user-mask-bands``, ``--user-jitter``; SpecAugment's
frequency masks in dMel terms) so hearing rests on more than one voice's details.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import dmel, listening
from model.arguments import at_least, between, positive
from model.audio import resampler
from model.config import NO_TEXT, ModelConfig, preset
from model.conversations import DATA_VERSION, Conversation, generate_in_order
from model.heads import weighted_mean
from model.interaction import InteractionModel
from model.lexicon import Lexicon, words_written
from model.memory import release_freed_memory
from model.text import encode
from model.transformer import MoE
from model.weights import (DECODING_FILE, WEIGHTS_FILE, checkpoint_step, deepen, deepened_blocks, load_checkpoint,
                           load_decoding, replacing, save_checkpoint, widen_kv_heads, with_audio_head, with_parts,
                           with_window, without_own_voice)

STATE_FILE = "train_state.pt"
LEXICON_FILE = "lexicon.txt"
# The data version and the levels the user's bins are stored at: either changes the examples.
CACHE_NAME = f"v{DATA_VERSION}-user{dmel.FINE_BINS}"
# Text input slots a micro-turn of the caches named before the slots were (tiny, small).
CACHE_SLOTS = 4
# Under torchrun the other ranks wait at a barrier while rank 0 makes the data (~1 s a
# conversation a core): thousands outlast the collectives' default 10 minutes. A hung
# collective still fails, only later.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


def cache_name(text_in_slots: int = CACHE_SLOTS) -> str:
    """``CACHE_NAME``, marked when the examples split their text input into other than
    ``CACHE_SLOTS`` slots a micro-turn (the ``gpu`` preset's 8: cached examples hold it
    split), and when this process resamples without PyAV (``model.audio``): the two
    resamplers' conversations differ in their low bits, so they are kept apart."""
    name = CACHE_NAME if text_in_slots == CACHE_SLOTS else f"{CACHE_NAME}-slots{text_in_slots}"
    return name if resampler() == "av" else f"{name}-{resampler()}"


@dataclass
class Example:
    """One conversation as tensors, turn-aligned."""

    user_bins: torch.Tensor  # (turns·16, mels) uint8 at dmel.FINE_BINS levels
    model_bins: torch.Tensor  # (turns·16, mels) uint8
    text_in: torch.Tensor  # (turns, text_in_slots)
    text_out: torch.Tensor  # (turns, out_positions)
    # The user's utterances: (n, 2 + MAX_WORDS) frame span and word ids (model/listening.py).
    user_words: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2 + listening.MAX_WORDS, dtype=torch.int64))

    @property
    def turns(self) -> int:
        return self.text_out.shape[0]


def text_input_slots(text_in: list[str], slots: int) -> torch.Tensor:
    """Per-turn input text as the server feeds it: queued, ``slots`` ids per turn."""
    ids = torch.full((len(text_in), slots), NO_TEXT, dtype=torch.int64)
    queue: list[int] = []
    for turn, text in enumerate(text_in):
        queue += encode(text)
        taken, queue = queue[:slots], queue[slots:]
        ids[turn, : len(taken)] = torch.tensor(taken, dtype=torch.int64)
    return ids


def to_example(conversation: Conversation, config: ModelConfig, text_lead: int | None = None) -> Example:
    """The conversation as ``config``'s model is trained on it: its text moved
    ``text_lead`` outputs earlier (default ``config.text_lead``; 0 for what is cached,
    and for a recording, whose text is already where the served model wrote it)."""
    # Bins as uint8: thousands of conversations fit in memory; batches widen them. The
    # user's at the finest input levels, so one cache serves models of any audio_in_bins.
    user = dmel.dmel(torch.from_numpy(conversation.user_audio)[None], dmel.FINE_BINS)[0].to(torch.uint8)
    own = dmel.dmel(torch.from_numpy(conversation.model_audio)[None])[0].to(torch.uint8)
    text_out = torch.from_numpy(conversation.text_out)
    if text_out.shape[1] != config.out_positions:
        raise ValueError(f"conversations have {text_out.shape[1]} output positions, the model {config.out_positions}")
    example = Example(user, own, text_input_slots(conversation.text_in, config.text_in_slots), text_out,
                      listening.word_targets(conversation.user_words))
    return leading_text(example, config.text_lead if text_lead is None else text_lead)


def leading_text(example: Example, lead: int) -> Example:
    """``example`` with its model text ``lead`` outputs ahead of its voice
    (``ModelConfig.text_lead``): every byte moved that many output positions earlier,
    across micro-turns; the last positions fall silent."""
    if not lead:
        return example
    flat = example.text_out.reshape(-1)
    led = torch.full_like(flat, NO_TEXT)
    led[: flat.numel() - lead] = flat[lead:]
    return replace(example, text_out=led.view_as(example.text_out))


def led_start(turn: int, config: ModelConfig) -> int:
    """The first output position of micro-turn ``turn``'s text in an example made for
    ``config`` (``leading_text`` moved it ``text_lead`` positions earlier)."""
    return max(turn * config.out_positions - config.text_lead, 0)


def cached_example(path: Path, text_in_slots: int) -> Example:
    """The example cached at ``path``, refused if its text input has other slots than
    the model's (cached under a name that did not yet tell them apart)."""
    example = Example(**torch.load(path))
    if example.text_in.shape[1] != text_in_slots:
        raise ValueError(f"{path} holds text input in {example.text_in.shape[1]} slots a micro-turn, the model "
                         f"takes {text_in_slots}: made for another preset; delete it to have it made again")
    return example


# Cache file names by kind; delegation drills keep the name they had before answer drills.
_CACHE_PREFIX = {None: "", "delegation": "drill-", "answer": "answer-drill-"}


def load_examples(seeds: list[int], config: ModelConfig, cache: Path | None, workers: int = 2,
                  drill: str | None = None, deadline: float | None = None) -> list[Example]:
    """Examples for ``seeds`` (``drill``: that kind of drill, see ``conversations.DRILLS``),
    generating (in parallel) only what the cache lacks. Past ``deadline`` (a
    ``time.monotonic()`` reading) no new conversation is started, and what comes back is
    the longest run of ``seeds`` from the first that is ready (a lease of minutes)."""
    examples: dict[int, Example] = {}
    missing = []
    cache = cache / cache_name(config.text_in_slots) if cache else None
    prefix = _CACHE_PREFIX[drill]
    for seed in seeds:
        path = cache / f"{prefix}{seed}.pt" if cache else None
        if path is not None and path.exists():
            examples[seed] = cached_example(path, config.text_in_slots)
        else:
            missing.append(seed)
    stream = generate_in_order(missing, workers=workers, drill=drill, until=deadline)
    # The dMel below runs while the workers make the next conversations: on one thread, as
    # theirs do (they, and on a GPU machine the trainers, have the other cores). Two
    # threads on cores the workers fill made the whole ~30 % slower (2 cores). Closed
    # on the way out, error or not, so the workers stop at once rather than at exit.
    with torch_threads(1), contextlib.closing(stream):
        # Not strict: past the deadline the stream ends before the seeds do.
        for count, (seed, conversation) in enumerate(zip(missing, stream, strict=False), start=1):
            example = to_example(conversation, config, text_lead=0)  # cached as the data has it
            examples[seed] = example
            if cache is not None:
                cache.mkdir(parents=True, exist_ok=True)
                # Written whole, then renamed: a run killed mid-write leaves no torn file, and a
                # reader beside a writer (--follow-cache) never meets half of one.
                with replacing(cache / f"{prefix}{seed}.pt") as partial:
                    torch.save(example.__dict__, partial)
            if count % 64 == 0:
                # The conversations' audio is freed by now; without the trim glibc kept it (2,100
                # conversations reached 24 GB RSS; a 320-conversation test holds ~0.3 GB + examples).
                release_freed_memory()
    release_freed_memory()
    return [leading_text(examples[seed], config.text_lead)
            for seed in itertools.takewhile(examples.__contains__, seeds)]


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` for a while, then as they were."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cached_run(cache: Path, first: int, limit: int, text_lead: int = 0,
               text_in_slots: int = CACHE_SLOTS) -> list[Example]:
    """The conversations cached from seed ``first`` up to the first gap (or ``limit``):
    what a generator running beside the training has finished (``--follow-cache``)."""
    directory, examples = cache / cache_name(text_in_slots), []
    while first + len(examples) < limit and (path := directory / f"{first + len(examples)}.pt").exists():
        examples.append(leading_text(cached_example(path, text_in_slots), text_lead))
    return examples


def crop(example: Example, turns: int, rng: random.Random) -> Example:
    if example.turns <= turns:
        return example
    start = rng.randint(0, example.turns - turns)
    frames = slice(start * 16, (start + turns) * 16)
    return Example(example.user_bins[frames], example.model_bins[frames],
                   example.text_in[start : start + turns], example.text_out[start : start + turns],
                   listening.crop_targets(example.user_words, start * 16, turns * 16))


def jitter_bins(bins: torch.Tensor, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Move a ``rate`` fraction of dMel bins one step up or down (clamped to the range)."""
    if rate <= 0:
        return bins
    hit = torch.rand(bins.shape, generator=generator) < rate
    step = torch.randint(0, 2, bins.shape, generator=generator) * 2 - 1
    return torch.where(hit.to(bins.device), (bins + step.to(bins.device)).clamp(0, dmel.N_BINS - 1), bins)


def mask_user_bins(bins: torch.Tensor, bands: int, max_width: int, jitter: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """SpecAugment for one example's user dMel (frames, mels) at ``dmel.FINE_BINS``
    levels: ``bands`` bands of up to ``max_width`` mel channels each drop to the silence
    floor for the whole window, and a ``jitter`` fraction of the speech bins moves one
    coarse (N_BINS) step, keeping its place within the step (see ``jitter_bins``).

    No time masks: a stretch of silence inside speech is exactly what the model must
    tell apart from the end of a turn, so it must not be faked. Floor bins stay floor,
    so what is silent stays silent."""
    out = bins.clone()
    mels = bins.shape[-1]
    for _ in range(bands):
        width = int(torch.randint(0, max_width + 1, (), generator=generator))
        start = int(torch.randint(0, mels - width + 1, (), generator=generator))
        out[..., start : start + width] = 0
    if jitter > 0:
        fine = out.long()
        coarse = dmel.coarsen(fine, dmel.FINE_BINS)
        moved = torch.where(coarse > 0, jitter_bins(coarse, jitter, generator).clamp(min=1), coarse)
        out = fine + (moved - coarse) * (dmel.FINE_BINS // dmel.N_BINS)  # keeps the place within the step
    return out.to(bins.dtype)


def teacher_forced_layers(model: InteractionModel, batch: list[Example], history_noise: float = 0.0,
                          own_history: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Teacher forcing: the trunk's residual stream after each block over a batch of
    equally long examples, each (b, turns·tokens_per_turn, d); the model's own audio
    (the reference's bins, or ``own_history``'s (b, turns·16, mels) where given: see
    ``rendered_history``) is fed back with ``history_noise``."""
    config = model.config
    b, turns = len(batch), batch[0].turns
    user = torch.stack([e.user_bins for e in batch]).long().view(b, turns * 16, dmel.N_MELS)
    user = dmel.coarsen(user, dmel.FINE_BINS, config.audio_in_bins)
    own = torch.stack([e.model_bins for e in batch]) if own_history is None else own_history
    own = own.long().view(b, turns, 16, dmel.N_MELS)
    text_in = torch.stack([e.text_in for e in batch]).view(b * turns, -1)
    text_out = torch.stack([e.text_out for e in batch])  # (b, turns, out)
    audio, _ = model.encode_audio(user)  # the whole window at once: the context runs across turns
    audio = audio.reshape(b * turns, config.audio_in_tokens, -1)
    inputs = model.embed_inputs(audio, text_in, None).view(b, turns, config.input_tokens, -1)
    outputs = model.embed_output_targets(text_out, jitter_bins(own, history_noise))  # (b, turns, out, d)
    return model.trunk.forward_layers(model.layout(inputs, outputs))


def listened_states(model: InteractionModel, layers: list[torch.Tensor]) -> torch.Tensor:
    """What the listening head reads: the audio tokens' states in ``listening.LAYER``."""
    return layers[listening.LAYER][:, model.audio_positions(layers[0].shape[1] // model.config.tokens_per_turn)]


@torch.no_grad()
def rendered_history(model: InteractionModel, batch: list[Example], hidden: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """The model's own audio as its audio head renders it, one output ahead of the
    reference (b, turns·16, mels) bins: each patch is what the head samples from the
    reference history before it. Served, the trunk hears its head's rendering, not
    the reference; a flow head's differs by ~0.75 bins a value where the trunk was
    trained on ~0.1 (``--history-noise``), and that moved it off its training
    distribution (docs/eval.md, session 32). ``hidden``: the batch's ``predictor_states``
    where the caller has them already (teacher forced, no history noise)."""
    if hidden is None:
        hidden = predicting_states(model, teacher_forced_layers(model, batch))
    return dmel.quantize(model.audio_head.sample(hidden)).view(len(batch), -1, dmel.N_MELS)


def predictor_states(model: InteractionModel, batch: list[Example], history_noise: float = 0.0) -> torch.Tensor:
    """The hidden state that predicts each output position, (b·turns·out_positions, d)
    in (example, turn, position) order."""
    return predicting_states(model, teacher_forced_layers(model, batch, history_noise))


def predicting_states(model: InteractionModel, layers: list[torch.Tensor]) -> torch.Tensor:
    """``predictor_states`` from ``teacher_forced_layers``' output (the last block's, normed)."""
    hidden = model.trunk.norm(layers[-1])
    index = model.predictor_positions(hidden.shape[1] // model.config.tokens_per_turn).reshape(-1)
    return hidden[:, index].reshape(-1, hidden.shape[-1])


def batch_loss(model: InteractionModel, batch: list[Example], history_noise: float = 0.0,
               text_weight: float = 1.0, speech_weight: float = 1.0,
               listen_weight: float = 0.0, render_history: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Teacher-forced loss of a batch of equally long examples; the model's own audio
    is fed back with ``history_noise`` (see ``jitter_bins``) but predicted clean.

    Most output positions are silence with no text, which the model learns first;
    ``text_weight`` counts each position that writes a byte (not NO_TEXT) that many
    times in the text loss, ``speech_weight`` each position whose audio is not
    silent in the audio loss, so the rare decisions (when to start, which word,
    which digit to copy) keep their share of the gradient. ``listen_weight`` adds
    the listening head's CTC loss on the user's words (model/listening.py).
    ``render_history`` feeds the model's own audio back as its head renders it
    (``rendered_history``) rather than the reference."""
    config = model.config
    b, turns = len(batch), batch[0].turns
    history = rendered_history(model, batch) if render_history else None
    layers = teacher_forced_layers(model, batch, history_noise, history)
    predicting = predicting_states(model, layers)
    own = torch.stack([e.model_bins for e in batch]).long().view(b, turns, 16, dmel.N_MELS)
    text_targets = torch.stack([e.text_out for e in batch]).reshape(-1)
    text_losses = F.cross_entropy(model.text_head(predicting).float(), text_targets, reduction="none")
    text_loss = weighted_mean(text_losses, 1 + (text_weight - 1) * (text_targets != NO_TEXT).float())
    targets = own.reshape(b * turns * config.out_positions, config.frames_per_output, dmel.N_MELS)
    speaking = targets.flatten(1).amax(-1) > 0  # bin 0 is the silence floor
    audio_loss = model.audio_head.loss(predicting, targets, 1 + (speech_weight - 1) * speaking.float())
    loss = text_loss + audio_loss
    parts = {"text": text_loss.item(), "audio": audio_loss.item()}
    if listen_weight > 0:
        heard = listen_loss(model, listened_states(model, layers), batch)
        if heard is not None:
            loss = loss + listen_weight * heard
            parts["listen"] = heard.item()
    return loss, {"loss": loss.item(), **parts}


def listen_loss(model: InteractionModel, listened: torch.Tensor, batch: list[Example]) -> torch.Tensor | None:
    """The listening head's CTC loss on the batch's utterances (None: there is none)."""
    return listening.ctc_loss(model.listen_head, listened, [e.user_words for e in batch],
                              model.config.frames_per_audio_token)


def listen_probe_loss(model: InteractionModel, batch: list[Example]) -> tuple[torch.Tensor, dict[str, float]]:
    """The listening loss alone, the trunk run without gradients: a linear probe of
    what the trunk already hears (``--listen-probe``), and a warm start for the head
    before its loss is let into the trunk."""
    with torch.no_grad():
        hidden = listened_states(model, teacher_forced_layers(model, batch))
    heard = listen_loss(model, hidden, batch)
    if heard is None:
        heard = next(model.listen_head.parameters()).sum() * 0  # a batch without a whole utterance
    return heard, {"loss": heard.item(), "listen": heard.item()}


def balance_experts(model: torch.nn.Module, rate: float, distributed: bool = False) -> None:
    """Auxiliary-loss-free load balancing: nudge each expert's selection bias
    towards the mean load (the router's scores themselves are untouched). Under
    data parallelism the loads are summed over ranks first, so every replica's
    biases move alike."""
    for module in model.modules():
        if isinstance(module, MoE) and module.last_load is not None:
            load = module.last_load.float()
            if distributed:
                dist.all_reduce(load)
            module.route_bias += rate * torch.sign(load.mean() - load)


def average_gradients(model: torch.nn.Module) -> None:
    """Data parallelism by hand: every rank steps with the mean gradient. (The loss
    calls several sub-modules, not one ``forward``, so DistributedDataParallel's
    forward hooks would never run.) One flat all-reduce, not one per tensor."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for parameter, grad in zip(model.parameters(), grads, strict=True):
        parameter.grad = flat[offset : offset + grad.numel()].view_as(grad)
        offset += grad.numel()


def broadcast_int(value: int, distributed: bool, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank (a run's end decided by one clock, not several)."""
    if not distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def check_replicas_agree(model: torch.nn.Module) -> None:
    """Every rank must end with the same weights and buffers (the experts' routing
    biases); if not, gradients or loads were not shared."""
    tensors = [*model.parameters(), *model.buffers()]
    checksum = torch.stack([t.detach().double().sum() for t in tensors]).sum().view(1)
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"data-parallel replicas diverged: weight checksums {low.item()} .. {high.item()}")


def planned_steps(step: int, steps: int, first_step: int, elapsed_s: float, budget_s: float) -> int:
    """The step this run will end at: ``steps``, or with a time budget (``--minutes``)
    the step the rate so far reaches by then, so the cosine decay ends with the time."""
    if not budget_s or step == first_step:
        return steps
    reached = first_step + round((step - first_step) * budget_s / max(elapsed_s, 1e-6))
    return max(step, min(steps, reached))


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def check_trained_span(config: ModelConfig, turns: int) -> None:
    """Refuse a run whose windows are shorter than what the model will attend to when
    served: it never learns to use (or ignore) the older keys, and served past its
    training windows the tiny model missed half its turns (docs/eval.md, session 10)."""
    span, trained = config.sinks + config.window, turns * config.tokens_per_turn
    if trained < span:
        raise ValueError(
            f"--turns {turns} trains on {trained} tokens, but the model attends over sinks + window = {span}: "
            f"use --turns {-(-span // config.tokens_per_turn)} or more, or --window {trained - config.sinks} or less")


def build_model(args: argparse.Namespace) -> tuple[InteractionModel, dict[str, Any] | None, list[str]]:
    """The model a run trains, as ``args`` say: resumed from ``--out`` (with its saved
    optimiser state), fine-tuned from ``--init``, or new from ``--preset``; then with
    the parts its switches add or remove. Also the name prefixes of the blocks
    ``--layers`` added. Switches that do not go together raise ValueError, before any
    data is made (bench/gpu_check.sh calls this to check runs before a lease is spent)."""
    if args.kv_heads and not args.init:
        raise ValueError("--kv-heads widens the checkpoint given by --init; a new model takes its heads from --preset")
    if (args.audio_encoder or args.audio_context or args.layers or args.audio_in_bins) and not args.init:
        raise ValueError("--audio-encoder, --audio-context, --audio-in-bins and --layers add parts to the "
                         "checkpoint given by --init")
    if args.listen_probe and args.audio_head_only:
        raise ValueError("--listen-probe trains the listening head alone, --audio-head-only the audio head alone")
    out = Path(args.out)
    state_path = out / STATE_FILE
    if args.resume and not state_path.exists() and (out / WEIGHTS_FILE).exists():
        # Else the run would start afresh and its first save overwrite those weights.
        raise ValueError(f"--resume: {out} holds weights but no {STATE_FILE} to resume them with (a packed, "
                         f"averaged or shipped checkpoint, or a run stopped before its first save); to train on "
                         f"from those weights use --init {out} with another --out")
    listens = args.listen_weight > 0 or args.listen_probe  # the run needs a listening head
    new_blocks: list[str] = []  # name prefixes of the parameters the rate is scaled for
    if args.resume and state_path.exists():
        model = load_checkpoint(out)
        if args.audio_head and args.audio_head != model.config.audio_head:
            raise ValueError(f"--audio-head {args.audio_head} with --resume: {out} was trained with "
                             f"{model.config.audio_head}")
        state = torch.load(state_path, map_location="cpu")
        check_saved_together(out, state)
        new_blocks = state.get("new_blocks", [])
    elif args.init:  # fine-tune: its weights, a fresh optimiser and schedule
        model = load_checkpoint(args.init)
        if args.kv_heads and args.kv_heads != model.config.n_kv_heads:
            model = widen_kv_heads(model, args.kv_heads)
        if args.layers:
            new_blocks = [f"trunk.blocks.{i}." for i in deepened_blocks(model.config.n_layers, args.layers)]
            model = deepen(model, args.layers)
        if args.audio_encoder:
            if args.audio_encoder <= model.config.audio_encoder_layers:
                raise ValueError(f"--audio-encoder {args.audio_encoder}: {args.init} already has "
                                 f"{model.config.audio_encoder_layers} blocks")
            model = with_parts(model, audio_encoder_layers=args.audio_encoder)
        if args.audio_context:
            if model.config.audio_context:
                raise ValueError(f"--audio-context: {args.init} already mixes {model.config.audio_context} tokens")
            model = with_parts(model, audio_context=args.audio_context)
        if args.audio_in_bins:
            if args.audio_in_bins <= model.config.audio_in_bins or args.audio_in_bins > dmel.FINE_BINS:
                raise ValueError(f"--audio-in-bins {args.audio_in_bins}: {args.init} hears "
                                 f"{model.config.audio_in_bins} levels; grow to more, at most {dmel.FINE_BINS}")
            model = with_parts(model, audio_in_bins=args.audio_in_bins)
        if args.audio_head and args.audio_head != model.config.audio_head:
            model = with_audio_head(model, args.audio_head)
        state = None
    else:
        model = InteractionModel(preset(args.preset, audio_head=args.audio_head or "classify", listen_head=listens))
        state = None
    if args.no_own_voice and model.config.hears_own_voice:  # a new model or --init alike: one way to drop it
        if state is not None:
            raise ValueError("--no-own-voice with --resume: the run's model was fixed when it started")
        model = without_own_voice(model)
    if args.render_history and not model.config.hears_own_voice:
        raise ValueError("--render-history feeds back the model's own voice, which this model does not hear")
    if args.window and args.window != model.config.window:
        if state is not None:
            raise ValueError("--window with --resume: the run's span was fixed when it started")
        model = with_window(model, args.window)
    if args.text_lead is not None and args.text_lead != model.config.text_lead:
        if state is not None:
            raise ValueError("--text-lead with --resume: the run's layout was fixed when it started")
        model = with_parts(model, text_lead=args.text_lead)  # no new weights: the data moves
    if listens and not model.config.listen_head:
        if state is not None:
            raise ValueError("--listen-weight with --resume: the run's model was fixed when it started")
        model = with_parts(model, listen_head=True)
    if args.new_lr_scale != 1 and not new_blocks:
        raise ValueError("--new-lr-scale scales the rate of the blocks --layers adds")
    check_trained_span(model.config, args.turns)
    return model, state, new_blocks


def check_saved_together(out: Path, state: dict[str, Any]) -> None:
    """Refuse to resume weights and a ``train_state.pt`` from different saves (a run
    killed between writing the two): the step ``save`` stamps on both must agree. A
    pair saved before the stamps (no step on the weights, no generators in the state)
    cannot be checked."""
    stamped = checkpoint_step(out)
    if stamped is None and "rng" not in state:
        return
    if stamped != state["step"]:
        saved = "an unknown step" if stamped is None else f"step {stamped}"
        raise ValueError(f"--resume: {out}'s weights are from {saved}, its {STATE_FILE} from step "
                         f"{state['step']}: a save was cut short between the two. To train on from the weights "
                         f"alone (a fresh optimiser and schedule) use --init {out} with another --out")


def train(args: argparse.Namespace) -> list[float]:
    """Train as ``args`` say; returns the loss of every step this run made."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")
    if distributed:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's barriers use the current device: else GPU 0 on every rank
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    rank = dist.get_rank() if distributed else 0
    out = Path(args.out)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model, state, new_blocks = build_model(args)
    config = model.config
    # How the weights it starts from are decoded carries on: a fine-tune of the shipped
    # checkpoint keeps its write threshold (its lexicon is remade from this run's text).
    decoded_from = out if state is not None else args.init
    carried = {key: value for key, value in load_decoding(decoded_from).items()
               if key == "write_threshold"} if decoded_from else {}
    if rank == 0 and args.steps:  # (--steps 0 only makes data)
        origin = f"resumed in {out}" if state is not None else f"from {args.init}" if args.init else "new"
        print(f"model: {config.preset}, {sum(p.numel() for p in model.parameters()):,} parameters, {origin}",
              file=sys.stderr)
    model.to(device).train()
    frozen_but = "listen_head." if args.listen_probe else "audio_head." if args.audio_head_only else None
    if frozen_but:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith(frozen_but))
    groups = parameter_groups(model, new_blocks, args.new_lr_scale)
    trained = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.05, betas=(0.9, 0.95))
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])  # the saved groups' lr_scale with it
        for group in optimizer.param_groups:
            group.setdefault("lr_scale", 1.0)  # a state saved before the groups had a scale
        step = state["step"]

    cache = Path(args.cache) if args.cache else None
    if args.follow_cache and (cache is None or distributed):
        raise ValueError("--follow-cache reads conversations another process writes to --cache; one process only")
    if distributed and rank != 0 and cache is not None:
        dist.barrier()  # rank 0 generates and caches; the others then read the cache
    examples: list[Example] = []
    # --data-minutes bounds the conversations only: the drills are few and always made.
    # Under torchrun rank 0 makes them; the others, past the barrier, take what it cached
    # (a deadline already past) rather than make the rest on a fresh clock of their own.
    deadline = None
    if args.data_minutes:
        if distributed and cache is None:
            raise ValueError("--data-minutes under torchrun needs --cache: the ranks must train on the same seeds")
        deadline = time.monotonic() + 60 * args.data_minutes if rank == 0 else 0.0
    for drill, first, count in ((None, args.first_seed, args.conversations),
                                ("delegation", args.first_drill, args.drills),
                                ("answer", args.first_answer_drill, args.answer_drills)):
        if drill is None and args.follow_cache:  # what is ready now; more joins as it is made
            loaded = cached_run(cache, first, first + count, config.text_lead, config.text_in_slots)
        else:
            loaded = load_examples(list(range(first, first + count)), config, cache, args.workers, drill=drill,
                                   deadline=deadline if drill is None else None)
        if rank == 0 and len(loaded) < count:
            print(f"data: {len(loaded)} of {count} {drill + ' drills' if drill else 'conversations'} ready"
                  + (f" (seeds {first}–{first + len(loaded) - 1})" if loaded else ""), file=sys.stderr)
        if drill is None:
            following = first + len(loaded)  # --follow-cache: the next seed to look for
        examples += loaded
    if distributed and rank == 0 and cache is not None:
        dist.barrier()
    if args.recordings:  # served sessions (docs/recording.md); every rank reads them itself
        from model.recordings import load_recording_examples

        examples += load_recording_examples(args.recordings, config, args.turns)
    if args.steps == 0:  # --steps 0: the data is made and cached; nothing to train
        if distributed:
            dist.destroy_process_group()
        return []
    words = set().union(*(words_written(e.text_out.tolist()) for e in examples))
    if not examples:
        raise SystemExit("no training examples: no conversations (--conversations 0, or none cached yet for "
                         "--follow-cache), no drills and no usable --recordings")
    torch.manual_seed(args.seed * 1000 + rank + step)  # history noise differs by rank
    rng = random.Random(args.seed * 1000 + step + rank)
    if state is not None and "rng" in state and rank == 0:
        # Only rank 0 saves, so only its draws go on as if never stopped; the other ranks
        # (and states saved before the generators were) draw afresh from the seeds above.
        restore_rng(state["rng"], rng, device)
    tokens_per_step = args.batch * args.turns * config.tokens_per_turn
    started, last_report, first_step = time.monotonic(), time.monotonic(), step
    losses: list[float] = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    budget_s, total = 60 * args.minutes, args.steps
    while step < total:
        if args.follow_cache and step % 50 == 0:
            fresh = cached_run(cache, following, args.first_seed + args.conversations, config.text_lead,
                               config.text_in_slots)
            if fresh:
                following += len(fresh)
                examples += fresh
                words = words.union(*(words_written(e.text_out.tolist()) for e in fresh))
                print(f"\ndata: +{len(fresh)} conversations at step {step}, "
                      f"{following - args.first_seed} now", file=sys.stderr)
        batch = [crop(rng.choice(examples), args.turns, rng) for _ in range(args.batch)]
        if args.user_mask_bands or args.user_jitter:
            batch = [replace(e, user_bins=mask_user_bins(e.user_bins, args.user_mask_bands, args.user_mask_width,
                                                         args.user_jitter)) for e in batch]
        batch = [Example(*(t.to(device) for t in (e.user_bins, e.model_bins, e.text_in, e.text_out)), e.user_words)
                 for e in batch]
        for group in optimizer.param_groups:
            group["lr"] = group["lr_scale"] * learning_rate(step, total, args.lr, args.warmup)
        with autocast:
            if args.listen_probe:
                loss, parts = listen_probe_loss(model, batch)
            else:
                loss, parts = batch_loss(model, batch, args.history_noise, args.text_weight, args.speech_weight,
                                         args.listen_weight, args.render_history)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if distributed:
            average_gradients(model)
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        if not frozen_but:  # training one head leaves everything else as it was
            balance_experts(model, args.balance_rate, distributed)
        losses.append(parts["loss"])
        step += 1
        now = time.monotonic()
        if budget_s:  # every rank must agree on when to stop: rank 0's clock decides
            total = broadcast_int(planned_steps(step, args.steps, first_step, now - started, budget_s), distributed, device)
        if rank == 0 and (now - last_report > 2 or step == total):
            rate = tokens_per_step * (step - first_step) / max(now - started, 1e-6)
            bar = "#" * int(30 * step / total)
            named = ", ".join(f"{name} {value:.3f}" for name, value in parts.items() if name != "loss")
            print(f"\r[{bar:30s}] step {step}/{total}  loss {parts['loss']:.3f} ({named})  "
                  f"{rate:,.0f} tokens/s", end="", file=sys.stderr, flush=True)
            last_report = now
        if rank == 0 and (step % args.save_every == 0 or step == total):
            save(model, optimizer, step, out, new_blocks, rng, device)
            save_decoding(out, carried, words)
    if rank == 0:
        print(file=sys.stderr)
    if distributed:
        check_replicas_agree(model)
        # Leave together: a rank tearing down gloo while the other still uses it (rank 0
        # saving) ended once in "terminate called without an active exception".
        dist.barrier()
        dist.destroy_process_group()
    return losses


def parameter_groups(model: InteractionModel, new_blocks: list[str], new_lr_scale: float) -> list[dict]:
    """AdamW's groups: the trainable parameters, those under ``new_blocks`` (a deepened
    trunk's added blocks) apart with ``new_lr_scale`` times the schedule's rate. The
    added blocks start with zeroed output projections, and at a fine-tuning rate those
    grew to ~5 % of the trained blocks' norms in 1,300 steps (docs/eval.md, session 21)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    new = tuple(new_blocks)  # startswith(()) is False: no new blocks, one group
    groups = [{"params": [p for name, p in trainable if not name.startswith(new)], "lr_scale": 1.0}]
    added = [p for name, p in trainable if name.startswith(new)]
    if added:
        groups.append({"params": added, "lr_scale": new_lr_scale})
    return groups


def save(model: InteractionModel, optimizer: torch.optim.Optimizer, step: int, out: Path,
         new_blocks: list[str], rng: random.Random, device: torch.device) -> None:
    """The weights, then what resumes them: each file written whole (``replacing``), and
    the step stamped on both, so a run killed between the two is refused on ``--resume``
    (``check_saved_together``) rather than pairing weights with another save's optimiser."""
    save_checkpoint(model, out, step=step)
    state = {"optimizer": optimizer.state_dict(), "step": step, "new_blocks": new_blocks,
             "rng": rng_state(rng, device)}
    with replacing(out / STATE_FILE) as partial:
        torch.save(state, partial)


def rng_state(rng: random.Random, device: torch.device) -> dict[str, object]:
    """What the steps after a save draw from: ``rng`` (the windows and their crops),
    torch's CPU generator (history noise, masks) and the GPU's (a flow head's noise)."""
    state: dict[str, object] = {"python": rng.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], rng: random.Random, device: torch.device) -> None:
    """The generators as ``rng_state`` saved them (the GPU's only where there is one)."""
    rng.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_decoding(out: Path, carried: dict[str, float | str], words: set[str]) -> None:
    """``decoding.json`` beside the weights, so they serve and evaluate as trained: the
    settings ``carried`` from the weights the run started from, and a lexicon of the words
    its model text wrote (``model.lexicon``; none when that text holds no word)."""
    settings = dict(carried)
    if words:
        with replacing(out / LEXICON_FILE) as partial:
            Lexicon(words).save(partial)
        settings["lexicon"] = LEXICON_FILE
    else:
        (out / LEXICON_FILE).unlink(missing_ok=True)
    if settings:
        with replacing(out / DECODING_FILE) as partial:
            partial.write_text(json.dumps(settings) + "\n")
    else:
        (out / DECODING_FILE).unlink(missing_ok=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microturn train", description="Train the interaction model.")
    parser.add_argument("--out", required=True, help="checkpoint directory")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--audio-head", choices=["classify", "flow"], default=None,
                        help="a new model's audio head (default classify); with --init, a head of the other "
                             "kind replaces the checkpoint's, fresh")
    parser.add_argument("--audio-head-only", action="store_true",
                        help="train the audio head alone, the rest frozen: a (new) head learns to voice a "
                             "trained trunk without changing what it says or when")
    parser.add_argument("--steps", type=at_least(0), default=2000,
                        help="optimiser steps (0: make and cache the data, train nothing)")
    parser.add_argument("--minutes", type=between(0), default=0.0,
                        help="stop after this many minutes of training, the schedule fitted to them (0: off)")
    parser.add_argument("--data-minutes", type=between(0), default=0.0,
                        help="start no new batch of conversations after this many minutes; train on the "
                             "seeds made from the first (0: off)")
    parser.add_argument("--batch", type=at_least(1), default=8)
    parser.add_argument("--turns", type=at_least(1), default=40, help="micro-turns per training window (8 s)")
    parser.add_argument("--lr", type=positive, default=2e-3)
    parser.add_argument("--warmup", type=at_least(0), default=100)
    parser.add_argument("--balance-rate", type=between(0), default=1e-3)
    parser.add_argument("--history-noise", type=between(0, 1), default=0.1,
                        help="fraction of the model's own fed-back dMel bins moved by one step")
    parser.add_argument("--no-own-voice", action="store_true",
                        help="feed back only the model's text, not its voice (ModelConfig.hears_own_voice); "
                             "with --init, its own voice's embedding is dropped")
    parser.add_argument("--render-history", action="store_true",
                        help="feed the model's own audio back as its audio head renders it (an extra forward "
                             "pass without gradients), not the reference: what serving feeds it")
    parser.add_argument("--user-mask-bands", type=at_least(0), default=0,
                        help="mel bands of the user's audio dropped to the floor per training window (0: off)")
    parser.add_argument("--user-mask-width", type=at_least(0, at_most=dmel.N_MELS), default=12,
                        help="widest such band, in mel channels (of 80)")
    parser.add_argument("--user-jitter", type=between(0, 1), default=0.0,
                        help="fraction of the user's speech dMel bins moved by one step (silence untouched)")
    parser.add_argument("--text-weight", type=between(0), default=1.0,
                        help="text-loss weight of positions that write a byte (1: plain mean)")
    parser.add_argument("--speech-weight", type=between(0), default=1.0,
                        help="audio-loss weight of positions that are not silent (1: plain mean)")
    parser.add_argument("--listen-weight", type=between(0), default=0.0,
                        help="weight of the listening head's CTC loss on the user's words (0: off; "
                             "adds the head to a checkpoint without one)")
    parser.add_argument("--listen-probe", action="store_true",
                        help="train only the listening head, on its loss alone (the trunk frozen)")
    parser.add_argument("--conversations", type=at_least(0), default=400)
    parser.add_argument("--drills", type=at_least(0), default=0,
                        help="delegation drills added to the conversations (model.conversations.make_delegation_drill)")
    parser.add_argument("--first-drill", type=at_least(0), default=0,
                        help="drill seeds start here (a chained fine-tune can take drills its --init never saw)")
    parser.add_argument("--answer-drills", type=at_least(0), default=0,
                        help="answer drills added: small sums and 'what comes after' back to back "
                             "(model.conversations.make_answer_drill)")
    parser.add_argument("--first-answer-drill", type=at_least(0), default=0, help="answer drill seeds start here")
    parser.add_argument("--recordings", action="append", default=[], metavar="DIR",
                        help="also train on every session recording under DIR (repeatable)")
    parser.add_argument("--follow-cache", action="store_true",
                        help="train on the conversations already in --cache and add those another "
                             "process (--steps 0) caches meanwhile, every 50 steps; generates none")
    parser.add_argument("--first-seed", type=at_least(0), default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=".cache/conversations", help="'' disables the cache")
    parser.add_argument("--workers", type=at_least(1), default=2, help="processes generating conversations")
    parser.add_argument("--save-every", type=at_least(1), default=200)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--init", default="", help="start from this checkpoint's weights (not with --resume)")
    parser.add_argument("--window", type=at_least(0), default=0,
                        help="attention window in tokens (default: the preset's or --init checkpoint's); "
                             "sinks + window must fit in --turns micro-turns")
    parser.add_argument("--kv-heads", type=at_least(0), default=0,
                        help="with --init: widen to this many key/value heads first (same outputs at the start)")
    parser.add_argument("--audio-encoder", type=at_least(0), default=0, metavar="BLOCKS",
                        help="with --init: grow the encoder on the user's audio tokens to this many blocks "
                             "(same outputs at the start; ModelConfig.audio_encoder_layers)")
    parser.add_argument("--layers", type=at_least(0), default=0, metavar="BLOCKS",
                        help="with --init: deepen the trunk to this many blocks, the new ones in before the "
                             "last (same outputs at the start; ModelConfig.n_layers)")
    parser.add_argument("--new-lr-scale", type=between(0), default=1.0, metavar="FACTOR",
                        help="with --layers: the new blocks learn at FACTOR times --lr (kept by --resume)")
    parser.add_argument("--audio-in-bins", type=at_least(0), default=0, metavar="LEVELS",
                        help="with --init: hear the user's audio at this many dMel levels, not 16 "
                             f"(up to {dmel.FINE_BINS}; same outputs at the start; ModelConfig.audio_in_bins)")
    parser.add_argument("--text-lead", type=at_least(0), default=None, metavar="OUTPUTS",
                        help="train the model's text this many outputs (50 ms each) ahead of its voice "
                             "(ModelConfig.text_lead; default: as the model has it, 0 for a new one)")
    parser.add_argument("--audio-context", type=at_least(0), default=0, metavar="TOKENS",
                        help="with --init: mix each user audio token with this many before it "
                             "(same outputs at the start; ModelConfig.audio_context)")
    return parser


def main(argv: list[str] | None = None) -> None:
    train(build_parser().parse_args(argv))


if __name__ == "__main__":  # torchrun -m model.train ...
    main()
    # Everything is saved and the process group destroyed; skip the interpreter's
    # teardown. A rank once aborted there ("terminate called without an active
    # exception", after its last step, barrier and destroy): C++ threads of gloo or
    # the TCP store torn down during finalisation, as pytorch/pytorch#179291 describes.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
