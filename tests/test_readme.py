"""Documentation facts that come from code must match the code; README.md stays the short front door."""

from __future__ import annotations

import re

import pytest

from infra import catalog
from tools import docgen, synth

README = (synth.ROOT / "README.md").read_text()
DOCS = synth.ROOT / "docs"


@pytest.mark.parametrize("page", sorted(docgen.PAGES))
def test_generated_blocks_are_current(page):
    """The config table and the sizing tables in docs/ are what the code says now (`make docs`)."""
    text = (DOCS / page).read_text()
    assert docgen.rewrite(page, text) == text, f"docs/{page} is stale: run `make docs`"


def test_every_stack_file_is_described():
    for stack in synth.stack_names():
        assert f"| `{stack}` |" in README


def test_instance_facts_in_the_platform_page_match_the_catalog():
    platform = (DOCS / "platform.md").read_text()
    for name in catalog.GPU_INSTANCE_TYPES:
        t = catalog.get(name)
        row = next(line for line in platform.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {t.gpus} x {t.gpu_model} | {t.gpu_memory_gib} GiB | {t.efa_interfaces} |" in row
        assert f"{t.on_demand_usd_per_hour:.2f}" in row
    assert catalog.PRICE_DATE in platform


def test_make_test_is_the_documented_test_command():
    assert "make test" in README and "make plan STACK=dev" in README


def test_readme_is_a_front_door():
    assert len(README.splitlines()) <= 200


def test_every_relative_link_resolves():
    for page in [synth.ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(((?:docs/|\.\./|\./)?[\w./-]+\.md)(?:#[\w-]+)?\)", page.read_text()):
            assert (page.parent / target).resolve().exists(), f"{page.name}: broken link {target}"


def test_every_docs_page_is_linked_from_the_readme():
    for page in sorted(DOCS.glob("*.md")):
        assert f"(docs/{page.name})" in README, page.name
