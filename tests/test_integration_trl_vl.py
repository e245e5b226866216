"""The TRL adapter on a vision-language model (tiny-vl + vcountdown): ReLaX trains, and the rollout's hidden
states come from a forward with the images in both of TRL's forward paths (its own old-log-prob forward, and
the adapter's extra forward), so the update's DSD equals the rollout's (``latent/relax/dsd_drift`` = 0)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402

from latentx.integrations.trl import LatentGRPOConfig, LatentGRPOTrainer  # noqa: E402
from latentx.models import load_model  # noqa: E402
from latentx.tasks import get_task  # noqa: E402
from latentx.vision import processor_of, save_tokenizer  # noqa: E402


def digit_reward(completions, **kwargs):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # conversational completions
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


@pytest.fixture(scope="module")
def tiny_vl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-vl")
    model, tokenizer = load_model("tiny-vl", seed=0)
    model.save_pretrained(path)
    save_tokenizer(tokenizer, path)
    return path


def vcountdown_dataset(n: int = 8) -> Dataset:
    task = get_task("vcountdown", min_operands=2, max_operands=3)
    instances = task.train_instances(n)
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": i.prompt}]}]
                   for i in instances],
        "image": [task.images(i)[0] for i in instances],
    })


@pytest.mark.parametrize("trl_forward", [False, True], ids=["adapter-forward", "trl-forward"])
def test_relax_on_tiny_vl_has_no_dsd_drift(tmp_path, tiny_vl_dir, trl_forward):
    model, tokenizer = load_model(str(tiny_vl_dir))
    extra = dict(steps_per_generation=2, per_device_train_batch_size=4) if trl_forward else {}
    args = LatentGRPOConfig(**{
        **dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=12,
               max_steps=1, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
               seed=0, disable_tqdm=True, bf16=False, latent_objective="relax", relax_m=4),
        **extra,
    })
    trainer = LatentGRPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=vcountdown_dataset(),
                                processing_class=processor_of(tokenizer))
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "latent/relax/dsd_drift" in entry)
    assert log["latent/extra_forward"] == (0.0 if trl_forward else 1.0)
    assert log["latent/relax/dsd_update_mean"] > 0
    assert abs(log["latent/relax/dsd_drift"]) < 1e-5


# ----------------------------------------------------------------------------------------------------
# an independent forward with images, per sequence
# ----------------------------------------------------------------------------------------------------


def reload(tiny_vl_dir, params: dict):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_vl_dir)
    missing, unexpected = model.load_state_dict(params, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model.eval()


def per_sequence_forward(model, batch: dict, b: int, pixel_values: torch.Tensor, grid: torch.Tensor):
    """Sequence ``b`` of a TRL rollout batch alone, with the given image tensors: (H [C, d], entropy [C])."""
    ids = torch.cat([batch["prompt_ids"][b], batch["completion_ids"][b]])[None]
    attention = torch.cat([batch["prompt_mask"][b], batch["completion_mask"][b]])[None]
    mm = torch.zeros_like(ids)
    mm[ids == model.config.image_token_id] = 1
    C = batch["completion_ids"].shape[1]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attention, pixel_values=pixel_values, image_grid_thw=grid,
                    mm_token_type_ids=mm, output_hidden_states=True)
    logits = out.logits[0, -(C + 1) : -1].float()
    entropy = -(logits.log_softmax(-1).exp() * logits.log_softmax(-1)).sum(-1)
    return out.hidden_states[-1][0, -(C + 1) : -1], entropy


def image_slices(batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each sequence's (pixel rows, grid rows), cut by hand from the batch's grids and image counts."""
    lengths = batch["image_grid_thw"].prod(-1).tolist()
    out, img, row = [], 0, 0
    for n in batch["num_images"]:
        rows = sum(lengths[img : img + n])
        out.append((batch["pixel_values"][row : row + rows], batch["image_grid_thw"][img : img + n]))
        img, row = img + n, row + rows
    return out


# ----------------------------------------------------------------------------------------------------
# the latent monitor on a VLM (a sample of rows read from TRL's loss forward): signals = an independent forward
# with images
# ----------------------------------------------------------------------------------------------------


