"""Preflight's API-endpoint check: DescribeCluster answers checked against the EKS service model (Stubber),
and real TCP connections to a socket on 127.0.0.1."""

from __future__ import annotations

import socket

import boto3
import pytest
from botocore.stub import Stubber

from infra import config
from tests.conftest import raw_config
from tools import preflight
from tools.preflight import FAIL, PASS, WARN


def stack_config(**overrides):
    return config.load(raw_config(overrides), "dev")


def eks_answering(method: str = "describe_cluster", response=None, error_code: str | None = None):
    client = boto3.client("eks", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    stub = Stubber(client)
    if error_code:
        stub.add_client_error(method, service_error_code=error_code, expected_params={"name": "nemo-eks-dev"})
    else:
        stub.add_response(method, response, expected_params={"name": "nemo-eks-dev"})
    stub.activate()
    return client


def cluster(endpoint: str, public: bool = False) -> dict:
    return {"cluster": {"name": "nemo-eks-dev", "endpoint": endpoint, "status": "ACTIVE",
                        "resourcesVpcConfig": {"endpointPublicAccess": public, "endpointPrivateAccess": True,
                                               "publicAccessCidrs": ["100.24.1.7/32"] if public else []}}}


@pytest.fixture
def listening():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        yield server.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once it is closed


def test_a_reachable_endpoint_passes(listening):
    [check] = preflight.check_api_endpoint(eks_answering(response=cluster(f"https://127.0.0.1:{listening}")), stack_config())
    assert check.status == PASS and f"127.0.0.1:{listening}" in check.detail and "nemo-eks-dev" in check.detail


def test_an_unreachable_endpoint_fails_with_the_ways_to_reach_it():
    port = closed_port()
    [check] = preflight.check_api_endpoint(eks_answering(response=cluster(f"https://127.0.0.1:{port}", public=True)),
                                           stack_config())
    assert check.status == FAIL and "cannot reach" in check.detail and "public for 100.24.1.7/32" in check.detail
    assert "CI runners" in check.fix and "SSM port forward" in check.fix and "/32" in check.fix


def test_the_default_port_is_https():
    seen = []
    preflight.check_api_endpoint(eks_answering(response=cluster("https://ABC.gr7.us-east-1.eks.amazonaws.com")),
                                 stack_config(), connect=lambda host, port: seen.append((host, port)) or "10.0.1.5")
    assert seen == [("abc.gr7.us-east-1.eks.amazonaws.com", 443)]  # DNS names are case-insensitive


def test_before_the_cluster_exists_it_warns_how_the_first_up_will_reach_it():
    [check] = preflight.check_api_endpoint(eks_answering(error_code="ResourceNotFoundException"), stack_config())
    assert check.status == WARN and "does not exist yet" in check.detail and "a private endpoint only" in check.detail
    assert "bootstrap" in check.fix


def test_a_refused_describe_is_reported_by_run_checks_not_swallowed():
    with pytest.raises(Exception) as error:
        preflight.check_api_endpoint(eks_answering(error_code="AccessDeniedException"), stack_config())
    assert preflight._error_code(error.value) == "AccessDeniedException"  # run_checks turns it into a WARN
