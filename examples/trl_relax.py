"""Train a policy with ReLaX (or VERL, entropy bonus, KL-Cov) inside TRL's GRPOTrainer.

The task and its verifiable reward come from latentx (``countdown``: reasoning-gym's verifier; ``math``:
problems from a JSONL/Parquet file graded by latentx's math grader).  Every ``GRPOConfig`` option of
TRL and every latentx option (``--latent_objective``, ``--relax_*``, ``--verl_*``, ``--kl_cov_*``) is a
command-line flag; see docs/trl.md.

CPU, built-in tiny model (a smoke run, a few minutes on 2 cores)::

    python examples/trl_relax.py --model tiny --output_dir runs/trl-tiny --use_cpu --bf16 false \\
        --max_steps 4 --per_device_train_batch_size 8 --num_generations 4 --max_completion_length 32 \\
        --relax_m 16 --relax_xi 0.05 --report_to none

The tiny model starts from the cached supervised warm start ``latentx train`` uses (``--warm_start``, on by
default for ``tiny``, ``--warm_start false`` to skip it; the first run computes it, ~2 CPU minutes), so that its
rewards are not all 0.

Plain GRPO with the latent monitor (README "Monitor your GRPO run"; ``--monitor_plot`` draws the curves)::

    python examples/trl_relax.py --model tiny --output_dir runs/trl-monitor --use_cpu --bf16 false \\
        --latent_objective grpo --latent_monitor --latent_monitor_every 1 --verl_stride 4 --relax_m 10 \\
        --max_steps 30 --per_device_train_batch_size 128 --num_generations 8 --max_completion_length 32 \\
        --learning_rate 1e-4 --lr_scheduler_type constant --logging_steps 1 --report_to none \\
        --eval_instances 256 --seed 0 --monitor_plot runs/trl-monitor/monitor.png

It prints the training reward's mean over the first and last ten steps and, with ``--eval_instances``, the
held-out accuracy before and after training (`latentx train`'s evaluation), plus the monitor's share of a step.

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
from latentx.evaluate import headline_metrics, held_out_evaluation
from latentx.models import build_tiny_model, prepare_tokenizer
from latentx.tasks import Task, TaskInstance, get_task
from latentx.warmstart import WarmStartConfig, warm_start


@dataclass
class TaskArguments:
    """The latentx task and its training problems (shared with trl_relax_vl.py)."""

    task: str = field(default="countdown", metadata={"help": "latentx task: 'countdown' or 'math'."})
    task_options: str = field(default="{}", metadata={"help": "JSON object of task options, e.g. '{\"num_operands\": 3}'."})
    data_path: str | None = field(default=None, metadata={"help": "problem file (JSONL / Parquet) for --task math / vmath."})
    train_size: int = field(default=256, metadata={"help": "number of training problems."})
    task_seed: int = field(default=0, metadata={"help": "seed of the problem generator / sampler."})


@dataclass
class ScriptArguments(TaskArguments):
    model: str = field(default="tiny", metadata={"help": "'tiny' (built-in tiny Qwen2) or a Hugging Face id / directory."})
    warm_start: bool | None = field(
        default=None,
        metadata={"help": "start from latentx's cached supervised warm start (the one `latentx train` uses); "
                  "default: on for --model tiny, off otherwise."},
    )
    eval_instances: int = field(
        default=0,
        metadata={"help": "evaluate the policy before and after training on this many held-out problems with "
                  "`latentx train`'s held-out evaluation (greedy Mean@1, Mean@16 / Pass@k, seed 1234; 0 = off)."},
    )
    monitor_plot: str | None = field(
        default=None, metadata={"help": "write a PNG of the latent/ monitor curves beside reward and entropy here."}
    )


def load_task(script: TaskArguments) -> tuple[Task, list[TaskInstance]]:
    """The task named by ``--task`` (with ``--task_options`` and ``--data_path``) and its training problems."""
    options = json.loads(script.task_options)
    if script.data_path:
        options["path"] = script.data_path
    task = get_task(script.task, **options)
    return task, task.train_instances(script.train_size, seed=script.task_seed)


def load_policy(script: ScriptArguments, task: Task, output_dir: str) -> tuple[str, object, dict]:
    """(model path for TRL, tokenizer, warm-start info).  A tiny or warm-started model is saved once so TRL
    can load it (and its reference); the warm start itself comes from latentx's cache (latentx.warmstart)."""
    use_warm_start = script.warm_start if script.warm_start is not None else script.model == "tiny"
    if script.model != "tiny" and not use_warm_start:
        return script.model, prepare_tokenizer(AutoTokenizer.from_pretrained(script.model)), {}
    info: dict = {}
    with PartialState().main_process_first():
        if script.model == "tiny":
            model, tokenizer = build_tiny_model(seed=0)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(script.model)
            tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(script.model))
        name = "tiny-init"
        if use_warm_start:
            model, info = warm_start(model, tokenizer, task, WarmStartConfig(), progress=PartialState().is_main_process)
            name = f"warm-start-{info['key']}"
        path = Path(output_dir) / name
        if not (path / "config.json").exists():
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
    return str(path), tokenizer, info


