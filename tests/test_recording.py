"""Session recording: exact round trip, crash safety under kill -9, manifest last,
write failures contained, and recordings as training data (docs/recording.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import preset
from model.conversations import Conversation, generate
from model.interface import TURN_SAMPLES
from model.recordings import recording_example, text_output_positions, to_conversation
from model.text import Decoder
from model.train import to_example
from server.recording import (
    HEADER,
    MANIFEST_FILE,
    PCM_SCALE,
    RECORDS_FILE,
    RecordingWriter,
    from_pcm16,
    iter_records,
    read_recording,
    to_pcm16,
)

QUANTUM = 0.5 / PCM_SCALE + 1e-7  # int16 rounding, plus float32 slack
REPO = Path(__file__).resolve().parent.parent
MICROTURN = str(REPO / ".venv" / "bin" / "microturn")


def run(command: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=False, capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def tone(turn: int) -> np.ndarray:
    """A different, reproducible chunk for every turn (the crash test's child makes the same)."""
    return np.random.default_rng(turn).uniform(-1, 1, TURN_SAMPLES).astype(np.float32)


def test_round_trip_is_exact_up_to_int16(tmp_path):
    writer = RecordingWriter(tmp_path)
    recorder = writer.open("s1", {"engine": "model", "weights": "tiny"})
    loud = tone(99) * 3  # beyond full scale: clipped
    loud[7] = np.nan
    frames = {4: np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3),
              9: np.full((20, 30, 3), 200, np.uint8)}
    events_in = [{"type": "text.input", "text": "héllo <task>"}, {"type": "ping", "id": 1, "t": 2.5}]
    events_out = [{"type": "turn", "turn": t, "played": [[t, 320 * t]]} for t in range(3)]
    events_out.append({"type": "task.done", "task_id": "t1", "tool": "calc", "result": "42"})
    for turn in range(12):
        recorder.input(turn, loud if turn == 2 else tone(turn), "héllo <task>" if turn == 3 else "")
        recorder.output(turn, tone(100 + turn), f"<result>{turn}</result>é" if turn % 5 == 0 else "")
        if turn in frames:
            recorder.video(turn, frames[turn])
    for event in events_in:
        recorder.event("in", event)
    for event in events_out:
        recorder.event("out", event)
    recorder.close("deleted by client").result(10)
    assert writer.close()

    recording = read_recording(tmp_path / "s1")
    assert recording.complete and recording.ignored_bytes == 0
    assert recording.turns == 12 and sorted(recording.inputs) == list(range(12))
    for turn in range(12):
        sent = np.nan_to_num(np.clip(loud, -1, 1)) if turn == 2 else tone(turn)
        assert np.abs(recording.inputs[turn] - sent).max() <= QUANTUM
        assert np.abs(recording.outputs[turn] - tone(100 + turn)).max() <= QUANTUM
    assert recording.input_text == {t: "héllo <task>" if t == 3 else "" for t in range(12)}
    assert recording.output_text[10] == "<result>10</result>é" and recording.output_text[1] == ""
    assert [(turn, frame.tolist()) for turn, frame in recording.video] == [(t, f.tolist()) for t, f in frames.items()]
    assert [e.event for e in recording.events if e.direction == "in"] == events_in
    assert [e.event for e in recording.events if e.direction == "out"] == events_out
    stamps = [e.ms for e in recording.events]
    assert stamps == sorted(stamps) and abs(stamps[-1] - time.time() * 1000) < 60_000
    assert recording.task_results == [events_out[-1]]
    assert recording.meta == {"engine": "model", "weights": "tiny"} and recording.end_reason == "deleted by client"
    assert np.array_equal(recording.user_audio()[TURN_SAMPLES : 2 * TURN_SAMPLES], recording.inputs[1])

    manifest = recording.manifest
    assert manifest["clean"] and manifest["end_reason"] == "deleted by client" and manifest["session_id"] == "s1"
    assert (manifest["sample_rate"], manifest["turn_ms"]) == (16_000, 200)
    assert manifest["counts"] == {"input": 12, "output": 12, "video": 2, "event_in": 2, "event_out": 4}
    assert manifest["turns"] == {"first": 0, "last": 11} and manifest["meta"]["weights"] == "tiny"
    # int16 on disk: a turn's two chunks take 12.8 kB, not 25.6.
    assert (tmp_path / "s1" / RECORDS_FILE).stat().st_size < 12 * 2 * (TURN_SAMPLES * 2 + 200) + 40_000


