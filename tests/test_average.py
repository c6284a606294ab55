"""``microturn average``: a checkpoint whose weights are the (weighted) mean of others',
checked against the shipped checkpoint and a freshly initialised one of its config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from model.average import average
from model.average import main as average_main
from model.interaction import InteractionModel
from model.streaming import load_engine
from model.weights import load_checkpoint, save_checkpoint
from server.config import default_checkpoint

SHIPPED = Path(default_checkpoint())


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A newly initialised model of the shipped config, saved without decoding settings."""
    torch.manual_seed(37)
    return save_checkpoint(InteractionModel(load_checkpoint(SHIPPED).config), tmp_path_factory.mktemp("fresh"))


def test_the_mean_lies_between_the_checkpoints_as_weighted(fresh):
    shipped, other = load_checkpoint(SHIPPED).state_dict(), load_checkpoint(fresh).state_dict()
    middle = average([SHIPPED, fresh]).state_dict()
    leaning = average([SHIPPED, fresh], [3.0, 1.0]).state_dict()
    differ = [name for name in shipped if not torch.equal(shipped[name], other[name])]
    assert len(differ) > 10  # the two really are different models
    for name in differ:
        torch.testing.assert_close(middle[name], (shipped[name] + other[name]) / 2)
        torch.testing.assert_close(leaning[name], (3 * shipped[name] + other[name]) / 4)
    alone = average([SHIPPED, SHIPPED]).state_dict()
    assert all(torch.equal(alone[name], shipped[name]) for name in shipped)


def test_the_average_serves_and_decodes_as_its_first_checkpoint(fresh, tmp_path, capsys):
    out = tmp_path / "mean"
    average_main([str(SHIPPED), str(fresh), "--out", str(out)])
    assert "mean of" in capsys.readouterr().out
    assert json.loads((out / "decoding.json").read_text()) == json.loads((SHIPPED / "decoding.json").read_text())
    assert (out / "lexicon.txt").read_text() == (SHIPPED / "lexicon.txt").read_text()
    engine = load_engine(str(out), max_sessions=1)  # loads, with the first one's lexicon
    assert engine.model.config == load_checkpoint(SHIPPED).config
    average_main([str(fresh), str(SHIPPED), "--out", str(tmp_path / "other")])  # the first has no decoding.json
    assert not (tmp_path / "other" / "decoding.json").exists()


def test_checkpoints_of_other_shapes_or_bad_weights_are_refused(fresh, tmp_path, capsys):
    config = dataclasses.replace(load_checkpoint(SHIPPED).config, n_layers=2)
    smaller = save_checkpoint(InteractionModel(config), tmp_path / "smaller")
    cases = [([str(SHIPPED), str(smaller)], "has another config"),
             ([str(SHIPPED)], "two checkpoints or more"),
             ([str(SHIPPED), str(fresh), "--weights", "1", "-1"], "one weight of 0 or more"),
             ([str(SHIPPED), str(fresh), "--weights", "1"], "one weight of 0 or more"),
             ([str(SHIPPED), str(tmp_path / "missing")], "missing")]
    for arguments, message in cases:
        with pytest.raises(SystemExit):
            average_main([*arguments, "--out", str(tmp_path / "out")])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        average_main([str(SHIPPED), str(fresh), "--out", str(fresh)])
    assert "--out must not be one of" in capsys.readouterr().err
