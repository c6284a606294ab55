"""Session recording: a crash-safe, time-aligned record of one session (docs/recording.md).

One ``RecordingWriter`` per server owns one writer thread, fed by a queue; each
recorded session gets a ``SessionRecorder`` whose methods the event loop calls.
They only copy what they are given (audio as int16 PCM, events as JSON) and queue
it: the loop never touches the disk. The thread appends records to
``<root>/<session_id>/records.mtr`` and fsyncs once per batch: it wakes on a
record, lets the loop finish its burst (``gather_s``), then writes everything
queued and fsyncs each file once (a slow disk gives bigger batches: group commit).
``manifest.json`` is written last, atomically, when the session ends.

A record is ``HEADER`` (magic, payload length, CRC32 of the payload) + payload; the
payload is a little-endian u32 length, a JSON object (its ``k`` says what it is)
and a binary body (PCM, a compressed video frame, or nothing). A killed writer
leaves at most one torn record at the tail, which the reader detects and ignores.

A write failure (disk full, a bad path) stops recording that session, never the
session: it is logged, counted, kept in ``SessionRecorder.error`` and reported to
the ``on_failure`` callback.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.interface import SAMPLE_RATE, TURN_MS, TURN_SAMPLES

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAGIC = b"MTR1"
HEADER = struct.Struct("<4sII")  # magic, payload length, CRC32 of the payload
META_LENGTH = struct.Struct("<I")
RECORDS_FILE = "records.mtr"
MANIFEST_FILE = "manifest.json"
PCM_SCALE = 32767.0
MAX_RECORD_BYTES = 64 << 20  # anything claiming more is a corrupt header, not a record
# Queued but unwritten bytes beyond which new records are refused (the disk cannot
# keep up): about 100 sessions' worth of 40 s of audio.
DEFAULT_MAX_BACKLOG_BYTES = 256 << 20
_ITEM_OVERHEAD = 256  # bytes a queued record costs beyond its body, for the backlog


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """float32 [-1, 1] -> int16 PCM (a fresh array; NaN becomes 0)."""
    scaled = np.multiply(audio, np.float32(PCM_SCALE), dtype=np.float32)
    if not np.isfinite(scaled).all():  # checked first: nan_to_num alone costs more than the rest
        np.nan_to_num(scaled, copy=False, nan=0.0)
    np.clip(scaled, -PCM_SCALE, PCM_SCALE, out=scaled)
    return np.rint(scaled, out=scaled).astype("<i2")


def from_pcm16(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / np.float32(PCM_SCALE)


def encode_record(meta: bytes, body: bytes | memoryview = b"") -> bytes:
    payload = META_LENGTH.pack(len(meta)) + meta + bytes(body)
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def _json(value: Any) -> bytes:
    # default=str: an odd value in an event (a numpy scalar) must not fail a session.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def _now_ms() -> float:
    return round(time.time() * 1000, 1)


# -- writing ---------------------------------------------------------------------------


class SessionRecorder:
    """One session's recording. Every method is non-blocking, meant for the event
    loop (call them all from that one thread); after ``close`` or a failure they do
    nothing."""

    def __init__(self, writer: RecordingWriter, session_id: str, meta: dict[str, Any],
                 on_failure: Callable[[str], None] | None) -> None:
        self.session_id = session_id
        self.path = writer.root / session_id
        self.error: str | None = None  # why recording stopped, if it failed
        self._writer = writer
        self._meta = meta
        self._on_failure = on_failure
        self._closed = False
        self._close_future: concurrent.futures.Future[None] | None = None
        # Touched by the writer thread only:
        self._fd: int | None = None
        self._pending: list[bytes] = []
        self._counts = {"input": 0, "output": 0, "video": 0, "event_in": 0, "event_out": 0}
        self._records = 0
        self._bytes = 0
        self._first_turn: int | None = None
        self._last_turn: int | None = None
        self._started_ms = _now_ms()

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def active(self) -> bool:
        return not self._closed and self.error is None

    def input(self, turn: int, audio: np.ndarray, text: str = "") -> None:
        """Micro-turn ``turn``'s input chunk (3,200 samples) and the text that
        entered the model with it (typed text, background results)."""
        if self.active:
            pcm = to_pcm16(audio)
            self._put("input", {"k": "in", "turn": turn, "ms": _now_ms(), "text": text}, pcm, pcm.nbytes)

    def output(self, turn: int, audio: np.ndarray, text: str = "") -> None:
        """The model's output for micro-turn ``turn`` (made right after input ``turn``)."""
        if self.active:
            pcm = to_pcm16(audio)
            self._put("output", {"k": "out", "turn": turn, "ms": _now_ms(), "text": text}, pcm, pcm.nbytes)

    def video(self, turn: int, frame: np.ndarray) -> None:
        """A camera frame, (height, width, 3) uint8, seen at micro-turn ``turn``;
        compressed (zlib, lossless) on the writer thread."""
        if self.active:
            pixels = np.array(frame, dtype=np.uint8, copy=True, order="C")
            self._put("video", {"k": "video", "turn": turn, "ms": _now_ms(), "shape": list(pixels.shape),
                                "codec": "zlib"}, pixels, pixels.nbytes)

    def event(self, direction: str, event: dict[str, Any]) -> None:
        """A data-channel event: ``"in"`` (client -> server) or ``"out"``."""
        if direction not in ("in", "out"):
            raise ValueError(f"direction must be 'in' or 'out', not {direction!r}")
        if self.active:
            # Serialised now: the caller may reuse the dict.
            self._put(f"event_{direction}", _json({"k": "event", "dir": direction, "ms": _now_ms(), "event": event}),
                      b"", 0)

    def close(self, reason: str) -> concurrent.futures.Future[None]:
        """End the recording: every record queued before this call, then an ``end``
        record, then ``manifest.json``. Returns a future that is done when all of it
        is on disk (``await asyncio.wrap_future(...)`` on the loop). Idempotent."""
        if self._close_future is None:
            self._closed = True
            self._close_future = concurrent.futures.Future()
            self._writer._enqueue_final(("close", self._close_future, self, reason))
        return self._close_future

    def _put(self, count: str, meta: dict[str, Any] | bytes, body: Any, nbytes: int) -> None:
        self._writer._enqueue(self, ("rec", self, count, meta, body), nbytes + _ITEM_OVERHEAD)

    # -- on the writer thread (and _fail from either) ------------------------------------

    def _fail(self, message: str) -> None:
        with self._writer._lock:  # the loop (backlog) and the writer thread may both fail it
            if self.error is not None:
                return
            self.error = message
            self._writer._failures += 1
        log.error("recording of session %s stopped: %s", self.session_id, message)
        if self._on_failure is not None:
            try:
                self._on_failure(message)
            except Exception:  # the callback's problem must not stop the writer
                log.exception("recording failure callback raised")

    def _open_file(self) -> None:
        self._writer.root.mkdir(parents=True, exist_ok=True)
        self.path.mkdir()  # a second recording of the same id would mix two sessions
        _fsync_dir(self.path.parent)
        self._fd = os.open(self.path / RECORDS_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        _fsync_dir(self.path)
        self._append(_json({"k": "start", "format": FORMAT_VERSION, "session_id": self.session_id,
                            "started_ms": self._started_ms, "sample_rate": SAMPLE_RATE, "turn_ms": TURN_MS,
                            "meta": self._meta}), b"")

    def _append(self, meta: dict[str, Any] | bytes, body: Any, count: str | None = None) -> None:
        if isinstance(meta, dict):
            if meta["k"] == "video":
                body = zlib.compress(body, 1)
            turn = meta["turn"]
            self._first_turn = turn if self._first_turn is None else min(self._first_turn, turn)
            self._last_turn = turn if self._last_turn is None else max(self._last_turn, turn)
            meta = _json(meta)
        if count is not None:
            self._counts[count] += 1
        record = encode_record(meta, body)
        self._pending.append(record)
        self._records += 1
        self._bytes += len(record)

    def _flush(self) -> None:
        """Write what is pending and fsync: after this it survives a crash."""
        if not self._pending or self._fd is None:
            self._pending.clear()
            return
        data = b"".join(self._pending)
        self._pending.clear()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def _finish(self, reason: str, clean: bool) -> None:
        if self._fd is None:
            return
        self._append(_json({"k": "end", "ms": _now_ms(), "reason": reason}), b"")
        self._flush()
        os.close(self._fd)
        self._fd = None
        manifest = {
            "format": FORMAT_VERSION,
            "session_id": self.session_id,
            "started_ms": self._started_ms,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._started_ms / 1000)),
            "ended_ms": _now_ms(),
            "sample_rate": SAMPLE_RATE,
            "turn_ms": TURN_MS,
            "turn_samples": TURN_SAMPLES,
            "meta": self._meta,
            "turns": {"first": self._first_turn, "last": self._last_turn} if self._first_turn is not None else None,
            "counts": dict(self._counts),
            "records": self._records,
            "bytes": self._bytes,
            "end_reason": reason,
            "clean": clean,
        }
        _write_atomically(self.path / MANIFEST_FILE, _json(manifest) + b"\n")

    def _abandon(self) -> None:
        self._pending.clear()
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


