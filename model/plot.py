"""Timeline pictures of a conversation, as PNG, with no plotting library.

Three lanes, one column per micro-turn: the user's loudness (blue), the model's
speech (orange, at the time it is heard live, one micro-turn after its step), and a
tick wherever the model wrote text (dark: text; red: a task request). Grey lines
mark each second. The picture people look at first: overlap, pauses and
interruptions are visible at a glance.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from model.interface import TURN_SAMPLES

COLUMN = 6  # pixels per micro-turn
LANE = 40
BLUE, ORANGE, INK, RED, GREY, PAPER = (31, 111, 235), (217, 72, 15), (40, 44, 52), (200, 30, 30), (210, 212, 216), (255, 255, 255)


def _rms_per_turn(audio: np.ndarray) -> np.ndarray:
    turns = audio.size // TURN_SAMPLES
    return np.sqrt(np.mean(np.square(audio[: turns * TURN_SAMPLES].reshape(turns, TURN_SAMPLES)), axis=1))


def timeline_image(user_audio: np.ndarray, model_active: np.ndarray, model_text: list[str]) -> np.ndarray:
    """(height, width, 3) uint8 picture of one conversation."""
    user = np.clip(_rms_per_turn(user_audio) / 0.1, 0, 1)
    turns = len(model_text)
    height, width = 3 * LANE + 8, turns * COLUMN
    image = np.full((height, width, 3), PAPER, dtype=np.uint8)
    for second in range(0, turns, 5):
        image[:, second * COLUMN] = GREY
    for turn in range(turns):
        x = slice(turn * COLUMN, turn * COLUMN + COLUMN - 1)
        bar = int(user[turn] * (LANE - 2)) if turn < user.size else 0
        image[LANE - bar : LANE, x] = BLUE
        if turn + 1 < turns and model_active[turn]:  # heard one micro-turn after its step
            live = slice((turn + 1) * COLUMN, (turn + 1) * COLUMN + COLUMN - 1)
            image[LANE + 4 : 2 * LANE, live] = ORANGE
        if model_text[turn].strip():
            image[2 * LANE + 8 : 3 * LANE, x] = RED if "<task>" in model_text[turn] else INK
    return image


def write_png(image: np.ndarray, path: str | Path) -> Path:
    """A plain 8-bit RGB PNG."""
    height, width, _ = image.shape
    rows = b"".join(b"\x00" + image[y].tobytes() for y in range(height))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path = Path(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
                     + chunk(b"IEND", b""))
    return path
