"""Fabric test of a multi-node run: all-reduce bus bandwidth across the run's nodes, before training starts.

    torchrun --nnodes N --nproc-per-node 8 ... fabric_test.py --config run.json --min-busbw 221.9 \
        --instance-type p5.48xlarge --marker /fsx/checkpoints/<run>/FABRIC_TESTED

Every rank all-reduces large float32 buffers through NCCL, in the training pod, with the image, NCCL, plugin
and environment training will use. Bandwidth is reported as nccl-tests does (NVIDIA/nccl-tests
doc/PERFORMANCE.md): algbw = bytes / time, busbw = algbw x 2(n-1)/n for all-reduce, n the number of ranks, time
the slowest rank's mean over the timed iterations; out-of-place like all_reduce_perf's first columns is not
possible in torch (all_reduce is in place), so the figure is all_reduce_perf's in-place busbw. The best busbw
at the large sizes is compared with the floor; below it, rank 0 writes the run's training failure marker with
the measured number and every rank exits 1. At or above it, rank 0 writes ``--marker`` (the report), and later
restarts of the run's pods skip the test.

Why not all_reduce_perf itself: nccl-tests runs across nodes only under MPI (its README: "NCCL tests rely on MPI
to work on multiple processes, hence multiple nodes"), i.e. mpirun reaching every pod over ssh or an MPI
operator; the training pods have neither (no ssh daemon, all capabilities but IPC_LOCK dropped). The image
carries all_reduce_perf for diagnosis by hand (docs/runbook.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import layout

GIB = 1024 ** 3
DEFAULT_SIZES = (256 * 1024 ** 2, GIB, 2 * GIB)  # the floors' published figures are at 2 GiB
LARGE_MESSAGE_BYTES = GIB  # the verdict counts sizes from here up: smaller ones are latency-bound
WARMUP_ITERATIONS = 5
TIMED_ITERATIONS = 20
DOCS = "docs/efa.md (reading the fabric test) and docs/runbook.md#runbook-efa-fabric"


@dataclass(frozen=True)
class Measurement:
    size_bytes: int
    seconds: float  # mean per all-reduce, slowest rank
    algbw_gbps: float
    busbw_gbps: float


def measure(size_bytes: int, seconds: float, ranks: int) -> Measurement:
    algbw = size_bytes / 1e9 / seconds
    return Measurement(size_bytes, seconds, round(algbw, 2), round(algbw * 2 * (ranks - 1) / ranks, 2))


def large_message_busbw(results: Sequence[Measurement]) -> float:
    large = [r.busbw_gbps for r in results if r.size_bytes >= LARGE_MESSAGE_BYTES]
    if not large:
        raise ValueError(f"no measurement at {LARGE_MESSAGE_BYTES} bytes or more")
    return max(large)


def table(results: Sequence[Measurement]) -> str:
    """The lines of all_reduce_perf's table (size, count, type, redop, time in us, algbw, busbw) for the sizes
    measured, so the numbers read as nccl-tests' do."""
    lines = ["#       size         count      type   redop     time   algbw   busbw",
             "#        (B)    (elements)                       (us)  (GB/s)  (GB/s)"]
    for r in results:
        lines.append(f"{r.size_bytes:12d}  {r.size_bytes // 4:12d}     float     sum  {r.seconds * 1e6:7.1f}  "
                     f"{r.algbw_gbps:6.2f}  {r.busbw_gbps:6.2f}")
    return "\n".join(lines)


def verdict(results: Sequence[Measurement], floor_gbps: float, ranks: int, nodes: int, instance_type: str
            ) -> tuple[bool, str]:
    busbw = large_message_busbw(results)
    summary = (f"all-reduce bus bandwidth {busbw:.1f} GB/s across {nodes} x {instance_type} ({ranks} ranks) at "
               f"{LARGE_MESSAGE_BYTES // GIB} GiB and larger; floor {floor_gbps:.1f} GB/s")
    if busbw >= floor_gbps:
        return True, f"fabric test passed: {summary}"
    share = busbw / floor_gbps
    hint = ("NCCL is almost certainly not on EFA (TCP sockets reach a few GB/s): check the pods' NCCL_DEBUG=INFO "
            "log for 'NET/OFI' lines and `Using network Libfabric`" if share < 0.1 else
            "part of the fabric is missing or slow: a node with fewer EFA interfaces, nodes outside one cluster "
            "placement group, or a faulty host; run all_reduce_perf between pairs of nodes to find it")
    return False, (f"fabric test failed: {summary}. {hint}. Training did not start. To train anyway, set "
                   f"efa.fabricTest false or lower efa.minBusBandwidthGBps. More: {DOCS}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(layout.RUN_CONFIG_FILE))
    parser.add_argument("--min-busbw", type=float, required=True, help="floor, GB/s")
    parser.add_argument("--instance-type", required=True)
    parser.add_argument("--marker", required=True, help="written when the fabric passes")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    args = parser.parse_args(argv)
    run = layout.load_run(args.config)

    import torch
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    rank, ranks = dist.get_rank(), dist.get_world_size()
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "0")) or ranks // max(1, torch.cuda.device_count())
    results = []
    for size in args.sizes:
        buffer = torch.ones(size // 4, dtype=torch.float32, device="cuda")
        for _ in range(WARMUP_ITERATIONS):
            dist.all_reduce(buffer)
        torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(TIMED_ITERATIONS):
            dist.all_reduce(buffer)
        torch.cuda.synchronize()
        elapsed = torch.tensor([(time.perf_counter() - start) / TIMED_ITERATIONS], device="cuda")
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        results.append(measure(size, float(elapsed.item()), ranks))
        del buffer
    passed, message = verdict(results, args.min_busbw, ranks, nodes, args.instance_type)
    if rank == 0:
        print(table(results), flush=True)
        details = {"passed": passed, "message": message, "floor_gbps": args.min_busbw,
                   "busbw_gbps": large_message_busbw(results), "ranks": ranks, "nodes": nodes,
                   "instance_type": args.instance_type, "results": [asdict(r) for r in results]}
        if passed:
            layout.write_marker(args.marker, **details)
        else:
            layout.write_marker(layout.failure_marker(run["paths"]["training_marker"]), error=message, check="fabric",
                                **{k: v for k, v in details.items() if k != "message"})
    print(message, file=sys.stdout if passed else sys.stderr, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
