"""The sizing planner: architecture facts, the memory model against hand-computed cases, the fit boundary,
calibration, the common sizing table, and config overrides that cannot work."""

from __future__ import annotations

import json

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
    assert m.gradients == 0 and m.optimizer == 0
    lora_per_layer = 16 * ((4096 + 3 * 4096) + (4096 + 4096) + (4096 + 2 * 11008) + (11008 + 4096))
    assert m.lora_adapters == 32 * lora_per_layer * 18  # bf16 + fp32 grad + fp32 master and Adam moments
    # 12h + 4*kv_dim + 6F bytes per token per layer (Korthikanti et al. 2022 accounting, flash attention)
    assert m.activations == (12 * 4096 + 4 * 4096 + 6 * 11008) * 4096 * 32
    assert m.logits == 4 * 4096 * 32000
    assert m.total == 31_854_428_160 and m.usable == int(40 * GIB * 0.9)
    assert m.fits


def test_sft_uses_the_distributed_optimizer():
    """Megatron-Core: 6 + 12/d bytes per parameter with the optimizer sharded over d data-parallel ranks."""
    request = TrainingRequest(MODELS["llama2-7b"], "sft", P4DE)
    m = memory_breakdown(request, tp=2, pp=1, cp=1, dp=4, recompute="full")
    params_here = (32 * MODELS["llama2-7b"].params_per_layer + 2 * MODELS["llama2-7b"].embedding_params) // 2
    assert (m.weights, m.gradients, m.optimizer) == (2 * params_here, 4 * params_here, 12 * params_here // 4)
    assert m.weights + m.gradients + m.optimizer == params_here * (6 + 12 // 4)


def test_tensor_and_pipeline_parallelism_divide_the_memory():
    request = TrainingRequest(MODELS["llama31-70b"], "lora", P5, precision="fp8")
    one = memory_breakdown(request, tp=4, pp=1, cp=1, dp=2, recompute="none")
    two = memory_breakdown(request, tp=8, pp=1, cp=1, dp=1, recompute="none")
    assert two.weights == pytest.approx(one.weights / 2, rel=1e-6)
    assert two.activations == pytest.approx(one.activations / 2, rel=1e-6)
    staged = memory_breakdown(request, tp=4, pp=2, cp=1, dp=1, recompute="none")
    # Two stages: each holds half the layers and one of the two embedding matrices.
    model = MODELS["llama31-70b"]
    assert staged.weights == (40 * model.params_per_layer + model.embedding_params) // 4 * 4  # bf16 + FP8 copies


def test_full_recompute_keeps_only_layer_inputs():
    request = TrainingRequest(MODELS["llama2-13b"], "lora", P4D)
    none = memory_breakdown(request, tp=2, pp=1, cp=1, dp=4, recompute="none")
    full = memory_breakdown(request, tp=2, pp=1, cp=1, dp=4, recompute="full")
    model = MODELS["llama2-13b"]
    per_layer = sizing.activation_bytes_per_token_per_layer(model) * 4096 // 2
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


def test_planner_takes_the_fewest_nodes_then_the_least_model_parallelism():
    result = plan(TrainingRequest(MODELS["llama31-70b"], "sft", P5, precision="fp8"))
    assert result.fits and result.parallelism.nodes == 4
    assert (result.parallelism.tp, result.parallelism.pp, result.parallelism.dp) == (8, 2, 2)
    for nodes in (1, 2):
        assert not plan(TrainingRequest(MODELS["llama31-70b"], "sft", P5, precision="fp8", nodes=nodes)).memory.fits
    with pytest.raises(sizing.SizingError, match="no data-parallel size of 3 x p5.48xlarge divides it"):
        plan(TrainingRequest(MODELS["llama31-70b"], "sft", P5, precision="fp8", nodes=3))  # 24 GPUs: no DP divides 128


def test_a_plan_that_does_not_fit_says_why_and_what_would():
    result = plan(TrainingRequest(MODELS["llama31-70b"], "sft", P4D, nodes=1))
    assert not result.fits
    assert "needs 148.8 GiB per GPU" in result.reasons[0] and "36.0 GiB usable" in result.reasons[0]
    assert result.nearest == "8 x p4d.24xlarge with TP8 x PP4 x DP2"


def test_context_parallelism_only_for_long_sequences():
    model = MODELS["llama31-70b"]
    assert sizing._cp_candidates(TrainingRequest(model, "lora", P5, seq_length=4096)) == [1]
    long = TrainingRequest(model, "lora", P5, precision="fp8", seq_length=65536, global_batch_size=32)
    assert sizing._cp_candidates(long) == [1, 2, 4, 8]
    one, two = (memory_breakdown(long, 8, 1, cp, 1, "none") for cp in (1, 2))
    assert two.activations == one.activations // 2  # each rank holds half of every sequence


# ---------------------------------------------------------------------------------------------- throughput


@pytest.mark.parametrize("point", sizing.PUBLISHED, ids=lambda p: f"{p.model}-{p.method}-{p.precision}-{p.gpus}")
def test_one_efficiency_figure_explains_every_published_point_within_15_percent(point):
    """The efficiency is the mean over these points; this bounds the spread: one figure per GPU, precision and
    method must describe every model size NVIDIA published, or the FLOPs formula is off for some size."""
    model = MODELS[point.model]
    efficiency = sizing.EFFICIENCY[("hopper", point.precision, point.method)]
    estimate = catalog.GPU_PEAK_TFLOPS[point.gpu_model][point.precision] * 1e12 * efficiency / \
        sizing.flops_per_token(model, sizing.CALIBRATION_SEQ_LENGTH, point.method)
    assert estimate == pytest.approx(point.tokens_per_sec_per_gpu, rel=0.15)


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
    assert "115.0 GiB per GPU" in checks[("7b", "sft")].detail  # 7B full fine-tune on one 80 GiB GPU


# ---------------------------------------------------------------------------------------------- config wiring


def stack(overrides: dict, stack_name: str = "dev"):
    return load(raw_config(overrides), stack_name)


def seventy_b_sft(extra_training: dict | None = None, group: dict | None = None) -> dict:
    return {"nemo-eks:model": {"variant": "70b"},
            "nemo-eks:training": {"method": "sft", "precision": "fp8", **(extra_training or {})},
            "nemo-eks:gpuNodeGroups": [{"name": "train", "instanceType": "p5.48xlarge", **(group or {})}]}


OVERRIDES = [
    ({"nemo-eks:model": {"variant": "70b"}, "nemo-eks:training": {"method": "sft", "nodes": 1}},
     "nemo-eks:training.nodes", ["needs 148.8 GiB per GPU", "8 x p4d.24xlarge with TP8 x PP4 x DP2"]),
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
    # With at most 2 nodes allowed, 70B full SFT fits no layout of p5.48xlarge; p5e's 141 GiB GPUs would.
    monkeypatch.setattr(sizing, "MAX_NODES", 2)
    with pytest.raises(ConfigError) as caught:
        stack(seventy_b_sft())
    assert caught.value.key == "nemo-eks:gpuNodeGroups[0].instanceType"
    assert "a setting that fits: 2 x p5e.48xlarge" in str(caught.value) and "GiB per GPU" in str(caught.value)


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
