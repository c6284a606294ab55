"""Training: the loss falls, a run resumes where it stopped, and the checkpoint serves."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

import numpy as np
import torch

from model.interface import TURN_SAMPLES, TurnInput
from model.train import build_parser, text_input_slots, train
from server.engine import make_model


def test_text_input_is_queued_four_ids_a_turn_like_the_server_does():
    slots = text_input_slots(["", "<result>t1: 42</result>", "", ""], 4)
    # <result> and </result> are one marker id each (259, 260); 256 is "no text".
    assert slots.tolist() == [[256] * 4, [259, *b"t1:"], [*b" 42", 260], [256] * 4]


def test_training_lowers_the_loss_resumes_and_serves(tmp_path):
    out = tmp_path / "ckpt"
    common = ["--out", str(out), "--batch", "2", "--turns", "10", "--conversations", "4",
              "--cache", str(tmp_path / "cache"), "--warmup", "5", "--save-every", "20", "--lr", "3e-3"]
    losses = train(build_parser().parse_args(common + ["--steps", "40"]))
    assert len(losses) == 40
    assert statistics.mean(losses[-5:]) < 0.6 * statistics.mean(losses[:5]), losses

    more = train(build_parser().parse_args(common + ["--steps", "45", "--resume"]))
    assert len(more) == 5, "resumed at step 40"
    assert torch.load(out / "train_state.pt")["step"] == 45

    engine = make_model("model", max_sessions=2, checkpoint=str(out))
    assert engine.weights == "ckpt"
    engine.open_session("s")
    output = engine.step([TurnInput("s", 0, np.zeros(TURN_SAMPLES, dtype=np.float32))])[0]
    assert output.audio.shape == (TURN_SAMPLES,) and np.isfinite(output.audio).all()


def test_data_parallel_under_torchrun_keeps_replicas_identical(tmp_path):
    """Two CPU ranks (gloo) train on different batches; train() raises at the end if
    their weights differ, so a clean exit means the gradients were averaged."""
    out = tmp_path / "ckpt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
               "-m", "model.train", "--out", str(out), "--batch", "1", "--turns", "6", "--conversations", "2",
               "--cache", str(tmp_path / "cache"), "--steps", "3", "--warmup", "1", "--workers", "1"]
    run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert torch.load(out / "train_state.pt")["step"] == 3
