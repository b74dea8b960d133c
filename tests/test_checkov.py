"""checkov over every stack's rendered manifests: no failed check (suppressions live in .checkov.yaml)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tools import synth

CHECKOV = Path(os.environ.get("CHECKOV", synth.ROOT / ".venv-tools" / "bin" / "checkov"))


def test_checkov_finds_nothing(stack_synth, tmp_path):
    assert CHECKOV.exists(), f"{CHECKOV} is missing: `make test` installs it into .venv-tools"
    target = synth.write(stack_synth, tmp_path)
    result = subprocess.run([str(CHECKOV), "-d", str(target / "manifests"), "--config-file",
                             str(synth.ROOT / ".checkov.yaml"), "-o", "json"],
                            capture_output=True, text=True, timeout=600)
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    summary = [r["summary"] for r in reports]
    failed = [f"{c['check_id']} {c['resource']}" for r in reports for c in r["results"]["failed_checks"]]
    assert not failed, failed
    assert sum(s["passed"] for s in summary) > 50  # it really scanned our manifests
