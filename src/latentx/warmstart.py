"""The warm start: a short supervised phase on task solutions before RL, cached on disk.

RL from verifiable rewards needs a policy that succeeds *sometimes*: a randomly initialised tiny model
never does (no reward signal), a fully trained one always does (nothing to explore).  ``warm_start``
fine-tunes the policy for a few hundred AdamW steps on ``prompt + solution + eos`` sequences (loss on the
solution tokens only), with solutions re-drawn among the task's several correct ones at every step.

The result is cached in ``<cache>/warmstart/<key>/`` (``$LATENTX_CACHE_DIR``, else
``$XDG_CACHE_HOME/latentx``, else ``~/.cache/latentx``); the key hashes the initial weights, the
tokenizer, the task's configuration and the SFT hyper-parameters, so repeated runs and study seeds that
start from the same policy reuse it.  The cache entry is written to a temporary directory and renamed
into place, so an interrupted run never leaves a half-written entry.

``python -m latentx.warmstart`` runs the default warm start of the tiny model on countdown and reports
Mean@8 / Pass@8 on held-out prompts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as load_safetensors_into
from safetensors.torch import save_model as save_safetensors

from latentx.models import latentx_cache_dir
from latentx.tasks.base import Task, TaskInstance

__all__ = ["WarmStartConfig", "warm_start", "warm_start_key", "task_fingerprint", "sample_accuracy", "solution_nll"]

_CACHE_FORMAT = 1  # bump when the SFT procedure changes, so old cache entries are not reused


@dataclass
class WarmStartConfig:
    """Supervised warm start before RL.

    Defaults are tuned for the tiny model on 3-number countdown: ~15 % Mean@8 / ~60 % Pass@8 on held-out
    prompts after ~120 CPU seconds (1500 steps: ~6 % Mean@8; 1000 steps: ~1 %)."""

    enabled: bool = True
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    num_examples: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_examples", "warmup_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"warm_start.{name} must be an integer, got {value!r}")
        if self.steps < 1:
            raise ValueError(f"warm_start.steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"warm_start.batch_size must be >= 1, got {self.batch_size}")
        if self.num_examples < 1:
            raise ValueError(f"warm_start.num_examples must be >= 1, got {self.num_examples}")
        if self.warmup_steps < 0:
            raise ValueError(f"warm_start.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"warm_start.lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"warm_start.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"warm_start.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if not self.grad_clip > 0:
            raise ValueError(f"warm_start.grad_clip must be > 0, got {self.grad_clip!r}")

    def sft_hyperparameters(self) -> dict[str, Any]:
        """Everything that changes the SFT result (``enabled`` does not)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "enabled"}


# --------------------------------------------------------------------------------------------------
# cache key
# --------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
    return None  # not part of the identity (e.g. cached data, verifier objects)


def task_fingerprint(task: Task) -> dict[str, Any]:
    """A JSON description of a task's configuration: its name, class and simple attributes / options."""
    attributes = {k: _jsonable(v) for k, v in vars(task).items() if not k.startswith("_")}
    attributes = {k: v for k, v in attributes.items() if v is not None and k not in ("pools", "items")}
    return {"name": task.name, "class": f"{type(task).__module__}.{type(task).__qualname__}", "attributes": attributes}


def _weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def warm_start_key(model, tokenizer, task: Task, cfg: WarmStartConfig) -> tuple[str, dict[str, Any]]:
    """``(key, description)``: the cache key hashes the initial weights (which pins the model spec and,
    for the tiny model, its config and seed), the tokenizer's vocabulary, the task and the SFT settings."""
    description = {
        "format": _CACHE_FORMAT,
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "model_config": _jsonable(model.config.to_dict()),
        "weights_sha256": _weights_digest(model),
        "tokenizer_sha256": hashlib.sha256(
            json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
            + str(tokenizer.eos_token).encode()
        ).hexdigest(),
        "task": task_fingerprint(task),
        "sft": cfg.sft_hyperparameters(),
    }
    description["model_config"].pop("_name_or_path", None)
    description["model_config"].pop("transformers_version", None)
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]
    return key, description


# --------------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------------


def _encode_prompt(tokenizer, prompt: str, images=None) -> tuple[list[int], tuple | None]:
    """``(prompt_ids, vision)``: ``vision`` is a VLM prompt's extra inputs (:func:`latentx.vision.encode_one`)."""
    if images:
        from latentx.vision import encode_one

        return encode_one(tokenizer, prompt, images)
    return tokenizer(prompt).input_ids, None


