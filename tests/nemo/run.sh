#!/usr/bin/env bash
# The NeMo test environment: builds the fine-tuning entrypoint's real NeMo 2 objects from every stack's
# resolved run.json, on the CPU, with the NeMo stack of the NGC container we target (tests/nemo/requirements.txt).
#
#   bash tests/nemo/run.sh [pytest args...]
#
# .venv-nemo is kept between runs; it is rebuilt only when requirements.txt changes (a stamp file holds the
# hash), so a second run costs only the tests. The run.json files come from the main .venv (tests/nemo/write_runs.py:
# infra.config and workloads.runconfig need PyYAML and our config code, not NeMo), written to a temp dir named by
# NEMO_EKS_RUNS_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
MAIN_PY="${MAIN_PY:-$ROOT/.venv/bin/python}"
VENV="${NEMO_VENV:-$ROOT/.venv-nemo}"
REQUIREMENTS="$ROOT/tests/nemo/requirements.txt"
STAMP="$VENV/.requirements.sha256"

if [[ ! -x "$MAIN_PY" ]]; then
    echo "tests/nemo: $MAIN_PY not found; run \`make venv\` first (it writes the run.json files)" >&2
    exit 1
fi

want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]]; then
    echo "tests/nemo: building $VENV (requirements changed or venv missing)"
    start=$SECONDS
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # torch first and alone: with it in place, nothing below can pull a CUDA build as a dependency.
    "$VENV/bin/python" -m pip install --quiet "$(grep -E '^torch==' "$REQUIREMENTS")"
    "$VENV/bin/python" -m pip install --quiet -r "$REQUIREMENTS"
    echo "$want" > "$STAMP"
    echo "tests/nemo: environment ready in $((SECONDS - start)) s"
fi

RUNS_DIR="$(mktemp -d)"
trap 'rm -rf "$RUNS_DIR"' EXIT
# exactly what the training pods are given, and the planner shapes no stack file has
"$MAIN_PY" -m tests.nemo.write_runs "$RUNS_DIR"
export NEMO_EKS_RUNS_DIR="$RUNS_DIR"
# No accelerator and no network here: keep NeMo, Lightning and Hugging Face from looking for either.
export CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NEMO_HOME="$RUNS_DIR/nemo-home"
start=$SECONDS
"$VENV/bin/python" -m pytest -c "$ROOT/tests/nemo/pytest.ini" "$ROOT/tests/nemo" "$@"
echo "tests/nemo: tests ran in $((SECONDS - start)) s"
