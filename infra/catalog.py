"""The one table of EC2 instance facts that the stacks size node groups against.

Pure Python with no Pulumi import, so that tests and tools can use it without an engine.

Hardware facts are copied from EC2 DescribeInstanceTypes, as shipped in moto's
`moto/ec2/resources/instance_types.json.gz`. tests/test_catalog.py checks every field
against that file, so a typo or a stale value fails CI instead of mis-sizing a node group.
Sizes are the API's numbers, not the marketing ones: for example, p5 disks are 3800 GB
in the API while the product page says 3.84 TB.

EFA interface counts from the API: p4d/p4de 4, p5/p5e 32, p5en 16. AWS's EFA guide also documents the 32-interface layout for P5
and P5e (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/efa-acc-inst-types.html).
Some public blueprints hard-code 16 for p5e; the API says 32.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

PRICE_REGION = "us-east-1"

# This is the date the us-east-1 Linux On-Demand prices were read. The figures come from the
# AWS Price List, as recorded on 2026-11-09 in
# https://raw.githubusercontent.com/datareceipts/data-receipts/main/109-gpu-pricing/hyperscalers.json
# (p4d, p4de, p5). Other sources are noted on each row.
# The prices already include the June 2025 cut (AWS News Blog, 2025-06-05, effective 2025-06-01:
# https://aws.amazon.com/blogs/aws/announcing-up-to-45-price-reduction-for-amazon-ec2-nvidia-gpu-accelerated-instances/).
# Before the cut they were p4d 32.7726, p4de 40.9657 and p5 98.32. Those numbers are stale: do not reuse them.
PRICE_DATE = "2026-11-09"

# This is the default CPU type for the system (add-ons) node group. With 8 vCPUs and 32 GiB it
# runs CoreDNS, the device plugins, the operators and monitoring without crowding them out.
SYSTEM_INSTANCE_TYPE = "m7i.2xlarge"


# Dense (no sparsity) Tensor Core peak per GPU in TFLOP/s, by GPU model and training precision, from NVIDIA's
# datasheets: A100 SXM BF16 312; H100 SXM BF16 989 and FP8 1,979; H200 SXM has the H100's compute (the same
# GH100 die with more memory). Ampere has no FP8. The planner's efficiency figures are shares of these.
GPU_PEAK_TFLOPS: Mapping[str, Mapping[str, float]] = MappingProxyType({
    "A100": MappingProxyType({"bf16": 312.0}),
    "H100": MappingProxyType({"bf16": 989.0, "fp8": 1979.0}),
    "H200": MappingProxyType({"bf16": 989.0, "fp8": 1979.0}),
})

# NVLink bandwidth per GPU in GB/s, both directions together, from NVIDIA's datasheets: A100 SXM 600, H100 SXM
# and H200 SXM 900 (fourth-generation NVLink). Tensor-parallel traffic stays on it (TP never leaves a node).
GPU_NVLINK_GB_S: Mapping[str, float] = MappingProxyType({"A100": 600.0, "H100": 900.0, "H200": 900.0})


@dataclass(frozen=True)
class FabricFloor:
    """The least all-reduce bus bandwidth (nccl-tests' busbw, GB/s) a multi-node run must measure across its
    nodes at 1 GiB and larger messages before training starts, with the published figure it derives from.

    Socket fallback is one to two orders of magnitude below these figures and a node that lost part of its EFA
    interfaces loses the same share of bandwidth, so half of the published figure separates a broken fabric
    from an ordinary one without failing runs for noise (placement, other tenants, NCCL version)."""

    published_gbps: float  # out-of-place busbw of the published run, at the message size below
    message_bytes: int
    nodes: int  # of the published run: more nodes measure a little less (longer rings)
    source: str

    @property
    def floor_gbps(self) -> float:
        return round(self.published_gbps * FABRIC_FLOOR_SHARE, 1)


FABRIC_FLOOR_SHARE = 0.5
# aws-samples/awsome-distributed-training at commit 7217859f67bc693c52ff175ccc6082c41dbd7a1b (2026-02-21).
_ADT = "awsome-distributed-training (commit 7217859f, 2026-02-21)"
# micro-benchmarks/nccl-tests/README.md, "Results", lines 155-187: 2 x p4de.24xlarge, 2147483648 B: time 51406 us,
# algbw 41.78, busbw 78.33 GB/s. p4d has the same 4 x 100 Gbps EFA (API: 4 EFA interfaces each) and the same
# A100/NVSwitch node, only less GPU memory: the same fabric figure holds.
_P4_FLOOR = FabricFloor(78.33, 2 * 1024 ** 3, 2, f"{_ADT} micro-benchmarks/nccl-tests/README.md:187, "
                        "all_reduce_perf on 2 x p4de.24xlarge, 2147483648 B")
# The same README, lines 190-225: 2 x p5.48xlarge, 2147483648 B: time 9074.5 us, algbw 236.65, busbw 443.72 GB/s
# (487.09 at 16 GiB, line 225). p5e has p5's 32 x 100 Gbps EFA (API: 32 network cards of 100 Gbps) and the same
# NVSwitch node with H200s: the same fabric figure holds.
_P5_FLOOR = FabricFloor(443.72, 2 * 1024 ** 3, 2, f"{_ADT} micro-benchmarks/nccl-tests/README.md:222, "
                        "all_reduce_perf on 2 x p5.48xlarge, 2147483648 B")
# p5en: no 2-node figure was found published. The one p5en all_reduce_perf figure found is in
# micro-benchmarks/nccl-tests/slurm/topology-aware-nccl-tests/README.md, lines 257-265 ("Performance Output
# Format", p5en.48xlarge): 17179869184 B, time 92173 us, algbw 186.39, busbw 369.86 GB/s. Its rank count is not
# written there; busbw/algbw = 2(n-1)/n gives n = 128 ranks, 16 nodes (the example result files above it, lines
# 248-250, are named nccl_16_..., the node count by line 253). 16 nodes measure less than 2 (p5: 443.72 at 2 GiB
# on 2 nodes) and 16 GiB a little more than 2 GiB (p5: 487.09 vs 443.72), so half of it is a looser floor than
# p5's, still far above socket fallback. p5en has p5's 3200 Gbps of network in total, on 16 cards of 200 Gbps
# instead of 32 of 100 (API: NetworkPerformance "3200 Gigabit" for p5, p5e and p5en).
_P5EN_FLOOR = FabricFloor(369.86, 16 * 1024 ** 3, 16,
                          f"{_ADT} micro-benchmarks/nccl-tests/slurm/topology-aware-nccl-tests/README.md:265, "
                          "all_reduce_perf on 16 x p5en.48xlarge, 17179869184 B")
FABRIC_FLOORS: Mapping[str, FabricFloor] = MappingProxyType({
    "p4d.24xlarge": _P4_FLOOR, "p4de.24xlarge": _P4_FLOOR,
    "p5.48xlarge": _P5_FLOOR, "p5e.48xlarge": _P5_FLOOR, "p5en.48xlarge": _P5EN_FLOOR,
})


class UnknownInstanceType(ValueError):
    """Raised when an instance type is not in the catalog. A stack config typo fails here, at preview."""


@dataclass(frozen=True)
class InstanceType:
    name: str
    vcpus: int
    memory_gib: int  # host memory
    gpus: int  # 0 for CPU types
    gpu_model: str | None  # "A100", "H100" or "H200", as the API names it
    gpu_memory_gib: int  # per GPU, as the API reports it (0 for CPU)
    gpu_arch: str | None  # "ampere" | "hopper"
    network_cards: int  # MaximumNetworkCards
    efa_interfaces: int  # MaximumEfaInterfaces (0 = no EFA)
    network_gbps: int  # sum of NetworkCards[].PeakBandwidthInGbps: what data-parallel traffic between nodes gets
    nvme_disks: int  # instance-store disk count
    nvme_disk_gb: int  # size of each disk, in GB as the API reports it
    on_demand_usd_per_hour: float  # Linux, PRICE_REGION, as of PRICE_DATE

    @property
    def is_gpu(self) -> bool:
        return self.gpus > 0

    @property
    def fp8(self) -> bool:
        # FP8 Tensor Cores (Transformer Engine) start with Hopper. Ampere has none.
        return self.gpu_arch == "hopper"

    @property
    def efa(self) -> bool:
        return self.efa_interfaces > 0

    @property
    def nvme_total_gb(self) -> int:
        return self.nvme_disks * self.nvme_disk_gb


def _gpu(name, vcpus, memory_gib, gpu_model, gpu_memory_gib, gpu_arch, network_cards,
         efa_interfaces, network_gbps, nvme_disk_gb, price):
    # Every GPU type here has 8 GPUs and 8 NVMe disks, so those two are fixed here.
    return InstanceType(name, vcpus, memory_gib, 8, gpu_model, gpu_memory_gib, gpu_arch,
                        network_cards, efa_interfaces, network_gbps, 8, nvme_disk_gb, price)


def _cpu(name, vcpus, memory_gib, price):
    # m7i is EBS-only with a single network card: no GPU, no EFA, no instance store.
    return InstanceType(name, vcpus, memory_gib, 0, None, 0, None, 1, 0, 0, 0, 0, price)


_ALL = (
    _gpu("p4d.24xlarge", 96, 1152, "A100", 40, "ampere", 4, 4, 400, 1000, 21.957642),
    _gpu("p4de.24xlarge", 96, 1152, "A100", 80, "ampere", 4, 4, 400, 1000, 27.44705),
    _gpu("p5.48xlarge", 192, 2048, "H100", 80, "hopper", 32, 32, 3200, 3800, 55.04),
    # p5e price: we could not confirm a Linux On-Demand price for p5e. AWS sells it through Capacity Blocks,
    # and its Price List entries are CapacityBlock terms only (skypilot-org/skypilot#4657).
    # moto's DescribeInstanceTypeOfferings snapshot does not offer p5e in us-east-1 at all
    # (only us-east-2, us-west-2, eu-north-1, eu-west-2, ap-southeast-2/3, sa-east-1).
    # The figure below is the Capacity Block effective hourly rate after the January 2026 increase
    # of about 15% ($34.61 -> $39.80, "most regions"). Source: ITPro, "AWS Amazon EC2 Capacity Blocks price increase",
    # https://www.itpro.com/cloud/cloud-computing/aws-amazon-ec2-capacity-blocks-price-increase
    # It is what a p5e hour actually costs, but it is not an On-Demand price, and AWS reprices
    # Capacity Blocks every quarter. Treat this number as an estimate.
    _gpu("p5e.48xlarge", 192, 2048, "H200", 141, "hopper", 32, 32, 3200, 3800, 39.80),
    # p5en price: us-east-1 On-Demand from the AWS Price List, as shown by `dstack offer`
    # on 2026-08-06 (dstackai/dstack#4110). This is the post-cut figure: the June 2025 cut took up to 26% off P5en.
    _gpu("p5en.48xlarge", 192, 2048, "H200", 141, "hopper", 16, 16, 3200, 3800, 63.296),
    # m7i: us-east-1 Price List figures. m7i.large costs $0.1008 and the price scales linearly with size.
    # Several public price tables agree on these numbers. The 2025 cut applied only to GPU types.
    _cpu("m7i.xlarge", 4, 16, 0.2016),
    _cpu("m7i.2xlarge", 8, 32, 0.4032),
    _cpu("m7i.4xlarge", 16, 64, 0.8064),
)

INSTANCE_TYPES: Mapping[str, InstanceType] = MappingProxyType({t.name: t for t in _ALL})
GPU_INSTANCE_TYPES: tuple[str, ...] = tuple(n for n, t in INSTANCE_TYPES.items() if t.is_gpu)
SYSTEM_INSTANCE_TYPES: tuple[str, ...] = tuple(n for n, t in INSTANCE_TYPES.items() if not t.is_gpu)


def get(name: str) -> InstanceType:
    """Return the facts for `name`. Raise UnknownInstanceType (a ValueError) if `name` is not in the catalog."""
    try:
        return INSTANCE_TYPES[name]
    except (KeyError, TypeError):  # TypeError: unhashable input, e.g. a list from YAML config
        raise UnknownInstanceType(
            f"unknown instance type {name!r}; allowed: {', '.join(INSTANCE_TYPES)}"
        ) from None
