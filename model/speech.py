"""Text to speech with espeak-ng, for synthetic training conversations.

The library and its voice data come from the ``espeakng-loader`` wheel (nothing is
downloaded at run time); we call its C API through ctypes. espeak-ng keeps global
state, so calls are serialised by a lock.

Determinism: the same sequence of calls in a fresh process gives the same samples
in every run, but espeak-ng 1.52 carries state from one utterance to the next (the
same text and voice said twice in a row differ by a few milliseconds; neither
``espeak_ng_SetRandSeed`` nor re-initialising resets it — measured). So anything
that must be a pure function of a seed runs in a fresh process
(``conversations.generate``).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4
_EVENT_LIST_TERMINATED, _EVENT_WORD = 0, 1


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms from the start of the utterance
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice: a language plus a variant, at a speed and pitch."""

    name: str = "en-us"  # language voice, optionally "+variant" (e.g. "en-us+f3")
    words_per_minute: int = 160
    pitch: int = 50  # 0..100
    pitch_range: int = 50  # 0..100


@dataclass(frozen=True)
class Utterance:
    audio: np.ndarray  # float32 mono at ``sample_rate``
    sample_rate: int
    word_starts_s: tuple[float, ...]  # when each word starts, from espeak's word events
    text: str


class _Engine:
    def __init__(self) -> None:
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.sample_rate = self.lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise")
        # Initialising seeds espeak-ng's noise generator from the clock, so breathy
        # voices (f3, f5, sandro, ...) differed from run to run; a fixed seed makes a
        # process's first utterances the same bits every time.
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(0))
        self.lock = threading.Lock()
        self._chunks: list[np.ndarray] = []
        self._words: list[int] = []
        self._callback = _CALLBACK(self._collect)  # keep a reference: C holds the pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: ctypes.POINTER(ctypes.c_short), count: int, events: ctypes.POINTER(_Event)) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        index = 0
        while events[index].type != _EVENT_LIST_TERMINATED:
            if events[index].type == _EVENT_WORD:
                self._words.append(events[index].audio_position)
            index += 1
        return 0  # 0: carry on

    def say(self, text: str, voice: Voice) -> Utterance:
        with self.lock:
            if self.lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice.name!r}")
            for parameter, value in ((_RATE, voice.words_per_minute), (_PITCH, voice.pitch),
                                     (_RANGE, voice.pitch_range), (_VOLUME, 100)):
                self.lib.espeak_SetParameter(parameter, value, 0)
            self._chunks, self._words = [], []
            data = text.encode("utf-8")
            result = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            if result != 0:
                raise RuntimeError(f"espeak_Synth failed with {result}")
            self.lib.espeak_Synchronize()
            pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)
            words = tuple(ms / 1000 for ms in self._words)
        return Utterance(pcm.astype(np.float32) / 32768, self.sample_rate, words, text)


@lru_cache(maxsize=1)
def _engine() -> _Engine:
    return _Engine()


def synthesize(text: str, voice: Voice = Voice()) -> Utterance:
    """Speak ``text`` with ``voice`` (espeak-ng's own rate, 22,050 Hz)."""
    return _engine().say(text, voice)
