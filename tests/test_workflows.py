"""The GitHub Actions workflows: valid against GitHub's workflow schema, and doing what the README says."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tools import synth
from tools.affected import affected

WORKFLOWS = synth.ROOT / ".github" / "workflows"
CHECK_JSONSCHEMA = Path(os.environ.get("CHECK_JSONSCHEMA", synth.ROOT / ".venv-tools" / "bin" / "check-jsonschema"))


def load(name: str) -> dict:
    document = yaml.safe_load((WORKFLOWS / name).read_text())
    document["on"] = document.pop(True, document.get("on"))  # YAML 1.1 reads the key `on` as true
    return document


def steps_using(job: dict, action: str) -> list[dict]:
    return [step for step in job.get("steps", []) if step.get("uses", "").startswith(action)]


def test_workflows_match_githubs_schema():
    assert CHECK_JSONSCHEMA.exists(), f"{CHECK_JSONSCHEMA} is missing: `make test` installs it into .venv-tools"
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    result = subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.github-workflows", *files],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_long_lived_credentials_anywhere():
    for path in WORKFLOWS.glob("*.yml"):
        text = path.read_text()
        for forbidden in ("aws-access-key-id", "AWS_SECRET_ACCESS_KEY", "PULUMI_ACCESS_TOKEN", "secrets.AWS"):
            assert forbidden not in text, (path.name, forbidden)
        for job in load(path.name)["jobs"].values():
            for step in steps_using(job, "aws-actions/configure-aws-credentials"):
                assert "role-to-assume" in step["with"]  # OIDC role assumption


def test_pull_request_workflow():
    wf = load("pull-request.yml")
    assert set(wf["on"]) == {"pull_request"}
    assert wf["permissions"] == {"contents": "read"}  # least by default; the preview job asks for more
    jobs = wf["jobs"]
    assert any(step.get("run") == "make test" for step in jobs["test"]["steps"])
    assert any(step.get("run") == "make plan-all" for step in jobs["plan"]["steps"])
    [upload] = steps_using(jobs["plan"], "actions/upload-artifact")
    assert upload["with"]["path"] == "build/"
    preview = jobs["preview"]
    assert preview["permissions"] == {"contents": "read", "id-token": "write", "pull-requests": "write"}
    assert "fromJSON(needs.plan.outputs.affected)" in preview["strategy"]["matrix"]["stack"]
    assert preview["concurrency"]["group"] == "pulumi-${{ matrix.stack }}"
    [pulumi] = steps_using(preview, "pulumi/actions@")
    assert pulumi["uses"] == "pulumi/actions@v7"
    assert pulumi["with"]["command"] == "preview" and pulumi["with"]["comment-on-pr"] is True
    assert pulumi["with"]["edit-pr-comment"] is True and pulumi["with"]["policyPacks"] == "policy"
    assert any("policy/requirements.txt" in step.get("run", "") for step in preview["steps"])
    assert steps_using(preview, "pulumi/auth-actions@")


def test_deploy_goes_dev_then_staging_then_prod():
    wf = load("deploy.yml")
    assert wf["on"] == {"push": {"branches": ["main"]}}
    jobs = wf["jobs"]
    assert jobs["dev"]["needs"] == "test" and jobs["staging"]["needs"] == "dev" and jobs["prod"]["needs"] == "staging"
    deployed = {name: job["with"]["stack"] for name, job in jobs.items() if job.get("uses") == "./.github/workflows/up.yml"}
    assert set(deployed.values()) == set(synth.stack_names())  # every stack file is deployed
    up = load("up.yml")
    job = up["jobs"]["up"]
    assert job["environment"] == "${{ inputs.stack }}"  # protection rules per environment (approval for prod)
    assert job["concurrency"] == {"group": "pulumi-${{ inputs.stack }}", "cancel-in-progress": False}
    [pulumi] = steps_using(job, "pulumi/actions@")
    assert pulumi["with"]["command"] == "up" and pulumi["with"]["policyPacks"] == "policy"
    assert any("policy/requirements.txt" in step.get("run", "") for step in job["steps"])
    assert up["permissions"] == {"contents": "read", "id-token": "write"}


def test_manual_preflight_and_non_prod_destroy():
    wf = load("operate.yml")
    assert set(wf["on"]) == {"workflow_dispatch"}
    assert wf["on"]["workflow_dispatch"]["inputs"]["action"]["options"] == ["preflight", "destroy"]
    preflight, destroy = wf["jobs"]["preflight"], wf["jobs"]["destroy"]
    assert any("tools.preflight --stack" in step.get("run", "") for step in preflight["steps"])
    guard = destroy["steps"][0]
    assert "prod|prod-*" in guard["run"] and "exit 1" in guard["run"]
    [pulumi] = steps_using(destroy, "pulumi/actions@")
    assert pulumi["with"]["command"] == "destroy"


@pytest.mark.parametrize("changed,expected", [
    (["stacks/Pulumi.dev.yaml"], ["dev"]),
    (["stacks/Pulumi.dev.yaml", "stacks/Pulumi.prod.yaml"], ["dev", "prod"]),
    (["README.md"], []),
    (["infra/gpu_nodes.py"], ["dev", "prod", "prod-405b", "staging"]),
    (["README.md", "stacks/Pulumi.staging.yaml"], ["staging"]),
    (["stacks/Pulumi.gone.yaml"], []),
])
def test_affected_stacks(changed, expected):
    assert affected(changed, ["dev", "staging", "prod", "prod-405b"]) == expected
