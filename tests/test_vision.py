"""Vision-language policies: tiny-vl, images through sampler / forward / trainer, vcountdown and vmath."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch

from latentx import dynamics
from latentx.models import load_model
from latentx.rollout import Sequences, _stack_extra, policy_forward, sample_responses
from latentx.tasks import FunctionTask, get_task, register_task
from latentx.vision import (
    VISION_TOKENS,
    blank_images,
    encode_prompts,
    format_vision_prompt,
    processor_of,
    save_tokenizer,
    suppressed_token_ids,
    task_images,
)


@pytest.fixture(scope="module")
def tiny_vl():
    return load_model("tiny-vl", seed=0)


@pytest.fixture(scope="module")
def vcountdown():
    return get_task("vcountdown", min_operands=2, max_operands=4)


def _prompts(task, tokenizer, n=5, split="train"):
    instances = task.train_instances(n) if split == "train" else task.eval_instances(n)
    return instances, [task.format_prompt(i, tokenizer) for i in instances], [task.images(i) for i in instances]


def test_tiny_vl_saves_and_reloads(tmp_path, tiny_vl, vcountdown):
    model, tokenizer = tiny_vl
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert 0.15e6 < sum(p.numel() for p in model.parameters()) < 0.4e6
    model.save_pretrained(tmp_path)
    save_tokenizer(tokenizer, tmp_path)
    again, tok2 = load_model(str(tmp_path))
    assert type(again).__name__ == type(model).__name__ and processor_of(tok2) is not None
    _, prompts, images = _prompts(vcountdown, tokenizer, 3)
    a = encode_prompts(tokenizer, prompts, images)
    b = encode_prompts(tok2, prompts, images)
    ea, eb = _stack_extra(a[2], "cpu", a[0].shape[1]), _stack_extra(b[2], "cpu", b[0].shape[1])
    assert torch.equal(a[0], b[0]) and torch.equal(ea["pixel_values"], eb["pixel_values"])
    with torch.no_grad():
        la = model(input_ids=a[0], attention_mask=a[1], **ea).logits
        lb = again(input_ids=b[0], attention_mask=b[1], **eb).logits
    assert torch.allclose(la, lb)


def test_batched_forward_equals_per_sequence_forward(tiny_vl, vcountdown):
    """Ragged prompts (2-4 image cells) left-padded into one batch: the same log-probs and hidden states as
    each sequence alone, unpadded -- what mm_token_type_ids (3-D rope positions) buys."""
    model, tokenizer = tiny_vl
    instances, prompts, images = _prompts(vcountdown, tokenizer, 6)
    assert len({len(i.meta["numbers"]) for i in instances}) > 1, "want ragged image sizes"
    torch.manual_seed(0)
    seqs = sample_responses(model, tokenizer, prompts, 2, 10, images=images)
    batched = policy_forward(model, seqs, want_hidden=True)
    for row in range(0, seqs.input_ids.shape[0], 3):
        g = row // 2
        alone, _, rows = encode_prompts(tokenizer, [prompts[g]], [images[g]])
        assert torch.equal(alone[0], seqs.input_ids[row, seqs.prompt_length - alone.shape[1] : seqs.prompt_length])
        response = seqs.response_ids[row : row + 1]
        single = Sequences(
            input_ids=torch.cat([alone, response], 1),
            attention_mask=torch.cat([torch.ones_like(alone), seqs.response_mask[row : row + 1].long()], 1),
            prompt_length=alone.shape[1], response_mask=seqs.response_mask[row : row + 1], extra_inputs=rows,
        )
        fo = policy_forward(model, single, want_hidden=True)
        m = single.response_mask[0]
        assert torch.allclose(fo.logp[0][m], batched.logp[row][m], atol=1e-5)
        assert torch.allclose(fo.hidden[0][m], batched.hidden[row][m], atol=1e-5)
    # the image is in the hidden states: blank images of the same size change them
    blank = blank_images(vcountdown)
    _, _, blank_rows = encode_prompts(tokenizer, prompts, [blank.images(i) for i in instances])
    seqs.extra_inputs = [blank_rows[k // 2] for k in range(len(seqs.extra_inputs))]
    assert (policy_forward(model, seqs, want_hidden=True).hidden - batched.hidden).abs().max() > 1e-3


def test_sampler_log_probs_equal_the_forward_and_never_emit_image_tokens(tiny_vl, vcountdown):
    """generate's (processed) scores = policy_forward's log-probs; with the image token made the most
    likely token, it is still never sampled."""
    model, tokenizer = tiny_vl
    _, prompts, images = _prompts(vcountdown, tokenizer, 4)
    image_id = tokenizer.convert_tokens_to_ids(VISION_TOKENS[2])
    ids, mask, rows = encode_prompts(tokenizer, prompts, images)
    torch.manual_seed(1)
    out = model.generate(input_ids=ids, attention_mask=mask, **_stack_extra(rows, "cpu", ids.shape[1]), max_new_tokens=8,
                         do_sample=True, top_k=0, suppress_tokens=list(suppressed_token_ids(model)), output_scores=True,
                         return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=-1)
    response = out.sequences[:, ids.shape[1]:]
    scores = torch.stack([torch.log_softmax(s.float(), -1).gather(-1, response[:, k : k + 1])[:, 0]
                          for k, s in enumerate(out.scores)], 1)
    seqs = Sequences(out.sequences, torch.cat([mask, torch.ones_like(response)], 1), ids.shape[1],
                     torch.ones_like(response, dtype=torch.bool), extra_inputs=rows)
    assert torch.allclose(policy_forward(model, seqs, want_hidden=False).logp, scores, atol=1e-5)

    hook = model.lm_head.register_forward_hook(lambda mod, inp, logits: logits.index_add(
        -1, torch.tensor([image_id]), torch.full((*logits.shape[:-1], 1), 50.0)))
    try:
        torch.manual_seed(2)
        seqs = sample_responses(model, tokenizer, prompts, 4, 8, images=images)
    finally:
        hook.remove()
    assert not (seqs.response_ids[seqs.response_mask] == image_id).any()


def _vl_config(tmp_path, objective="relax", *extra):
    from latentx.config import apply_overrides
    from latentx.trainer import TrainConfig

    return apply_overrides(TrainConfig(), [
        f"objective={objective}", "steps=1", f"out={tmp_path / objective}", "model.name=tiny-vl",
        "task.name=vcountdown", "task.train_size=16", "warm_start.enabled=false", "eval.enabled=false",
        "rollout.prompts_per_step=2", "rollout.samples_per_prompt=3", "rollout.max_new_tokens=10",
        "rollout.micro_batch_size=3", "checkpoint_every=1", "relax.fit_batch_size=3", *extra,
    ])


def test_trainer_on_policy_at_step_0_and_signals_equal_an_independent_forward(tmp_path):
    from latentx.trainer import Trainer, resolve_config

    trainer = Trainer(resolve_config(_vl_config(tmp_path)), progress=False)
    ro = trainer.rollout()
    seqs = ro.seqs
    assert seqs.extra_inputs is not None and len(seqs.extra_inputs) == seqs.input_ids.shape[0]
    # the update forward (train mode, per micro-batch) reproduces the rollout's old log-probs
    trainer.model.train()
    for sl in trainer._micro_batches(seqs.input_ids.shape[0]):
        mb = seqs.select(sl)
        with torch.no_grad():
            fo = policy_forward(trainer.model, mb, want_hidden=True)
        t = mb.response_length
        assert torch.allclose(fo.logp * mb.response_mask, ro.old_logp[sl, :t] * mb.response_mask, atol=1e-5)
    trainer.model.eval()
    # the signals: an independent forward, each response on its own with its own images
    er, dsd = [], []
    for row in range(seqs.input_ids.shape[0]):
        one = seqs.select([row])
        with torch.no_grad():
            fo = policy_forward(trainer.model, one, want_hidden=True)
        er.append(dynamics.rank_dynamics(fo.hidden, one.response_mask, stride=trainer.cfg.verl.stride,
                                         window=trainer.cfg.verl.window).er)
        dsd.append(trainer._dsd(fo.hidden, one.response_mask))
    assert torch.allclose(torch.cat(er), ro.signals["er"], atol=1e-4)
    assert torch.allclose(torch.cat(dsd), ro.signals["dsd"], atol=1e-4)
    row = trainer.train_step()
    assert torch.isfinite(torch.tensor(row["loss"])) and "dsd_mean" in row
    saved = trainer.save()
    again, tokenizer = load_model(str(saved))
    assert processor_of(tokenizer) is not None


def test_image_task_on_a_text_model_is_a_one_line_error(vcountdown):
    _, tokenizer = load_model("tiny")
    with pytest.raises(ValueError, match="has images but the model has no vision tower") as error:
        vcountdown.format_prompt(vcountdown.train_instances(1)[0], tokenizer)
    assert "\n" not in str(error.value)


def test_more_images_than_placeholders_is_a_one_line_error(tiny_vl, vcountdown):
    _, tokenizer = tiny_vl
    inst = vcountdown.train_instances(1)[0]
    with pytest.raises(ValueError, match=r"prompt 0: 2 image\(s\) but 1 image placeholder"):
        encode_prompts(tokenizer, [vcountdown.format_prompt(inst, tokenizer)], [vcountdown.images(inst) * 2])
    with pytest.raises(ValueError, match="has 1 <image> placeholder"):
        format_vision_prompt(tokenizer, "look: <image>", 2, chat=False)


def test_vcountdown_reward_transcription_and_blind():
    task = get_task("vcountdown")
    strict = get_task("vcountdown", require_transcription=True)
    inst = task.train_instances(1)[0]
    answer = task.solution(inst, random.Random(0))
    head, tail = answer.split("|")
    assert head.split() == [str(n) for n in inst.meta["numbers"]] and inst.prompt == f">{inst.meta['target']}:"
    assert task.reward(inst, answer) == 1.0 and strict.reward(inst, answer) == 1.0
    assert task.reward(inst, tail) == 1.0 and strict.reward(inst, tail) == 0.0  # no transcription
    wrong = "99 " + head + "|" + tail
    assert task.reward(inst, wrong) == 1.0 and strict.reward(inst, wrong) == 0.0
    assert task.reward(inst, head + "|1+1=2") == 0.0
    image = task.images(inst)[0]
    assert image.size == (28 * len(inst.meta["numbers"]), 28) and image.getextrema()[0][0] < 100
    blind = get_task("vcountdown", blind=True).images(inst)[0]
    assert blind.size == image.size and blind.getextrema() == ((255, 255),) * 3
    with pytest.raises(ValueError, match="task.options.cell"):
        get_task("vcountdown", cell=3)
    # train / eval disjoint as countdown's
    train = {(tuple(sorted(i.meta["numbers"])), i.meta["target"]) for i in task.train_instances(200)}
    held = {(tuple(sorted(i.meta["numbers"])), i.meta["target"]) for i in task.eval_instances(50)}
    assert not train & held


def _png(color=(0, 0, 0)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (56, 28), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_vmath_reads_geometry3k_and_mathvista_schemas(tmp_path, tiny_vl):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "img").mkdir()
    for k in range(12):
        (tmp_path / "img" / f"{k}.png").write_bytes(_png((k * 20, 0, 0)))
    rows = [{"pid": str(k), "question": f"What is {k}+1?", "image": f"img/{k}.png", "answer": str(k + 1)}
            for k in range(12)]
    (tmp_path / "vista.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    vista = get_task("vmath", path=str(tmp_path / "vista.jsonl"), eval_fraction=0.3)
    inst = vista.train_instances(1)[0]
    _, tokenizer = tiny_vl
    prompt = vista.format_prompt(inst, tokenizer)
    assert prompt.count(VISION_TOKENS[2]) == 1 and inst.prompt in prompt
    assert vista.reward(inst, f"so \\boxed{{{inst.answer}}}") == 1.0 and vista.reward(inst, "\\boxed{x}") == 0.0
    _, _, rows = encode_prompts(tokenizer, [prompt], [vista.images(inst)])
    assert rows[0]["image_grid_thw"].shape == (1, 3)

    table = pa.table({
        "problem": [f"<image>Find x if x = {k}." for k in range(12)],
        "answer": [str(k) for k in range(12)],
        "images": [[{"bytes": _png((0, k * 20, 0)), "path": None}] for k in range(12)],
    })
    pq.write_table(table, tmp_path / "geo.parquet")
    geo = get_task("vmath", path=str(tmp_path / "geo.parquet"), eval_fraction=0.3)
    inst = geo.eval_instances(1)[0]
    prompt = geo.format_prompt(inst, tokenizer)
    assert "<image>" not in prompt and prompt.count(VISION_TOKENS[2]) == 1
    assert task_images(geo, [inst])[0][0]["bytes"]


def test_vmath_bad_images_are_one_line_errors_naming_the_row(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "bad.png").write_bytes(b"not an image")
    base = [{"problem": f"p{k}", "answer": str(k), "image": "ok.png"} for k in range(10)]

    def write(rows, name):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    cases = {
        "missing": (dict(image="nope.png"), "image file .*nope.png' not found"),
        "unreadable": (dict(image="bad.png"), "bad.png' is not a readable image"),
        "none": (dict(image=None), "no image"),
        "extra": (dict(problem="<image> then <image>"), r"1 image\(s\) but 2 <image> placeholder"),
    }
    for name, (change, message) in cases.items():
        rows = [dict(r) for r in base]
        rows[4].update(change)
        with pytest.raises(ValueError, match=message) as error:
            get_task("vmath", path=write(rows, f"{name}.jsonl"))
        assert "\n" not in str(error.value) and "problem" in str(error.value), name


def test_user_task_with_images(tiny_vl):
    def make(rng):
        from PIL import Image

        k = rng.randint(0, 9)
        return {"prompt": f"#{rng.randint(0, 999)} colour?", "answer": str(k), "image": Image.new("RGB", (28, 28), (k * 25, 0, 0))}

    register_task("test_vl_colour", lambda **o: FunctionTask(
        "test_vl_colour", generate=make, reward_fn=lambda inst, r: float(r.strip() == inst.answer), **o),
        overwrite=True)
    task = get_task("test_vl_colour")
    model, tokenizer = tiny_vl
    instances = task.train_instances(3)
    seqs = sample_responses(model, tokenizer, [task.format_prompt(i, tokenizer) for i in instances], 2, 4,
                            images=task_images(task, instances))
    assert seqs.extra_inputs is not None and seqs.input_ids.shape[0] == 6


@pytest.mark.slow  # the whole analysis with figures and report: ~1 min on the loaded 2-core machine
def test_analyze_image_blind_control(tmp_path):
    """``analyze --image-blind``: every model also runs with blank images, under its own label."""
    from latentx.analyze.pipeline import AnalyzeConfig, run_analysis

    cfg = AnalyzeConfig(models=["tiny-vl"], out=str(tmp_path), task="vcountdown", prompts=3, samples=2,
                        max_new_tokens=8, image_blind=True, task_options={"num_operands": 2})
    analysis = run_analysis(cfg, progress=False, log=lambda message: None, strict=True)
    labels = [r.label for r in analysis.models]
    assert labels == ["tiny-vl", "tiny-vl-noimage"]
    seeing, blind = (np.asarray(r.columns["er"]) for r in analysis.models)
    assert seeing.shape == blind.shape and not np.allclose(seeing, blind)


def test_solution_nll_equals_an_independent_per_sequence_forward(tiny_vl):
    """The held-out SFT loss: teacher-forced NLL of the solution (+ eos) with the images, batched and ragged."""
    from latentx.warmstart import solution_nll

    model, tokenizer = tiny_vl
    task = get_task("vcountdown", min_operands=2, max_operands=3, max_value=12)
    instances = task.eval_instances(5)
    rng = random.Random(0)
    whole, head = [], []  # per-token NLLs of each solution / of its transcription ("a b|")
    for inst in instances:
        solution = task.solution(inst, rng)
        ids, _, vision = encode_prompts(tokenizer, [task.format_prompt(inst, tokenizer)], [task.images(inst)])
        answer = tokenizer(solution, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        full = torch.cat([ids, torch.tensor([answer])], 1)
        extra = dict(vision[0])
        extra["mm_token_type_ids"] = torch.nn.functional.pad(extra["mm_token_type_ids"], (0, len(answer)))
        with torch.no_grad():
            logits = model(input_ids=full, attention_mask=torch.ones_like(full), **extra).logits[0]
        logp = torch.log_softmax(logits[ids.shape[1] - 1: -1].float(), -1)
        nll = -logp[torch.arange(len(answer)), torch.tensor(answer)]
        whole += nll.tolist()
        head += nll[: solution.index("|") + 1].tolist()
    assert solution_nll(model, tokenizer, task, instances, batch_size=2) == pytest.approx(np.mean(whole), rel=1e-5)
    assert solution_nll(model, tokenizer, task, instances, upto="|") == pytest.approx(np.mean(head), rel=1e-5)
    with pytest.raises(ValueError, match="has no '#'"):
        solution_nll(model, tokenizer, task, instances, upto="#")


def _sft_vs_blind(tmp_path, steps: int, seed: int = 0, accuracy: bool = False) -> dict[str, float]:
    """The warm start (the project's SFT) of tiny-vl on 2-number vcountdown, once with the images and once
    on the task's own image-blind variant (``blind=True``: blank images, same problems and settings), then
    held-out teacher-forced NLLs (``solution_nll``) and, with ``accuracy``, greedy transcription / solve
    rates on 64 held-out problems."""
    from latentx.evaluate import SamplingSettings, evaluate_task
    from latentx.warmstart import WarmStartConfig, solution_nll, warm_start

    options = {"num_operands": 2, "max_value": 12, "max_target": 40}
    cfg = WarmStartConfig(steps=steps, batch_size=32, lr=2e-3, warmup_steps=50, num_examples=800, seed=seed)
    seeing_task, blind_task = get_task("vcountdown", **options), get_task("vcountdown", blind=True, **options)
    held = seeing_task.eval_instances(64)
    out: dict[str, float] = {}
    for label, task in (("seeing", seeing_task), ("blind", blind_task)):
        model, tokenizer = load_model("tiny-vl", seed=seed)
        model, _ = warm_start(model, tokenizer, task, cfg, progress=False, cache_dir=tmp_path)
        out[f"{label}_transcription_nll"] = solution_nll(model, tokenizer, task, held, upto="|")
        out[f"{label}_answer_nll"] = solution_nll(model, tokenizer, task, held)
        if label == "seeing":  # the same model with the images blanked at evaluation
            out["seeing_on_blank_transcription_nll"] = solution_nll(model, tokenizer, blank_images(task), held, upto="|")
        if accuracy:
            result = evaluate_task(model, tokenizer, task, held, benchmark="vcountdown",
                                   settings=SamplingSettings(n=1, temperature=0.0, max_new_tokens=16, ks=(1,)))
            by_id = {inst.id: inst for inst in held}
            out[f"{label}_transcription_acc"] = float(np.mean(
                [seeing_task.transcription_correct(by_id[s.problem_id], s.response) for s in result.samples]))
            out[f"{label}_solve_acc"] = result.metrics["mean@1"]
    return out


def test_short_vcountdown_sft_beats_the_image_blind_baseline(tmp_path):
    """The quality bar: 300 SFT steps with the images read them, the same SFT on blank images cannot.

    Measured (seeds 0-4, this setting): transcription NLL 0.67-0.87 with the images vs 1.19-1.25 for the
    blind-trained model (margin 0.33-0.56 nats/token), answer NLL margin 0.10-0.19; the seeing model on
    blanked images 1.7-3.2.  Greedy accuracy does not separate reliably yet at 300 steps (see the slow test)."""
    m = _sft_vs_blind(tmp_path, steps=300)
    assert m["seeing_transcription_nll"] < m["blind_transcription_nll"] - 0.15, m
    assert m["seeing_answer_nll"] < m["blind_answer_nll"] - 0.03, m
    assert m["seeing_on_blank_transcription_nll"] > m["seeing_transcription_nll"] + 0.5, m  # it uses the image


@pytest.mark.slow  # two 500-step warm starts: ~40 s on the loaded 2-core machine
def test_vcountdown_warm_start_beats_the_image_blind_baseline_in_accuracy(tmp_path):
    """demo-vl's warm-start length: greedy transcription 0.58-0.86 and solve 0.17-0.58 on 64 held-out
    problems with the images vs 0.00-0.03 / 0.00 for the blind-trained model (seeds 0-2); transcription NLL
    0.13-0.27 vs 1.22-1.47."""
    m = _sft_vs_blind(tmp_path, steps=500, accuracy=True)
    assert m["seeing_transcription_acc"] >= max(0.3, m["blind_transcription_acc"] + 0.25), m
    assert m["seeing_solve_acc"] >= m["blind_solve_acc"] + 0.1, m
    assert m["seeing_transcription_nll"] < m["blind_transcription_nll"] - 0.5, m
