"""Benchmark of the lean ``policy_forward`` against the plain forward it replaced, in the same run.

    .venv/bin/python bench/forward.py [--quick] [--device cuda] [--reps 3]

``latentx.rollout.policy_forward`` reads the backbone's last hidden state through a forward hook and runs
the LM head on the response positions only; ``policy_forward_reference`` asks for every layer's hidden
states and full-sequence logits and slices them afterwards.  For each model configuration and for the two
ways the trainer calls it (``no_grad``: the rollout's scoring forward; ``grad``: forward + backward of a
loss on log-probs, entropies and hidden states, as in a ReLaX update) it prints the peak memory and the
median time of both, and the ratios reference / lean.

Configurations: the built-in ``tiny`` model (as in the demo: prompt 16 + response 32 tokens, batch 64)
and a wider Qwen2 built from a config (hidden 896 like Qwen2.5-0.5B, vocabulary 50,000, 2 layers,
sequence 1,024 = prompt 64 + response 960, batch 2).  Each measurement runs in its own fresh process
(spawn): on CPU the peak is the growth of the process's maximum resident set size during the call
(``ru_maxrss``), on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time

CONFIGS = {
    # name: (model options, batch, prompt tokens, response tokens)
    "tiny": ({"tiny": True}, 64, 16, 32),
    "wide": ({"hidden_size": 896, "vocab_size": 50_000, "num_hidden_layers": 2, "num_attention_heads": 14,
              "num_key_value_heads": 2, "intermediate_size": 2432}, 2, 64, 960),
}


def _build(options: dict, device: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if options.get("tiny"):
        from latentx.models import build_tiny_model

        model, _ = build_tiny_model(seed=0)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = Qwen2ForCausalLM(Qwen2Config(**options, max_position_embeddings=4096, tie_word_embeddings=True))
    return model.to(device).float()


def _sequences(vocab: int, batch: int, prompt: int, response: int, device: str):
    import torch

    from latentx.rollout import Sequences

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, prompt + response), generator=g)
    lengths = torch.randint(response // 2, response + 1, (batch,), generator=g)
    lengths[0] = response
    response_mask = torch.arange(response)[None, :] < lengths[:, None]
    attention = torch.cat([torch.ones(batch, prompt, dtype=torch.long), response_mask.long()], dim=1)
    return Sequences(ids, attention, prompt, response_mask).to(device)


def _measure(name: str, variant: str, mode: str, device: str, reps: int, queue) -> None:
    import torch

    torch.set_num_threads(1)
    from latentx.rollout import policy_forward, policy_forward_reference

    options, batch, prompt, response = CONFIGS[name]
    model = _build(options, device)
    seqs = _sequences(model.config.vocab_size, batch, prompt, response, device)
    forward = policy_forward if variant == "lean" else policy_forward_reference
    mask = seqs.response_mask

    def call() -> None:
        if mode == "no_grad":
            with torch.no_grad():
                forward(model, seqs, want_hidden=True, want_entropy=True)
        else:
            out = forward(model, seqs, want_hidden=True, want_entropy=True)
            (out.logp[mask].sum() + out.entropy[mask].sum() + out.hidden[mask].pow(2).mean()).backward()
            model.zero_grad(set_to_none=True)

    cuda = device.startswith("cuda")
    if cuda:
        call()  # warm-up: kernels and allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # a warm-up would already set the process's high-water mark: measure the first call
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    call()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = [time.perf_counter() - start]
    for _ in range(reps - 1):
        start = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    queue.put((peak, statistics.median(times)))


def run_case(name: str, variant: str, mode: str, device: str, reps: int) -> tuple[float, float]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(name, variant, mode, device, reps, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per case (median)")
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    args = parser.parse_args()
    names = ["tiny"] if args.quick else list(CONFIGS)
    print(f"device {args.device}; peak memory in MiB (CPU: max RSS growth), time in s (median of {args.reps})\n")
    print("| model | B × (P + T) | mode | reference MiB | lean MiB | memory ratio | reference s | lean s | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        _, batch, prompt, response = CONFIGS[name]
        for mode in ("no_grad", "grad"):
            ref_mem, ref_s = run_case(name, "reference", mode, args.device, args.reps)
            lean_mem, lean_s = run_case(name, "lean", mode, args.device, args.reps)
            mib = 2**20
            print(f"| {name} | {batch} × ({prompt} + {response}) | {mode} | {ref_mem / mib:.0f} | {lean_mem / mib:.0f} | "
                  f"{ref_mem / max(lean_mem, 1):.2f}x | {ref_s:.3f} | {lean_s:.3f} | {ref_s / lean_s:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
