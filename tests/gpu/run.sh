#!/usr/bin/env bash
# The pipeline's entrypoints on one CUDA GPU with a tiny Llama made on the spot (tests/gpu/harness.py says what
# runs and what is checked). Needs python3 with torch (CUDA), and the NeMo 2.7.3 stack importable, either
# installed or as wheels unpacked into an overlay directory first (tests/gpu/overlay-requirements.txt lists them):
#
#   bash tests/gpu/run.sh [--install WHEEL_DIR]... [-- HARNESS_ARGS...]
#
#   --install DIR   unpack every DIR/*.whl into $GPU_TEST_SITE (default ~/nemo-eks-site), which is put first on
#                   PYTHONPATH so it shadows the machine's own versions (transformers 4.57 over 5.x, say)
#   HARNESS_ARGS    e.g. --stages setup | --stages train,export,evaluate | --methods lora
#
# Results: $OUT/summary.json (every step's checks and numbers), $OUT/logs.tar.gz, $OUT/harness.log.
# The work directory ($GPU_TEST_WORK, default ~/nemo-eks-gpu) keeps the models between invocations.
# Exit code 0 only when every check of every step that ran passed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SITE="${GPU_TEST_SITE:-$HOME/nemo-eks-site}"
OUT="${OUT:-$ROOT/build/gpu-out}"
PYTHON="${PYTHON:-python3}"
LIMIT="${GPU_TEST_LIMIT_S:-0}"  # > 0: stop the harness after this many seconds (it still writes its results)

install=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --install) install+=("$2"); shift 2 ;;
        --) shift; break ;;
        *) break ;;
    esac
done

mkdir -p "$OUT" "$SITE"
start=$SECONDS
for dir in "${install[@]}"; do
    "$PYTHON" - "$SITE" "$dir"/*.whl <<'PY'
import sys, zipfile
site, wheels = sys.argv[1], sys.argv[2:]
for wheel in wheels:
    zipfile.ZipFile(wheel).extractall(site)
print(f"unpacked {len(wheels)} wheels into {site}")
PY
done
[[ ${#install[@]} -gt 0 ]] && echo "install: $((SECONDS - start)) s"

export OUT PYTHONUNBUFFERED=1
export PYTHONPATH="$SITE:$ROOT/tests/gpu${PYTHONPATH:+:$PYTHONPATH}"
set -o pipefail
if [[ "$LIMIT" -gt 0 ]]; then
    timeout --signal=TERM "$LIMIT" "$PYTHON" "$ROOT/tests/gpu/harness.py" "$@" 2>&1 | tee "$OUT/harness.log"
else
    "$PYTHON" "$ROOT/tests/gpu/harness.py" "$@" 2>&1 | tee "$OUT/harness.log"
fi
