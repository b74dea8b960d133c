"""README facts that come from code must match the code."""

from __future__ import annotations

from infra import catalog
from tools import docgen, synth

README = (synth.ROOT / "README.md").read_text()


def test_generated_blocks_are_current():
    """The config table and the sizing tables in README.md are what the code says now (`make docs`)."""
    assert docgen.rewrite(README) == README, "README.md is stale: run `make docs`"


def test_every_stack_file_is_described():
    for stack in synth.stack_names():
        assert f"| `{stack}` |" in README


def test_instance_facts_in_readme_match_the_catalog():
    for name in catalog.GPU_INSTANCE_TYPES:
        t = catalog.get(name)
        row = next(line for line in README.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {t.gpus} x {t.gpu_model} | {t.gpu_memory_gib} GiB | {t.efa_interfaces} |" in row
        assert f"{t.on_demand_usd_per_hour:.2f}" in row
    assert catalog.PRICE_DATE in README


def test_make_test_is_the_documented_test_command():
    assert "make test" in README and "make plan STACK=dev" in README