def build_dataset(task: Task, instances: list[TaskInstance], tokenizer) -> Dataset:
    """One row per problem: the formatted prompt and the index of its instance (passed to the reward)."""
    return Dataset.from_dict(
        {
            "prompt": [task.format_prompt(instance, tokenizer) for instance in instances],
            "instance_index": list(range(len(instances))),
        }
    )


def make_reward(task: Task, instances: list[TaskInstance]):
    """TRL reward function: latentx's verifiable reward of each completion (a string, or for conversational
    prompts the list of messages whose last one is the reply) against its problem (column ``instance_index``)."""

    def task_reward(completions: list, instance_index: list[int], **kwargs) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [task.reward(instances[i], text) for text, i in zip(texts, instance_index)]

    task_reward.__name__ = f"{task.name}_reward"
    return task_reward


def held_out(trainer: LatentGRPOTrainer, task: Task, instances: int, max_new_tokens: int) -> dict:
    """Held-out greedy Mean@1 and sampled Mean@n / Pass@k of the trainer's policy, scored by the task's verifier:
    `latentx train`'s end-of-run evaluation (FinalEvalConfig defaults; the training RNG does not move)."""
    from latentx.trainer import FinalEvalConfig

    ec = FinalEvalConfig(instances=instances)
    model = trainer.accelerator.unwrap_model(trainer.model)
    result = held_out_evaluation(model, trainer.processing_class, task, ec.instances, ec.n, ec.ks, ec.temperature,
                                 ec.seed, max_new_tokens)
    metrics = headline_metrics(result)
    return {key: metrics[key] for key in ("instances", "mean@1_greedy", f"mean@{ec.n}")}


def summarize(trainer: LatentGRPOTrainer) -> dict[str, float]:
    """Mean per-step wall time and latent costs over the logged steps (first step excluded when possible),
    the mean reward of the first and last ten steps, and the monitor's share of the steps it ran on."""
    every = [log for log in trainer.state.log_history if "step_time" in log]
    logs = every[1:] if len(every) > 1 else every
    keys = ["step_time", "reward", "latent/time/extra_forward_s", "latent/time/rollout_signals_s",
            "latent/time/loss_terms_s", "latent/relax/xp", "latent/dsd_mean", "latent/er_mean"]
    out = {key: statistics.fmean(log[key] for log in logs if log.get(key) is not None)
           for key in keys if any(log.get(key) is not None for log in logs)}
    if len(every) >= 20:  # the training reward's 10-step moving average at the start and at the end
        out["reward_first10"] = statistics.fmean(log["reward"] for log in every[:10])
        out["reward_last10"] = statistics.fmean(log["reward"] for log in every[-10:])
    # The monitor's cost on the steps it ran (the dictionary-fit step excluded; it is reported apart).
    monitored = [log for log in logs if "latent/time/monitor_signals_s" in log]
    if monitored:
        cost = [log["latent/time/monitor_signals_s"] for log in monitored]
        out["monitor/steps"] = len(monitored)
        out["monitor/seconds_per_monitored_step"] = statistics.fmean(cost)
        out["monitor/share_of_step"] = statistics.fmean(c / log["step_time"] for c, log in zip(cost, monitored))
    return out


