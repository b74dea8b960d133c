"""Documentation blocks generated from code, so the docs cannot drift from it.

    python -m tools.docgen config      # print the stack-config table (from infra/config.py)
    python -m tools.docgen sizing      # print the sizing matrix (from infra/sizing.py)
    python -m tools.docgen seed        # print the check of the common sizing table
    python -m tools.docgen tuned       # print NVIDIA's tuned layouts and what the planner picks
    python -m tools.docgen loo         # print the leave-one-out check of the throughput estimate
    python -m tools.docgen --write     # rewrite every generated block of the docs/ pages in place
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable

from infra import sizing
from infra.config import KEYS, REQUIRED, Derived, Key

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _default(key: Key) -> str:
    if key.default is REQUIRED:
        return "**required**"
    if key.default is None:
        return "unset"
    if isinstance(key.default, Derived):
        return str(key.default)
    if isinstance(key.default, bool):
        return f"`{str(key.default).lower()}`"
    if isinstance(key.default, list):
        return f"`{key.default}`" if key.default else "`[]`"
    if isinstance(key.default, dict):
        return "`{}`"
    return f"`{key.default}`"


def config_table() -> str:
    lines = ["| key | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    for key in KEYS:
        cells = [f"`{key.qualified}`", key.type.replace("<", "&lt;").replace(">", "&gt;"), _default(key),
                 key.allowed.replace("|", "\\|"), key.description.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[], str]] = {
    "config": config_table,
    "sizing": sizing.matrix,
    "seed": sizing.seed_table_markdown,
    "tuned": sizing.tuned_table,
    "loo": sizing.leave_one_out_table,
}
# The page each generated block lives in.
PAGES: dict[str, tuple[str, ...]] = {
    "configuration.md": ("config",),
    "sizing.md": ("sizing", "seed"),
    "sizing-layouts.md": ("tuned", "loo"),
}


def block(name: str) -> str:
    return f"<!-- generated:{name} (make docs; do not edit by hand) -->\n{BLOCKS[name]()}\n<!-- end:{name} -->"


def rewrite(page: str, text: str) -> str:
    for name in PAGES[page]:
        pattern = re.compile(rf"<!-- generated:{name} .*?<!-- end:{name} -->", re.S)
        if not pattern.search(text):
            raise SystemExit(f"docs/{page} has no generated:{name} block")
        text = pattern.sub(lambda _: block(name), text)
    return text


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        for page in PAGES:
            path = DOCS / page
            path.write_text(rewrite(page, path.read_text()))
        return 0
    if len(argv) == 1 and argv[0] in BLOCKS:
        print(BLOCKS[argv[0]]())
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
