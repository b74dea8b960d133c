"""The NeMo 2 config class of the tiny Llama (needs nemo_toolkit 2.7.x).

run.json names it as ``training.model.nemo_config``; entry.py puts it into ``nemo.collections.llm`` where
finetune.py looks the class up. Checkpoint contexts refer to it by this module's name, so every process that loads
one (export.py's merge_lora and export_ckpt) needs tests/gpu on PYTHONPATH (run.sh sets it).
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo.collections.llm.gpt.model.llama import LlamaConfig

import tiny_model


@dataclass
class TinyLlamaConfig(LlamaConfig):
    num_layers: int = tiny_model.LAYERS
    hidden_size: int = tiny_model.HIDDEN
    num_attention_heads: int = tiny_model.HEADS
    num_query_groups: int = tiny_model.KV_HEADS
    ffn_hidden_size: int = tiny_model.FFN
    vocab_size: int = tiny_model.VOCAB
    rotary_base: float = tiny_model.ROPE_THETA
    layernorm_epsilon: float = tiny_model.NORM_EPS
    init_method_std: float = tiny_model.INIT_STD
    # Without Transformer Engine or apex Megatron-Core runs its local layer spec, and these fused kernels are not
    # there; NeMo's image has both, so this is the only place the run differs from a pod's configuration.
    apply_rope_fusion: bool = False
    bias_activation_fusion: bool = False
    bias_dropout_fusion: bool = False
    masked_softmax_fusion: bool = False
    persist_layer_norm: bool = False
    gradient_accumulation_fusion: bool = False
    cross_entropy_loss_fusion: bool = False
