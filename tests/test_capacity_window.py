"""Preflight: does a Capacity Block's window cover what the stack runs on its group? moto 5.2 does not serve
DescribeCapacityReservations, so the block comes from a botocore Stubber (request and answer checked against the
EC2 service model), as in tests/test_preflight.py."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.test_preflight import NOW, RID, reservation, stack_config, stubbed
from tools import preflight
from tools.preflight import PASS, WARN


def block_stack(serving_elsewhere: bool = True, dataset_tokens: int | None = 200_000_000):
    groups = [{"name": "train", "instanceType": "p5.48xlarge", "availabilityZone": "us-east-1b",
               "capacityType": "CAPACITY_BLOCK", "capacityReservationId": RID, "maxSize": 4}]
    overrides = {}
    if serving_elsewhere:
        groups.append({"name": "serve", "instanceType": "p4d.24xlarge"})
        overrides["nemo-eks:serving"] = {"nodeGroup": "serve"}
    if dataset_tokens:
        overrides["nemo-eks:training"] = {"datasetTokens": dataset_tokens}
    return stack_config(groups, **overrides)


def judge(cfg, **changes):
    return preflight.judge_capacity_block_window(0, cfg.gpu_node_groups[0], reservation(**changes), NOW, cfg)


def test_a_block_that_covers_the_training_passes():
    cfg = block_stack()
    hours = cfg.sizing.hours
    assert hours is not None and hours < 7 * 24
    check = judge(cfg)
    assert check.status == PASS, check
    assert check.name == "capacity window gpuNodeGroups[0] (train)"
    assert "runs 2026-11-20 11:00 UTC to 2026-11-27 12:00 UTC" in check.detail


def test_a_block_that_ends_before_the_training_warns():
    cfg = block_stack()
    hours = cfg.sizing.hours
    check = judge(cfg, EndDate=NOW + timedelta(hours=hours / 2))
    assert check.status == WARN
    assert "would end" in check.detail and "after the block" in check.detail
    assert "extend the block" in check.fix and "nemo-eks:training.maxSteps" in check.fix


def test_a_later_start_moves_the_run_and_the_end_must_still_cover_it():
    cfg = block_stack()
    hours = cfg.sizing.hours
    start = NOW + timedelta(days=2)
    # Long enough from now, but not from the block's start: the run cannot begin before the block does.
    check = judge(cfg, State="scheduled", StartDate=start, EndDate=start + timedelta(hours=hours * 0.9))
    assert check.status == WARN and "the group can only grow from 2026-11-22 12:00 UTC" in check.detail
    assert "NemoGpuPodPending after 15 min" in check.detail
    fits = judge(cfg, State="scheduled", StartDate=start, EndDate=start + timedelta(hours=hours * 1.5))
    assert fits.status == PASS and "can only grow from" in fits.detail


def test_serving_from_a_block_warns():
    check = judge(block_stack(serving_elsewhere=False))
    assert check.status == WARN and "Triton serves from this group: it stops at 2026-11-27 12:00 UTC" in check.detail
    assert "nemo-eks:serving.nodeGroup" in check.fix


def test_without_a_training_estimate_the_window_cannot_be_judged():
    check = judge(block_stack(dataset_tokens=None))
    assert check.status == WARN and "no training estimate" in check.detail
    assert "nemo-eks:training.datasetTokens" in check.fix


def test_the_block_is_described():
    client, stub = stubbed("ec2")
    stub.add_response("describe_capacity_reservations", {"CapacityReservations": [reservation()]},
                      {"CapacityReservationIds": [RID]})
    with stub:
        checks = preflight.check_capacity_block_windows(client, block_stack(), NOW)
    assert [c.status for c in checks] == [PASS]


@pytest.mark.parametrize("capacity_type", ["ON_DEMAND"])
def test_only_capacity_blocks_are_judged(capacity_type):
    client, stub = stubbed("ec2")
    cfg = stack_config([{"name": "train", "instanceType": "p5.48xlarge", "capacityType": capacity_type,
                         "capacityReservationId": RID, "maxSize": 4}])
    with stub:  # no call expected: an unexpected one fails the stub
        assert preflight.check_capacity_block_windows(client, cfg, NOW) == []


def test_an_unreadable_block_warns():
    client, stub = stubbed("ec2")
    stub.add_client_error("describe_capacity_reservations", "UnauthorizedOperation", "not allowed")
    with stub:
        [check] = preflight.check_capacity_block_windows(client, block_stack(), NOW)
    assert check.status == WARN and "UnauthorizedOperation" in check.detail
