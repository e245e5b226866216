"""The one generation core: stop tokens, row order, RNG discipline, and the trainer's evaluation with it."""

from __future__ import annotations

import pytest
import torch

from latentx.config import apply_overrides
from latentx.rollout import sample_responses, stop_token_ids
from latentx.trainer import TrainConfig, Trainer, resolve_config

PROMPTS = ["3 4>", "a longer prompt 12 30>", "7>"]


@pytest.fixture(scope="module")
def tiny():
    from latentx.models import load_model

    return load_model("tiny")


def _rng_states() -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states += [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return states


def _trainer(tmp_path, seed: int) -> Trainer:
    cfg = apply_overrides(TrainConfig(), [
        "objective=grpo", f"seed={seed}", "steps=1", f"out={tmp_path / f's{seed}'}", "task.train_size=16",
        "warm_start.enabled=false", "eval.instances=3", "eval.n=2", "eval.ks=[1,2]",
        "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=6",
    ])
    return Trainer(resolve_config(cfg), progress=False)


def test_rows_are_grouped_by_prompt_and_seeded_runs_repeat(tiny):
    model, tokenizer = tiny
    first = sample_responses(model, tokenizer, PROMPTS, 3, 6, generation_batch_size=2, seed=5)
    again = sample_responses(model, tokenizer, PROMPTS, 3, 6, generation_batch_size=2, seed=5)
    assert first.input_ids.shape[0] == 9 and first.texts == again.texts
    for row in range(9):  # row g*R + j holds a response to prompt g
        prompt = tokenizer.decode(first.input_ids[row, : first.prompt_length][first.attention_mask[row, : first.prompt_length].bool()],
                                  skip_special_tokens=True)
        assert prompt == PROMPTS[row // 3]
    stops = torch.tensor(stop_token_ids(model, tokenizer))
    for row in range(9):
        valid = first.response_ids[row][first.response_mask[row]]
        ended = bool(torch.isin(valid[-1:], stops).any())
        assert ended == bool(first.ended[row])
        assert not torch.isin(valid[:-1], stops).any(), "nothing is valid after the first stop token"
    greedy = sample_responses(model, tokenizer, PROMPTS, 2, 6, temperature=0.0)
    assert greedy.texts[0::2] == greedy.texts[1::2]


def test_stop_tokens_come_from_the_generation_config(tiny):
    model, tokenizer = tiny
    saved = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
        assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id, 7]
        seqs = sample_responses(model, tokenizer, PROMPTS, 4, 12, seed=0)
        for row in range(seqs.input_ids.shape[0]):
            valid = seqs.response_ids[row][seqs.response_mask[row]].tolist()
            assert 7 not in valid[:-1]
        model.generation_config.eos_token_id = None
        assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id]
    finally:
        model.generation_config.eos_token_id = saved


def test_seeded_sampling_leaves_every_rng_alone_and_unseeded_draws_from_it(tiny):
    model, tokenizer = tiny
    before = _rng_states()
    sample_responses(model, tokenizer, PROMPTS, 2, 4, seed=11)
    assert all(torch.equal(a, b) for a, b in zip(before, _rng_states()))
    sample_responses(model, tokenizer, PROMPTS, 2, 4)
    assert not torch.equal(before[0], torch.get_rng_state()), "an unseeded (training) rollout advances the RNG"


def test_evaluation_does_not_move_the_training_rng_and_seeds_stay_distinct(tmp_path):
    trainers = {seed: _trainer(tmp_path, seed) for seed in (0, 1)}
    samples = {}
    for seed, trainer in trainers.items():
        torch.manual_seed(seed)  # each run's training stream, as the trainer seeds it
        before = _rng_states()
        ev = trainer.evaluate()
        assert all(torch.equal(a, b) for a, b in zip(before, _rng_states())), "evaluation moved the training RNG"
        assert set(ev["benchmarks"]) == {"greedy", "sampled"}
        assert ev["benchmarks"]["sampled"]["metrics"].keys() == {"mean@2", "pass@1", "pass@2"}
        # the same prompts after the evaluation: each seed continues from its own stream
        samples[seed] = sample_responses(trainer.model, trainer.tokenizer, PROMPTS, 4, 8).texts
    assert samples[0] != samples[1], "two seeds drew the same training samples after an evaluation"


def test_trainer_summary_uses_the_eval_json_schema(tmp_path):
    import json

    from latentx.evaluate import headline_metrics

    trainer = _trainer(tmp_path, 0)
    summary = trainer.run()
    saved = json.loads((trainer.run_dir / "summary.json").read_text())
    assert saved["eval"]["benchmarks"].keys() == {"greedy", "sampled"}
    sampled = saved["eval"]["benchmarks"]["sampled"]
    assert sampled["settings"]["n"] == 2 and sampled["metrics"].keys() == {"mean@2", "pass@1", "pass@2"}
    assert len(sampled["correct_counts"]) == 3
    flat = headline_metrics(summary["eval"])
    assert flat["mean@2"] == pytest.approx(sum(flat["correct_counts"]) / 6)
    assert "greedy" in saved["warm_start"]["eval"]["benchmarks"]


@pytest.mark.parametrize("positions_per_chunk", [None, 3])
def test_lean_forward_equals_the_reference_forward_with_gradients(tiny, monkeypatch, positions_per_chunk):
    import latentx.rollout as rollout
    from latentx.integrations.backbone import find_backbone
    from latentx.rollout import _keeps_logits, _plain_head, policy_forward, policy_forward_reference

    model, tokenizer = tiny
    assert _keeps_logits(model) and find_backbone(model) is model.model  # the lean path, not the fallback
    assert _plain_head(model) is model.lm_head
    if positions_per_chunk:  # several checkpointed chunks of response positions
        monkeypatch.setattr(rollout, "SCORE_CHUNK_ELEMENTS", 6 * positions_per_chunk * model.config.vocab_size)
    seqs = sample_responses(model, tokenizer, PROMPTS, 2, 10, seed=1)
    results = []
    for forward in (policy_forward, policy_forward_reference):
        model.zero_grad(set_to_none=True)
        out = forward(model, seqs, want_hidden=True, want_entropy=True)
        mask = seqs.response_mask
        loss = (out.logp[mask].sum() + out.entropy[mask].sum() + out.hidden[mask].pow(2).sum())
        loss.backward()
        results.append((out, [p.grad.clone() for p in model.parameters()]))
    (lean, lean_grads), (ref, ref_grads) = results
    assert lean.logp.shape == ref.logp.shape == seqs.response_mask.shape
    assert torch.allclose(lean.logp, ref.logp, atol=1e-5) and torch.allclose(lean.entropy, ref.entropy, atol=1e-5)
    assert torch.allclose(lean.hidden, ref.hidden, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(lean_grads, ref_grads))
    no_hidden = policy_forward(model, seqs, want_hidden=False, want_entropy=False)
    assert no_hidden.hidden is None and torch.allclose(no_hidden.logp, ref.logp.detach(), atol=1e-5)
    model.zero_grad(set_to_none=True)
