"""The nemo-eks policy pack, as the Pulumi engine runs it:

    pulumi preview --policy-pack policy

The engine runs this file with the pack's own virtualenv (policy/venv, see PulumiPolicy.yaml). Constructing
the PolicyPack starts the analyzer's gRPC server and never returns, so nothing else imports this file: the
policies live in policy/rules.py, which the tests import.
"""

import sys
from pathlib import Path

# The policies read instance facts from the project's infra/catalog.py (pure Python, standard library only):
# put the project directory on the path, whichever directory the engine starts the pack in.
PROJECT_DIR = str(Path(__file__).resolve().parent.parent)
if PROJECT_DIR not in sys.path:
    sys.path.insert(0, PROJECT_DIR)

from pulumi_policy import EnforcementLevel, PolicyPack  # noqa: E402

from policy.rules import POLICIES  # noqa: E402

PolicyPack(
    name="nemo-eks-guardrails",
    description="nemo-eks guardrails: EFA launch templates and security groups, FSx for Lustre ports, S3 "
                "encryption, public access and TLS, pinned images, no RDMAV_FORK_SAFE, /dev/shm for GPU pods, "
                "EFA requests per node, Triton's GPUs per engine, and protected CI runner nodes and controller.",
    enforcement_level=EnforcementLevel.MANDATORY,
    policies=POLICIES,
)