def _encode_example(tokenizer, prompt: str | tuple, solution: str, images=None) -> tuple[list[int], list[int], tuple | None]:
    """``(ids, labels, vision)`` of ``prompt + solution + eos``; ``prompt`` may be pre-encoded (``_encode_prompt``)."""
    prompt_ids, vision = prompt if isinstance(prompt, tuple) else _encode_prompt(tokenizer, prompt, images)
    answer_ids = tokenizer(solution, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids, vision


def _collate(examples: list[tuple[list[int], list[int], tuple | None]], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    vision_rows: dict[str, list] = {}
    token_types: dict[str, torch.Tensor] = {}
    for row, (ids, target, vision) in enumerate(examples):  # right padding: positions start at 0 for every row
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(target)
        attention[row, : len(ids)] = 1
        if vision is not None:  # a VLM prompt: its vision tensors, and its per-token fields (0 elsewhere)
            from latentx.vision import TOKEN_FIELDS

            for key, value in vision.items():
                if key in TOKEN_FIELDS:
                    types = token_types.setdefault(key, torch.zeros((len(examples), width), dtype=value.dtype))
                    types[row, : value.shape[-1]] = value[0]
                else:
                    vision_rows.setdefault(key, []).append(value)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention, **token_types}
    batch.update({k: torch.cat(v) for k, v in vision_rows.items()})
    return {k: v.to(device) for k, v in batch.items()}


def _lr_at(step: int, cfg: WarmStartConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def _sft(model, tokenizer, task: Task, cfg: WarmStartConfig, progress: bool) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    instances = task.train_instances(cfg.num_examples, seed=cfg.seed)
    prompts = [task.format_prompt(inst, tokenizer) for inst in instances]
    images = [task.images(inst) for inst in instances]
    encoded: dict[int, tuple] = {}
    rng = random.Random(cfg.seed)
    if task.solution(instances[0], random.Random(0)) is None:
        raise ValueError(
            f"task {task.name!r} provides no solutions, so it cannot be warm-started; set warm_start.enabled=false"
        )
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    losses: list[float] = []
    columns = [TextColumn("[bold]warm start"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with torch.random.fork_rng(devices=[]), Progress(*columns, disable=not progress, transient=False) as bar:
        torch.manual_seed(cfg.seed)
        bar_id = bar.add_task("sft", total=cfg.steps, loss="-")
        for step in range(cfg.steps):
            batch = []
            for index in (rng.randrange(len(instances)) for _ in range(cfg.batch_size)):
                solution = task.solution(instances[index], rng)  # a fresh draw among the correct solutions
                if solution is None:
                    raise ValueError(f"task {task.name!r} has no solution for instance {instances[index].id}")
                if index not in encoded:  # the processor runs once per prompt (images are the slow part)
                    encoded[index] = _encode_prompt(tokenizer, prompts[index], images[index])
                batch.append(_encode_example(tokenizer, encoded[index], solution))
            inputs = _collate(batch, tokenizer.pad_token_id, device)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, cfg)
            loss = model(**inputs, use_cache=False).loss
            if not torch.isfinite(loss):
                raise ValueError(f"warm start diverged at step {step} (loss {loss.item()}); lower warm_start.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            bar.update(bar_id, advance=1, loss=f"{losses[-1]:.3f}")
    model.eval()
    tail = losses[-max(1, min(20, len(losses) // 10)):]
    return {"steps": cfg.steps, "final_loss": sum(tail) / len(tail), "first_loss": losses[0]}


def warm_start(
    model, tokenizer, task: Task, cfg: WarmStartConfig, cache: bool = True, progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Fine-tune ``model`` in place on ``task`` solutions (or load the cached result) and return
    ``(model, info)``.  ``info``: ``cache_path``, ``cache_hit``, ``steps``, ``final_loss``,
    ``sft_time_s`` (of the SFT that produced the weights), ``wall_time_s`` (of this call), ``key``.
    With ``cfg.enabled`` false the model is returned untouched and ``info == {"enabled": False}``."""
    if not cfg.enabled:
        return model, {"enabled": False}
    start = time.perf_counter()
    key, description = warm_start_key(model, tokenizer, task, cfg)
    root = Path(cache_dir) if cache_dir is not None else latentx_cache_dir()
    entry = root / "warmstart" / key
    weights, info_file = entry / "weights.safetensors", entry / "info.json"
    if cache and weights.is_file() and info_file.is_file():
        load_safetensors_into(model, str(weights), strict=True)
        model.eval()
        info = json.loads(info_file.read_text())
        info.update(cache_hit=True, cache_path=str(entry), wall_time_s=time.perf_counter() - start)
        return model, info

    sft_start, sft_cpu_start = time.perf_counter(), time.process_time()
    result = _sft(model, tokenizer, task, cfg, progress)
    info = {"enabled": True, "key": key, **result, "sft_time_s": time.perf_counter() - sft_start,
            "sft_cpu_time_s": time.process_time() - sft_cpu_start,
            "task": task.name, "model": description["model"], "sft": description["sft"]}
    if cache:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=entry.parent))
        try:
            save_safetensors(model, str(tmp / "weights.safetensors"))
            (tmp / "info.json").write_text(json.dumps(info, indent=2))
            (tmp / "key.json").write_text(json.dumps(description, indent=2))
            try:
                os.rename(tmp, entry)
            except OSError:  # another process finished the same warm start first: keep theirs
                if not weights.is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    info.update(cache_hit=False, cache_path=str(entry) if cache else None, wall_time_s=time.perf_counter() - start)
    return model, info


# --------------------------------------------------------------------------------------------------
# measuring where RL starts
# --------------------------------------------------------------------------------------------------


def sample_accuracy(
    model, tokenizer, task: Task, instances: list[TaskInstance], k: int = 8, temperature: float = 1.0,
    max_new_tokens: int = 32, batch_size: int = 256, seed: int = 0,
) -> dict[str, float]:
    """Sample ``k`` responses per instance (the one evaluator, full distribution at ``temperature``) and
    return ``mean_at_k`` (fraction of correct samples) and ``pass_at_k`` (fraction of instances with at
    least one correct sample)."""
    from latentx.evaluate import SamplingSettings, evaluate_task

    if k < 1 or not instances:
        raise ValueError("sample_accuracy needs k >= 1 and at least one instance")
    settings = SamplingSettings(n=k, temperature=temperature, max_new_tokens=max_new_tokens, ks=(k,))
    result = evaluate_task(model, tokenizer, task, instances, settings, batch_size=batch_size, seed=seed,
                           benchmark="warm_start")
    return {
        "mean_at_k": result.metrics[f"mean@{k}"],
        "pass_at_k": result.metrics[f"pass@{k}"],
        "k": k,
        "instances": len(instances),
    }


def solution_nll(
    model, tokenizer, task: Task, instances: list[TaskInstance], seed: int = 0, upto: str | None = None,
    batch_size: int = 64,
) -> float:
    """Mean per-token negative log-likelihood (nats) of ``task``'s solutions on ``instances``, teacher-forced:
    the warm start's own encoding (``prompt + solution + eos``, the task's images included) and forward,
    without gradients, i.e. the SFT loss measured on held-out instances.  One solution per instance is drawn
    with ``random.Random(seed)``.  ``upto`` scores only the solution's tokens up to and including its first
    ``upto`` (``"|"``: vcountdown's transcription of the image)."""
    if not instances:
        raise ValueError("solution_nll needs at least one instance")
    if batch_size < 1:
        raise ValueError(f"solution_nll: batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    examples = []
    for inst in instances:
        solution = task.solution(inst, rng)
        if solution is None:
            raise ValueError(f"task {task.name!r} has no solution for instance {inst.id}")
        ids, labels, vision = _encode_example(tokenizer, task.format_prompt(inst, tokenizer), solution, task.images(inst))
        if upto is not None:
            if upto not in solution:
                raise ValueError(f"solution_nll: the solution of instance {inst.id} ({solution!r}) has no {upto!r}")
            head = tokenizer(solution[: solution.index(upto) + len(upto)], add_special_tokens=False).input_ids
            start = next(i for i, t in enumerate(labels) if t != -100)
            if ids[start: start + len(head)] != head:
                raise ValueError(f"solution_nll: {upto!r} is not a token boundary of {solution!r} for this tokenizer")
            labels = labels[: start + len(head)] + [-100] * (len(labels) - start - len(head))
        examples.append((ids, labels, vision))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for first in range(0, len(examples), batch_size):
                inputs = _collate(examples[first: first + batch_size], tokenizer.pad_token_id, device)
                labels = inputs.pop("labels")[:, 1:]
                logits = model(**inputs, use_cache=False).logits[:, :-1].float()
                total += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
                ).item()
                count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return total / count


def _main() -> None:  # pragma: no cover - a measurement entry point, exercised by hand
    import argparse

    from latentx.models import load_model
    from latentx.tasks import get_task

    parser = argparse.ArgumentParser(description="Warm-start the tiny model and report Mean@k / Pass@k.")
    parser.add_argument("--steps", type=int, default=WarmStartConfig.steps)
    parser.add_argument("--lr", type=float, default=WarmStartConfig.lr)
    parser.add_argument("--batch-size", type=int, default=WarmStartConfig.batch_size)
    parser.add_argument("--model-seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--no-cache", action="store_true")
    args = parser.parse_args()
    model, tokenizer = load_model("tiny", seed=args.model_seed)
    task = get_task("countdown")
    cfg = WarmStartConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size)
    model, info = warm_start(model, tokenizer, task, cfg, cache=not args.no_cache)
    start = time.perf_counter()
    scores = sample_accuracy(model, tokenizer, task, task.eval_instances(args.prompts, seed=0), k=args.k)
    print(json.dumps({"warm_start": info, "eval": scores, "eval_time_s": time.perf_counter() - start}, indent=2))


if __name__ == "__main__":  # pragma: no cover
    _main()
