"""The verl engine hook on a vision-language model (``tiny-vl``), with verl 0.9.1's own batch types, on the CPU.

A rollout batch is built as verl's agent loop builds it (left-padded prompts, right-padded responses, the
4-row position ids of its own ``AgentLoopWorker._compute_position_ids`` — text positions plus Qwen's 3-D
rope — and per-sample ``multi_modal_inputs`` in the ``DataProto``'s non-tensor batch), converted by
``DataProto.to_tensordict`` and ``left_right_2_no_padding``, and run through the real
``FSDPEngineWithLMHead.prepare_model_inputs/prepare_model_outputs`` with the latentx hook.  The hooked
response trajectories, and ER / ERV / ERA / DSD from them, equal an independent per-sequence forward with
the images (and differ from one with blank pixels); the update forward's DSD has gradient into the vision
tower.  Runs in the verl environment; skipped where verl is not installed.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("transfer_queue")

from PIL import Image, ImageDraw  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from transformers.models.qwen2_5_vl import Qwen2_5_VLModel  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.experimental.agent_loop.agent_loop import AgentLoopWorker  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

from latentx.dynamics import KoopmanDictionary, dsd, rank_dynamics  # noqa: E402
from latentx.integrations.verl.signals import per_response_values  # noqa: E402
from latentx.integrations.verl.worker import LatentxEngineHook  # noqa: E402
from latentx.models import load_model  # noqa: E402
from latentx.vision import VISION_TOKENS, processor_of  # noqa: E402
from test_integration_verl import FakeFSDPEngine, engine_forward, settings  # noqa: E402

IMAGE = "".join(VISION_TOKENS[:3][i] for i in (0, 2, 1))  # <|vision_start|><|image_pad|><|vision_end|>
# (prompt text, image widths in 28-px cells, response length): one, two and one images, ragged lengths
ROWS = [(f"{IMAGE}>12:", [2], 5), (f"{IMAGE}ab{IMAGE}>7:", [3, 1], 9), (f"{IMAGE}>345:", [4], 3)]


def _image(seed: int, cells: int) -> Image.Image:
    image = Image.new("RGB", (28 * cells, 28), "white")
    draw = ImageDraw.Draw(image)
    for i in range(cells):
        draw.text((28 * i + 9, 8), str((seed + 3 * i) % 10), fill="black")
    return image


@pytest.fixture(scope="module")
def tiny_vl():
    model, tokenizer = load_model("tiny-vl", seed=0)
    model.config._attn_implementation = "sdpa"
    return model, tokenizer


def agent_loop_batch(model, tokenizer) -> tuple[DataProto, list[tuple]]:
    """verl's rollout layout for ROWS, and each row's (prompt ids, response ids, processor inputs)."""
    processor = processor_of(tokenizer)
    # what verl's hf_processor binds for a Qwen2.5-VL processor (verl/utils/tokenizer/tokenizer.py)
    processor.config = model.config
    processor.get_rope_index = types.MethodType(Qwen2_5_VLModel.get_rope_index, processor)
    processor.get_vision_position_ids = types.MethodType(Qwen2_5_VLModel.get_vision_position_ids, processor)
    worker = types.SimpleNamespace(processor=processor, tokenizer=tokenizer)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for k, (text, cells, length) in enumerate(ROWS):
        encoded = processor(text=[text], images=[_image(k + j, c) for j, c in enumerate(cells)], return_tensors="pt")
        inputs = {key: value for key, value in encoded.items() if key not in ("input_ids", "attention_mask")}
        rows.append((encoded["input_ids"][0], torch.randint(1, 40, (length,), generator=gen), inputs))
    B, P, C = len(rows), max(p.numel() for p, _, _ in rows), max(r.numel() for _, r, _ in rows)
    prompts = torch.zeros(B, P, dtype=torch.long)
    responses = torch.zeros(B, C, dtype=torch.long)
    attention = torch.zeros(B, P + C, dtype=torch.long)
    for b, (p, r, _) in enumerate(rows):
        prompts[b, P - len(p) :], responses[b, : len(r)] = p, r
        attention[b, P - len(p) : P + len(r)] = 1
    input_ids = torch.cat([prompts, responses], 1)
    position_ids = torch.cat([
        AgentLoopWorker._compute_position_ids(worker, input_ids[b : b + 1], attention[b : b + 1], dict(inputs))
        for b, (_, _, inputs) in enumerate(rows)
    ])
    assert position_ids.shape == (B, 4, P + C)
    # the agent loop pops mm_token_type_ids while computing the positions: the engine gets pixels and grids
    mm = np.array([{k: v for k, v in inputs.items() if k != "mm_token_type_ids"} for _, _, inputs in rows], dtype=object)
    batch = TensorDict({
        "prompts": prompts, "responses": responses, "input_ids": input_ids, "attention_mask": attention,
        "position_ids": position_ids, "response_mask": attention[:, P:].clone(), "temperature": torch.ones(B),
    }, batch_size=B)
    return DataProto(batch=batch, non_tensor_batch={"multi_modal_inputs": mm}), rows


def reference_trajectories(model, rows, blank: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence alone through the plain model with its images (``mm_token_type_ids``, no position ids,
    as ``generate`` runs it): the last hidden states that predict its response tokens, padded to [B, C, d]."""
    C = max(r.numel() for _, r, _ in rows)
    H = torch.zeros(len(rows), C, model.config.text_config.hidden_size)
    mask = torch.zeros(len(rows), C, dtype=torch.bool)
    for b, (p, r, inputs) in enumerate(rows):
        ids = torch.cat([p, r])[None]
        extra = dict(inputs, mm_token_type_ids=torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, len(r))))
        if blank:
            extra["pixel_values"] = torch.zeros_like(extra["pixel_values"])
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, **extra)
        H[b, : len(r)] = out.hidden_states[-1][0, len(p) - 1 : len(p) + len(r) - 1]
        mask[b, : len(r)] = True
    return H, mask