def test_monitor_on_tiny_vl_equals_independent_forward_with_images(tmp_path, tiny_vl_dir):
    from test_integration_trl_monitor import expected_stats

    from latentx.dynamics import rank_dynamics

    model, tokenizer = load_model(str(tiny_vl_dir))
    args = LatentGRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=12,
        max_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
        disable_tqdm=True, bf16=False, latent_objective="grpo", latent_monitor=True, latent_monitor_every=1,
        latent_monitor_fraction=0.5, relax_m=4, relax_fit_batch_size=4, verl_stride=2,
    )
    trainer = LatentGRPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=vcountdown_dataset(),
                                processing_class=processor_of(tokenizer))
    trainer.latent_records = []
    trainer.train()
    rollouts = [r for r in trainer.latent_records if r["kind"] == "monitor_rollout"]
    logs = [log for log in trainer.state.log_history if "latent/er_mean" in log]
    assert len(rollouts) == len(logs) == 2
    assert rollouts[0]["rows"] is None and len(rollouts[1]["rows"]) == 4  # the second batch: a sample of rows
    assert all(log["latent/monitor/loss_forward"] == 1.0 for log in logs)
    koopman = trainer.latent_monitor.koopman
    for rec, log in zip(rollouts, logs):
        batch = rec["output"]
        picked = rec["rows"].tolist() if rec["rows"] is not None else list(range(batch["completion_ids"].shape[0]))
        policy = reload(tiny_vl_dir, rec["params"])
        slices = image_slices(batch)
        states = [per_sequence_forward(policy, batch, b, *slices[b]) for b in picked]
        H = torch.stack([h for h, _ in states])
        mask = batch["completion_mask"][picked].bool()
        entropy = torch.stack([(e * m).sum() / m.sum() for (_, e), m in zip(states, mask)])
        rank = rank_dynamics(H, mask, stride=2, window=512)
        completions = tokenizer.batch_decode(batch["completion_ids"][picked], skip_special_tokens=True)
        rewards = np.array(digit_reward(completions), dtype=np.float64)
        signals = {"er": rank.er, "erv": rank.erv, "era": rank.era, "dsd": koopman.dsd(H, mask), "entropy": entropy}
        for name, values in signals.items():
            values = values.detach().double().numpy()
            for key, value in expected_stats(name, values, rewards).items():
                tolerance = 1e-4 + (1e-5 * abs(values.mean()) / values.std() if key.endswith("_reward_corr") else 0)
                assert log[f"latent/{key}"] == pytest.approx(value, rel=1e-4, abs=tolerance), key
        # the images matter: the same sequences with blank pixels give other states
        blank = per_sequence_forward(policy, batch, picked[0], torch.zeros_like(slices[picked[0]][0]), slices[picked[0]][1])
        assert (blank[0] - H[0]).abs().max() > 1e-3


def test_relax_lazy_reference_on_tiny_vl_scores_i_rows_with_their_images(tmp_path, tiny_vl_dir):
    # ReLaX's reference forward runs on the rows of I only (here 2 of 8: xi_mode quantile 0.25), each with its
    # own images; its log-probs equal an independent forward of the reference (the initial weights).
    from transformers import AutoModelForImageTextToText

    model, tokenizer = load_model(str(tiny_vl_dir))
    args = LatentGRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=12,
        max_steps=1, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
        disable_tqdm=True, bf16=False, latent_objective="relax", relax_m=4, relax_xi=0.25, relax_xi_mode="quantile",
    )
    trainer = LatentGRPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=vcountdown_dataset(),
                                processing_class=processor_of(tokenizer))
    trainer.latent_records = []
    trainer.train()
    batch = next(r for r in trainer.latent_records if r["kind"] == "relax_rollout")["output"]
    rows = torch.nonzero(batch["latent_in_set"]).flatten().tolist()
    assert len(rows) == 2
    reference = AutoModelForImageTextToText.from_pretrained(tiny_vl_dir).eval()
    slices = image_slices(batch)
    C = batch["completion_ids"].shape[1]
    for b in range(8):
        if b not in rows:
            assert not batch["ref_per_token_logps"][b].any()
            continue
        ids = torch.cat([batch["prompt_ids"][b], batch["completion_ids"][b]])[None]
        attention = torch.cat([batch["prompt_mask"][b], batch["completion_mask"][b]])[None]
        mm = (ids == reference.config.image_token_id).long()
        with torch.no_grad():
            logits = reference(input_ids=ids, attention_mask=attention, pixel_values=slices[b][0],
                               image_grid_thw=slices[b][1], mm_token_type_ids=mm).logits[0, -(C + 1) : -1].float()
        logp = logits.log_softmax(-1).gather(-1, batch["completion_ids"][b][:, None]).squeeze(-1)
        valid = batch["completion_mask"][b].bool()
        torch.testing.assert_close(batch["ref_per_token_logps"][b][valid], logp[valid], atol=1e-4, rtol=1e-4)


