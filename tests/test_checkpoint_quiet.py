"""Checkpoint writes are silent in the terminal (no per-shard progress bar of transformers)."""

from __future__ import annotations

from transformers.utils import logging as hf_logging

from latentx.checkpoint import save_weights
from latentx.models import load_model


def test_saving_weights_prints_no_shard_bar_and_restores_the_setting(tmp_path, capfd):
    model, _ = load_model("tiny")
    assert hf_logging.is_progress_bar_enabled()
    save_weights(model, tmp_path / "quiet")
    out, err = capfd.readouterr()
    assert "Writing model shards" not in out + err
    assert (tmp_path / "quiet" / "model.safetensors").is_file()
    assert hf_logging.is_progress_bar_enabled(), "the global progress-bar setting is restored"
    model.save_pretrained(tmp_path / "loud")  # the plain call does print it: the test can fail
    out, err = capfd.readouterr()
    assert "Writing model shards" in out + err