def micro_batch(data: DataProto, use_remove_padding: bool) -> TensorDict:
    td = left_right_2_no_padding(data.to_tensordict())
    tu.assign_non_tensor(td, use_remove_padding=use_remove_padding)
    return td


@pytest.mark.parametrize("use_remove_padding", [True, False], ids=["packed", "padded"])
def test_engine_hook_on_tiny_vl_equals_an_independent_forward_with_images(tiny_vl, use_remove_padding):
    model, tokenizer = tiny_vl
    data, rows = agent_loop_batch(model, tokenizer)
    engine = FakeFSDPEngine(model)
    s = settings("verl")
    hook = LatentxEngineHook(engine, s)
    hook.keep_last = True
    hook.mode = "infer"
    with torch.no_grad():
        out = engine_forward(engine, micro_batch(data, use_remove_padding))
    hook.mode = None

    H_ref, mask_ref = reference_trajectories(model, rows)
    H, mask = hook.last_trajectories
    W = mask.shape[1]
    assert torch.equal(mask, mask_ref[:, :W]) and not mask_ref[:, W:].any()
    torch.testing.assert_close(H[mask], H_ref[:, :W][mask], atol=1e-5, rtol=1e-5)
    blank, _ = reference_trajectories(model, rows, blank=True)
    assert (blank[mask_ref] - H_ref[mask_ref]).abs().max() > 1e-3  # the images reach the states
    ref = rank_dynamics(H_ref, mask_ref, stride=s.verl.stride, window=s.verl.window)
    for key, value in (("latentx_er", ref.er), ("latentx_erv", ref.erv), ("latentx_era", ref.era)):
        torch.testing.assert_close(per_response_values(out[key]), value.float(), atol=1e-4, rtol=1e-4)
    assert "log_probs" in out