def plot_monitor(log_history: list[dict], path: str) -> None:
    """reward, token entropy and the monitor's ER / ERV / ERA / DSD (median and 10-90 % band) per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [log for log in log_history if "step_time" in log]
    panels = [("reward", "reward (mean)", None), ("entropy", "token entropy", "latent/entropy"),
              ("er", "effective rank ER", "latent/er"), ("erv", "ER velocity", "latent/erv"),
              ("era", "ER acceleration", "latent/era"), ("dsd", "DSD (Koopman)", "latent/dsd")]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6), sharex=True)
    for ax, (_, title, prefix) in zip(axes.flat, panels):
        if prefix is None:
            steps = [log["step"] for log in logs]
            rewards = [log["reward"] for log in logs]
            ax.plot(steps, rewards, color="tab:green", lw=0.8, alpha=0.6, label="per step")
            if len(rewards) >= 10:  # the 10-step moving average the README quotes
                average = [statistics.fmean(rewards[i - 9 : i + 1]) for i in range(9, len(rewards))]
                ax.plot(steps[9:], average, color="tab:green", lw=2, label="10-step mean")
                ax.legend(fontsize=8, loc="best")
        else:
            rows = [log for log in logs if f"{prefix}_q50" in log]
            steps = [log["step"] for log in rows]
            ax.fill_between(steps, [log[f"{prefix}_q10"] for log in rows], [log[f"{prefix}_q90"] for log in rows],
                            alpha=0.25, label="10-90 %")
            ax.plot(steps, [log[f"{prefix}_q50"] for log in rows], label="median")
            corr = [log.get(f"{prefix}_reward_corr") for log in rows]
            if any(c is not None for c in corr):
                twin = ax.twinx()
                twin.plot(steps, [float("nan") if c is None else c for c in corr], color="tab:red", lw=0.8, ls=":")
                twin.set_ylim(-1, 1)
                twin.set_ylabel("corr. with reward", color="tab:red", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes.flat[1].legend(fontsize=8, loc="best")
    fig.suptitle("TRL GRPO on countdown (tiny model, CPU) with latent_monitor: latent/ curves beside reward")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, LatentGRPOConfig)).parse_args_into_dataclasses()
    task, instances = load_task(script)
    model_path, tokenizer, warm_info = load_policy(script, task, args.output_dir)
    trainer = LatentGRPOTrainer(
        model=model_path,
        reward_funcs=make_reward(task, instances),
        args=args,
        train_dataset=build_dataset(task, instances, tokenizer),
        processing_class=tokenizer,
    )
    evaluate = script.eval_instances > 0 and trainer.accelerator.is_main_process
    before = held_out(trainer, task, script.eval_instances, args.max_completion_length) if evaluate else None
    trainer.train()
    after = held_out(trainer, task, script.eval_instances, args.max_completion_length) if evaluate else None
    trainer.save_model(args.output_dir)
    trainer.save_latent_state(args.output_dir)
    if trainer.accelerator.is_main_process:
        summary = {"latent_objective": args.latent_objective, "warm_start_cache_hit": warm_info.get("cache_hit"),
                   **summarize(trainer)}
        if before is not None:
            summary["held_out_before"], summary["held_out_after"] = before, after
        print(json.dumps(summary, indent=2))
        Path(args.output_dir, "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        if script.monitor_plot:
            plot_monitor(trainer.state.log_history, script.monitor_plot)


if __name__ == "__main__":
    main()
