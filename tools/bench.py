"""Benchmarks (not tests): how long the planner takes.

    make bench

Target: the full matrix (every variant x method x GPU type, 40 plans) well under a second.
"""

from __future__ import annotations

import statistics
import time

from infra import sizing

TARGET_SECONDS = 1.0


def time_it(fn, repeat: int = 5) -> float:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> int:
    results = {
        "sizing matrix (40 plans)": time_it(sizing.matrix),
        "common sizing table check": time_it(sizing.check_seed_table),
        "one plan, 70b sft p4d.24xlarge, 1 node (with nearest fit)": time_it(lambda: sizing.plan(sizing.TrainingRequest(
            sizing.MODELS["llama31-70b"], "sft", sizing.catalog.get("p4d.24xlarge"), nodes=1))),
    }
    for name, seconds in results.items():
        print(f"{seconds * 1000:9.1f} ms  {name}")
    matrix = results["sizing matrix (40 plans)"]
    print(f"\nmatrix: {'within' if matrix < TARGET_SECONDS else 'OVER'} the {TARGET_SECONDS:.0f} s target")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
