"""Benchmark of latentx.dynamics against the straightforward reference algorithms.

    .venv/bin/python bench/dynamics.py [--quick] [--device cuda] [--threads N] [--timer wall|cpu]

On a shared, busy machine use ``--threads 1 --timer cpu`` (process CPU time of one thread): multi-threaded
LAPACK calls stall badly when the cores are oversubscribed, which makes wall-clock ratios meaningless.

For T in {256, 512, 1024, 2048, 4096} and d in {576, 896, 2048} (B = 8 synthetic hidden-state trajectories)
it times ``rank_dynamics`` (default tail window 512, and ``window=None``) and ``dsd`` (m = 50) against
``rank_dynamics_reference`` / ``dsd_reference`` in the same run and prints per-response seconds, the speed-up
and the largest relative difference between the two (identical numbers = differences at float32 round-off).
The reference runs on a subset of responses (``--ref-responses``) and is skipped ("skipped") when its
predicted time exceeds ``--max-ref-seconds``.  Prints markdown tables.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from latentx.dynamics import KoopmanDictionary, dsd, dsd_reference, rank_dynamics, rank_dynamics_reference


def synthetic_hidden_states(B: int, T: int, d: int, device: str, seed: int = 0) -> torch.Tensor:
    """LLM-like trajectories: a slow low-rank drift, token-level noise and a few large "massive" dims."""
    g = torch.Generator().manual_seed(seed)
    drift = torch.randn(B, T, 32, generator=g).cumsum(dim=1) / math.sqrt(T) @ torch.randn(32, d, generator=g)
    H = drift + 0.5 * torch.randn(B, T, d, generator=g)
    H[:, :, :3] += 20.0 + 5.0 * torch.randn(B, T, 3, generator=g)
    return H.to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCK = time.perf_counter  # --timer cpu switches to process CPU time (robust on a shared machine, 1 thread)


def timed(fn, device: str, repeats: int = 1):
    """(result, best seconds over `repeats` runs)."""
    best, out = math.inf, None
    for _ in range(repeats):
        sync(device)
        start = CLOCK()
        out = fn()
        sync(device)
        best = min(best, CLOCK() - start)
    return out, best


def max_rel_diff(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-3) -> float:
    """Largest |a - b| / max(|b|, floor) (ERV / ERA can be ~0: they are compared on a 1e-3 floor)."""
    a, b = a.double().cpu(), b.double().cpu()
    scale = torch.maximum(b.abs(), torch.full_like(b, floor))
    return float(((a - b).abs() / scale).max()) if a.numel() else 0.0


_unit_cost: dict[tuple[str, int], float] = {}


def _calibrate(kind: str, d: int) -> float:
    """Seconds per unit of work of one SVD (256 x d, float32) or one eigvalsh (256 x 256, float64)."""
    if (kind, d) not in _unit_cost:
        X = torch.randn(256, d) if kind == "svd" else torch.randn(256, 256, dtype=torch.float64)
        fn = torch.linalg.svdvals if kind == "svd" else (lambda A: torch.linalg.eigvalsh(A @ A.T))
        fn(X)
        start = time.perf_counter()
        fn(X)
        work = 256 * d * min(256, d) if kind == "svd" else 256**3
        _unit_cost[(kind, d)] = (time.perf_counter() - start) / work
    return _unit_cost[(kind, d)]


def window_sizes(T: int, window: int | None, stride: int = 40) -> list[int]:
    tail = T if window is None else min(T, window)
    return [t + 1 for t in range(stride, tail, stride)]


def predicted_reference_seconds(T: int, d: int, window: int | None) -> float:
    """Cost model of the per-window SVD reference (one n x d SVD per window plus the full response)."""
    return _calibrate("svd", d) * sum(n * d * min(n, d) for n in window_sizes(T, window) + [T])


def predicted_fast_seconds(T: int, d: int, window: int | None) -> float:
    """Cost model of rank_dynamics (one min(n, d)^3 eigen-solve per window plus the full response)."""
    return _calibrate("eig", d) * sum(min(n, d) ** 3 for n in window_sizes(T, window) + [T])


def fmt(x: float | None, digits: int = 3) -> str:
    return "skipped" if x is None else f"{x:.{digits}g}"


def bench_rank(Ts, ds, B, device, ref_responses, max_ref_seconds, windows, max_fast_seconds) -> list[str]:
    rows = [
        "| T | d | window | rank_dynamics s/resp | reference s/resp | speed-up | max rel diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in ds:
        for T in Ts:
            H = synthetic_hidden_states(B, T, d, device)
            mask = torch.ones(B, T, dtype=torch.bool, device=device)
            for window in windows:
                if window is not None and T <= window and None in windows:
                    continue  # identical to window=None
                n_fast = B
                while n_fast > 1 and predicted_fast_seconds(T, d, window) * n_fast > max_fast_seconds:
                    n_fast //= 2  # very long problems: time the fast path on fewer responses too
                fast, t_fast = timed(lambda: rank_dynamics(H[:n_fast], mask[:n_fast], window=window), device)
                per_fast = t_fast / n_fast
                ref_s = diff = speed = None
                if predicted_reference_seconds(T, d, window) * ref_responses <= max_ref_seconds:
                    ref, t_ref = timed(
                        lambda: rank_dynamics_reference(H[:ref_responses], mask[:ref_responses], window=window), device
                    )
                    ref_s = t_ref / ref_responses
                    speed = ref_s / per_fast
                    k = min(n_fast, ref_responses)
                    diff = max(max_rel_diff(f[:k], r[:k]) for f, r in zip(fast, ref))
                line = (
                    f"| {T} | {d} | {window} | {per_fast:.4f} | {fmt(ref_s, 4)} | "
                    f"{'skipped' if speed is None else f'{speed:.1f}x'} | {fmt(diff, 2)} |"
                )
                print(line, flush=True)
                rows.append(line)
    return rows


def bench_dsd(Ts, ds, B, device, m: int = 50) -> list[str]:
    rows = [
        "| T | d | dsd ms/resp | dsd fwd+bwd ms/resp | reference ms/resp | speed-up | max rel diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in ds:
        dictionary = KoopmanDictionary(d, m=m, seed=0).to(device)
        for T in Ts:
            H = synthetic_hidden_states(B, T, d, device)
            mask = torch.ones(B, T, dtype=torch.bool, device=device)
            dsd(H, mask, dictionary)  # warm-up
            with torch.no_grad():
                fast, t_fast = timed(lambda: dsd(H, mask, dictionary), device, repeats=3)
            Hg = H.clone().requires_grad_(True)

            def forward_backward():
                dsd(Hg, mask, dictionary).sum().backward()

            _, t_grad = timed(forward_backward, device, repeats=3)
            ref, t_ref = timed(lambda: dsd_reference(H, mask, dictionary), device, repeats=3)
            line = (
                f"| {T} | {d} | {1e3 * t_fast / B:.2f} | {1e3 * t_grad / B:.2f} | {1e3 * t_ref / B:.2f} | "
                f"{t_ref / t_fast:.1f}x | {max_rel_diff(fast, ref, floor=1e-12):.1e} |"
            )
            print(line, flush=True)
            rows.append(line)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes only (< 1 minute)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ref-responses", type=int, default=1, help="responses the reference is timed on")
    parser.add_argument("--max-ref-seconds", type=float, default=90.0, help="skip longer reference runs")
    parser.add_argument("--max-fast-seconds", type=float, default=60.0, help="time fewer responses beyond this")
    parser.add_argument("--timer", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.timer == "cpu":
        global CLOCK
        CLOCK = time.process_time
    if args.quick:
        Ts, ds, max_ref = [256, 512], [576, 896], min(args.max_ref_seconds, 3.0)
    else:
        Ts, ds, max_ref = [256, 512, 1024, 2048, 4096], [576, 896, 2048], args.max_ref_seconds
    print(
        f"# latentx.dynamics benchmark: device={args.device}, threads={torch.get_num_threads()}, B={args.batch}, "
        f"timer={args.timer}"
    )
    print(f"# torch {torch.__version__}; reference timed on {args.ref_responses} response(s)\n")
    print("## rank_dynamics (stride 40) vs per-window SVD reference\n")
    rank_rows = bench_rank(
        Ts, ds, args.batch, args.device, args.ref_responses, max_ref, (512, None), args.max_fast_seconds
    )
    print("\n## dsd (m = 50, eig spectrum) vs straightforward loop\n")
    dsd_rows = bench_dsd(Ts, ds, args.batch, args.device)
    print("\n# summary (markdown)\n")
    print("\n".join(rank_rows))
    print()
    print("\n".join(dsd_rows))


if __name__ == "__main__":
    main()
