"""The tiny Llama of the GPU run: one place for its shape (stdlib only).

The Hugging Face checkpoint (harness.py), the NeMo config class the fine-tuning builds (tiny_llama_nemo.py), the
run.json model section and the planner's ModelSpec (infra/sizing.py) are all made from these numbers, so the
imported base, the trained model and the memory estimate describe the same network.
"""

from __future__ import annotations

HF_MODEL_ID = "nemo-eks-test/tiny-llama"  # a name only: the weights are made locally, never downloaded
NEMO_CONFIG = "TinyLlamaConfig"  # registered into nemo.collections.llm by entry.py
LAYERS = 4
HIDDEN = 512
HEADS = 8
KV_HEADS = 4
FFN = 1536
VOCAB = 1024  # the tokenizer is trained to at most this many tokens; a multiple of 128 needs no padding
MAX_POSITIONS = 2048
ROPE_THETA = 10000.0  # NeMo's LlamaConfig rotary_base default, and Hugging Face LlamaConfig's rope_theta
NORM_EPS = 1e-5  # NeMo's TransformerConfig layernorm_epsilon default, set as the HF rms_norm_eps too
INIT_STD = 0.02  # NeMo's init_method_std default and HF LlamaConfig's initializer_range default


def model_section() -> dict:
    """run.json's ``training.model`` for the tiny model (the same keys as workloads/runconfig.py writes)."""
    return {"key": "tiny-llama", "display": "Tiny Llama (random weights)", "hf_model_id": HF_MODEL_ID,
            "nemo_config": NEMO_CONFIG, "layers": LAYERS, "hidden": HIDDEN, "heads": HEADS, "kv_heads": KV_HEADS,
            "ffn": FFN, "vocab": VOCAB, "max_seq_length": MAX_POSITIONS}


def model_spec():
    """The planner's description of the same network."""
    from infra import sizing

    return sizing.ModelSpec("tiny-llama", "Tiny Llama", HF_MODEL_ID, NEMO_CONFIG, LAYERS, HIDDEN, HEADS, KV_HEADS,
                            FFN, VOCAB, MAX_POSITIONS)


def hf_config_kwargs(bos_id: int, eos_id: int, pad_id: int) -> dict:
    """transformers.LlamaConfig arguments; no rope_scaling, so NeMo's importer builds a plain LlamaConfig
    (nemo/collections/llm/gpt/model/llama.py, HFLlamaImporter.config, 2.7.3)."""
    return {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "max_position_embeddings": MAX_POSITIONS,
            "rms_norm_eps": NORM_EPS, "rope_theta": ROPE_THETA, "initializer_range": INIT_STD,
            "tie_word_embeddings": False, "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
