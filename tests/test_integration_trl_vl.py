"""The TRL adapter on a vision-language model (tiny-vl + vcountdown): ReLaX trains, and the rollout's hidden
states come from a forward with the images in both of TRL's forward paths (its own old-log-prob forward, and
the adapter's extra forward), so the update's DSD equals the rollout's (``latent/relax/dsd_drift`` = 0)."""

from __future__ import annotations

import pytest

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