def test_pcm16_quantisation_is_symmetric_and_bounded():
    audio = np.array([-2.0, -1.0, -0.5, 0.0, 1e-6, 0.5, 1.0, 2.0, np.inf, -np.inf, np.nan], np.float32)
    pcm = to_pcm16(audio)
    assert pcm.tolist() == [-32767, -32767, -16384, 0, 0, 16384, 32767, 32767, 32767, -32767, 0]
    assert np.abs(from_pcm16(pcm)[:8] - np.clip(audio[:8], -1, 1)).max() <= QUANTUM


CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from model.interface import TURN_SAMPLES
    from server.recording import RecordingWriter

    def tone(turn):
        return np.random.default_rng(turn).uniform(-1, 1, TURN_SAMPLES).astype(np.float32)

    # Incompressible frames make long writes, which a kill can cut in the middle.
    frame = np.random.default_rng(0).integers(0, 256, (256, 512, 3), dtype=np.uint8)
    writer = RecordingWriter(sys.argv[1], gather_s=0.0)
    recorder = writer.open("crashed", {"engine": "echo"})
    turn = 0
    while True:
        recorder.input(turn, tone(turn), f"in {turn}")
        recorder.output(turn, tone(1000 + turn), f"out {turn}")
        recorder.video(turn, frame)
        recorder.event("out", {"type": "turn", "turn": turn})
        if turn % 2 == 0:  # odd turns stay queued or half-written when the kill lands
            writer.sync().result()
            print(turn, flush=True)  # everything up to this turn is on disk
        turn += 1
