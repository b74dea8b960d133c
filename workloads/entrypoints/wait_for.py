"""Block until a completion marker exists on the shared volume; the init container of every waiting stage.

    python3 /opt/nemo-eks/wait_for.py MARKER [--timeout-seconds N] [--poll-seconds S] [--failure-marker PATH ...]

Exit 0 when MARKER exists (its JSON is printed), 1 when a failure marker appears (its message is printed),
2 on timeout. Stdlib only: it runs in whichever image the stage uses.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Sequence

EXIT_READY, EXIT_FAILED, EXIT_TIMEOUT = 0, 1, 2
DEFAULT_TIMEOUT_SECONDS = 7 * 24 * 3600  # a long fine-tune; the Job's activeDeadlineSeconds is the real bound
DEFAULT_POLL_SECONDS = 15.0  # Lustre metadata lookups are cheap, but there can be dozens of waiters
REPORT_EVERY_SECONDS = 600  # a line every ten minutes shows the pod is alive without flooding the log


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def wait(marker: str, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS, poll_seconds: float = DEFAULT_POLL_SECONDS,
         failure_markers: Sequence[str] = (), out=None,
         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> int:
    out = out or sys.stdout
    start = clock()
    last_report = start
    print(f"waiting for {marker} (timeout {timeout_seconds:.0f} s"
          + (f", failing fast on {', '.join(failure_markers)}" if failure_markers else "") + ")", file=out, flush=True)
    while True:
        if os.path.exists(marker):
            print(f"ready after {clock() - start:.0f} s: {marker}", file=out)
            print(_read(marker), file=out, flush=True)
            return EXIT_READY
        for failed in failure_markers:
            if os.path.exists(failed):
                print(f"failed: {failed} exists; the stage it belongs to reported:", file=out)
                print(_read(failed) or "(no message)", file=out, flush=True)
                return EXIT_FAILED
        now = clock()
        if now - start >= timeout_seconds:
            print(f"timed out after {now - start:.0f} s waiting for {marker}; is the stage that writes it "
                  "running? (kubectl get pods,jobs,pytorchjobs -n <namespace>)", file=out, flush=True)
            return EXIT_TIMEOUT
        if now - last_report >= REPORT_EVERY_SECONDS:
            print(f"still waiting for {marker} ({now - start:.0f} s)", file=out, flush=True)
            last_report = now
        sleep(min(poll_seconds, max(0.0, timeout_seconds - (now - start))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("marker")
    parser.add_argument("--timeout-seconds", type=float, default=DEFAULT_TIMEOUT_SECONDS)
    parser.add_argument("--poll-seconds", type=float, default=DEFAULT_POLL_SECONDS)
    parser.add_argument("--failure-marker", action="append", default=[],
                        help="exit 1 as soon as this file exists (repeatable)")
    args = parser.parse_args(argv)
    return wait(args.marker, args.timeout_seconds, args.poll_seconds, args.failure_marker)


if __name__ == "__main__":
    sys.exit(main())
