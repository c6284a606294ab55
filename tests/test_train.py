"""Training: the loss falls, a run resumes where it stopped, and the checkpoint serves."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

from model.interface import TURN_SAMPLES, TurnInput
from model.config import NO_TEXT, preset
from model.heads import FlowHead
from model.interaction import InteractionModel
from model.lexicon import from_data
from model.train import Example, batch_loss, build_parser, mask_user_bins, text_input_slots, train
from model.weights import load_checkpoint, save_checkpoint, without_parts
from server.engine import make_model


def test_text_input_is_queued_four_ids_a_turn_like_the_server_does():
    slots = text_input_slots(["", "<result>t1: 42</result>", "", ""], 4)
    # <result> and </result> are one marker id each (259, 260); 256 is "no text".
    assert slots.tolist() == [[256] * 4, [259, *b"t1:"], [*b" 42", 260], [256] * 4]


def test_training_lowers_the_loss_resumes_and_serves(tmp_path):
    out = tmp_path / "ckpt"
    common = ["--out", str(out), "--batch", "2", "--turns", "10", "--window", "144", "--conversations", "4",
              "--drills", "1", "--cache", str(tmp_path / "cache"), "--warmup", "5", "--save-every", "20", "--lr", "3e-3"]
    losses = train(build_parser().parse_args(common + ["--steps", "40"]))
    assert len(losses) == 40
    assert statistics.mean(losses[-5:]) < 0.6 * statistics.mean(losses[:5]), losses

    state = torch.load(out / "train_state.pt")  # as saved before session 22: no rate scales, no new blocks
    del state["new_blocks"], state["optimizer"]["param_groups"][0]["lr_scale"]
    torch.save(state, out / "train_state.pt")
    more = train(build_parser().parse_args(common + ["--steps", "45", "--resume"]))
    assert len(more) == 5, "resumed at step 40"
    assert torch.load(out / "train_state.pt")["step"] == 45

    # It decodes as trained: a lexicon of the words its conversations and drill wrote, as
    # model.lexicon makes one from the conversations themselves; no threshold to carry.
    assert json.loads((out / "decoding.json").read_text()) == {"lexicon": "lexicon.txt"}
    words = from_data(range(4), range(1)).words
    assert (out / "lexicon.txt").read_text().split() == words
    engine = make_model("model", max_sessions=2, checkpoint=str(out))
    assert engine.weights == "ckpt"
    assert engine.decoding == f"greedy, lexicon of {len(words)} words"
    engine.open_session("s")
    output = engine.step([TurnInput("s", 0, np.zeros(TURN_SAMPLES, dtype=np.float32))])[0]
    assert output.audio.shape == (TURN_SAMPLES,) and np.isfinite(output.audio).all()

    # A fine-tune that first widens the key/value heads (1 -> 4), narrows the
    # attention window, adds encoder blocks on the user's audio, mixes each audio
    # token with the three before it, hears 64 levels, adds a trunk block and writes its text an output
    # ahead of its voice trains and serves too. The tiny preset has the encoder now: start from the run's weights without it.
    save_checkpoint(without_parts(load_checkpoint(out), audio_encoder_layers=0), tmp_path / "without_encoder")
    with pytest.raises(ValueError, match="already has 2 blocks"):
        train(build_parser().parse_args(common[2:] + ["--out", str(tmp_path / "twice"), "--init", str(out),
                                                      "--audio-encoder", "2", "--steps", "1"]))
    with pytest.raises(ValueError, match="hears 16 levels; grow to more, at most 64"):
        train(build_parser().parse_args(common[2:] + ["--out", str(tmp_path / "finer"), "--init", str(out),
                                                      "--audio-in-bins", "128", "--steps", "1"]))
    wide = tmp_path / "wide"
    growing = common[2:] + ["--out", str(wide), "--init", str(tmp_path / "without_encoder"), "--kv-heads", "4",
                            "--window", "128", "--audio-encoder", "2", "--audio-context", "3", "--layers", "5",
                            "--new-lr-scale", "10", "--user-mask-bands", "2", "--user-jitter", "0.1",
                            "--first-drill", "1", "--audio-in-bins", "64", "--answer-drills", "1",
                            "--first-answer-drill", "2", "--render-history", "--text-lead", "1"]
    (tmp_path / "without_encoder" / "decoding.json").write_text('{"write_threshold": 0.4}')
    tuned = train(build_parser().parse_args(growing + ["--steps", "3"]))
    assert len(tuned) == 3 and statistics.mean(tuned) < 0.8 * statistics.mean(losses[:5])  # from the trained weights
    drills = sorted(path.name for path in (tmp_path / "cache").glob("v*/drill-*.pt"))
    assert drills == ["drill-0.pt", "drill-1.pt"], "the fine-tune took drill 1, not drill 0 again"
    answer_drills = [path.name for path in (tmp_path / "cache").glob("v*/answer-drill-*.pt")]
    assert answer_drills == ["answer-drill-2.pt"], "cached apart from the delegation drills of the same seed"
    engine = make_model("model", max_sessions=2, checkpoint=str(wide))
    # The threshold it started with carries on; the lexicon is this run's, drills and all.
    assert json.loads((wide / "decoding.json").read_text()) == {"write_threshold": 0.4, "lexicon": "lexicon.txt"}
    assert engine.decoding.startswith("write_threshold 0.4, lexicon of ")
    engine.open_session("s")
    assert np.isfinite(engine.step([TurnInput("s", 0, np.zeros(TURN_SAMPLES, dtype=np.float32))])[0].audio).all()
    assert '"n_kv_heads": 4' in (wide / "config.json").read_text()
    assert '"window": 128' in (wide / "config.json").read_text()
    assert '"audio_encoder_layers": 2' in (wide / "config.json").read_text()
    encoder = engine.model.audio_encoder.blocks  # added as identities, moved by training
    assert all(block.down.weight.abs().max() > 0 for block in encoder)
    assert '"audio_context": 3' in (wide / "config.json").read_text()
    assert engine.model.audio_context.out.weight.abs().max() > 0  # started at zero
    assert '"audio_in_bins": 64' in (wide / "config.json").read_text()
    assert engine.model.audio_in_fine.table.abs().max() > 0  # started at zero
    assert '"n_layers": 5' in (wide / "config.json").read_text()
    assert '"text_lead": 1' in (wide / "config.json").read_text()
    assert engine.model.trunk.blocks[3].attn.out.weight.abs().max() > 0  # the added block, started as an identity
    # The added block learns at ten times the rate, and a resumed run keeps it so.
    assert len(train(build_parser().parse_args(growing + ["--steps", "4", "--resume"]))) == 1
    state = torch.load(wide / "train_state.pt")
    assert state["new_blocks"] == ["trunk.blocks.3."]
    old_group, new_group = state["optimizer"]["param_groups"]
    assert len(new_group["params"]) == sum(1 for _ in engine.model.trunk.blocks[3].parameters())
    assert new_group["lr"] == pytest.approx(10 * old_group["lr"]) and old_group["lr"] > 0
    with pytest.raises(ValueError, match="--text-lead with --resume"):
        train(build_parser().parse_args(growing[:-1] + ["2", "--steps", "5", "--resume"]))
    with pytest.raises(ValueError, match="already mixes 3 tokens"):
        train(build_parser().parse_args(common[2:] + ["--out", str(tmp_path / "again"), "--init", str(wide),
                                                      "--audio-context", "2", "--steps", "1"]))

    # A fine-tune that stops feeding back its own voice (its text only) trains and serves,
    # and refuses to be fed back its rendered voice, which it no longer hears.
    deaf = common[2:] + ["--out", str(tmp_path / "deaf"), "--init", str(out), "--no-own-voice"]
    with pytest.raises(ValueError, match="which this model does not hear"):
        train(build_parser().parse_args(deaf + ["--render-history", "--steps", "1"]))
    assert len(train(build_parser().parse_args(deaf + ["--steps", "2"]))) == 2
    assert '"hears_own_voice": false' in (tmp_path / "deaf" / "config.json").read_text()
    engine = make_model("model", max_sessions=2, checkpoint=str(tmp_path / "deaf"))
    assert not hasattr(engine.model, "audio_out")
    engine.open_session("s")
    assert np.isfinite(engine.step([TurnInput("s", 0, np.zeros(TURN_SAMPLES, dtype=np.float32))])[0].audio).all()


def test_user_audio_masks_drop_whole_bands_and_keep_silence_silent():
    """On the stored 64-level bins: silence (coarse bin 0) stays silent, jitter moves a
    bin one coarse step and keeps its place within the step."""
    generator = torch.Generator().manual_seed(1)
    bins = torch.randint(4, 64, (320, 80), generator=generator, dtype=torch.uint8)
    bins[100:140] = 0  # a pause: it must stay a pause
    masked = mask_user_bins(bins, bands=2, max_width=12, jitter=0.2, generator=generator)
    assert masked.dtype == torch.uint8 and masked.shape == bins.shape
    assert (masked[100:140] == 0).all()
    dropped = (masked == 0).all(0)  # channels silenced for the whole window
    assert 0 < dropped.sum() <= 24 and not (bins == 0).all(0).any()
    assert torch.equal(masked[:, ~dropped] % 4, bins[:, ~dropped] % 4)
    moved = masked[:, ~dropped].long() // 4 - bins[:, ~dropped].long() // 4
    speech = bins[:, ~dropped] >= 4
    assert moved.abs().max() <= 1 and (masked[:, ~dropped][speech] >= 4).all()
    assert 0.1 < (moved[speech] != 0).float().mean() < 0.3  # ~the jitter rate (less at the clamped ends)
    assert torch.equal(mask_user_bins(bins, 0, 12, 0.0), bins)


def test_windows_shorter_than_the_served_attention_span_are_refused(tmp_path):
    """Trained on 8 s windows and served over 25.6 s, the tiny model missed half the
    questions asked late in a session; a run that would repeat that does not start."""
    with pytest.raises(ValueError, match=r"--turns 40 or more, or --window 144 or less"):
        train(build_parser().parse_args(["--out", str(tmp_path / "ckpt"), "--turns", "10", "--steps", "1"]))
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("flag,value,said", [
    ("--user-mask-width", "81", "must be 80 or less, not 81"),
    ("--user-jitter", "1.5", "must be from 0 to 1, not 1.5"),
    ("--user-mask-bands", "-1", "must be 0 or more, not -1"),
    ("--history-noise", "-0.1", "must be from 0 to 1, not -0.1"),
    ("--lr", "-3e-4", "must be above 0, not -3e-4"),  # would climb the loss, silently
    ("--lr", "nan", "must be above 0, not nan"),
    ("--listen-weight", "-0.25", "must be 0 or more, not -0.25"),
    ("--text-weight", "nan", "must be 0 or more, not nan"),
    ("--layers", "-2", "must be 0 or more, not -2"),
])
def test_impossible_training_settings_are_refused_before_training(capsys, flag, value, said):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--out", "unused", f"{flag}={value}"])
    assert f"argument {flag}: {said}" in capsys.readouterr().err


@pytest.mark.parametrize("growth", [["--kv-heads", "4"], ["--audio-encoder", "2"], ["--layers", "6"]])
def test_growing_without_a_checkpoint_to_grow_is_an_error(tmp_path, growth):
    with pytest.raises(ValueError, match="--init"):
        train(build_parser().parse_args(["--out", str(tmp_path / "ckpt"), *growth, "--steps", "1"]))
    assert not (tmp_path / "ckpt").exists()


def test_a_rate_for_new_blocks_without_new_blocks_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="the blocks --layers adds"):
        train(build_parser().parse_args(["--out", str(tmp_path / "ckpt"), "--new-lr-scale", "10", "--steps", "1"]))
    assert not (tmp_path / "ckpt").exists()


def test_data_parallel_under_torchrun_keeps_replicas_identical(tmp_path):
    """Two CPU ranks (gloo) train on different batches; train() raises at the end if
    their weights differ, so a clean exit means the gradients were averaged."""
    out = tmp_path / "ckpt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
               "-m", "model.train", "--out", str(out), "--batch", "1", "--turns", "6", "--window", "80", "--conversations", "2",
               "--cache", str(tmp_path / "cache"), "--steps", "3", "--warmup", "1", "--workers", "1"]
    run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert torch.load(out / "train_state.pt")["step"] == 3


def _batch(config, turns: int = 6) -> list[Example]:
    """Two hand-made examples: the first half of each is silence without text, the
    second half speech that writes bytes."""
    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(2):
        user = torch.randint(0, 16, (turns * 16, 80), generator=generator, dtype=torch.uint8)
        own = torch.randint(1, 16, (turns * 16, 80), generator=generator, dtype=torch.uint8)
        own[: turns * 8] = 0
        text_out = torch.randint(97, 123, (turns, config.out_positions), generator=generator)
        text_out[: turns // 2] = NO_TEXT
        examples.append(Example(user, own, torch.full((turns, config.text_in_slots), NO_TEXT), text_out))
    return examples


def test_loss_weights_shift_the_mean_towards_bytes_and_speech():
    """Weight 1 is the plain mean; a huge weight makes each loss the mean over just
    the positions that write a byte / speak (checked against the heads' own losses
    on those rows, read from the hidden states the text head saw)."""
    torch.manual_seed(0)
    model = InteractionModel(preset("tiny"))
    batch = _batch(model.config)
    seen: list[torch.Tensor] = []
    model.text_head.register_forward_hook(lambda _module, args, _out: seen.append(args[0].detach()))
    _, plain = batch_loss(model, batch)
    _, same = batch_loss(model, batch, text_weight=1.0, speech_weight=1.0)
    assert same == plain
    _, heavy = batch_loss(model, batch, text_weight=1e9, speech_weight=1e9)
    hidden = seen[-1]
    text = torch.stack([e.text_out for e in batch]).reshape(-1)
    writes = text != NO_TEXT
    audio = torch.stack([e.model_bins for e in batch]).long().reshape(-1, model.config.frames_per_output, 80)
    speaks = audio.flatten(1).amax(-1) > 0
    assert 0 < writes.sum() < writes.numel() and 0 < speaks.sum() < speaks.numel()
    with torch.no_grad():
        text_on_bytes = torch.nn.functional.cross_entropy(model.text_head(hidden[writes]), text[writes]).item()
        audio_on_speech = model.audio_head.loss(hidden[speaks], audio[speaks]).item()
    assert abs(heavy["text"] - text_on_bytes) < 1e-4 * text_on_bytes
    assert abs(heavy["audio"] - audio_on_speech) < 1e-4 * audio_on_speech
    assert heavy["text"] != plain["text"] and heavy["audio"] != plain["audio"]


# Run in a fresh interpreter: in the suite's own process (~1.9 GB resident, server and
# torch threads from earlier tests) the RSS moved by tens of MB around the trim, and
# CI once saw 74 of the 150 MB come back. Alone, the same code frees ~107 MB every run.
_FREED_BUFFERS = """
from model.memory import release_freed_memory, resident_bytes
warm = bytearray(4 << 20)  # freeing an mmapped block raises glibc's mmap threshold,
del warm                   # so the buffers below come from the heap, as in training
buffers, kept = [], []
for _ in range(100):
    buffers.append(bytearray(b"\\x01" * (3 << 19)))  # 1.5 MB, like 24 s of float32 audio
    kept.append(bytearray(b"\\x01" * (64 << 10)))  # a live example after it pins the heap top