class RecordingWriter:
    """Records sessions under ``root``; one per server, owning one writer thread."""

    def __init__(self, root: Path | str, max_backlog_bytes: int = DEFAULT_MAX_BACKLOG_BYTES,
                 gather_s: float = 0.02) -> None:
        self.root = Path(root)
        self.max_backlog_bytes = max_backlog_bytes
        self.last_flush_ms = 0.0  # how long the writer's last write + fsync round took
        self.gather_s = gather_s
        # Items: ("open", recorder) ("rec", recorder, count, meta, body) ("close", future, recorder,
        # reason) ("sync", future) ("stop",), each followed by its size for the backlog.
        self._queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        # Backlog = queued - written; each counter has one writing thread, so no lock.
        self._queued_bytes = 0
        self._written_bytes = 0
        self._failures = 0
        self._lock = threading.Lock()  # failures, and futures queued around the thread's exit
        self._stopping = False
        self._stopped = False
        self._open: set[SessionRecorder] = set()  # writer thread only
        self._thread = threading.Thread(target=self._run, name="recording-writer", daemon=True)
        self._thread.start()

    @property
    def failures(self) -> int:
        """Sessions whose recording failed."""
        return self._failures

    @property
    def backlog_bytes(self) -> int:
        return self._queued_bytes - self._written_bytes

    def open(self, session_id: str, meta: dict[str, Any] | None = None,
             on_failure: Callable[[str], None] | None = None) -> SessionRecorder:
        """Start recording a session (non-blocking: the directory is made on the
        writer thread). ``meta`` lands in the start record and the manifest (e.g.
        engine, weights). ``on_failure(message)`` is called once if recording stops
        on an error, from the writer thread or the caller's: hop to your loop with
        ``loop.call_soon_threadsafe``."""
        if not session_id or session_id.startswith(".") or "/" in session_id or "\\" in session_id:
            raise ValueError(f"unsafe session id for a directory name: {session_id!r}")
        recorder = SessionRecorder(self, session_id, dict(meta or {}), on_failure)
        self._enqueue(recorder, ("open", recorder), _ITEM_OVERHEAD)
        return recorder

    def sync(self) -> concurrent.futures.Future[None]:
        """A future done once everything queued before this call is on disk."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._enqueue_final(("sync", future))
        return future

    def close(self, timeout_s: float = 10.0) -> bool:
        """Write everything queued, end recordings still open (their manifest says
        ``clean: false``) and stop the thread. Blocks up to ``timeout_s``; from the
        event loop, ``await asyncio.to_thread(writer.close)``. True if all was written."""
        if not self._stopping:
            self._stopping = True
            self._queue.put(("stop", 0))
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("recording writer did not finish within %.1f s (%d bytes queued)", timeout_s,
                      self.backlog_bytes)
            return False
        return True

    def _enqueue(self, recorder: SessionRecorder, item: tuple[Any, ...], nbytes: int) -> None:
        if self._stopping:
            recorder._fail("the recording writer is closed")
        elif self.backlog_bytes + nbytes > self.max_backlog_bytes:
            recorder._fail(f"the disk is not keeping up ({self.backlog_bytes / 2**20:.1f} MiB queued)")
        else:
            self._queued_bytes += nbytes
            self._queue.put((*item, nbytes))

    def _enqueue_final(self, item: tuple[Any, ...]) -> None:
        """A close or sync: queued even while stopping; done at once once stopped."""
        with self._lock:
            if not self._stopped:
                self._queue.put((*item, 0))
                return
        _resolve(item[1])

    # -- the writer thread -------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            # Let the loop finish its burst (a micro-turn's records arrive together)
            # before taking the GIL from it, then write the whole burst at once.
            time.sleep(self.gather_s)
            while True:  # drain what else is waiting: one fsync per file for all of it
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = self._process(batch)
        for recorder in list(self._open):
            self._end(recorder, "server shutdown", clean=False)
        with self._lock:
            self._stopped = True
            while True:  # closes and syncs that raced the stop: nothing is left to write
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item[0] in ("close", "sync"):
                    _resolve(item[1])

    def _process(self, batch: list[tuple[Any, ...]]) -> bool:
        dirty: dict[SessionRecorder, None] = {}  # an ordered set
        stop = False
        for item in batch:
            kind = item[0]
            if kind == "rec":
                _, recorder, count, meta, body, _ = item
                if recorder._fd is not None:  # open; a backlog failure keeps what it had accepted
                    self._guard(recorder, recorder._append, meta, body, count)
                    dirty[recorder] = None
            elif kind == "open":
                recorder = item[1]
                if self._guard(recorder, recorder._open_file):
                    self._open.add(recorder)
                    dirty[recorder] = None
            elif kind == "close":
                _, future, recorder, reason, _ = item
                self._end(recorder, reason, clean=True)
                dirty.pop(recorder, None)
                _resolve(future)
            elif kind == "sync":
                self._flush_all(dirty)
                _resolve(item[1])
            elif kind == "stop":
                stop = True
            self._written_bytes += item[-1]
        self._flush_all(dirty)
        return stop

    def _flush_all(self, dirty: dict[SessionRecorder, None]) -> None:
        started = time.perf_counter()
        for recorder in dirty:
            if recorder._fd is not None:
                self._guard(recorder, recorder._flush)
        if dirty:
            self.last_flush_ms = (time.perf_counter() - started) * 1000
        dirty.clear()

    def _end(self, recorder: SessionRecorder, reason: str, clean: bool) -> None:
        self._open.discard(recorder)
        if recorder.error is None:
            self._guard(recorder, recorder._finish, reason, clean)
        elif recorder._fd is not None:  # refused for backlog: keep what it had accepted, no manifest
            self._guard(recorder, recorder._flush)
        recorder._abandon()

    def _guard(self, recorder: SessionRecorder, action: Callable[..., None], *args: Any) -> bool:
        """Run a recorder's disk action; any failure stops that recording, nothing else."""
        try:
            action(*args)
            return True
        except OSError as exc:  # disk full, permissions, a bad path
            message = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a bug here must not stop every other recording
            log.exception("recording writer failed on session %s", recorder.session_id)
            message = f"{type(exc).__name__}: {exc}"
        recorder._fail(message)
        recorder._abandon()
        self._open.discard(recorder)
        return False