def test_select_multimodal_rows_keeps_each_sequences_images():
    from latentx.integrations.trl.trainer import select_multimodal_rows

    grids = torch.tensor([[1, 2, 2], [1, 2, 4], [1, 2, 2], [1, 4, 2], [1, 2, 2]])  # 4, 8, 4, 8, 4 patch rows
    pixels = torch.arange(28.0)[:, None].expand(28, 3)
    batch = {"pixel_values": pixels, "image_grid_thw": grids, "num_images": [2, 0, 1, 2],
             "mm_token_type_ids": torch.arange(4)[:, None].expand(4, 5)}
    picked = select_multimodal_rows(batch, [0, 3], 4)
    assert picked["num_images"] == [2, 2] and torch.equal(picked["image_grid_thw"], grids[[0, 1, 3, 4]])
    assert torch.equal(picked["pixel_values"], torch.cat([pixels[:12], pixels[16:]]))
    assert torch.equal(picked["mm_token_type_ids"][:, 0], torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="num_images"):
        select_multimodal_rows({"pixel_values": pixels, "image_grid_thw": grids}, [0], 4)


# ----------------------------------------------------------------------------------------------------
# examples/trl_relax_vl.py: a problem with several images, placed at its <image> markers
# ----------------------------------------------------------------------------------------------------


def _example():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "trl_relax_vl.py"
    if str(path.parent) not in sys.path:  # it imports trl_relax.py from beside it
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("trl_relax_vl_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_example_passes_every_image_of_a_multi_image_prompt(tmp_path, tiny_vl_dir):
    import json

    from PIL import Image

    from latentx.vision import encode_one, format_vision_prompt

    for k in range(12):  # two different images per problem
        Image.new("RGB", (56, 28), (30 * k, 0, 0)).save(tmp_path / f"a{k}.png")
        Image.new("RGB", (28, 56), (0, 0, 30 * k)).save(tmp_path / f"b{k}.png")
    rows = [{"problem": f"<image> plus <image> is {k}", "answer": str(k), "images": [f"a{k}.png", f"b{k}.png"]}
            for k in range(12)]
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("vmath", path=str(tmp_path / "two.jsonl"), eval_fraction=0.25)
    instances = task.train_instances(8)
    columns = _example().trl_vision_rows(task, instances)
    assert [part["type"] for part in columns["prompt"][0][0]["content"]] == ["image", "text", "image", "text"]
    assert all(len(images) == 2 for images in columns["images"])

    model, tokenizer = load_model(str(tiny_vl_dir))
    args = LatentGRPOConfig(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
        max_steps=1, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
        disable_tqdm=True, bf16=False, latent_objective="relax", relax_m=4,
    )
    trainer = LatentGRPOTrainer(model=model, reward_funcs=digit_reward, args=args,
                                train_dataset=Dataset.from_dict(columns), processing_class=processor_of(tokenizer))
    trainer.latent_records = []
    trainer.train()
    rec = next(r for r in trainer.latent_records if r["kind"] == "relax_rollout")
    batch = rec["output"]
    assert batch["num_images"] == [2] * 8 and batch["image_grid_thw"].shape[0] == 16
    # each sequence's prompt and pixels are the processor's own encoding of its problem with both images in order
    slices = image_slices(batch)
    policy = reload(tiny_vl_dir, rec["params"])
    by_prompt = {}
    for inst in instances:
        text = format_vision_prompt(tokenizer, inst.prompt, 2, chat=False)
        ids, row = encode_one(tokenizer, text, task.images(inst))
        by_prompt[tuple(ids)] = row
    H = []
    for b in range(8):
        ids = batch["prompt_ids"][b][batch["prompt_mask"][b].bool()].tolist()
        row = by_prompt[tuple(ids)]
        assert torch.equal(slices[b][0], row["pixel_values"]) and torch.equal(slices[b][1], row["image_grid_thw"])
        H.append(per_sequence_forward(policy, batch, b, row["pixel_values"], row["image_grid_thw"])[0])
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(rec["dsd"], trainer.koopman.dsd(torch.stack(H), mask).float(), atol=1e-4, rtol=1e-4)
    log = next(entry for entry in trainer.state.log_history if "latent/relax/dsd_drift" in entry)
    assert abs(log["latent/relax/dsd_drift"]) < 1e-5
