"""Step time of every objective against GRPO on the SAME replayed rollout batches, with repeats, as ratios.

    .venv/bin/python bench/train_overhead.py [--steps 5] [--warmup 1] [--repeats 3] [--set key=value ...]
        [--objectives grpo,relax,relax-quantile,verl,...] [--shape 0.5b|1.5b] [--force-length 1024]

Why replayed: when each objective samples its own rollouts the responses differ in length and the ratio
swings from run to run (0.92x-1.39x before issue 17).  Here the rollout batches are sampled ONCE (from the
same starting policy, the demo configuration unless ``--set`` says otherwise) and every objective's trainer
gets exactly those batches back from ``sample_responses``; what is timed is the rest of the step (no-grad
forward, signals, advantages, reference forward if any, update).  Each objective runs ``--repeats`` times,
interleaved; the table gives the median over repeats of the per-run median step time, the ratio to GRPO's
and its spread (min-max over repeats of the ratio of paired runs).  ``full step x`` adds the recorded
generation time (the same for every objective) to both sides.

Variants: ``relax`` = paper preset (ξ = 25: the KL set is empty, no reference forward), ``relax-quantile`` =
``relax.xi_mode=quantile relax.xi=0.1`` (β term active on the top 10 % of DSD), ``relax-authors`` =
``relax.preset=authors``.  The GRPO baseline computes no latent signal (``signals.monitor=false``).

``--shape 0.5b|1.5b`` builds a Qwen2.5-0.5B / 1.5B-shaped policy (hidden size, layers, heads, MLP of the
published configs; random weights, latentx's character vocabulary) instead of the tiny model, and
``--force-length L`` replaces the sampled responses by random tokens of exactly L positions (no EOS): the
GPU measurement of bench/gpu.sh.  Quality bar (issue 17): relax (paper, empty KL set) <= 1.10x grpo.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import latentx.trainer as trainer_module
from latentx.config import apply_overrides
from latentx.rollout import Sequences
from latentx.trainer import TrainConfig, Trainer, resolve_config

VARIANTS = {
    "grpo": ["objective=grpo"],
    "relax": ["objective=relax"],
    "relax-quantile": ["objective=relax", "relax.xi_mode=quantile", "relax.xi=0.1"],
    "relax-authors": ["objective=relax", "relax.preset=authors", "rollout.dynamic_sampling=false"],
    "verl": ["objective=verl"],
    "entropy_bonus": ["objective=entropy_bonus"],
    "kl_cov": ["objective=kl_cov"],
    "clip_cov": ["objective=clip_cov"],
}

#: Qwen2.5 published shapes (hidden, layers, heads, kv heads, MLP); the vocabulary stays latentx's.
SHAPES = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960),
    "tiny-dry": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=64),
}


def build_shaped(shape: str, root: Path, max_positions: int) -> str:
    from latentx.models import build_tiny_model

    model, tokenizer = build_tiny_model(seed=0, max_position_embeddings=max_positions, **SHAPES[shape])
    out = root / f"policy-{shape}"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


class Replay:
    """Stands in for ``latentx.trainer.sample_responses``: records batches on the first pass, replays after."""

    def __init__(self, real, force_length: int = 0) -> None:
        self.real, self.force_length = real, force_length
        self.recorded: list[tuple[Sequences, float]] = []
        self.recording = True
        self.position = 0

    def __call__(self, model, tokenizer, prompts, samples_per_prompt, max_new_tokens, **kwargs):
        if self.recording:
            start = time.perf_counter()
            seqs = self.real(model, tokenizer, prompts, samples_per_prompt, max_new_tokens, **kwargs)
            if self.force_length:
                seqs = self._forced(seqs, tokenizer, self.force_length)
            self.recorded.append((seqs, time.perf_counter() - start))
            return seqs
        seqs = self.recorded[self.position % len(self.recorded)][0]
        self.position += 1
        return seqs

    @staticmethod
    def _forced(seqs: Sequences, tokenizer, length: int) -> Sequences:
        n, p = seqs.input_ids.shape[0], seqs.prompt_length
        g = torch.Generator().manual_seed(n)
        ids = torch.randint(4, len(tokenizer), (n, length), generator=g)
        return Sequences(
            input_ids=torch.cat([seqs.input_ids[:, :p].cpu(), ids], 1),
            attention_mask=torch.cat([seqs.attention_mask[:, :p].cpu(), torch.ones(n, length, dtype=torch.long)], 1),
            prompt_length=p, response_mask=torch.ones(n, length, dtype=torch.bool),
            texts=tokenizer.batch_decode(ids, skip_special_tokens=True),
        )

    def rewind(self) -> None:
        self.recording, self.position = False, 0


def run(variant: str, steps: int, root: str, base: list[str], replay: Replay, record: bool = False) -> list[dict]:
    cfg = apply_overrides(
        TrainConfig(),
        [*base, *VARIANTS[variant], f"steps={steps}", f"out={root}/{variant}-{time.monotonic_ns()}",
         "eval.enabled=false", "signals.monitor=false", f"checkpoint_every={10**6}"],
    )
    trainer = Trainer(resolve_config(cfg), progress=False, log=lambda *a: None)
    if not record:
        replay.rewind()
    return [trainer.train_step() for _ in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps (ReLaX's dictionary fit)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--objectives", default="grpo,relax,relax-quantile,verl")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--force-length", type=int, default=0)
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra config overrides")
    parser.add_argument("--diagnose", action="store_true",
                        help="after timing, one untimed run per relax variant with diagnostics.term_grads_every=1: "
                        "DSD range, |I|, per-term gradient shares on the same batches")
    args = parser.parse_args()
    variants = args.objectives.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--objectives: unknown {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    if "grpo" not in variants:
        variants = ["grpo", *variants]
    total = args.steps + args.warmup
    replay = Replay(trainer_module.sample_responses, args.force_length)
    trainer_module.sample_responses = replay
    with tempfile.TemporaryDirectory() as root:
        base = list(args.extra)
        if args.force_length:
            base.append(f"rollout.max_new_tokens={args.force_length}")
        if args.shape:
            base += [f"model.name={build_shaped(args.shape, Path(root), args.force_length + 512)}", "warm_start.enabled=false"]
        else:  # warm-start once (cached on disk), then every run starts from that policy
            first = Trainer(resolve_config(apply_overrides(TrainConfig(), [*base, f"out={root}/warm", "eval.enabled=false"])),
                            progress=False, log=lambda *a: None)
            first.model.save_pretrained(Path(root) / "policy")
            first.tokenizer.save_pretrained(Path(root) / "policy")
            base += [f"model.name={root}/policy", "warm_start.enabled=false"]
        # Record the rollout batches once (GRPO run), then replay them to every variant.
        run("grpo", total, root, base, replay, record=True)
        generate = statistics.median(t for _, t in replay.recorded[args.warmup:])
        times: dict[str, list[float]] = {v: [] for v in variants}
        rows_by: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            for v in variants:
                rows = run(v, total, root, base, replay)[args.warmup:]
                times[v].append(statistics.median(r["time_step"] - r["time_generate"] for r in rows))
                rows_by[v].extend(rows)
        diagnosed: dict[str, list[dict]] = {}
        if args.diagnose:
            for v in variants:
                if v.startswith("relax"):
                    VARIANTS[f"{v}+grads"] = [*VARIANTS[v], "diagnostics.term_grads_every=1"]
                    diagnosed[v] = run(f"{v}+grads", total, root, base, replay)[args.warmup:]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"replayed rollouts: {len(replay.recorded)} batches; {args.repeats} repeats x {args.steps} timed steps "
          f"(+{args.warmup} warm-up); device {device}; torch threads {torch.get_num_threads()}; "
          f"recorded generation {generate:.3f} s/step")
    print(f"{'objective':<15} {'step s (no gen)':>15} {'vs grpo':>8} {'spread':>13} {'full step x':>11} {'|I| mean':>9} {'ref rows':>9}")
    base_t = times["grpo"]
    for v in variants:
        ratios = [a / b for a, b in zip(times[v], base_t)]
        med = statistics.median(times[v])
        full = (med + generate) / (statistics.median(base_t) + generate)
        kl = [r.get("kl_set_size", 0.0) for r in rows_by[v]]
        ref = [r.get("reference_rows", 0.0) for r in rows_by[v]]
        print(f"{v:<15} {med:>15.3f} {statistics.median(ratios):>7.3f}x {min(ratios):>6.3f}-{max(ratios):<6.3f} "
              f"{full:>10.3f}x {statistics.mean(kl):>9.1f} {statistics.mean(ref):>9.1f}")
    if diagnosed:
        print(f"\n{'variant':<15} {'DSD min':>9} {'DSD q50':>9} {'DSD max':>9} {'xi used':>9} {'|I|':>6} "
              f"{'share pg':>9} {'share xp':>9} {'share kl':>9} {'cos(xp,pg)':>10}")
        for v, rows in diagnosed.items():
            def m(key):
                return statistics.mean(r.get(key, 0.0) for r in rows)
            print(f"{v:<15} {min(r['dsd_min'] for r in rows):>9.4g} {m('dsd_q50'):>9.4g} {max(r['dsd_max'] for r in rows):>9.4g} "
                  f"{m('xi_used'):>9.4g} {m('kl_set_size'):>6.1f} {m('grad_share/pg'):>9.3f} {m('grad_share/xp'):>9.3f} "
                  f"{m('grad_share/kl'):>9.3f} {m('grad_cos_pg/xp'):>10.3f}")


if __name__ == "__main__":
    main()