""")


@pytest.mark.parametrize("delay_s", [0.0, 0.013, 0.031])
def test_kill_9_mid_stream_keeps_every_synced_turn(tmp_path, delay_s):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        synced = -1
        while synced < 10:
            line = child.stdout.readline()
            assert line, "the child died before it was killed"
            synced = int(line)
        time.sleep(delay_s)  # let it get on with the next turns
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL

    recording = read_recording(tmp_path / "crashed")
    assert not recording.complete and recording.manifest is None and recording.end_reason is None
    assert recording.meta == {"engine": "echo"}
    whole_turns = sorted(set(recording.inputs) & set(recording.outputs))
    assert whole_turns == list(range(len(whole_turns))), "no holes: append-only"
    assert len(whole_turns) > synced, "every turn synced before the kill is there"
    for turn in whole_turns:
        assert np.abs(recording.inputs[turn] - tone(turn)).max() <= QUANTUM
        assert np.abs(recording.outputs[turn] - tone(1000 + turn)).max() <= QUANTUM
        assert (recording.input_text[turn], recording.output_text[turn]) == (f"in {turn}", f"out {turn}")
    assert [turn for turn, _ in recording.video][: synced + 1] == list(range(synced + 1))
    data = (tmp_path / "crashed" / RECORDS_FILE).read_bytes()
    records, end = iter_records(data)
    assert end + recording.ignored_bytes == len(data) and len(records) == recording.records


def test_a_torn_tail_at_any_byte_is_ignored_and_never_raises(tmp_path):
    writer = RecordingWriter(tmp_path)
    recorder = writer.open("torn")
    for turn in range(3):
        recorder.input(turn, tone(turn), "")
    recorder.output(2, tone(7), "last")  # the record that gets torn
    writer.sync().result(10)
    path = tmp_path / "torn" / RECORDS_FILE
    data = path.read_bytes()
    records, end = iter_records(data)
    assert end == len(data) and [meta["k"] for meta, _ in records] == ["start", "in", "in", "in", "out"]
    last_start = iter_records(data[:-1])[1]  # where the last record begins
    assert len(data) - last_start > HEADER.size + TURN_SAMPLES * 2
    for cut in range(len(data) - 1, last_start - 1, -1):
        os.truncate(path, cut)
        recording = read_recording(tmp_path / "torn")
        assert recording.records == 4 and recording.ignored_bytes == cut - last_start
        assert sorted(recording.inputs) == [0, 1, 2] and recording.outputs == {} and not recording.complete
    # Corruption rather than truncation: a flipped byte fails the CRC, the rest stands.
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    path.write_bytes(bytes(flipped))
    recording = read_recording(tmp_path / "torn")
    assert recording.records == 4 and recording.ignored_bytes == len(data) - last_start
    recorder.close("done")
    writer.close()


def test_a_caller_giving_up_on_a_sync_or_close_does_not_stop_the_writer(tmp_path):
    """A cancelled future (an ``asyncio.wait_for`` that timed out on a close, say) is
    left alone: answering it raised in the writer thread, which then wrote nothing more."""
    writer = RecordingWriter(tmp_path, gather_s=0.3)  # the writer waits before it takes up a burst
    abandoned = writer.open("abandoned")
    abandoned.input(0, tone(0), "")
    given_up = [writer.sync(), abandoned.close("gone")]
    assert all(future.cancel() for future in given_up)  # before the writer got to them
    kept = writer.open("kept")
    kept.input(0, tone(1), "hello")
    kept.close("done").result(10)
    assert writer.close() and writer.failures == 0
    recording = read_recording(tmp_path / "kept")
    assert recording.complete and recording.input_text[0] == "hello"
    assert read_recording(tmp_path / "abandoned").complete  # its close was still carried out


def test_the_manifest_is_written_after_every_record(tmp_path):
    """Watched from another thread while a backlog drains: whenever manifest.json
    exists, the records file already holds everything it counts."""
    writer = RecordingWriter(tmp_path, gather_s=0.05)
    recorder = writer.open("m")
    for turn in range(150):
        recorder.input(turn, tone(turn % 5), "")
        recorder.output(turn, tone(5 + turn % 5), "")
        recorder.event("out", {"type": "turn", "turn": turn})
    closed = recorder.close("peer connection closed")
    directory = tmp_path / "m"
    seen_without, seen_with = 0, 0
    while True:
        done = closed.done()
        if (directory / MANIFEST_FILE).exists():
            seen_with += 1
            recording = read_recording(directory)
            assert recording.complete and recording.manifest["counts"]["input"] == 150
            assert recording.records == recording.manifest["records"] == 1 + 450 + 1  # start, turns, end
        else:
            seen_without += 1
            assert not done, "the close future was done before the manifest was written"
        if done:
            break
    assert seen_with >= 1 and seen_without >= 1
    assert not list(directory.glob("*.tmp"))
    writer.close()


def test_write_failures_stay_inside_the_recording(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    writer = RecordingWriter(blocker / "recordings")  # every mkdir under it fails (ENOTDIR), even as root
    failures: list[str] = []
    healthy_writer = RecordingWriter(tmp_path / "ok")
    recorder = writer.open("s", on_failure=failures.append)
    healthy = healthy_writer.open("s")
    for turn in range(5):
        for each in (recorder, healthy):
            each.input(turn, tone(turn), "x")
            each.output(turn, tone(turn), "y")
            each.video(turn, np.zeros((4, 4, 3), np.uint8))
            each.event("out", {"type": "turn"})
        time.sleep(0.01)
    recorder.close("done").result(10)
    healthy.close("done").result(10)
    assert recorder.failed and failures == [recorder.error] and "NotADirectoryError" in recorder.error
    assert writer.failures == 1 and writer.close() and healthy_writer.close()
    assert read_recording(tmp_path / "ok" / "s").complete
    # After close: calls are no-ops, a new recording fails at once, nothing raises.
    recorder.input(6, tone(6), "")
    late = healthy_writer.open("late", on_failure=failures.append)
    assert late.failed and failures[-1] == "the recording writer is closed"
    assert late.close("done").done()


FULL_DISK_CHILD = textwrap.dedent("""
    import json, resource, signal, sys
    import numpy as np
    from server.recording import RecordingWriter

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))  # the disk is full at 60 kB
    failures = []
    writer = RecordingWriter(sys.argv[1], gather_s=0.0)
    recorder = writer.open("full", on_failure=failures.append)
    for turn in range(40):
        recorder.input(turn, np.full(3200, 0.25, np.float32), "")
        writer.sync().result()
    recorder.close("done").result()
    print(json.dumps([writer.close(), writer.failures, recorder.error, failures]))