def test_relax_hook_on_tiny_vl_fits_emits_dsd_and_trains_through_the_vision_tower(tiny_vl, tmp_path):
    model, tokenizer = tiny_vl
    data, rows = agent_loop_batch(model, tokenizer)
    engine = FakeFSDPEngine(model)
    s = settings("relax", m=4, fit_batch_size=2)
    s.dictionary_path = str(tmp_path / "koopman.safetensors")
    hook = LatentxEngineHook(engine, s)
    hook.mode = "infer"
    with torch.no_grad():
        engine_forward(engine, micro_batch(data, True))
    hook.mode = None
    hidden = model.config.text_config.hidden_size
    hook.state.finish_first_pass(hidden, torch.device("cpu"))
    H_ref, mask_ref = reference_trajectories(model, rows)
    manual = KoopmanDictionary.from_config(s.relax, hidden).fit(H_ref, mask_ref)
    torch.testing.assert_close(hook.state.dictionary.weight, manual.weight, atol=1e-5, rtol=1e-4)

    hook.mode = "infer"
    with torch.no_grad():
        second = engine_forward(engine, micro_batch(data, True))
    torch.testing.assert_close(per_response_values(second["latentx_dsd"]), dsd(H_ref, mask_ref, manual).float(),
                               atol=1e-4, rtol=1e-4)
    hook.mode = "train"
    model.zero_grad()
    train = engine_forward(engine, micro_batch(data, True))
    hook.mode = None
    train["latentx_dsd"].sum().backward()
    assert model.model.visual.blocks[0].mlp.up_proj.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# the data writer's rows read by verl's own RLHFDataset, and the reward loaded by verl's own loader
# ----------------------------------------------------------------------------------------------------


def test_verl_reads_the_vl_rows_and_loads_the_latentx_reward(tiny_vl, tmp_path):
    pytest.importorskip("reasoning_gym", reason="latentx's tasks need reasoning-gym (requirements/verl.txt)")
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from latentx.integrations.verl.data import IMAGE_KEY, REWARD_FUNCTION_PATH, verl_rows, write_parquet
    from latentx.tasks import get_task

    model, tokenizer = tiny_vl
    options = {"min_operands": 2, "max_operands": 3, "require_transcription": True}
    task = get_task("vcountdown", **options)
    instances = task.eval_instances(4)
    path = write_parquet(verl_rows(task, "vcountdown", options, instances, "test", system=""), tmp_path / "test.parquet")
    # verl's length filter and its agent loop resize images with qwen_vl_utils, which imports torchvision (not
    # loadable against the CPU torch): off here; the processor renders each row's messages below instead.
    config = OmegaConf.create({"image_key": IMAGE_KEY, "max_prompt_length": 64, "filter_overlong_prompts": False,
                               "cache_dir": str(tmp_path / "cache")})
    processor = processor_of(tokenizer)
    dataset = RLHFDataset(str(path), tokenizer, config, processor=processor)
    assert len(dataset) == 4
    reward_fn = get_custom_reward_fn(OmegaConf.create(
        {"reward": {"custom_reward_function": {"path": REWARD_FUNCTION_PATH, "name": "compute_score"}}}))
    import random

    rng = random.Random(0)
    for k, inst in enumerate(instances):
        row = dataset[k]
        (turn,) = row["raw_prompt"]
        image_part, text_part = turn["content"]
        assert image_part["type"] == "image" and text_part == {"type": "text", "text": inst.prompt}
        assert image_part["image"].convert("RGB").tobytes() == task.images(inst)[0].tobytes()
        text = processor.apply_chat_template(row["raw_prompt"], add_generation_prompt=True, tokenize=False)
        encoded = processor(text=[text], images=[image_part["image"]], return_tensors="pt")
        assert (encoded["input_ids"] == model.config.image_token_id).sum() == encoded["image_grid_thw"].prod() // 4
        args = dict(data_source=row["data_source"], ground_truth=row["reward_model"]["ground_truth"],
                    extra_info=row["extra_info"])
        right = task.solution(inst, rng)
        assert reward_fn(solution_str=right, **args) == 1.0
        assert reward_fn(solution_str=right.split("|")[1], **args) == 0.0  # the transcription is required
