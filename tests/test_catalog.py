"""Check infra/catalog.py against AWS's own DescribeInstanceTypes data, as shipped in moto.

This file loads the installed moto package's data directly. If a moto upgrade brings newer
AWS data that disagrees with the catalog, this test fails, and someone has to decide which is right.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
from importlib import resources

import pytest

from infra import catalog

# Catalog types that moto's data lacks, each mapped to a reason and a source for its facts.
# Only add a type here if it really is missing from moto's instance_types.json.gz. Today none is.
MISSING_FROM_MOTO: dict[str, str] = {}

# NVIDIA architecture of each GPU model (NVIDIA datasheets). The API does not report it,
# and it decides FP8 support.
GPU_ARCH = {"A100": "ampere", "H100": "hopper", "H200": "hopper"}


@pytest.fixture(scope="module")
def aws_types() -> dict:
    path = resources.files("moto.ec2.resources") / "instance_types.json.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt") as text:
        return json.load(text)


def _facts_from_aws(entry: dict) -> dict:
    """Map one DescribeInstanceTypes entry to the catalog's field names."""
    gpus = (entry.get("GpuInfo") or {}).get("Gpus", [])
    disks = (entry.get("InstanceStorageInfo") or {}).get("Disks", [])
    # The catalog models one GPU kind and one disk kind per type. Fail loudly if AWS ever differs.
    assert len(gpus) <= 1 and len(disks) <= 1, entry["InstanceType"]
    gpu = gpus[0] if gpus else {}
    disk = disks[0] if disks else {}
    network = entry["NetworkInfo"]
    return {
        "vcpus": entry["VCpuInfo"]["DefaultVCpus"],
        "memory_mib": entry["MemoryInfo"]["SizeInMiB"],
        "gpus": gpu.get("Count", 0),
        "gpu_model": gpu.get("Name"),
        "gpu_memory_mib": gpu.get("MemoryInfo", {}).get("SizeInMiB", 0),
        "network_cards": network["MaximumNetworkCards"],
        "efa_interfaces": (network.get("EfaInfo") or {}).get("MaximumEfaInterfaces", 0),
        # CPU types have no per-card figure worth planning with; the catalog keeps 0 for them
        "network_gbps": int(sum(c.get("PeakBandwidthInGbps", 0) for c in network.get("NetworkCards", []))) if gpus else 0,
        "nvme_disks": disk.get("Count", 0),
        "nvme_disk_gb": disk.get("SizeInGB", 0),
    }


def _facts_from_catalog(it: catalog.InstanceType) -> dict:
    return {
        "vcpus": it.vcpus,
        "memory_mib": it.memory_gib * 1024,  # compare exactly: a rounded GiB figure must not pass
        "gpus": it.gpus,
        "gpu_model": it.gpu_model,
        "gpu_memory_mib": it.gpu_memory_gib * 1024,
        "network_cards": it.network_cards,
        "efa_interfaces": it.efa_interfaces,
        "network_gbps": it.network_gbps,
        "nvme_disks": it.nvme_disks,
        "nvme_disk_gb": it.nvme_disk_gb,
    }


@pytest.mark.parametrize("name", list(catalog.INSTANCE_TYPES))
def test_hardware_facts_match_aws(name, aws_types):
    if name in MISSING_FROM_MOTO:
        assert name not in aws_types, f"{name} is in moto now: drop it from MISSING_FROM_MOTO"
        pytest.skip(MISSING_FROM_MOTO[name])
    assert name in aws_types, f"{name} is not in moto's DescribeInstanceTypes data"
    assert _facts_from_catalog(catalog.INSTANCE_TYPES[name]) == _facts_from_aws(aws_types[name])


def test_allow_list_only_names_catalog_entries():
    assert set(MISSING_FROM_MOTO) <= set(catalog.INSTANCE_TYPES)


def test_keys_are_names_and_table_is_read_only():
    assert all(key == it.name for key, it in catalog.INSTANCE_TYPES.items())
    with pytest.raises(TypeError):
        catalog.INSTANCE_TYPES["x"] = None  # type: ignore[index]


def test_get_returns_entry():
    assert catalog.get("p5.48xlarge") is catalog.INSTANCE_TYPES["p5.48xlarge"]


@pytest.mark.parametrize("bad", ["p5.48xlarg", "", "P5.48XLARGE", ["p5.48xlarge"]])
def test_get_unknown_names_value_and_allowed(bad):
    with pytest.raises(catalog.UnknownInstanceType) as err:
        catalog.get(bad)
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert repr(bad) in message
    assert all(name in message for name in catalog.INSTANCE_TYPES)


def test_gpu_and_system_tuples_partition_the_table():
    gpu, system = catalog.GPU_INSTANCE_TYPES, catalog.SYSTEM_INSTANCE_TYPES
    assert set(gpu) == {n for n, t in catalog.INSTANCE_TYPES.items() if t.gpus > 0}
    assert set(system) == {n for n, t in catalog.INSTANCE_TYPES.items() if t.gpus == 0}
    assert len(gpu) + len(system) == len(catalog.INSTANCE_TYPES)
    assert {"p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge", "p5e.48xlarge", "p5en.48xlarge"} == set(gpu)
    assert {"m7i.xlarge", "m7i.2xlarge", "m7i.4xlarge"} == set(system)
    assert catalog.SYSTEM_INSTANCE_TYPE in system


@pytest.mark.parametrize("it", catalog.INSTANCE_TYPES.values(), ids=list(catalog.INSTANCE_TYPES))
def test_derived_properties(it):
    assert it.is_gpu == (it.gpus > 0)
    assert it.efa == (it.efa_interfaces > 0)
    assert it.nvme_total_gb == it.nvme_disks * it.nvme_disk_gb
    if it.is_gpu:
        assert it.efa, "every GPU type here is an EFA type: the node groups rely on it"
        assert it.gpu_arch == GPU_ARCH[it.gpu_model]
    else:
        assert (it.gpu_model, it.gpu_arch, it.gpu_memory_gib) == (None, None, 0)


def test_fp8_exactly_for_hopper():
    fp8 = {n for n, t in catalog.INSTANCE_TYPES.items() if t.fp8}
    assert fp8 == {n for n, t in catalog.INSTANCE_TYPES.items() if t.gpu_arch == "hopper"}
    assert fp8 == {"p5.48xlarge", "p5e.48xlarge", "p5en.48xlarge"}


def test_prices_positive():
    for it in catalog.INSTANCE_TYPES.values():
        assert isinstance(it.on_demand_usd_per_hour, float) and it.on_demand_usd_per_hour > 0, it.name


def test_price_metadata():
    assert catalog.PRICE_REGION == "us-east-1"
    read_on = dt.date.fromisoformat(catalog.PRICE_DATE)
    # These prices must be from after the June 2025 GPU cut, and PRICE_DATE cannot be in the future.
    assert dt.date(2025, 6, 1) <= read_on <= dt.date.today()