def _resolve(future: concurrent.futures.Future[None]) -> None:
    """Say a close or sync is done, unless its caller gave up on it (cancelled: e.g. a
    ``wait_for`` that timed out). ``set_result`` on a cancelled future raises, which
    would end the writer thread, and with it every other session's recording."""
    if future.set_running_or_notify_cancel():
        future.set_result(None)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    """Temp file + fsync + rename + fsync of the directory: the file is whole or absent."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    _fsync_dir(path.parent)


# -- reading ---------------------------------------------------------------------------


@dataclass
class RecordedEvent:
    direction: str  # "in" (client -> server) or "out"
    ms: float  # server wall clock (Unix ms) when it was recorded
    event: dict[str, Any]


@dataclass
class Recording:
    """What a recording holds, keyed by micro-turn. Audio is float32 at 16 kHz."""

    path: Path
    session_id: str = ""
    started_ms: float | None = None
    sample_rate: int = SAMPLE_RATE
    turn_ms: int = TURN_MS
    meta: dict[str, Any] = field(default_factory=dict)
    inputs: dict[int, np.ndarray] = field(default_factory=dict)
    input_text: dict[int, str] = field(default_factory=dict)
    outputs: dict[int, np.ndarray] = field(default_factory=dict)
    output_text: dict[int, str] = field(default_factory=dict)
    video: list[tuple[int, np.ndarray]] = field(default_factory=list)
    events: list[RecordedEvent] = field(default_factory=list)
    end_reason: str | None = None
    manifest: dict[str, Any] | None = None
    records: int = 0  # whole records read
    ignored_bytes: int = 0  # a torn or corrupt tail, skipped

    @property
    def complete(self) -> bool:
        """Ended and fully on disk: a manifest, matching the records read, no torn tail."""
        return (self.manifest is not None and self.ignored_bytes == 0
                and self.manifest.get("records") == self.records)

    @property
    def turns(self) -> int:
        """One past the last micro-turn with input or output."""
        return 1 + max([*self.inputs, *self.outputs], default=-1)

    def user_audio(self, turns: int | None = None) -> np.ndarray:
        """Input chunks end to end, silence where a turn is missing."""
        return _join(self.inputs, self.turns if turns is None else turns)

    def model_audio(self, turns: int | None = None) -> np.ndarray:
        """Output chunks in step time (output t right after input t), silence where missing."""
        return _join(self.outputs, self.turns if turns is None else turns)

    @property
    def task_results(self) -> list[dict[str, Any]]:
        return [e.event for e in self.events if e.direction == "out"
                and e.event.get("type") in ("task.done", "task.failed")]


def _join(chunks: dict[int, np.ndarray], turns: int) -> np.ndarray:
    audio = np.zeros(turns * TURN_SAMPLES, np.float32)
    for turn, chunk in chunks.items():
        if 0 <= turn < turns:
            audio[turn * TURN_SAMPLES : turn * TURN_SAMPLES + chunk.size] = chunk[:TURN_SAMPLES]
    return audio


def iter_records(data: bytes) -> tuple[list[tuple[dict[str, Any], bytes]], int]:
    """Every whole record of a records file, and the offset where they stop (a torn
    or corrupt tail starts there). Never raises on bad data."""
    records = []
    offset = 0
    while offset + HEADER.size <= len(data):
        magic, length, crc = HEADER.unpack_from(data, offset)
        end = offset + HEADER.size + length
        if magic != MAGIC or length < META_LENGTH.size or length > MAX_RECORD_BYTES or end > len(data):
            break
        payload = data[offset + HEADER.size : end]
        if zlib.crc32(payload) != crc:
            break
        (meta_length,) = META_LENGTH.unpack_from(payload)
        try:
            meta = json.loads(payload[META_LENGTH.size : META_LENGTH.size + meta_length])
        except ValueError:
            break
        if not isinstance(meta, dict):
            break
        records.append((meta, payload[META_LENGTH.size + meta_length :]))
        offset = end
    return records, offset


def read_recording(path: Path | str) -> Recording:
    """Read a session's recording directory: every whole record, the manifest if it
    was written. A crashed or still-running recording reads as far as it got
    (``complete`` False). Raises only if there is no records file to read."""
    path = Path(path)
    data = (path / RECORDS_FILE).read_bytes()
    records, end = iter_records(data)
    recording = Recording(path, session_id=path.name, records=len(records), ignored_bytes=len(data) - end)
    for meta, body in records:
        try:
            _apply(recording, meta, body)
        except (KeyError, TypeError, ValueError) as exc:  # CRC-valid but not ours: say so, keep the rest
            log.warning("%s: skipping a malformed %r record: %s", path, meta.get("k"), exc)
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        recording.manifest = manifest if isinstance(manifest, dict) else None
    except (OSError, ValueError):
        recording.manifest = None
    return recording


def _apply(recording: Recording, meta: dict[str, Any], body: bytes) -> None:
    kind = meta.get("k")
    if kind in ("in", "out"):
        audio = from_pcm16(np.frombuffer(body, dtype="<i2"))
        turn = int(meta["turn"])
        (recording.inputs if kind == "in" else recording.outputs)[turn] = audio
        (recording.input_text if kind == "in" else recording.output_text)[turn] = str(meta.get("text", ""))
    elif kind == "video":
        if meta.get("codec") != "zlib":
            raise ValueError(f"unknown video codec {meta.get('codec')!r}")
        frame = np.frombuffer(zlib.decompress(body), dtype=np.uint8).reshape(meta["shape"])
        recording.video.append((int(meta["turn"]), frame))
    elif kind == "event":
        recording.events.append(RecordedEvent(meta["dir"], float(meta["ms"]), meta["event"]))
    elif kind == "start":
        recording.session_id = meta.get("session_id", recording.session_id)
        recording.started_ms = meta.get("started_ms")
        recording.sample_rate = int(meta.get("sample_rate", SAMPLE_RATE))
        recording.turn_ms = int(meta.get("turn_ms", TURN_MS))
        recording.meta = meta.get("meta", {})
    elif kind == "end":
        recording.end_reason = meta.get("reason")


def find_recordings(root: Path | str) -> list[Path]:
    """Every recording directory at or under ``root``, sorted."""
    root = Path(root)
    return sorted(p.parent for p in root.rglob(RECORDS_FILE))
