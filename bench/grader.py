"""Grader throughput: answers graded per second, one worker process vs a pool of worker processes.

    .venv/bin/python bench/grader.py [--benchmarks math500,minerva_math] [--limit 300] [--workers 2]
    .venv/bin/python bench/grader.py --limits 1,3 [--rounds 6]

``--limits``: the time limit of ``grade_answer(..., timeout=t)`` against the wall time of the whole call,
right after a timeout (a pathological answer, ``9^{9^{9^9}}``, alternating with a normal one that needs
math-verify), from one thread and from four threads at once; it prints the worst wall time, the worst
overrun (wall - limit; the target is < 0.2 s) and how many normal answers were graded wrong because no
worker was ready in time.

The answer set is built from the shared benchmarks' reference answers, so every check goes through
math-verify (plain-number pairs, decided in-process, are left out unless --include-numbers):
for each problem two correct responses (its gold in \\boxed{} and after "The answer is") and a wrong
one (the gold of a problem half the list away), as in an evaluation with n = 3 samples per problem.
Workers are started before the clock starts and restarted between modes, so that no mode profits
from another's parse caches. A third line grades in-process without any time limit (``timeout=None``)
to show what the worker round trip costs. On a machine shared with other jobs the pool cannot beat
one worker by much: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from latentx.tasks import grading  # noqa: E402
from latentx.tasks.benchmarks import load_benchmark  # noqa: E402
from latentx.tasks.grading import _fast_verdict, grade_answer, grade_many  # noqa: E402


def build_pairs(benchmarks: list[str], limit: int | None, include_numbers: bool) -> tuple[list[str], list[str], list[bool]]:
    """Like an evaluation with n = 3: per problem two right answers (boxed / "the answer is") and a
    wrong one (the reference of a problem half the list away)."""
    golds = [p.answer for name in benchmarks for p in load_benchmark(name)]
    responses, references, expected = [], [], []
    for i, gold in enumerate(golds):
        other = golds[(i + len(golds) // 2) % len(golds)]
        candidates = ((f"So we get $\\boxed{{{gold}}}$.", True), (f"The answer is ${gold}$.", True),
                      (f"Thus \\boxed{{{other}}}", False))
        for response, is_correct in candidates:
            if not include_numbers and _fast_verdict(grading.extract_answer(response) or "", gold) is not None:
                continue
            responses.append(response)
            references.append(gold)
            expected.append(is_correct)
    if limit is not None:
        responses, references, expected = responses[:limit], references[:limit], expected[:limit]
    return responses, references, expected


def fresh_workers(count: int) -> None:
    grading._POOL.close_all()
    grade_many(["\\boxed{\\frac{1}{2}}"] * count, ["0.5"] * count, workers=count)  # start `count` workers


PATHOLOGICAL = "\\boxed{9^{9^{9^{9}}}}"  # math-verify would compute a gigantic integer power
NORMAL = ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt2}")  # equal, decided by math-verify


def _timed_calls(limit: float, rounds: int, out: list[tuple[str, float, bool]]) -> None:
    for _ in range(rounds):
        for kind, (response, gold) in (("timeout", (PATHOLOGICAL, "5")), ("normal", NORMAL)):
            start = time.monotonic()
            verdict = grade_answer(response, gold, timeout=limit)
            out.append((kind, time.monotonic() - start, verdict))


def limits(limits_s: list[float], rounds: int) -> None:
    import threading

    print(f"{os.cpu_count()} CPUs; {rounds} rounds of (timeout, normal) per thread; target: wall <= limit + 0.2 s")
    print(f"{'limit':>6} {'threads':>7} {'calls':>5} {'max wall':>9} {'max overrun':>11} {'wrong normal':>12}")
    for limit in limits_s:
        for threads in (1, 4):
            grading._POOL.close_all()
            grading.prewarm(threads + 1)
            time.sleep(3.0 + threads)  # let the workers start: only calls after a timeout are measured
            results: list[list[tuple[str, float, bool]]] = [[] for _ in range(threads)]
            pool = [threading.Thread(target=_timed_calls, args=(limit, rounds, results[i])) for i in range(threads)]
            for thread in pool:
                thread.start()
            for thread in pool:
                thread.join()
            calls = [c for r in results for c in r]
            worst = max(seconds for _, seconds, _ in calls)
            wrong = sum(1 for kind, _, verdict in calls if kind == "normal" and verdict is not True)
            normal = sum(1 for kind, _, _ in calls if kind == "normal")
            print(f"{limit:>5.1f}s {threads:>7} {len(calls):>5} {worst:>8.2f}s {worst - limit:>+10.2f}s {wrong:>6}/{normal}")
    grading._POOL.close_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmarks", default="math500,minerva_math")
    parser.add_argument("--limit", type=int, default=300, help="number of (response, gold) pairs")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--include-numbers", action="store_true")
    parser.add_argument("--limits", default=None, help="comma list of time limits: measure the wall time of calls")
    parser.add_argument("--rounds", type=int, default=6, help="--limits: (timeout, normal) pairs per thread")
    args = parser.parse_args()
    if args.limits:
        limits([float(v) for v in args.limits.split(",")], args.rounds)
        return

    responses, golds, expected = build_pairs(args.benchmarks.split(","), args.limit, args.include_numbers)
    print(f"{len(responses)} answers from {args.benchmarks}; {os.cpu_count()} CPUs; timeout {args.timeout}s")

    fresh_workers(1)
    start = time.perf_counter()
    single = [grade_answer(r, g, timeout=args.timeout) for r, g in zip(responses, golds)]
    single_rate = len(responses) / (time.perf_counter() - start)

    fresh_workers(args.workers)
    start = time.perf_counter()
    pooled = grade_many(responses, golds, timeout=args.timeout, workers=args.workers)
    pool_rate = len(responses) / (time.perf_counter() - start)
    grading._POOL.close_all()

    start = time.perf_counter()
    in_process = [grade_answer(r, g, timeout=None) for r, g in zip(responses, golds)]
    in_process_rate = len(responses) / (time.perf_counter() - start)

    agree = sum(a == e for a, e in zip(single, expected)) / len(expected)
    print(f"single worker process : {single_rate:8.1f} answers/s")
    print(f"pool of {args.workers} workers     : {pool_rate:8.1f} answers/s")
    print(f"speed-up (pool/single): {pool_rate / single_rate:8.2f}x")
    print(f"in-process, no limit  : {in_process_rate:8.1f} answers/s  (reference: cost of the pipe round trip)")
    print(f"results identical: {single == pooled == in_process}; agreement with the constructed labels: "
          f"{100 * agree:.1f}% (a 'wrong' pair is right when two golds are equal, e.g. x=5 vs 5)")


if __name__ == "__main__":
    main()
