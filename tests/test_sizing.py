"""The sizing planner: architecture facts, the memory model against hand-computed cases, the fit boundary,
calibration, the common sizing table, and config overrides that cannot work."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from infra import catalog, sizing
from infra.config import ConfigError, load
from infra.sizing import GIB, MODELS, TrainingRequest, memory_breakdown, plan
from tests.conftest import raw_config, synth_stack
from tools import synth

P4D, P4DE, P5 = (catalog.get(n) for n in ("p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge"))


# ---------------------------------------------------------------------------------------------- models

# Parameter counts Hugging Face reports for each model (model cards / safetensors index): the architecture
# facts must reproduce them exactly.
HF_PARAMS = {
    "llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192,
    "llama31-8b": 8_030_261_248, "llama31-70b": 70_553_706_496, "llama31-405b": 405_853_388_800,
}


@pytest.mark.parametrize("key", MODELS)
def test_parameter_count_matches_the_published_model(key):
    assert MODELS[key].params == HF_PARAMS[key]


def test_variants_map_to_the_product_defaults():
    assert {v: sizing.model_for(v).display for v in sizing.VARIANTS} == {
        "7b": "Llama-2-7B", "13b": "Llama-2-13B", "70b": "Llama-3.1-70B", "405b": "Llama-3.1-405B"}
    assert sizing.model_for("7b", "llama31-8b").display == "Llama-3.1-8B"
    assert sizing.model_for("70b", "llama2-70b").display == "Llama-2-70B"


def test_kv_cache_bytes_per_token_use_kv_heads():
    # 2 (K and V) x layers x KV heads x head_dim x bytes: Llama 3 70B 2*80*8*128*2, 8B 2*32*8*128*2.
    assert sizing.kv_bytes_per_token(MODELS["llama31-70b"], 2) == 327_680
    assert sizing.kv_bytes_per_token(MODELS["llama31-8b"], 2) == 131_072
    assert sizing.kv_bytes_per_token(MODELS["llama31-70b"], 1) == 163_840  # FP8 KV cache
    assert sizing.kv_bytes_per_token(MODELS["llama2-7b"], 2) == 2 * 32 * 32 * 128 * 2  # no GQA in Llama 2 7B


def test_flops_per_token_is_nemos_llama_formula():
    # nemo/utils/flops_formulas.py (llama3) for Llama3-8B at s=8192: 51.5 GFLOP per token.
    assert sizing.flops_per_token(MODELS["llama31-8b"], 8192, "sft") == pytest.approx(51.47e9, rel=1e-3)
    sft = sizing.flops_per_token(MODELS["llama2-7b"], 4096, "sft")
    lora = sizing.flops_per_token(MODELS["llama2-7b"], 4096, "lora")
    attention = 12 * 32 * 4096 * 4096 * 0.5
    assert lora - attention == pytest.approx((sft - attention) * 2 / 3)


# ---------------------------------------------------------------------------------------------- memory


def test_lora_memory_by_hand_llama2_7b_on_one_a100():
    """Llama-2-7B LoRA, TP1 PP1, seq 4096, micro-batch 1, rank 16, no recompute."""
    m = memory_breakdown(TrainingRequest(MODELS["llama2-7b"], "lora", P4D), tp=1, pp=1, cp=1, dp=8, recompute="none")
    per_layer_params = 4096 * (2 * 4096 + 2 * 4096) + 3 * 4096 * 11008 + 2 * 4096
    assert m.weights == (32 * per_layer_params + 2 * 32000 * 4096) * 2  # frozen base, 2 bytes each
    assert m.gradients == 0 and m.optimizer == 0  # Megatron's DDP gives frozen parameters no gradient buffer
    lora_per_layer = 16 * ((4096 + 3 * 4096) + (4096 + 4096) + (4096 + 2 * 11008) + (11008 + 4096))
    assert m.lora_adapters == 32 * lora_per_layer * 16  # bf16 weight + bf16 grad + fp32 master and Adam moments
    # Megatron-Core's s*b*h*(18 + 4F/h) bytes per layer (theoretical_memory_usage.py), every layer in flight
    assert m.activations == int(4096 * 4096 * (18 + 4 * 11008 / 4096)) * 32
    assert m.logits == int(4096 * 4096 * 4 * (1 + 32000 / 4096))  # output layer input and fp32 cross-entropy
    assert m.usable == int(40 * GIB * 0.9) and m.fits


def test_sft_uses_the_distributed_optimizer():
    """Megatron-Core: 2 + grad + 12/d bytes per parameter with the optimizer sharded over d data-parallel ranks;
    the gradient buffer is bf16 as in NVIDIA's tuned recipes (grad_reduce_in_fp32 off)."""
    request = TrainingRequest(MODELS["llama2-7b"], "sft", P4DE)
    m = memory_breakdown(request, tp=2, pp=1, cp=1, dp=4, recompute="full")
    params_here = (32 * MODELS["llama2-7b"].params_per_layer + 2 * MODELS["llama2-7b"].embedding_params) // 2
    assert (m.weights, m.gradients, m.optimizer) == (2 * params_here, 2 * params_here, 12 * params_here // 4)
    assert not sizing.GRAD_REDUCE_IN_FP32 and sizing.GRAD_BYTES == 2


def test_fp8_memory_follows_what_megatron_keeps():
    """FP8 SFT keeps its compute weights in FP8 (fp8_param_gather); FP8 LoRA keeps its frozen base in bf16 and,
    with the parameter transpose cache off, no FP8 copies between micro-batches."""
    model = MODELS["llama31-70b"]
    sft = {p: memory_breakdown(TrainingRequest(model, "sft", P5, precision=p), 4, 4, 1, 2, "none", 5) for p in ("bf16", "fp8")}
    assert sft["fp8"].weights * 2 == sft["bf16"].weights and sft["fp8"].gradients == sft["bf16"].gradients
    lora = {p: memory_breakdown(TrainingRequest(model, "lora", P5, precision=p), 2, 4, 1, 1, "none", 20) for p in ("bf16", "fp8")}
    assert lora["fp8"].weights == lora["bf16"].weights


def test_interleaving_adds_megatrons_in_flight_penalty():
    """With VP the first stage holds PP x (1 + (PP-1)/(PP x VP)) micro-batches of its layers."""
    request = TrainingRequest(MODELS["llama31-70b"], "lora", P5, precision="fp8", global_batch_size=32)
    plain, interleaved = (memory_breakdown(request, 2, 4, 1, 1, "none", vp) for vp in (1, 20))
    assert interleaved.activations == int(plain.activations // 80 * 20 * 4 * (1 + 3 / 80))
    assert interleaved.activations > plain.activations


def test_tensor_and_pipeline_parallelism_divide_the_memory():
    request = TrainingRequest(MODELS["llama31-70b"], "lora", P5, precision="fp8")
    one = memory_breakdown(request, tp=4, pp=1, cp=1, dp=2, recompute="none")
    two = memory_breakdown(request, tp=8, pp=1, cp=1, dp=1, recompute="none")
    assert two.weights == pytest.approx(one.weights / 2, rel=1e-6)
    assert two.activations == pytest.approx(one.activations / 2, rel=1e-6)
    staged = memory_breakdown(request, tp=4, pp=2, cp=1, dp=1, recompute="none")
    # Two stages: each holds half the layers and one of the two embedding matrices.
    model = MODELS["llama31-70b"]
    assert staged.weights == (40 * model.params_per_layer + model.embedding_params) // 4 * 2  # bf16 frozen base


def test_full_recompute_keeps_only_layer_inputs():
    request = TrainingRequest(MODELS["llama2-13b"], "lora", P4D)
    none = memory_breakdown(request, tp=2, pp=1, cp=1, dp=4, recompute="none")
    full = memory_breakdown(request, tp=2, pp=1, cp=1, dp=4, recompute="full")
    model = MODELS["llama2-13b"]
    per_layer = int(sizing.activation_bytes_per_token_per_layer(model) * 4096) // 2
    assert full.activations == 2 * model.hidden * 4096 // 2 * model.layers + per_layer
    assert full.activations < none.activations / 5


def test_fit_boundary_on_micro_batch():
    """The largest micro-batch that fits without recompute: one more does not, and then the planner turns
    on full recompute rather than give up."""
    model = MODELS["llama2-7b"]
    batch = 8 * 2520  # divisible by 8 data-parallel ranks x every micro-batch size tried
    totals = {b: memory_breakdown(TrainingRequest(model, "lora", P4DE, micro_batch_size=b, global_batch_size=batch),
                                  1, 1, 1, 8, "none") for b in range(1, 10)}
    largest = max(b for b, m in totals.items() if m.fits)
    assert totals[largest].total <= totals[largest].usable < totals[largest + 1].total
    fixed = dict(nodes=1, tp=1, pp=1, global_batch_size=batch)
    assert plan(TrainingRequest(model, "lora", P4DE, micro_batch_size=largest, **fixed)).parallelism.recompute == "none"
    bigger = plan(TrainingRequest(model, "lora", P4DE, micro_batch_size=largest + 1, **fixed))
    assert bigger.fits and bigger.parallelism.recompute == "full"


def test_planner_takes_the_tuned_layout_and_searches_other_node_counts():
    result = plan(TrainingRequest(MODELS["llama31-70b"], "sft", P5, precision="fp8"))
    assert result.fits and result.parallelism.nodes == 4 and result.tuned is not None
    assert (result.parallelism.tp, result.parallelism.pp, result.parallelism.vp, result.parallelism.dp) == (4, 4, 5, 2)
    assert not plan(TrainingRequest(MODELS["llama31-70b"], "sft", P5, precision="fp8", nodes=1)).memory.fits
    two = plan(TrainingRequest(MODELS["llama31-70b"], "sft", P5, precision="fp8", nodes=2))
    assert two.memory.fits and two.tuned is None  # no tuned layout for 16 GPUs: the search chose one
    with pytest.raises(sizing.SizingError, match="no data-parallel size of 3 x p5.48xlarge divides it"):
        plan(TrainingRequest(MODELS["llama31-70b"], "sft", P5, precision="fp8", nodes=3))  # 24 GPUs: no DP divides 128


def test_a_plan_that_does_not_fit_says_why_and_what_would():
    result = plan(TrainingRequest(MODELS["llama31-70b"], "sft", P4D, nodes=1))
    assert not result.fits
    assert "needs 132.4 GiB per GPU" in result.reasons[0] and "36.0 GiB usable" in result.reasons[0]
    assert result.nearest == "8 x p4d.24xlarge with TP8 x PP8 x VP2 x DP1"


def test_context_parallelism_only_for_long_sequences():
    model = MODELS["llama31-70b"]
    assert sizing._cp_candidates(TrainingRequest(model, "lora", P5, seq_length=4096)) == [1]
    long = TrainingRequest(model, "lora", P5, precision="fp8", seq_length=65536, global_batch_size=32)
    assert sizing._cp_candidates(long) == [1, 2, 4, 8]
    one, two = (memory_breakdown(long, 8, 1, cp, 1, "none") for cp in (1, 2))
    assert two.activations == one.activations // 2  # each rank holds half of every sequence


# ---------------------------------------------------------------------------------------------- throughput


# ---------------------------------------------------------------------------------------------- NVIDIA's tuned layouts

# The rows of NVIDIA's tuned H100 layouts as the issue that asked for them lists them (Megatron-Bridge
# perf_recipes/llama/h100/llama3.py): model, method, precision, GPUs -> TP, PP, CP, VP, recompute.
ISSUE_TABLE = [
    ("llama31-8b", "sft", "bf16", 8, (1, 1, 1, 1, "none")),
    ("llama31-8b", "sft", "fp8", 8, (1, 1, 1, 1, "none")),
    ("llama31-70b", "sft", "fp8", 32, (4, 4, 1, 5, "none")),
    ("llama31-70b", "lora", "fp8", 8, (2, 4, 1, 20, "none")),
    ("llama31-70b", "lora", "bf16", 8, (1, 4, 1, 20, "full")),
]


@pytest.mark.parametrize("nodes_fixed", [True, False], ids=["nodes-fixed", "nodes-free"])
@pytest.mark.parametrize("row", ISSUE_TABLE, ids=lambda r: f"{r[0]}-{r[1]}-{r[2]}-{r[3]}")
def test_the_planner_reproduces_nvidias_tuned_layouts(row, nodes_fixed):
    model, method, precision, gpus, layout = row
    request = TrainingRequest(MODELS[model], method, P5, precision, global_batch_size=32,
                              nodes=gpus // 8 if nodes_fixed else None)
    result = plan(request)
    p = result.parallelism
    assert result.fits and p.gpus == gpus
    assert (p.tp, p.pp, p.cp, p.vp, p.recompute) == layout
    assert result.tuned is not None and "Megatron-Bridge" in result.tuned.source


@pytest.mark.parametrize("run", sizing.TUNED, ids=lambda r: f"{r.model}-{r.method}-{r.precision}-{r.gpus}")
def test_every_tuned_layout_is_picked_with_the_product_default_batch(run):
    """At the product's default global batch (128) the tuned layout still applies and is chosen."""
    result = plan(TrainingRequest(MODELS[run.model], run.method, P5, run.precision, nodes=run.gpus // 8))
    p = result.parallelism
    assert result.tuned is run
    assert (p.tp, p.pp, p.cp, p.vp, p.recompute) == (run.tp, run.pp, run.cp, run.vp_size, run.recompute)


def test_a_fixed_setting_that_differs_from_the_tuned_layout_is_searched():
    result = plan(TrainingRequest(MODELS["llama31-70b"], "lora", P5, "fp8", tp=8))
    assert result.tuned is None and result.parallelism.tp == 8 and result.fits


def _published_memory(run, settings=None):
    request = TrainingRequest(MODELS[run.model], run.method, P5, run.precision, run.seq_length, run.micro_batch_size,
                              run.global_batch_size)
    return memory_breakdown(request, run.tp, run.pp, run.cp, run.gpus // (run.tp * run.pp * run.cp), run.recompute,
                            run.vp_size, run.memory_settings if settings is None else settings)


@pytest.mark.parametrize("run", sizing.PUBLISHED, ids=lambda r: f"{r.model}-{r.method}-{r.precision}-{r.gpus}-{r.source[:12]}")
def test_no_published_configuration_is_judged_not_to_fit(run):
    """Every published run fits at its own layout, batch and recompute setting, under the memory settings it ran
    with (so a run without recompute is never given full recompute), and keeps Megatron-Core's interleaving rules."""
    assert _published_memory(run).fits
    dp = run.gpus // (run.tp * run.pp * run.cp)
    micro_batches = run.global_batch_size // (run.micro_batch_size * dp)
    assert sizing.virtual_pipeline_problem(MODELS[run.model], run.pp, run.vp_size, micro_batches) == ""


def test_nemo_2407_llama2_70b_sft_on_16_gpus_fits_without_recompute_with_its_bf16_optimizer_state():
    """NeMo 24.07's Llama-2-70B SFT at TP4 PP4 (VP20) and DP 1 ran without recompute: its Apex distributed
    optimizer kept master weights and both Adam moments in bf16 (6 bytes, unsharded at DP 1), not Megatron-Core's
    12 bytes of fp32. The pods keep fp32 state, and for them the same layout really does not fit without
    recompute: the planner must still say so."""
    run = next(r for r in sizing.PUBLISHED if (r.model, r.method, r.gpus) == ("llama2-70b", "sft", 16))
    assert (run.tp, run.pp, run.vp, run.recompute, run.memory_settings) == (4, 4, 20, "none", sizing.NEMO_2407_MEMORY)
    own, pods = _published_memory(run), _published_memory(run, sizing.POD_MEMORY)
    model = MODELS["llama2-70b"]
    params_here = (20 * model.params_per_layer + model.embedding_params) // 4
    assert own.optimizer == 6 * params_here and pods.optimizer == 12 * params_here  # DP 1: nothing to shard over
    assert own.weights == 2 * params_here and own.gradients == 2 * params_here  # FP8 + cached transpose; bf16 grads
    assert own.activations == pods.activations  # the same Megatron-Core activation accounting for both
    assert own.fits and own.total < own.usable - 8 * GIB
    assert not pods.fits and pods.total > pods.usable
    # The planner, with the pods' optimizer, gives that layout full recompute rather than a layout that cannot run.
    fixed = plan(TrainingRequest(model, "sft", P5, "fp8", global_batch_size=32, nodes=2, tp=4, pp=4))
    assert fixed.fits and fixed.parallelism.recompute == "full"
    assert not memory_breakdown(fixed.request, 4, 4, 1, 1, "none", fixed.parallelism.vp).fits


def test_the_nemo_2407_settings_come_from_the_launcher_examples_of_the_same_runs():
    """NeMo's summary gives TP and PP only; the launcher's H100 examples give VP and the optimizer."""
    rows = [r for r in sizing.PUBLISHED if "NVIDIA/NeMo docs" in r.source]
    assert len(rows) == 6
    for run in rows:
        assert "NeMo-Framework-Launcher examples/peft/llama/h100/" in run.source
        assert run.memory_settings is sizing.NEMO_2407_MEMORY and run.recompute == "none"
    vp = {(r.model, r.method): r.vp for r in rows}
    assert vp == {("llama2-7b", "sft"): None, ("llama2-13b", "sft"): 10, ("llama2-70b", "sft"): 20,
                  ("llama2-7b", "lora"): None, ("llama2-13b", "lora"): None, ("llama2-70b", "lora"): None}
    # Apex DistributedFusedAdam with dtype bf16 keeps params, exp_avg and exp_avg_sq in bf16.
    assert sizing.NEMO_2407_MEMORY.optimizer_bytes == 6 and sizing.POD_MEMORY.optimizer_bytes == 12


def test_the_pods_memory_settings_are_the_module_constants():
    assert sizing.POD_MEMORY == sizing.MemorySettings(sizing.GRAD_BYTES, sizing.OPTIMIZER_BYTES,
                                                      sizing.FP8_PARAM_BYTES,
                                                      sizing.WEIGHT_BYTES + sizing.FP8_WEIGHT_CACHE_BYTES)
    request = TrainingRequest(MODELS["llama31-70b"], "sft", P5, "fp8")
    assert memory_breakdown(request, 4, 4, 1, 2, "none", 5) == memory_breakdown(request, 4, 4, 1, 2, "none", 5,
                                                                                sizing.POD_MEMORY)


def test_the_tuned_table_is_one_table_with_sources():
    assert sizing.TUNED and all(r in sizing.PUBLISHED for r in sizing.TUNED)
    for run in sizing.TUNED:
        assert "perf_recipes/llama/h100/llama3.py" in run.source and sizing._BRIDGE_COMMIT[:8] in run.source
    measured = {(r.model, r.method, r.precision, r.gpus): r.tokens_per_sec_per_gpu for r in sizing.TUNED}
    assert measured[("llama31-70b", "sft", "fp8", 32)] == 1638 and measured[("llama31-70b", "lora", "fp8", 8)] == 2643
    table = sizing.tuned_table()
    assert table.count("(the tuned one)") == len(sizing.TUNED) and "NOT the tuned one" not in table


def test_the_sizing_page_shows_the_current_tables():
    from tools import docgen

    page = (docgen.DOCS / "sizing-layouts.md").read_text()
    assert docgen.rewrite("sizing-layouts.md", page) == page, "docs/sizing-layouts.md is stale: run `make docs`"
    assert "held-out points within 10%" in page and "(the tuned one)" in page


def test_where_nothing_is_tuned_the_search_still_chooses():
    for name in ("p5e.48xlarge", "p4de.24xlarge"):
        instance = catalog.get(name)
        result = plan(TrainingRequest(MODELS["llama31-70b"], "lora", instance, "fp8" if instance.fp8 else "bf16"))
        assert result.fits and result.tuned is None
    rows = [line for line in sizing.matrix().splitlines()[2:] if "p5e.48xlarge" in line]
    assert rows and all("| - |" in row for row in rows)  # no tuned mark where NVIDIA published none


# ---------------------------------------------------------------------------------------------- virtual pipeline


def test_virtual_pipeline_rules_are_megatrons():
    model = MODELS["llama31-70b"]
    assert sizing.virtual_pipeline_problem(model, 4, 5, 16) == ""  # 20 layers per stage, 16 micro-batches
    assert "needs pipeline parallelism" in sizing.virtual_pipeline_problem(model, 1, 2, 32)
    assert "must divide the 20 layers" in sizing.virtual_pipeline_problem(model, 4, 3, 32)
    assert "multiple of PP 4" in sizing.virtual_pipeline_problem(model, 4, 5, 6)
    # 126 layers over 8 stages count the embedding and the loss: 128 / 8 = 16 per stage
    assert sizing.virtual_pipeline_problem(MODELS["llama31-405b"], 8, 4, 8) == ""
    assert "16 layers" in sizing.virtual_pipeline_problem(MODELS["llama31-405b"], 8, 3, 8)


def test_the_search_interleaves_and_every_choice_keeps_the_rules():
    for variant in sizing.VARIANTS:
        for method in sizing.METHODS:
            for name in ("p5.48xlarge", "p4de.24xlarge"):
                instance = catalog.get(name)
                result = plan(TrainingRequest(sizing.model_for(variant), method, instance,
                                              "fp8" if instance.fp8 else "bf16"))
                p = result.parallelism
                micro_batches = 128 // p.dp
                assert sizing.virtual_pipeline_problem(result.model, p.pp, p.vp, micro_batches) == ""


# ---------------------------------------------------------------------------------------------- throughput


def _synthetic(fit):
    """The published layouts with measurements made by ``fit`` itself."""
    return [replace(r, tokens_per_sec_per_gpu=sizing._published_tokens_per_second(r, fit)) for r in sizing.MEASURED]


def test_the_fit_recovers_known_parameters_and_leave_one_out_is_exact_on_them():
    truth = sizing.ThroughputFit({("bf16", "sft"): 0.55, ("bf16", "lora"): 0.5, ("fp8", "sft"): 0.4,
                                  ("fp8", "lora"): 0.35}, 0.25)
    runs = _synthetic(truth)
    fitted = sizing.fit_throughput(runs)
    assert fitted.comm_exposed == 0.25
    for key, value in truth.efficiency.items():
        assert fitted.efficiency[key] == pytest.approx(value, rel=1e-4)
    assert all(abs(h.error) < 1e-3 for h in sizing.leave_one_out(runs))


def test_leave_one_out_never_sees_the_point_it_predicts():
    runs = list(sizing.MEASURED)
    before = sizing.leave_one_out(runs)
    runs[0] = replace(runs[0], tokens_per_sec_per_gpu=runs[0].tokens_per_sec_per_gpu * 2)
    after = sizing.leave_one_out(runs)
    assert after[0].predicted == before[0].predicted  # its own prediction ignores the doubled value
    assert after[0].error == pytest.approx((1 + before[0].error) / 2 - 1)
    assert len(before) == len(sizing.MEASURED) and [h.run for h in after][1:] == runs[1:]


def test_throughput_depends_on_the_layout():
    model = MODELS["llama31-70b"]

    def tokens(instance, tp, pp, vp, dp, recompute="none", gbs=32, method="sft", precision="fp8"):
        par = sizing.Parallelism(tp, pp, 1, dp, tp * pp * dp // 8, 8, recompute, vp)
        return gbs * 4096 / sizing.step_seconds(model, method, precision, instance, par, 4096, 1, gbs) / par.gpus

    assert tokens(P5, 4, 4, 5, 2) > tokens(P5, 4, 4, 1, 2)  # interleaving shrinks the bubble
    assert tokens(P5, 4, 4, 5, 2, gbs=128) > tokens(P5, 4, 4, 5, 2, gbs=32)  # more micro-batches, less bubble
    assert tokens(P5, 4, 4, 5, 2, "full") < tokens(P5, 4, 4, 5, 2) / 1.2  # recompute costs a forward
    assert tokens(P5, 8, 2, 1, 2) < tokens(P5, 4, 4, 5, 2) * 1.05  # TP8 pays for its collectives
    # data parallelism between nodes: p4d's 400 Gb/s against p5's 3,200 Gb/s
    eight_b = MODELS["llama31-8b"]
    ratio = {}
    for instance in (P4DE, P5):
        one, two = (sizing.step_seconds(eight_b, "sft", "bf16", instance,
                                        sizing.Parallelism(1, 1, 1, 8 * n, n, 8, "none"), 4096, 1, 128) for n in (1, 2))
        ratio[instance.name] = (one / two) / 2  # per-GPU throughput on two nodes over one
    assert ratio["p5.48xlarge"] > 0.97 and ratio["p4de.24xlarge"] < ratio["p5.48xlarge"] - 0.03


def test_time_and_cost_follow_from_throughput():
    result = plan(TrainingRequest(MODELS["llama31-70b"], "sft", P5, precision="fp8", dataset_tokens=10**9, epochs=2))
    gpus = result.parallelism.gpus
    assert result.hours == pytest.approx(2e9 / (result.tokens_per_sec_per_gpu * gpus) / 3600)
    assert result.cost_usd == pytest.approx(result.hours * result.parallelism.nodes * P5.on_demand_usd_per_hour)
    assert plan(TrainingRequest(MODELS["llama2-7b"], "lora", P4D)).hours is None  # no dataset size given


# ---------------------------------------------------------------------------------------------- storage and serving


def test_storage_plan_for_full_sft_checkpoints():
    result = plan(TrainingRequest(MODELS["llama31-70b"], "sft", P5, precision="fp8"))
    s = result.storage
    assert s.checkpoint_bytes == MODELS["llama31-70b"].params * 14  # bf16 weights + fp32 Adam state
    assert s.checkpoints_kept == 3
    assert s.fsx_capacity_gib * GIB >= s.needed_bytes and s.fsx_capacity_gib % 2400 == 0
    # A checkpoint writes in about ten minutes at the recommended throughput.
    assert s.fsx_throughput_mb_s * 1e6 * sizing.CHECKPOINT_WRITE_SECONDS >= s.checkpoint_bytes * 0.95


def test_serving_plan_fp8_on_hopper_and_world_size():
    s = plan(TrainingRequest(MODELS["llama31-70b"], "sft", P5, precision="fp8")).serving
    assert (s.precision, s.tp, s.pp, s.world_size) == ("fp8", 2, 1, 2)  # 70 GB of FP8 weights need two H100s
    assert s.kv_bytes_per_token == 163_840
    # 461,783 KV tokens at 4096 per sequence, half full on average: 225 -> 128 (power of two)
    assert s.kv_cache_tokens == 461_783 and s.max_batch_size == 128 and s.max_num_tokens == 8192
    a100 = plan(TrainingRequest(MODELS["llama2-7b"], "lora", P4D)).serving
    assert a100.precision == "bf16" and a100.tp == 1
    free = (P4D.gpu_memory_gib * GIB * 0.9 - MODELS["llama2-7b"].params * 2) * sizing.KV_CACHE_FREE_FRACTION
    assert a100.kv_cache_tokens == int(free / sizing.kv_bytes_per_token(MODELS["llama2-7b"], 2))


def test_serving_tp_that_cannot_hold_the_engine():
    s = sizing.serving_plan(MODELS["llama31-70b"], P5, 4096, tp=1)
    assert not s.fits and "weights per GPU" in s.reason


# ---------------------------------------------------------------------------------------------- the common table


def test_common_sizing_table_holds_for_lora_and_not_for_sft():
    checks = {(c.variant, c.method): c for c in sizing.check_seed_table()}
    assert len(checks) == 8
    for variant, gpus in (("7b", 1), ("13b", 2), ("70b", 8), ("405b", 32)):
        lora, sft = checks[(variant, "lora")], checks[(variant, "sft")]
        assert lora.holds and lora.gpus == gpus and lora.planner_min_gpus <= gpus
        assert not sft.holds and "does not fit" in sft.detail and "GiB per GPU" in sft.detail
    # "1 x A100 80GB on p4d.24xlarge": p4d's A100s have 40 GiB; the 80 GiB rows are checked on p4de.
    assert checks[("7b", "lora")].instance_type == "p4de.24xlarge"
    assert checks[("405b", "lora")].instance_type == "p5.48xlarge"
    assert "102.4 GiB per GPU" in checks[("7b", "sft")].detail  # 7B full fine-tune on one 80 GiB GPU


# ---------------------------------------------------------------------------------------------- config wiring


def stack(overrides: dict, stack_name: str = "dev"):
    return load(raw_config(overrides), stack_name)


def seventy_b_sft(extra_training: dict | None = None, group: dict | None = None) -> dict:
    return {"nemo-eks:model": {"variant": "70b"},
            "nemo-eks:training": {"method": "sft", "precision": "fp8", **(extra_training or {})},
            "nemo-eks:gpuNodeGroups": [{"name": "train", "instanceType": "p5.48xlarge", **(group or {})}]}


OVERRIDES = [
    ({"nemo-eks:model": {"variant": "70b"}, "nemo-eks:training": {"method": "sft", "nodes": 1}},
     "nemo-eks:training.nodes", ["needs 132.4 GiB per GPU", "8 x p4d.24xlarge with TP8 x PP8 x VP2 x DP1"]),
    ({"nemo-eks:model": {"variant": "70b"}, "nemo-eks:training": {"method": "lora", "pp": 4, "vp": 3}},
     "nemo-eks:training.vp", ["must divide the 20 layers", "allowed: 2, 4, 5, 10, 20"]),
    ({"nemo-eks:model": {"variant": "70b"}, "nemo-eks:training": {"method": "lora", "pp": 1, "vp": 2}},
     "nemo-eks:training.vp", ["needs pipeline parallelism"]),
    ({"nemo-eks:model": {"variant": "70b"}, "nemo-eks:training": {"method": "lora", "vp": 7}},
     "nemo-eks:training.vp", ["VP 7", "interleaving rules"]),
    ({"nemo-eks:training": {"tp": 3}}, "nemo-eks:training.tp", ["must divide", "32 attention heads", "nearest: TP 2"]),
    ({"nemo-eks:training": {"pp": 3}}, "nemo-eks:training.pp", ["cannot split", "32 layers", "nearest: PP"]),
    ({"nemo-eks:training": {"nodes": 1, "pp": 16}}, "nemo-eks:training.pp", ["no TP x PP layout of 1 x p4d.24xlarge"]),
    ({"nemo-eks:training": {"tp": 2, "seqLength": 4095}}, "nemo-eks:training.seqLength", ["multiple of TP 2", "nearest: 4094"]),
    ({"nemo-eks:training": {"nodes": 3}}, "nemo-eks:training.globalBatchSize", ["no data-parallel size of 3 x p4d.24xlarge"]),
    ({"nemo-eks:training": {"precision": "fp8"}}, "nemo-eks:training.precision", ["needs Hopper", "A100"]),
    ({"nemo-eks:model": {"variant": "405b"}, "nemo-eks:training": {"method": "sft"}},
     "nemo-eks:gpuNodeGroups[0].instanceType", ["hold the serving engine", "bf16 weights per GPU"]),
    ({**seventy_b_sft(), "nemo-eks:serving": {"tp": 1}}, "nemo-eks:serving.tp", ["nearest: serving TP 2", "weights per GPU"]),
    (seventy_b_sft(group={"maxSize": 2}), "nemo-eks:gpuNodeGroups[0].maxSize", [">= 4", "training 4", "unset for 5"]),
    (seventy_b_sft(group={"desiredSize": 2}), "nemo-eks:gpuNodeGroups[0].desiredSize", ["0 (idle) or 4..5"]),
    ({**seventy_b_sft(), "nemo-eks:storage": {"fsxStorageCapacityGib": 1200}}, "nemo-eks:storage.fsxStorageCapacityGib",
     [">= 4800", "3 checkpoints of 920 GiB"]),
    ({"nemo-eks:model": {"variant": "7b", "preset": "llama31-70b"}}, "nemo-eks:model.preset", ["llama2-7b, llama31-8b"]),
    ({"nemo-eks:training": {"seqLength": 8192}}, "nemo-eks:training.seqLength", ["128..4096 (Llama-2-7B)"]),
    ({"nemo-eks:training": {"method": "full"}}, "nemo-eks:training.method", ["lora, sft"]),
    ({"nemo-eks:serving": {"nodeGroup": "infer"}}, "nemo-eks:serving.nodeGroup", ["train"]),
]


@pytest.mark.parametrize("overrides,key,fragments", OVERRIDES, ids=[k for _, k, _ in OVERRIDES])
def test_overrides_that_cannot_work_fail_with_numbers_and_the_nearest_setting(overrides, key, fragments):
    with pytest.raises(ConfigError) as caught:
        stack(overrides)
    assert caught.value.key == key
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_no_node_count_fits_names_the_instance_type(monkeypatch):
    # With one node allowed, 70B full SFT fits no layout of p5.48xlarge; p5e's 141 GiB GPUs would.
    monkeypatch.setattr(sizing, "MAX_NODES", 1)
    with pytest.raises(ConfigError) as caught:
        stack(seventy_b_sft())
    assert caught.value.key == "nemo-eks:gpuNodeGroups[0].instanceType"
    assert "a setting that fits: 1 x p5e.48xlarge" in str(caught.value) and "GiB per GPU" in str(caught.value)


def test_documented_example_error_is_what_the_code_says():
    readme = (synth.ROOT / "docs" / "sizing.md").read_text()
    with pytest.raises(ConfigError) as caught:
        stack(OVERRIDES[0][0])
    assert str(caught.value) in readme


def test_group_size_defaults_to_the_planned_training_and_serving_nodes():
    cfg = stack(seventy_b_sft())
    assert cfg.sizing.parallelism.nodes == 4
    assert cfg.gpu_node_groups[0].max_size == 4 + 1  # training plus one node for two TP2 serving replicas
    assert cfg.storage.fsx_storage_capacity_gib == cfg.sizing.storage.fsx_capacity_gib
    assert cfg.storage.fsx_throughput_per_tib == cfg.sizing.storage.fsx_throughput_per_tib


def test_serving_on_its_own_group():
    cfg = stack({**seventy_b_sft(), "nemo-eks:gpuNodeGroups": [
        {"name": "train", "instanceType": "p5.48xlarge"}, {"name": "infer", "instanceType": "p5e.48xlarge"}],
        "nemo-eks:serving": {"nodeGroup": "infer"}})
    assert cfg.sizing.serving.instance_type == "p5e.48xlarge" and cfg.sizing.serving.tp == 1  # 141 GiB H200
    assert [g.max_size for g in cfg.gpu_node_groups] == [4, 1]


@pytest.mark.parametrize("stack_name", synth.stack_names())
def test_the_plan_reaches_every_consumer(stack_name, tmp_path):
    s = synth_stack(stack_name)
    raw, secrets = synth.read_stack_config(stack_name)
    cfg = load(raw, stack_name)
    planned = cfg.sizing
    group = cfg.gpu_node_groups[0]
    ng = s.one("aws:eks/nodeGroup:NodeGroup", f"nemo-eks-{stack_name}-{group.name}-nodes")
    assert ng.inputs["scalingConfig"]["maxSize"] == group.max_size >= planned.parallelism.nodes
    assert s.one("aws:ec2/launchTemplate:LaunchTemplate", f"nemo-eks-{stack_name}-{group.name}-lt").inputs[
        "instanceType"] == planned.request.instance.name
    fs = s.one("aws:fsx/lustreFileSystem:LustreFileSystem", f"nemo-eks-{stack_name}-storage-lustre").inputs
    assert fs["storageCapacity"] * GIB >= planned.storage.needed_bytes
    outputs = s.outputs["sizing"]
    assert outputs["training"]["nodes"] == planned.parallelism.nodes
    assert outputs["training"]["tp"] * outputs["training"]["pp"] * outputs["training"]["cp"] * outputs["training"]["dp"] \
        == outputs["training"]["gpus"]
    assert outputs["serving"]["worldSize"] == planned.serving.world_size and outputs["serving"]["tp"] == planned.serving.tp
    target = synth.write(s, tmp_path)
    assert json.loads((target / "sizing.json").read_text()) == json.loads(json.dumps(planned.to_dict()))


def test_every_shipped_stack_fits():
    for stack_name in synth.stack_names():
        raw, _ = synth.read_stack_config(stack_name)
        assert load(raw, stack_name).sizing.fits


# ---------------------------------------------------------------------------------------------- command line


def test_cli_json(capsys):
    assert sizing.main(["--model", "70b", "--method", "lora", "--instance", "p5.48xlarge", "--precision", "fp8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["model"]["key"] == "llama31-70b"
    assert data["serving"]["world_size"] == data["serving"]["tp"] * data["serving"]["pp"]


def test_cli_table_and_exit_code_when_it_does_not_fit(capsys):
    assert sizing.main(["--model", "70b", "--method", "sft", "--instance", "p4d.24xlarge", "--nodes", "1"]) == 1
    out = capsys.readouterr().out
    assert "fits:          NO" in out and "nearest fit:   8 x p4d.24xlarge" in out


@pytest.mark.parametrize("args", [["--tp", "0"], ["--micro-batch", "0"], ["--lora-rank", "-4"], ["--global-batch", "0"]])
def test_cli_rejects_non_positive_numbers(args, capsys):
    assert sizing.main(["--model", "7b", *args]) == 2
    err = capsys.readouterr().err
    assert f"error: {args[0]} (training." in err and f"{args[1]} is not valid; allowed: " in err


def test_cli_rejects_bad_input(capsys):
    assert sizing.main(["--model", "70b", "--instance", "p4d.24xlarge", "--precision", "fp8"]) == 2
    assert "needs Hopper" in capsys.readouterr().err


def test_matrix_covers_every_variant_method_and_gpu_type():
    rows = [line for line in sizing.matrix().splitlines()[2:]]
    assert len(rows) == len(sizing.VARIANTS) * len(sizing.METHODS) * len(catalog.GPU_INSTANCE_TYPES)
