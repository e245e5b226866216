"""Train a policy with ReLaX (or VERL, entropy bonus, KL-Cov) inside TRL's GRPOTrainer.

The task and its verifiable reward come from latentx (``countdown``: reasoning-gym's verifier; ``math``:
problems from a JSONL/Parquet file graded by latentx's math grader).  Every ``GRPOConfig`` option of
TRL and every latentx option (``--latent_objective``, ``--relax_*``, ``--verl_*``, ``--kl_cov_*``) is a
command-line flag; see docs/trl.md.

CPU, built-in tiny model (a smoke run, a few minutes on 2 cores)::

    python examples/trl_relax.py --model tiny --output_dir runs/trl-tiny --use_cpu --bf16 false \\
        --max_steps 4 --per_device_train_batch_size 8 --num_generations 4 --max_completion_length 32 \\
        --relax_m 16 --relax_xi 0.05 --report_to none

GPUs, a Hugging Face model, vLLM generation colocated with training::

    accelerate launch --num_processes 8 examples/trl_relax.py --model Qwen/Qwen2.5-3B-Instruct \\
        --task countdown --task_options '{"prompt_style": "question"}' --output_dir runs/trl-relax \\
        --use_vllm --vllm_mode colocate --bf16 --gradient_checkpointing \\
        --per_device_train_batch_size 8 --num_generations 8 --max_completion_length 1024 \\
        --learning_rate 1e-6 --max_steps 500 --logging_steps 1 --report_to tensorboard
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from datasets import Dataset
from transformers import AutoTokenizer, HfArgumentParser

from latentx.integrations.trl import LatentGRPOConfig, LatentGRPOTrainer
from latentx.models import build_tiny_model, prepare_tokenizer
from latentx.tasks import Task, TaskInstance, get_task


@dataclass
class ScriptArguments:
    model: str = field(default="tiny", metadata={"help": "'tiny' (built-in tiny Qwen2) or a Hugging Face id / directory."})
    task: str = field(default="countdown", metadata={"help": "latentx task: 'countdown' or 'math'."})
    task_options: str = field(default="{}", metadata={"help": "JSON object of task options, e.g. '{\"num_operands\": 3}'."})
    data_path: str | None = field(default=None, metadata={"help": "problem file (JSONL / Parquet) for --task math."})
    train_size: int = field(default=256, metadata={"help": "number of training problems."})
    task_seed: int = field(default=0, metadata={"help": "seed of the problem generator / sampler."})


def load_policy(script: ScriptArguments, output_dir: str) -> tuple[str, object]:
    """(model path for TRL, tokenizer).  The tiny model is saved once so TRL can load it (and its reference)."""
    if script.model != "tiny":
        return script.model, prepare_tokenizer(AutoTokenizer.from_pretrained(script.model))
    path = Path(output_dir) / "tiny-init"
    model, tokenizer = build_tiny_model(seed=0)
    with PartialState().main_process_first():
        if not (path / "config.json").exists():
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
    return str(path), tokenizer


def build_dataset(task: Task, instances: list[TaskInstance], tokenizer) -> Dataset:
    """One row per problem: the formatted prompt and the index of its instance (passed to the reward)."""
    return Dataset.from_dict(
        {
            "prompt": [task.format_prompt(instance, tokenizer) for instance in instances],
            "instance_index": list(range(len(instances))),
        }
    )


def make_reward(task: Task, instances: list[TaskInstance]):
    """TRL reward function: latentx's verifiable reward of each completion against its problem."""

    def task_reward(completions: list[str], instance_index: list[int], **kwargs) -> list[float]:
        return [task.reward(instances[i], completion) for completion, i in zip(completions, instance_index)]

    task_reward.__name__ = f"{task.name}_reward"
    return task_reward


def summarize(trainer: LatentGRPOTrainer) -> dict[str, float]:
    """Mean per-step wall time and latent costs over the logged steps (first step excluded when possible)."""
    logs = [log for log in trainer.state.log_history if "step_time" in log]
    logs = logs[1:] if len(logs) > 1 else logs
    keys = ["step_time", "reward", "latent/time/extra_forward_s", "latent/time/rollout_signals_s",
            "latent/time/loss_terms_s", "latent/relax/xp", "latent/dsd_mean", "latent/er_mean"]
    return {key: statistics.fmean(log[key] for log in logs if log.get(key) is not None)
            for key in keys if any(log.get(key) is not None for log in logs)}


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, LatentGRPOConfig)).parse_args_into_dataclasses()
    options = json.loads(script.task_options)
    if script.data_path is not None:
        options["path"] = script.data_path
    task = get_task(script.task, **options)
    model_path, tokenizer = load_policy(script, args.output_dir)
    instances = task.train_instances(script.train_size, seed=script.task_seed)
    trainer = LatentGRPOTrainer(
        model=model_path,
        reward_funcs=make_reward(task, instances),
        args=args,
        train_dataset=build_dataset(task, instances, tokenizer),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    trainer.save_latent_state(args.output_dir)
    if trainer.accelerator.is_main_process:
        print(json.dumps({"latent_objective": args.latent_objective, **summarize(trainer)}, indent=2))


if __name__ == "__main__":
    main()
