"""The built-in tiny model, the character tokenizer and model-spec resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from latentx.models import (
    TINY_CHARACTERS,
    TinyModelConfig,
    build_char_tokenizer,
    build_tiny_model,
    check_hidden_states,
    load_model,
    parse_dtype,
    prepare_tokenizer,
    resolve_model_path,
)

COUNTDOWN_TEXT = "3 5 7>22:3*5=15,15+7=22"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(seed=0)


@pytest.fixture(scope="module")
def saved_tiny(tiny, tmp_path_factory):
    model, tokenizer = tiny
    directory = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_tiny_model_size_and_determinism(tiny):
    model, tokenizer = tiny
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 5_000_000
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size == len(tokenizer)
    same, _ = build_tiny_model(seed=0)
    other, _ = build_tiny_model(seed=1)
    for (name, a), b, c in zip(model.state_dict().items(), same.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(model.state_dict().values(), other.state_dict().values()))


def test_tiny_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_overrides_and_validation():
    model, _ = build_tiny_model(seed=0, hidden_size=128, num_hidden_layers=4, intermediate_size=512)
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 4
    assert 900_000 < sum(p.numel() for p in model.parameters()) < 1_200_000
    with pytest.raises(ValueError, match="unknown tiny model option"):
        build_tiny_model(hidden=64)
    with pytest.raises(ValueError, match="tiny_model.hidden_size"):
        TinyModelConfig(hidden_size=130, num_attention_heads=4)
    with pytest.raises(ValueError, match="tiny_model.num_hidden_layers"):
        TinyModelConfig(num_hidden_layers=0)


@pytest.mark.parametrize(
    "text",
    [COUNTDOWN_TEXT, "12 3 4 9>45:12+3=15,9-4=5,15*5=75", "What is (2+3)/4?\nThe answer is \\boxed{5/4}.", ""],
)
def test_char_tokenizer_round_trip(text):
    tokenizer = build_char_tokenizer()
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == len(text) + 1  # one token per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_char_tokenizer_vocabulary():
    tokenizer = build_char_tokenizer()
    assert [tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token] == [
        "<pad>", "<bos>", "<eos>", "<unk>"
    ]
    ids = tokenizer(TINY_CHARACTERS, add_special_tokens=False).input_ids
    assert ids == list(range(4, 4 + len(TINY_CHARACTERS)))
    # characters outside the alphabet are kept as their UTF-8 bytes, never dropped
    assert tokenizer.decode(tokenizer("é=1").input_ids, skip_special_tokens=True) == "é=1"
    assert tokenizer.padding_side == "left"


def test_round_trip_save_load_identical_logits(tiny, saved_tiny):
    model, tokenizer = tiny
    loaded_model = AutoModelForCausalLM.from_pretrained(saved_tiny)
    loaded_tokenizer = AutoTokenizer.from_pretrained(saved_tiny)
    assert loaded_tokenizer(COUNTDOWN_TEXT).input_ids == tokenizer(COUNTDOWN_TEXT).input_ids
    assert loaded_tokenizer.decode(loaded_tokenizer(COUNTDOWN_TEXT).input_ids, skip_special_tokens=True) == COUNTDOWN_TEXT
    batch = tokenizer([COUNTDOWN_TEXT, "1 2>3:"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
        got = loaded_model(**batch).logits
    assert torch.equal(expected, got)


def test_hidden_states_available(tiny):
    model, tokenizer = tiny
    assert check_hidden_states(model) == model.config.hidden_size
    batch = tokenizer([COUNTDOWN_TEXT], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert out.hidden_states[-1].shape == (1, len(COUNTDOWN_TEXT) + 1, model.config.hidden_size)


def test_check_hidden_states_rejects_model_without_them():
    class NoHidden(torch.nn.Module):
        config = type("Config", (), {"vocab_size": 10})()

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)

        def forward(self, input_ids, **kwargs):
            return type("Out", (), {"logits": self.embed(input_ids), "hidden_states": None})()

    with pytest.raises(ValueError, match="does not return hidden states"):
        check_hidden_states(NoHidden())


def test_generation_with_left_padding(tiny):
    model, tokenizer = tiny
    batch = tokenizer(["1 2>3:", "10 20 30>60:"], padding=True, return_tensors="pt")
    assert batch.input_ids[0, 0] == tokenizer.pad_token_id  # left padded
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (2, batch.input_ids.shape[1] + 4)


def test_load_model_tiny_and_dtype():
    model, tokenizer = load_model("tiny", seed=3, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tokenizer.pad_token == "<pad>"
    with pytest.raises(ValueError, match="dtype must be one of"):
        parse_dtype("float8")


def _make_run(root: Path, model, tokenizer, steps=(20, 40)) -> Path:
    for step in steps:
        directory = root / "checkpoints" / f"step_{step:06d}" / "model"
        directory.mkdir(parents=True)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    (root / "checkpoints" / "LATEST").write_text(f"step_{steps[-1]:06d}\n")
    return root


def test_load_run_directory_and_checkpoint(tiny, tmp_path):
    model, tokenizer = tiny
    run = _make_run(tmp_path / "run", model, tokenizer)
    assert resolve_model_path(str(run)) == (str(run / "checkpoints" / "step_000040" / "model"), None)
    checkpoint = run / "checkpoints" / "step_000020"
    assert resolve_model_path(str(checkpoint)) == (str(checkpoint / "model"), None)
    loaded, loaded_tokenizer = load_model(str(run))
    assert loaded_tokenizer.padding_side == "left"
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_bad_specs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file or directory"):
        resolve_model_path(str(tmp_path / "missing" / "model"))
    with pytest.raises(ValueError, match="no such file or directory"):
        resolve_model_path("./not-here")
    with pytest.raises(ValueError, match="GGUF file does not exist"):
        resolve_model_path(str(tmp_path / "x.gguf"))
    with pytest.raises(ValueError, match="holds no config.json"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ValueError, match="no checkpoints/LATEST"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "checkpoints" / "LATEST").write_text("step_000010")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ValueError, match="non-empty string"):
        resolve_model_path("")
    with pytest.raises(ValueError, match="dir_or_repo::file.gguf"):
        resolve_model_path("somewhere::model.bin")
    with pytest.raises(ValueError, match="tiny_overrides only apply"):
        load_model(str(tmp_path), tiny_overrides={"hidden_size": 64})


def test_prepare_tokenizer_sets_pad_to_eos():
    tokenizer = build_char_tokenizer()
    tokenizer.pad_token = None
    tokenizer.padding_side = "right"
    prepare_tokenizer(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.padding_side == "left"
