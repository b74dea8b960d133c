"""README facts that come from code must match the code."""

from __future__ import annotations

from infra import catalog
from tools import configdoc, synth

README = (synth.ROOT / "README.md").read_text()


def test_configuration_table_is_generated_from_the_key_table():
    assert configdoc.table() in README, "README's config table is stale: run `make config-doc` and paste it"


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
