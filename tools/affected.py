"""Which stacks a change affects, for the pull-request preview matrix.

    python -m tools.affected BASE_REF      # prints a JSON list of stack names

A change to a stack file affects that stack; a change to the program (anything but documentation) affects
every stack; documentation alone affects none.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Iterable

from tools.synth import stack_names

DOCUMENTATION = (".md",)


def affected(changed: Iterable[str], stacks: Iterable[str]) -> list[str]:
    stacks = sorted(stacks)
    touched: set[str] = set()
    for path in changed:
        if path.startswith("stacks/Pulumi.") and path.endswith(".yaml"):
            name = path[len("stacks/Pulumi."):-len(".yaml")]
            if name in stacks:
                touched.add(name)
        elif not path.endswith(DOCUMENTATION):
            return stacks
    return sorted(touched)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    diff = subprocess.run(["git", "diff", "--name-only", f"{argv[0]}...HEAD"], capture_output=True, text=True,
                          check=True)
    print(json.dumps(affected(diff.stdout.split(), stack_names())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