""")


def test_a_full_disk_stops_the_recording_not_the_writer(tmp_path):
    child = run([sys.executable, "-c", FULL_DISK_CHILD, str(tmp_path)])
    assert child.returncode == 0, child.stderr
    closed, failed, error, reported = json.loads(child.stdout)
    assert closed and failed == 1 and "File too large" in error and reported == [error]
    recording = read_recording(tmp_path / "full")
    assert recording.manifest is None and not recording.complete
    assert 5 <= len(recording.inputs) < 40 and (tmp_path / "full" / RECORDS_FILE).stat().st_size <= 60_000


def test_a_writer_that_falls_behind_refuses_rather_than_grows(tmp_path):
    writer = RecordingWriter(tmp_path, max_backlog_bytes=30_000, gather_s=0.5)
    failures: list[str] = []
    recorder = writer.open("slow", on_failure=failures.append)
    for turn in range(10):  # 6.4 kB a chunk, queued faster than the (sleeping) writer takes them
        recorder.input(turn, tone(turn), "")
    assert recorder.failed and "not keeping up" in failures[0] and len(failures) == 1
    recorder.close("done").result(10)
    assert writer.close() and writer.backlog_bytes == 0
    recording = read_recording(tmp_path / "slow")  # what was accepted before is written
    assert sorted(recording.inputs) == [0, 1, 2, 3] and recording.manifest is None


# -- training on recordings --------------------------------------------------------------


@pytest.fixture(scope="module")
def conversation() -> Conversation:
    """A real synthetic conversation (60 turns, with a delegation: text in and markers out),
    plus text typed at turn 5."""
    conversation = generate([1], duration_s=12.0, workers=1)[0]
    assert any(conversation.text_in) and (conversation.text_out != 256).any()
    conversation.text_in[5] += "hello there"
    return conversation


def record(writer: RecordingWriter, session_id: str, conversation: Conversation, turns: int | None = None,
           close: bool = True) -> None:
    """Record a conversation the way a session does: input on submit, output (its text
    decoded as the engine decodes it) on delivery."""
    recorder = writer.open(session_id, {"engine": "model", "weights": "test"})
    decoder = Decoder()
    for turn in range(conversation.turns if turns is None else turns):
        span = slice(turn * TURN_SAMPLES, (turn + 1) * TURN_SAMPLES)
        recorder.input(turn, conversation.user_audio[span], conversation.text_in[turn])
        recorder.output(turn, conversation.model_audio[span], decoder.decode(conversation.text_out[turn].tolist()))
    if close:
        recorder.close("done").result(30)
    else:
        writer.sync().result(30)


def quantised(conversation: Conversation) -> Conversation:
    return Conversation(conversation.seed, from_pcm16(to_pcm16(conversation.user_audio)),
                        from_pcm16(to_pcm16(conversation.model_audio)), conversation.text_in,
                        conversation.text_out)


def test_a_recording_is_the_same_example_as_its_conversation(tmp_path, conversation):
    writer = RecordingWriter(tmp_path)
    record(writer, "conv", conversation)
    writer.close()
    config = preset("tiny")
    example = recording_example(read_recording(tmp_path / "conv"), config)
    expected = to_example(quantised(conversation), config)
    for name in ("user_bins", "model_bins", "text_in", "text_out"):
        assert torch.equal(getattr(example, name), getattr(expected, name)), name
    assert example.turns == conversation.turns == 60
    # int16 moves only dMel bins sitting on a boundary; the text is untouched.
    unquantised = to_example(conversation, config)
    assert (example.user_bins != unquantised.user_bins).float().mean() < 0.01
    assert torch.equal(example.text_out, unquantised.text_out)


def test_a_failed_turns_text_is_trained_once_where_it_reached_the_model(tmp_path):
    """The server records a turn's text when it submits it; if that step fails, it
    sends the text again with the next turn and records it there too. Training reads
    it where it reached the model: at the failed turn (no output) it is not."""
    writer = RecordingWriter(tmp_path)
    recorder = writer.open("retried")
    for turn in range(8):
        text = "hello" if turn in (5, 6) else ""
        recorder.input(turn, tone(turn), text)
        if turn != 5:  # turn 5's step failed: no output
            recorder.output(turn, tone(turn), "")
    recorder.close("done").result(10)
    writer.close()
    conversation = to_conversation(read_recording(tmp_path / "retried"), 4)
    assert conversation.text_in == [""] * 6 + ["hello", ""]


def test_output_text_layout_carries_overflow_forward():
    ids = text_output_positions(["ab", "", "<task>calc: 1", "é", ""], 4)
    assert ids.tolist() == [[*b"ab", 256, 256], [256] * 4, [257, *b"cal"], [*b"c: 1"], [*"é".encode(), 256, 256]]
    assert text_output_positions(["abcdef", ""], 4).tolist() == [[*b"abcd"], [*b"ef", 256, 256]]


def test_microturn_train_on_recordings_alone(tmp_path, conversation):
    root = tmp_path / "recordings"
    writer = RecordingWriter(root / "node-a")
    record(writer, "whole", conversation)
    record(writer, "crashed", conversation, turns=30, close=False)
    record(writer, "short", conversation, turns=6)  # under the 10-turn window: skipped
    writer.close()
    (root / "node-a" / "crashed" / MANIFEST_FILE).unlink()  # as if killed: still used
    out = tmp_path / "ckpt"
    trained = run([MICROTURN, "train", "--recordings", str(root), "--conversations", "0", "--steps", "2",
                   "--batch", "1", "--turns", "10", "--window", "144", "--out", str(out), "--cache", ""],
                  cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "whole: 60 turns, complete" in trained.stderr
    assert "crashed: 30 turns, incomplete" in trained.stderr
    assert "short: 6 turns, shorter than the 10-turn window" in trained.stderr
    assert torch.load(out / "train_state.pt")["step"] == 2 and (out / "model.safetensors").exists()

    empty = run([MICROTURN, "train", "--recordings", str(tmp_path / "none"), "--conversations", "0",
                 "--steps", "1", "--out", str(tmp_path / "x"), "--cache", ""], cwd=tmp_path)
    assert empty.returncode != 0 and "no training examples" in empty.stderr


def test_a_recording_reads_while_it_is_being_written(tmp_path):
    """Read between the writer thread's appends (to tail a live session): always a
    consistent prefix."""
    writer = RecordingWriter(tmp_path, gather_s=0.0)
    recorder = writer.open("live")
    writer.sync().result(10)
    seen = 0
    for turn in range(60):
        recorder.input(turn, tone(turn % 3), "")
        recording = read_recording(tmp_path / "live")
        assert sorted(recording.inputs) == list(range(len(recording.inputs))) and not recording.complete
        assert len(recording.inputs) >= seen
        seen = len(recording.inputs)
    recorder.close("done").result(10)
    writer.close()
    assert read_recording(tmp_path / "live").complete
