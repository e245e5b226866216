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

from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from datasets import Dataset
from transformers import HfArgumentParser
from trl_relax import TaskArguments, load_task, make_reward  # the text example beside this file

from latentx.integrations.trl import LatentGRPOConfig, LatentGRPOTrainer
from latentx.models import load_model
from latentx.vision import open_image, processor_of, save_tokenizer, vision_content


@dataclass
class ScriptArguments(TaskArguments):
    """trl_relax.py's task arguments with vision defaults, and a vision-language model."""

    task: str = field(default="vcountdown", metadata={"help": "latentx task with images: 'vcountdown' or 'vmath'."})
    task_options: str = field(default='{"min_operands": 2, "max_operands": 3}', metadata={"help": "JSON task options."})
    model: str = field(default="tiny-vl", metadata={"help": "'tiny-vl' or a vision-language model id / directory."})


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


def trl_vision_rows(task, instances) -> dict[str, list]:
    """TRL's multimodal dataset columns: conversational ``prompt`` turns with an image part at each of the
    problem's ``<image>`` markers (all images first when it has none) and the ``images`` list column that
    TRL fills them from, in order; any number of images per problem."""
    prompts, images = [], []
    for inst in instances:
        refs = task.images(inst)
        where = f"problem {inst.id}"
        prompts.append([{"role": "user", "content": vision_content(inst.prompt, len(refs), where)}])
        images.append([open_image(ref, where=where) for ref in refs])
    return {"prompt": prompts, "images": images}


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, LatentGRPOConfig)).parse_args_into_dataclasses()
    task, instances = load_task(script)
    dataset = Dataset.from_dict(trl_vision_rows(task, instances) | {"instance_index": list(range(len(instances)))})
    model, processor = load_policy(script, args.output_dir)
    trainer = LatentGRPOTrainer(model=model, reward_funcs=make_reward(task, instances), args=args,
                                train_dataset=dataset, processing_class=processor)
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
