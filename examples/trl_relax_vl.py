"""ReLaX (or VERL) on a vision-language model inside TRL's GRPOTrainer: the visual countdown (``vcountdown``)
or your own visual math file (``vmath``), rewarded by latentx's verifiers.

CPU, built-in ``tiny-vl`` (a smoke run, about a minute on 2 cores)::

    python examples/trl_relax_vl.py --model tiny-vl --output_dir runs/trl-vl --use_cpu --bf16 false \\
        --max_steps 4 --per_device_train_batch_size 8 --num_generations 4 --max_completion_length 24 \\
        --relax_m 8 --report_to none

GPUs, Qwen2.5-VL-3B on a Geometry3K-style Parquet file (``problem`` with ``<image>``, ``answer``, ``images``),
vLLM generation colocated with training (needs torchvision, which the stock Qwen processor imports)::

    accelerate launch --num_processes 8 examples/trl_relax_vl.py --model Qwen/Qwen2.5-VL-3B-Instruct \\
        --task vmath --data_path geometry3k/train.parquet --output_dir runs/trl-vl-relax \\
        --use_vllm --vllm_mode colocate --bf16 --gradient_checkpointing \\
        --per_device_train_batch_size 8 --num_generations 8 --max_completion_length 1024 \\
        --learning_rate 1e-6 --max_steps 500 --logging_steps 1 --report_to tensorboard
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from datasets import Dataset
from transformers import HfArgumentParser

from latentx.integrations.trl import LatentGRPOConfig, LatentGRPOTrainer
from latentx.models import load_model
from latentx.tasks import get_task
from latentx.vision import open_image, processor_of, save_tokenizer


@dataclass
class ScriptArguments:
    model: str = field(default="tiny-vl", metadata={"help": "'tiny-vl' or a vision-language model id / directory."})
    task: str = field(default="vcountdown", metadata={"help": "latentx task with images: 'vcountdown' or 'vmath'."})
    task_options: str = field(default='{"min_operands": 2, "max_operands": 3}', metadata={"help": "JSON task options."})
    data_path: str | None = field(default=None, metadata={"help": "problem file for --task vmath."})
    train_size: int = field(default=256, metadata={"help": "number of training problems."})
    task_seed: int = field(default=0, metadata={"help": "seed of the problem generator / sampler."})


def load_policy(script: ScriptArguments, output_dir: str):
    """(model, processor).  tiny-vl is saved once so that TRL can load its reference from a directory."""
    spec = script.model
    if spec == "tiny-vl":
        spec = str(Path(output_dir) / "tiny-vl-init")
        with PartialState().main_process_first():
            if not (Path(spec) / "config.json").exists():
                model, tokenizer = load_model("tiny-vl", seed=0)
                model.save_pretrained(spec)
                save_tokenizer(tokenizer, spec)
    model, tokenizer = load_model(spec)
    processor = processor_of(tokenizer)
    if processor is None:
        raise SystemExit(f"error: model {script.model!r} has no vision tower; use trl_relax.py for text models")
    return model, processor


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, LatentGRPOConfig)).parse_args_into_dataclasses()
    options = json.loads(script.task_options)
    if script.data_path:
        options["path"] = script.data_path
    task = get_task(script.task, **options)
    instances = task.train_instances(script.train_size, seed=script.task_seed)
    by_index = {str(k): inst for k, inst in enumerate(instances)}
    # TRL's multimodal path wants conversational prompts and an image column; the text part is the task's
    # own prompt with its <image> markers removed (the image goes first).
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": inst.prompt.replace("<image>", "")}]}]
                   for inst in instances],
        "image": [open_image(task.images(inst)[0], where=f"problem {inst.id}") for inst in instances],
        "index": list(by_index),
    })

    def reward(completions, index, **kwargs):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [task.reward(by_index[i], text) for i, text in zip(index, texts)]

    model, processor = load_policy(script, args.output_dir)
    trainer = LatentGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                                processing_class=processor)
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
