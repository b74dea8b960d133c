"""Benchmarks (not tests): how long the planner takes, and how well its throughput estimate predicts NVIDIA's
published runs it was not fitted to.

    make bench

Targets: the full matrix (every variant x method x GPU type, 40 plans) well under a second; every published
measurement predicted within 10% when it is left out of the fit (leave-one-out). The errors are reported as
they are, never tuned to the check.
"""

from __future__ import annotations

import statistics
import time

from infra import sizing

TARGET_SECONDS = 1.0
TARGET_HELD_OUT_ERROR = 0.10


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
        "throughput fit over every published measurement": time_it(lambda: sizing.fit_throughput(sizing.MEASURED), 3),
    }
    for name, seconds in results.items():
        print(f"{seconds * 1000:9.1f} ms  {name}")
    matrix = results["sizing matrix (40 plans)"]
    print(f"\nmatrix: {'within' if matrix < TARGET_SECONDS else 'OVER'} the {TARGET_SECONDS:.0f} s target")

    fit = sizing.FIT
    print("\nthroughput fit on every published measurement: GEMM efficiency "
          + ", ".join(f"{p} {m} {e:.1%}" for (p, m), e in sorted(fit.efficiency.items()))
          + f"; exposed TP/PP communication {fit.comm_exposed:.0%}")
    held_out = sizing.leave_one_out()
    print("\nleave-one-out: each published measurement predicted by a fit on all the others\n")
    print(sizing.leave_one_out_table(held_out))
    missed = [h for h in held_out if abs(h.error) > TARGET_HELD_OUT_ERROR]
    print(f"\nheld-out target (every point within {TARGET_HELD_OUT_ERROR:.0%}): "
          + ("met" if not missed else f"MISSED by {len(missed)} point(s): " + ", ".join(
              f"{sizing.MODELS[h.run.model].display} {h.run.method} {h.run.precision} {h.run.gpus} GPUs {h.error:+.1%}"
              for h in missed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