del buffers
held = resident_bytes()
trimmed = release_freed_memory()
print(trimmed, held - resident_bytes(), len(kept))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's; elsewhere release_freed_memory is a no-op")
def test_freed_audio_buffers_go_back_to_the_os():
    """Generation frees ~1.5 MB audio buffers between the small examples it keeps; glibc
    holds such holes until trimmed (a 2,100-conversation `train` reached 24 GB RSS)."""
    run = subprocess.run([sys.executable, "-c", _FREED_BUFFERS], check=False, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr[-3000:]
    trimmed, released, kept = run.stdout.split()
    assert trimmed == "True" and kept == "100"
    assert int(released) > 75 << 20, f"under half of the 150 MB freed went back to the OS ({int(released) >> 20} MB)"


@pytest.mark.parametrize("flag", ["--first-seed", "--first-drill", "--drills", "--conversations"])
def test_negative_seeds_and_counts_are_refused(flag, capsys):
    """random.Random(-s) is random.Random(s): a negative --first-seed would replay other
    seeds' conversations (-1,000,000 is the held-out set) instead of failing."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--out", "unused", flag, "-1000000"])
    assert f"argument {flag}: must be 0 or more, not -1000000" in capsys.readouterr().err


_TRAIN_WITHOUT_MEDIA_LIBRARIES = """
import sys
for name in ("av", "espeakng_loader", "pocketsphinx", "aiortc", "starlette"):
    sys.modules[name] = None  # not installed, as on the lent GPU machine
from model.train import main
main(sys.argv[1:])
"""


def test_training_from_a_full_cache_needs_no_media_libraries(tmp_path):
    """bench/gpu_check.sh trains on a GPU machine that has torch but not PyAV or
    espeak-ng, from conversations cached here and carried there."""
    from model.train import load_examples

    load_examples([0, 1], preset("tiny"), tmp_path / "cache")  # generated here, with PyAV and espeak-ng
    run = subprocess.run(
        [sys.executable, "-c", _TRAIN_WITHOUT_MEDIA_LIBRARIES, "--out", str(tmp_path / "ckpt"), "--conversations", "2",
         "--cache", str(tmp_path / "cache"), "--steps", "2", "--batch", "2", "--turns", "40", "--save-every", "2"],
        capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 2/2" in run.stderr and (tmp_path / "ckpt" / "model.safetensors").exists()


@pytest.mark.timeout(300)  # ~60 s alone; a loaded 2-core machine has taken twice that
def test_the_prepared_gpu_check_runs_here_without_a_gpu(tmp_path, monkeypatch):
    """bench/gpu_check.sh is for a GPU lease of minutes, so its plumbing is checked
    here: without CUDA its CUDA tests skip, the bench and both trainings run on the
    CPU — one continuing a carried checkpoint, one from scratch, each with a switch of
    its own — with PyAV absent, as there, and what comes back (at most 8 files) unpacks
    into checkpoints that load."""
    import tarfile
    from pathlib import Path

    from model.train import CACHE_NAME, load_examples
    from model.weights import load_checkpoint

    repository = Path(__file__).resolve().parents[1]
    # PyAV absent, as on the GPU machine: a package of its name that fails to import.
    (tmp_path / "no-av" / "av").mkdir(parents=True)
    (tmp_path / "no-av" / "av" / "__init__.py").write_text("raise ImportError('no PyAV on this machine')\n")
    # Two conversations cached where the script starts, made as it would make them (no
    # PyAV: numpy resamples); a deadline already past makes no more.
    monkeypatch.setenv("MICROTURN_RESAMPLER", "sinc")
    load_examples([42000, 42001], preset("tiny"), tmp_path / "work" / "cache")  # the script's first seeds
    monkeypatch.delenv("MICROTURN_RESAMPLER")
    (tmp_path / "carried").mkdir()
    (tmp_path / "carried" / "tiny").symlink_to(repository / "checkpoints" / "tiny")  # continued; small is not carried
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
           "DATA_MINUTES": "0.0001", "WORKERS": "1", "DRILLS": "1", "TRAIN_AFTER": "0", "TRAIN_MINUTES": "0.05",
           "BATCH": "2", "REPEATS": "1", "PRESETS": "tiny+render-history small+no-own-voice",
           "INIT": str(tmp_path / "carried"),
           "PYTHONPATH": str(tmp_path / "no-av"),
           "WHEELS": str(tmp_path / "no-wheels")}  # what a fresh clone has: none carried here
    run = subprocess.run(["bash", str(repository / "bench" / "gpu_check.sh")], cwd=repository, env=env,
                         capture_output=True, text=True, timeout=240, check=False)
    report = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == 0 and "done: status 0" in run.stdout, report
    assert "train tiny+render-history, small+no-own-voice for 0.05 min each" in run.stdout, report
    out = tmp_path / "out"
    assert len(list(out.iterdir())) <= 8, report
    with tarfile.open(out / "logs.tar") as logs:
        logs.extractall(tmp_path / "logs", filter="data")
    assert "resampler sinc" in (tmp_path / "logs" / "versions.txt").read_text()
    tests = (tmp_path / "logs" / "tests.log").read_text()
    assert " passed" in tests and "failed" not in tests, tests
    bench = json.loads((tmp_path / "logs" / "bench_model.json").read_text())
    assert bench["device"] == "cpu" and set(bench["step_ms_by_sessions"]) == {"1", "8", "32", "64"}
    assert "2 of 100000 conversations ready" in (tmp_path / "logs" / "data.log").read_text()
    assert (tmp_path / "work" / "cache" / f"{CACHE_NAME}-sinc" / "drill-4700.pt").exists()  # made there, no PyAV
    first_loss = {}
    for name, preset_name, parameters, origin in (
            ("tiny_render-history", "tiny", 6_060_702, f"from {tmp_path / 'carried' / 'tiny'}"),
            ("small_no-own-voice", "small", 22_033_390 - 1_310_720, "new")):  # less the embedding of its voice
        log = (tmp_path / "logs" / f"train-{name}.log").read_text()
        assert "2 of 100000 conversations ready" in log and "step " in log, log  # --follow-cache found both
        first_loss[preset_name] = float(re.search(r"loss ([0-9.]+)", log)[1])
        parts = sorted(out.glob(f"{name}.tar.*"))
        assert parts and all(part.stat().st_size <= 15 * 2**20 for part in parts)
        packed = tmp_path / f"{name}.tar"
        packed.write_bytes(b"".join(part.read_bytes() for part in parts))
        with tarfile.open(packed) as archive:
            archive.extractall(tmp_path / "back", filter="data")
        model = load_checkpoint(tmp_path / "back" / name)  # bf16 on disk, float32 once loaded
        decoding = json.loads((tmp_path / "back" / name / "decoding.json").read_text())  # came back with it
        assert decoding == ({"write_threshold": 0.5} if preset_name == "tiny" else {}) | {"lexicon": "lexicon.txt"}
        assert (tmp_path / "back" / name / "lexicon.txt").read_text().split()
        assert model.config.preset == preset_name and sum(p.numel() for p in model.state_dict().values()) == parameters
        assert model.config.hears_own_voice == (preset_name == "tiny")  # each run's own switches
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert f"model: {preset_name}, {sum(p.numel() for p in model.parameters()):,} parameters, {origin}\n" in log, log
    assert first_loss["tiny"] < first_loss["small"] / 4, first_loss  # the carried weights, trained; not new ones


@pytest.mark.parametrize(("settings", "refusal"), [
    ({"PRESETS": "small"}, "holds none of small"),  # tiny carried, but not the preset asked for
    ({"PRESETS": "tiny small+no-own-vioce"}, "unrecognized arguments: --no-own-vioce"),  # a misspelt switch
    ({"PRESETS": "tiny+"}, "tiny+ has an empty switch"),
    ({"PRESETS": "tiny+no-own-voice tiny+no-own-voice"}, "PRESETS names tiny+no-own-voice twice"),  # one checkpoint
    ({"PRESETS": "tiny small small+no-own-voice"}, "MiB of weights; a call brings back 64 MiB"),  # ~95 MiB
    ({"PRESETS": "tiny", "RENDER_HISTORY": "1"}, "name the run small+render-history"),  # the old switch
    # Switches each valid but not together, found by building the model as the run would:
    ({"PRESETS": "tiny small+no-own-voice+render-history"},
     "PRESETS: small+no-own-voice+render-history: --render-history feeds back the model's own voice"),
    ({"PRESETS": "tiny+layers=6 small+layers=6"}, "PRESETS: small+layers=6: --audio-encoder, --audio-context"),
])
def test_the_gpu_check_stops_before_a_lease_is_spent_on_runs_it_cannot_do(tmp_path, settings, refusal):
    from pathlib import Path

    repository = Path(__file__).resolve().parents[1]
    (tmp_path / "carried").mkdir()
    (tmp_path / "carried" / "tiny").symlink_to(repository / "checkpoints" / "tiny")  # small is not carried
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
           "INIT": str(tmp_path / "carried"), "WHEELS": str(tmp_path / "no-wheels"), **settings}
    run = subprocess.run(["bash", str(repository / "bench" / "gpu_check.sh")], cwd=repository, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2 and refusal in run.stderr, run.stderr
    assert not (tmp_path / "work" / "cache").exists()  # nothing started


def test_a_time_budget_fits_the_schedule_to_the_steps_it_will_reach():
    from model.train import learning_rate, planned_steps

    assert planned_steps(0, 1000, 0, 0.0, 60.0) == 1000  # no rate yet: the step limit
    assert planned_steps(10, 1000, 0, 6.0, 60.0) == 100  # 10 steps in 6 s of 60
    assert planned_steps(10, 50, 0, 6.0, 60.0) == 50  # --steps still caps it
    assert planned_steps(110, 1000, 100, 6.0, 60.0) == 200  # a resumed run counts its own steps
    assert planned_steps(10, 1000, 0, 61.0, 60.0) == 10  # out of time: this step is the last
    assert planned_steps(10, 1000, 0, 6.0, 0.0) == 1000  # no budget
    assert learning_rate(99, planned_steps(99, 10**6, 0, 59.4, 60.0), 1e-3, 10) == pytest.approx(1e-4, rel=0.01)


def test_a_data_deadline_trains_on_the_seeds_made_from_the_first(tmp_path):
    """--data-minutes: past the deadline nothing new is generated, and the examples are
    the seeds from the first that are ready, so a gap never shifts what a seed means."""
    import time

    from model.train import CACHE_NAME, load_examples

    config = preset("tiny")
    load_examples([7, 9], config, tmp_path)
    assert not list((tmp_path / CACHE_NAME).glob("*.partial"))  # written whole, then renamed
    past = time.monotonic() - 1
    assert len(load_examples([7, 8, 9], config, tmp_path, deadline=past)) == 1  # 8 missing: 7 alone
    assert load_examples([8, 9], config, tmp_path, deadline=past) == []
    assert len(load_examples([7], config, tmp_path, deadline=past)) == 1
    assert len(load_examples([9, 7], config, tmp_path, deadline=past)) == 2


def test_a_text_lead_moves_every_byte_earlier_and_the_cache_keeps_the_data_as_it_is(tmp_path):
    """ModelConfig.text_lead: the model's text is trained that many outputs ahead of its
    voice. Bytes move across micro-turns and the voice stays; what is cached (shared by
    models of any lead) is the data as generated, and what comes back is moved."""
    from dataclasses import replace

    from model.conversations import generate
    from model.train import CACHE_NAME, Example, cached_run, leading_text, load_examples, to_example

    text = torch.tensor([[NO_TEXT, ord("h"), ord("i"), NO_TEXT], [NO_TEXT, NO_TEXT, ord("o"), ord("k")]])
    example = Example(torch.zeros(32, 80, dtype=torch.uint8), torch.ones(32, 80, dtype=torch.uint8),
                      torch.zeros(2, 4, dtype=torch.int64), text)
    led = leading_text(example, 1)
    assert led.text_out.tolist() == [[ord("h"), ord("i"), NO_TEXT, NO_TEXT], [NO_TEXT, ord("o"), ord("k"), NO_TEXT]]
    # "hi" would be written before the conversation began: gone; "ok" crosses into turn 0.
    assert leading_text(example, 3).text_out.tolist() == [[NO_TEXT, NO_TEXT, NO_TEXT, ord("o")],
                                                          [ord("k"), NO_TEXT, NO_TEXT, NO_TEXT]]
    assert led.model_bins is example.model_bins and leading_text(example, 0) is example

    leading = replace(preset("tiny"), text_lead=2)
    (conversation,) = generate([3])
    as_data = to_example(conversation, preset("tiny"))
    assert as_data.text_out.tolist() == torch.from_numpy(conversation.text_out).tolist()
    assert (as_data.text_out != NO_TEXT).sum() > 10  # it says something, so the moves below are seen
    (loaded,) = load_examples([3], leading, tmp_path)
    assert torch.equal(loaded.text_out, leading_text(as_data, 2).text_out)
    assert torch.equal(to_example(conversation, leading).text_out, loaded.text_out)
    cached = Example(**torch.load(tmp_path / CACHE_NAME / "3.pt"))
    assert torch.equal(cached.text_out, as_data.text_out)  # cached as the data has it
    (again,) = load_examples([3], leading, tmp_path)  # from the cache this time
    assert torch.equal(again.text_out, loaded.text_out)
    assert torch.equal(cached_run(tmp_path, 3, 4, text_lead=2)[0].text_out, loaded.text_out)
    with pytest.raises(ValueError, match="text_lead must be 0 to 4 outputs"):
        replace(preset("tiny"), text_lead=5)


def test_steps_zero_makes_and_caches_the_data_and_trains_nothing(tmp_path):
    from model.train import CACHE_NAME, main

    main(["--out", str(tmp_path / "ckpt"), "--steps", "0", "--conversations", "1", "--first-seed", "5",
          "--cache", str(tmp_path / "cache"), "--workers", "1"])
    assert (tmp_path / "cache" / CACHE_NAME / "5.pt").exists()
    assert not (tmp_path / "ckpt" / "model.safetensors").exists() and not (tmp_path / "ckpt" / "train_state.pt").exists()


def test_following_the_cache_takes_the_seeds_ready_up_to_the_first_gap(tmp_path):
    """--follow-cache: a generator beside the training caches conversations in any order
    within a batch; the training takes them from the next seed on, up to a gap."""
    from model.train import cached_run, load_examples, main

    config = preset("tiny")
    load_examples([0, 2], config, tmp_path)
    assert len(cached_run(tmp_path, 0, 10)) == 1  # seed 1 not made yet
    load_examples([1], config, tmp_path)
    assert [e.turns for e in cached_run(tmp_path, 1, 10)] == [e.turns for e in load_examples([1, 2], config, tmp_path)]
    assert len(cached_run(tmp_path, 0, 2)) == 2  # --conversations still bounds it
    run = subprocess.run(
        [sys.executable, "-m", "model.train", "--out", str(tmp_path / "ckpt"), "--cache", str(tmp_path),
         "--follow-cache", "--conversations", "5", "--steps", "1", "--batch", "1", "--turns", "40"],
        capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "3 of 5 conversations ready" in run.stderr  # and it made none of seeds 3 and 4
    with pytest.raises(ValueError, match="one process only"):
        main(["--out", str(tmp_path / "x"), "--cache", "", "--follow-cache", "--steps", "1"])


@pytest.mark.timeout(240)
def test_following_the_cache_takes_in_what_arrives_while_it_trains(tmp_path):
    """A seed cached after the run started joins it at the next check (every 50 steps)."""
    import re
    import shutil

    from model.train import CACHE_NAME, load_examples

    config = preset("tiny")
    load_examples([0], config, tmp_path / "cache")
    load_examples([1], config, tmp_path / "later")
    trainer = subprocess.Popen(
        [sys.executable, "-m", "model.train", "--out", str(tmp_path / "ckpt"), "--cache", str(tmp_path / "cache"),
         "--follow-cache", "--conversations", "3", "--steps", "51", "--batch", "1", "--turns", "40",
         "--save-every", "1000"], stderr=subprocess.PIPE, text=True)
    assert trainer.stderr is not None
    before = [trainer.stderr.readline()]  # printed before the first step (a warning may precede it)
    while "conversations ready" not in before[-1] and before[-1] and len(before) < 20:
        before.append(trainer.stderr.readline())
    assert "1 of 3 conversations ready" in before[-1], before
    # As a generator would: written beside, then renamed into place.
    shutil.copy(tmp_path / "later" / CACHE_NAME / "1.pt", tmp_path / "cache" / CACHE_NAME / "1.pt.partial")
    (tmp_path / "cache" / CACHE_NAME / "1.pt.partial").rename(tmp_path / "cache" / CACHE_NAME / "1.pt")
    rest = trainer.stderr.read()
    assert trainer.wait(timeout=200) == 0, rest[-2000:]
    # At the check at step 0 or 50, whichever comes first after the rename.
    assert re.search(r"\+1 conversations at step (0|50), 2 now", rest), rest[-2000:]


def test_a_fresh_flow_head_learns_to_voice_a_frozen_trained_trunk(tmp_path):
    """``--init`` with the other ``--audio-head`` swaps in a fresh head; with
    ``--audio-head-only`` it alone trains, so what the model says and when stays the
    checkpoint's (the question the issue asks of the flow head: what does it need?)."""
    shipped = load_checkpoint("checkpoints/tiny")
    out = tmp_path / "flow"
    common = ["--out", str(out), "--batch", "2", "--turns", "80", "--conversations", "2", "--cache",
              str(tmp_path / "cache"), "--warmup", "2", "--save-every", "100", "--lr", "3e-3"]
    losses = train(build_parser().parse_args(common + ["--init", "checkpoints/tiny", "--audio-head", "flow",
                                                       "--audio-head-only", "--steps", "30"]))
    assert statistics.mean(losses[-5:]) < 0.7 * statistics.mean(losses[:5]), losses
    voiced = load_checkpoint(out)
    assert voiced.config.audio_head == "flow" and shipped.config.audio_head == "classify"
    assert isinstance(voiced.audio_head, FlowHead)
    kept = voiced.state_dict()
    assert all(torch.equal(tensor, kept[name]) for name, tensor in shipped.state_dict().items()
               if not name.startswith("audio_head."))
    engine = make_model("model", max_sessions=2, checkpoint=str(out))
    engine.open_session("s")
    assert np.isfinite(engine.step([TurnInput("s", 0, np.zeros(TURN_SAMPLES, dtype=np.float32))])[0].audio).all()

    with pytest.raises(ValueError, match="was trained with flow"):
        train(build_parser().parse_args(common + ["--audio-head", "classify", "--resume", "--steps", "31"]))
    with pytest.raises(ValueError, match="alone"):
        train(build_parser().parse_args(common + ["--listen-probe", "--audio-head-only", "--steps", "1"]))


def test_a_save_replaces_each_file_whole_and_resume_refuses_a_pair_from_two_saves(tmp_path):
    """Each file is written beside and renamed over the last (a reader holding the old
    one keeps it whole, so a kill mid-write leaves it whole too), and the step on the
    weights must be the state's: a kill between the two files is refused, not resumed."""
    import random

    from model.train import STATE_FILE, build_model, save, save_decoding
    from model.weights import checkpoint_step

    out = tmp_path / "ckpt"
    model = InteractionModel(preset("tiny"))
    optimizer = torch.optim.AdamW(model.parameters())
    save(model, optimizer, 1, out, [], random.Random(0), torch.device("cpu"))
    save_decoding(out, {"write_threshold": 0.4}, {"one"})
    names = ["model.safetensors", "config.json", STATE_FILE, "decoding.json", "lexicon.txt"]
    before = {}
    for name in names:  # a second name for each file as it is now
        os.link(out / name, tmp_path / f"held-{name}")
        before[name] = (out / name).read_bytes()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save(model, optimizer, 2, out, [], random.Random(0), torch.device("cpu"))
    save_decoding(out, {"write_threshold": 0.5}, {"two"})
    for name in names:
        assert (tmp_path / f"held-{name}").read_bytes() == before[name], f"{name} was written over in place"
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert sorted(path.name for path in out.iterdir()) == sorted(names)  # no partial file left
    assert checkpoint_step(out) == 2 and checkpoint_step("checkpoints/tiny") is None  # shipped: unstamped
    load_checkpoint("checkpoints/tiny")

    resume = ["--out", str(out), "--resume", "--turns", "40"]
    assert build_model(build_parser().parse_args(resume))[1]["step"] == 2  # a whole pair resumes
    os.replace(tmp_path / f"held-{STATE_FILE}", out / STATE_FILE)  # killed after the weights of step 2
    with pytest.raises(ValueError, match="weights are from step 2, its train_state.pt from step 1"):
        build_model(build_parser().parse_args(resume))


def test_resume_refuses_weights_it_has_no_state_for_and_starts_a_fresh_out(tmp_path):
    """A packed or averaged checkpoint in --out: --resume would have trained a new model
    and its first save overwritten them. A fresh --out still starts (resume or not)."""
    from model.train import build_model

    out = tmp_path / "averaged"
    save_checkpoint(InteractionModel(preset("tiny")), out)
    weights = (out / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=f"no train_state.pt to resume them with .* use --init {out}"):
        build_model(build_parser().parse_args(["--out", str(out), "--resume", "--turns", "40"]))
    assert (out / "model.safetensors").read_bytes() == weights
    model, state, _ = build_model(build_parser().parse_args(["--out", str(tmp_path / "new"), "--resume",
                                                             "--turns", "40"]))
    assert state is None and model.config.preset == "tiny"


def test_a_resumed_run_draws_what_an_uninterrupted_one_does(tmp_path):
    """Stopped at step 3 and resumed to 6, a run's windows, crops and history noise are
    the uninterrupted run's, so are its losses and weights. (Within the warm-up the rate
    does not depend on --steps, so a shorter run is the interrupted one.)"""
    common = ["--batch", "2", "--turns", "10", "--window", "144", "--conversations", "2", "--warmup", "100",
              "--cache", str(tmp_path / "cache"), "--workers", "1"]
    whole = train(build_parser().parse_args(common + ["--out", str(tmp_path / "whole"), "--steps", "6"]))
    parted = train(build_parser().parse_args(common + ["--out", str(tmp_path / "parted"), "--steps", "3"]))
    parted += train(build_parser().parse_args(common + ["--out", str(tmp_path / "parted"), "--steps", "6",
                                                        "--resume"]))
    assert parted == whole
    ends = load_checkpoint(tmp_path / "whole").state_dict(), load_checkpoint(tmp_path / "parted").state_dict()
    assert all(torch.equal(tensor, ends[1][name]) for name, tensor in ends[0].items())


def test_examples_with_other_text_input_slots_are_cached_apart(tmp_path):
    """Cached examples hold their text input split into the model's slots a micro-turn:
    the gpu preset's 8 and tiny's 4 must not share a cache (tiny's keeps its name), and
    a file made for the other is refused by name, not met as a shape error mid-training."""
    from model.train import CACHE_NAME, cache_name, cached_run, load_examples

    assert cache_name() == cache_name(4) == CACHE_NAME and cache_name(8) == f"{CACHE_NAME}-slots8"
    (four,) = load_examples([3], preset("tiny"), tmp_path)
    (eight,) = load_examples([3], preset("gpu"), tmp_path)
    assert four.text_in.shape[1] == 4 and eight.text_in.shape[1] == 8
    assert torch.equal(eight.text_in.flatten()[eight.text_in.flatten() != NO_TEXT],
                       four.text_in.flatten()[four.text_in.flatten() != NO_TEXT])  # the same text, queued
    assert (tmp_path / CACHE_NAME / "3.pt").exists() and (tmp_path / f"{CACHE_NAME}-slots8" / "3.pt").exists()
    assert cached_run(tmp_path, 3, 4, text_in_slots=8)[0].text_in.shape[1] == 8
    torch.save(eight.__dict__, tmp_path / CACHE_NAME / "3.pt")  # as a gpu run cached it before the slots were named
    with pytest.raises(ValueError, match="3.pt holds text input in 8 slots a micro-turn, the model takes 4"):
        load_examples([3], preset("tiny"), tmp_path)
