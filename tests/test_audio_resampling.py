"""The numpy resampler the lent GPU machine makes its conversations with (no PyAV
there): close enough to PyAV's that what the model trains on is the same sound."""

import math

import numpy as np
import pytest

from model.audio import resample_mono, resample_sinc
from model.speech import Voice, synthesize


def _snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    return 10 * math.log10(np.sum(reference**2) / np.sum((reference - other) ** 2))


@pytest.fixture(scope="module")
def speech() -> tuple[np.ndarray, int]:
    utterance = synthesize("what comes after seventeen, um, ninety two plus nineteen", Voice())
    return utterance.audio.astype(np.float32), utterance.sample_rate


def test_sinc_resampling_matches_pyav_on_speech(speech, monkeypatch):
    monkeypatch.delenv("MICROTURN_RESAMPLER", raising=False)  # resample_mono is PyAV's, the reference
    audio, rate = speech
    at_16k = resample_mono(audio, rate, 16000)
    ours = resample_sinc(audio, rate, 16000)
    assert ours.dtype == np.float32 and abs(ours.size - at_16k.size) <= 1
    n = min(ours.size, at_16k.size)
    assert _snr_db(at_16k[:n], ours[:n]) > 60  # espeak-ng's rate to the model's: 75 dB measured
    # The vocal-tract stretches of the training voices: up, down and an awkward ratio.
    for rate_out in (16800, 15200, 16013):
        theirs, ours = resample_mono(at_16k, 16000, rate_out), resample_sinc(at_16k, 16000, rate_out)
        n = min(ours.size, theirs.size)
        assert abs(ours.size - theirs.size) <= 1 and _snr_db(theirs[:n], ours[:n]) > 40, rate_out


def test_sinc_resampling_passes_the_band_and_stops_aliases():
    rate_in, rate_out = 22050, 16000
    t = np.arange(rate_in) / rate_in
    kept = resample_sinc(np.sin(2 * np.pi * 1000 * t), rate_in, rate_out)[1000:-1000]  # away from the edges
    assert np.sqrt(np.mean(kept**2)) == pytest.approx(1 / math.sqrt(2), rel=0.01)
    # 10 kHz is above the output's 8 kHz Nyquist: kept, it would fold down to 6 kHz.
    folded = resample_sinc(np.sin(2 * np.pi * 10000 * t), rate_in, rate_out)[1000:-1000]
    assert 20 * math.log10(np.sqrt(np.mean(folded**2)) / (1 / math.sqrt(2))) < -60
    impulse = np.zeros(4000)
    impulse[2000] = 1
    assert np.argmax(resample_sinc(impulse, rate_in, rate_out)) == round(2000 * rate_out / rate_in)  # no delay


def test_a_conversation_made_without_pyav_is_the_same_sound_in_its_own_cache(tmp_path, monkeypatch):
    from model.config import preset
    from model.train import CACHE_NAME, load_examples

    config = preset("tiny")
    monkeypatch.delenv("MICROTURN_RESAMPLER", raising=False)
    (with_pyav,) = load_examples([40000], config, tmp_path)
    monkeypatch.setenv("MICROTURN_RESAMPLER", "sinc")  # the workers take it from the caller, not the fork server
    (without,) = load_examples([40000], config, tmp_path)
    assert (tmp_path / CACHE_NAME / "40000.pt").exists() and (tmp_path / f"{CACHE_NAME}-sinc" / "40000.pt").exists()
    assert np.array_equal(with_pyav.text_in, without.text_in) and np.array_equal(with_pyav.text_out, without.text_out)
    differing = 0
    for name in ("user_bins", "model_bins"):
        ours, theirs = getattr(without, name).int(), getattr(with_pyav, name).int()
        assert ours.shape == theirs.shape
        assert (ours != theirs).float().mean() < 0.03 and (ours - theirs).abs().max() <= 4, name  # 1.6 %, 3 measured
        differing += int((ours != theirs).sum())
    assert differing > 0  # made the other way, not read back from the first cache


def test_an_unknown_resampler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MICROTURN_RESAMPLER", "sox")
    with pytest.raises(ValueError, match="MICROTURN_RESAMPLER='sox': expected one of av, sinc"):
        resample_mono(np.zeros(100, np.float32), 22050, 16000)


def test_evaluation_refuses_conversations_not_made_with_pyav(monkeypatch, capsys):
    from model.conversations import generate
    from model.evaluate import evaluate, main

    monkeypatch.setenv("MICROTURN_RESAMPLER", "sinc")
    with pytest.raises(ValueError, match="evaluation conversations are made with PyAV"):
        evaluate(None, [1_000_000])
    with pytest.raises(ValueError, match="held-out conversations are made with PyAV"):
        generate([1_000_000], held_out=True)  # the voicing probe's and the load test's way in
    with pytest.raises(SystemExit) as exit_:
        main(["--reference", "--conversations", "1"])
    assert exit_.value.code == 2 and "unset it to evaluate" in capsys.readouterr().err
