"""The Qwen variant catalog: what each model is, what it costs on a hosted API, and how to sample it."""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import SpecError

__all__ = ["CATALOG", "ModelVariant", "Quantization", "Sampling", "get_variant"]

Quantization = Literal["awq", "gptq-int4", "gptq-int8", "fp8"]


class Sampling(BaseModel):
    """Sampling defaults recommended by a model card."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(description="Softmax temperature; 0 is greedy.")
    top_p: float = Field(1.0, description="Nucleus sampling mass, in (0, 1].")
    top_k: int = Field(-1, description="Keep only the k most likely tokens; -1 keeps all.")
    repetition_penalty: float = Field(1.0, description="Penalty for tokens already generated; 1.0 is none.")


class ModelVariant(BaseModel):
    """One Qwen checkpoint the catalog knows by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Catalog name used in job specs, e.g. `qwen2.5-7b-instruct`.")
    hf_id: str = Field(
        description="Hugging Face id the engine loads; found first under the local model folder "
        "(QWEN_BATCH_MODEL_DIR/<hf_id>), where `qwen-batch make-tiny-model` puts the `qwen-batch/tiny-*` checkpoints."
    )
    family: Literal["qwen2.5", "qwen2.5-coder", "qwen2.5-math", "qwen2.5-vl", "qwen3", "qwen3-moe", "tiny"] = Field(
        description="Model family, for grouping in `qwen-batch models`."
    )
    architecture: Literal[
        "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen2_5_VLForConditionalGeneration"
    ] = Field(description="Transformers architecture class from the checkpoint's config.json.")
    params_b: float = Field(description="Total parameters, in billions (the vision tower's included).")
    vision_params_b: float | None = Field(
        None, description="Parameters of the vision tower (ViT and patch merger), in billions; None for text-only "
        "models. A variant with a vision tower takes images (`prompt.images`, OpenAI `image_url` parts)."
    )
    active_params_b: float | None = Field(None, description="Parameters active per token for MoE models, in billions.")
    num_layers: int = Field(description="Transformer layers (`num_hidden_layers`).")
    hidden_size: int = Field(description="Model width (`hidden_size`).")
    num_attention_heads: int = Field(description="Query heads (`num_attention_heads`).")
    num_kv_heads: int = Field(description="Key/value heads (`num_key_value_heads`); fewer than query heads means GQA.")
    head_dim: int = Field(description="Dimension of one attention head.")
    num_experts: int | None = Field(None, description="Routed experts per MoE layer; None for dense models.")
    num_experts_per_token: int | None = Field(None, description="Experts each token is routed to; None for dense.")
    context_length: int = Field(description="Longest sequence (prompt + output) the model supports natively.")
    quantization: Quantization | None = Field(
        None, description="Weight quantization of the published checkpoint; None for bf16 weights."
    )
    dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="Dtype the engine computes in when the spec says `auto`."
    )
    license: str = Field(description="Licence of the published weights.")
    thinking: bool = Field(False, description="Whether the model can emit a `<think>` reasoning block.")
    sampling: Sampling = Field(description="Sampling the model card recommends (non-thinking mode for Qwen3).")
    thinking_sampling: Sampling | None = Field(
        None, description="Sampling the model card recommends in thinking mode; None if the model does not think."
    )
    input_per_mtok: float = Field(description="List price in USD per 1M input tokens on a hosted API.")
    output_per_mtok: float = Field(description="List price in USD per 1M output tokens on a hosted API.")
    thinking_output_per_mtok: float | None = Field(
        None,
        description="List price in USD per 1M output tokens when the model thinks (Model Studio bills Qwen3 thinking "
        "output higher); None means output_per_mtok applies in both modes.",
    )
    price_source: str = Field(description="Where the list prices come from.")


# Where the facts come from (all read from stored public copies, not the live web):
# - Architecture: config.json copies of Qwen2.5-{3,7,14,32}B, Qwen3-{4,8,14,32}B and Qwen3-30B-A3B
#   (citsjtu2020/LLM-Prof sglang/Model_Config.md); Megatron argument files derived from the HF configs for
#   Qwen2.5-{0.5,1.5,3,7,32}B and Qwen3-{0.6,1.7,4,8,14,32}B, 30B-A3B, 235B-A22B (THUDM slime scripts/models/);
#   the Qwen2.5-72B(-Instruct) shape from a stored config.json excerpt. Instruct and base share one shape.
# - Parameter counts, layers, heads, native context, licences: the Hugging Face model cards (copies in
#   ZHUI/paddlenlp_model_readme for Qwen2.5 / Coder / Math; Qwen-published GGUF and FP8 card copies for Qwen3).
#   LICENSE sizes on those copies (11.1 KB Apache-2.0, 7.2 KB Qwen Research, 6.8 KB Qwen) and `license_name`
#   metadata back the licence column.
# - Published quantized checkpoints: the QwenLM/Qwen2.5-Coder README table, Qwen2.5 model lists in public code,
#   and an HF listing of the Qwen org for Qwen3 (FP8 for every size, AWQ for 4B-32B, GPTQ-Int8 for 0.6B/1.7B,
#   GPTQ-Int4 for the two MoE models). Qwen published no quantized Qwen2.5-Math checkpoints.
# - Sampling: the model cards' "Best Practices" (Qwen3) and the Qwen2.5-Instruct generation_config.json values;
#   Qwen2.5-Math gives no sampling advice and its own evaluation (QwenLM/Qwen2.5-Math evaluation/sh/eval.sh)
#   decodes greedily.
# - Prices: Alibaba Cloud Model Studio international (Singapore) pay-as-you-go list prices per 1M tokens, as
#   mirrored in models.dev (providers/alibaba/models/*.toml, 2025 snapshots in the narevai and simon-iribarren
#   forks). Newer upstream models.dev snapshots show lower Qwen3 figures (e.g. qwen3-8b $0.072/$0.287/$0.717) that
#   match mainland-China CNY prices converted to USD; re-check the live page before relying on a bill.
# - Qwen2.5-VL: the Qwen2.5-VL-3B/7B config.json (text shape; vision_config depth 32, width 1280, MLP 3420, merger
#   from 4 x 1280 to the text width) and the Hugging Face cards (parameter counts 3.75B / 8.29B / 33.5B / 73.4B,
#   32,768-token context as configured, licences; AWQ checkpoints for all four). The vision tower's size is counted
#   from that shape: 630M in the ViT blocks plus the patch embedding and merger, 0.67B-0.70B with the merger's output
#   width. Image tokens are input tokens at the text price, as Model Studio bills them; Model Studio lists
#   qwen2.5-vl-7b-instruct and -72b-instruct ($0.35/$1.05, $2.80/$8.40).

# Qwen2.5-Instruct generation_config.json values; the per-size files were not read (Qwen2's 0.5B/1.5B used 1.1).
_QWEN25_SAMPLING = Sampling(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
_QWEN3_SAMPLING = Sampling(temperature=0.7, top_p=0.8, top_k=20)
_QWEN3_THINKING_SAMPLING = Sampling(temperature=0.6, top_p=0.95, top_k=20)
_GREEDY = Sampling(temperature=0.0)

_APACHE = "Apache-2.0"
_QWEN_RESEARCH = "Qwen Research License"
_QWEN = "Qwen License"

# Model Studio international list prices, USD per 1M tokens: (input, output, thinking output or None).
_MODEL_STUDIO_PRICES: dict[str, tuple[float, float, float | None]] = {
    "qwen2.5-7b-instruct": (0.175, 0.70, None),
    "qwen2.5-14b-instruct": (0.35, 1.40, None),
    "qwen2.5-32b-instruct": (0.70, 2.80, None),
    "qwen2.5-72b-instruct": (1.40, 5.60, None),
    "qwen2.5-vl-7b-instruct": (0.35, 1.05, None),
    "qwen2.5-vl-72b-instruct": (2.80, 8.40, None),
    "qwen3-0.6b": (0.11, 0.42, 1.26),  # not verified against a stored copy of the page
    "qwen3-1.7b": (0.11, 0.42, 1.26),  # not verified against a stored copy of the page
    "qwen3-4b": (0.11, 0.42, 1.26),  # not verified against a stored copy of the page
    "qwen3-8b": (0.18, 0.70, 2.10),
    "qwen3-14b": (0.35, 1.40, 4.20),
    "qwen3-32b": (0.70, 2.80, 8.40),
    "qwen3-30b-a3b": (0.20, 0.80, 2.40),  # not verified against a stored copy of the page
    "qwen3-235b-a22b": (0.70, 2.80, 8.40),
}


def _list_price(listed: str, *, stand_in_for: str | None = None) -> dict[str, float | str | None]:
    """Price fields for a variant billed as Model Studio's `listed` model, possibly standing in for an unlisted one."""
    input_per_mtok, output_per_mtok, thinking_output_per_mtok = _MODEL_STUDIO_PRICES[listed]
    source = f"Alibaba Cloud Model Studio international (Singapore) list price of `{listed}`"
    if thinking_output_per_mtok is not None:
        source += " (output billed higher in thinking mode)"
    if stand_in_for is not None:
        source += f"; `{stand_in_for}` is not listed there, so the nearest listed size of its family stands in"
    return {
        "input_per_mtok": input_per_mtok,
        "output_per_mtok": output_per_mtok,
        "thinking_output_per_mtok": thinking_output_per_mtok,
        "price_source": source,
    }


_QWEN25 = {"architecture": "Qwen2ForCausalLM", "sampling": _QWEN25_SAMPLING}
# Qwen2.5-VL's generation_config.json was not read; its cards' examples decode with the processor's defaults.
_QWEN25_VL = {"family": "qwen2.5-vl", "architecture": "Qwen2_5_VLForConditionalGeneration",
              "sampling": _QWEN25_SAMPLING, "context_length": 32768}
_QWEN3_COMMON = {
    "license": _APACHE,
    "head_dim": 128,  # explicit in every Qwen3 config.json, independent of hidden_size
    # Native context per the cards (131,072 with YaRN); config.json's max_position_embeddings is 40960.
    "context_length": 32768,
    "thinking": True,
    "sampling": _QWEN3_SAMPLING,
    "thinking_sampling": _QWEN3_THINKING_SAMPLING,
}
_QWEN3 = {"family": "qwen3", "architecture": "Qwen3ForCausalLM", **_QWEN3_COMMON}
_QWEN3_MOE = {"family": "qwen3-moe", "architecture": "Qwen3MoeForCausalLM", "num_experts": 128,
              "num_experts_per_token": 8, **_QWEN3_COMMON}

# Qwen2.5 (Instruct, Coder and Math) configs say 32768 (4096 for Math); the 7B+ cards quote 131,072 with YaRN.
_BASE_VARIANTS: list[ModelVariant] = [
    # Qwen2.5 Instruct
    ModelVariant(name="qwen2.5-0.5b-instruct", hf_id="Qwen/Qwen2.5-0.5B-Instruct", family="qwen2.5", **_QWEN25,
                 params_b=0.49, num_layers=24, hidden_size=896, num_attention_heads=14, num_kv_heads=2, head_dim=64,
                 context_length=32768, license=_APACHE,
                 **_list_price("qwen2.5-7b-instruct", stand_in_for="qwen2.5-0.5b-instruct")),
    ModelVariant(name="qwen2.5-1.5b-instruct", hf_id="Qwen/Qwen2.5-1.5B-Instruct", family="qwen2.5", **_QWEN25,
                 params_b=1.54, num_layers=28, hidden_size=1536, num_attention_heads=12, num_kv_heads=2, head_dim=128,
                 context_length=32768, license=_APACHE,
                 **_list_price("qwen2.5-7b-instruct", stand_in_for="qwen2.5-1.5b-instruct")),
    ModelVariant(name="qwen2.5-3b-instruct", hf_id="Qwen/Qwen2.5-3B-Instruct", family="qwen2.5", **_QWEN25,
                 params_b=3.09, num_layers=36, hidden_size=2048, num_attention_heads=16, num_kv_heads=2, head_dim=128,
                 context_length=32768, license=_QWEN_RESEARCH,
                 **_list_price("qwen2.5-7b-instruct", stand_in_for="qwen2.5-3b-instruct")),
    ModelVariant(name="qwen2.5-7b-instruct", hf_id="Qwen/Qwen2.5-7B-Instruct", family="qwen2.5", **_QWEN25,
                 params_b=7.61, num_layers=28, hidden_size=3584, num_attention_heads=28, num_kv_heads=4, head_dim=128,
                 context_length=32768, license=_APACHE, **_list_price("qwen2.5-7b-instruct")),
    ModelVariant(name="qwen2.5-14b-instruct", hf_id="Qwen/Qwen2.5-14B-Instruct", family="qwen2.5", **_QWEN25,
                 params_b=14.7, num_layers=48, hidden_size=5120, num_attention_heads=40, num_kv_heads=8, head_dim=128,
                 context_length=32768, license=_APACHE, **_list_price("qwen2.5-14b-instruct")),
    ModelVariant(name="qwen2.5-32b-instruct", hf_id="Qwen/Qwen2.5-32B-Instruct", family="qwen2.5", **_QWEN25,
                 params_b=32.5, num_layers=64, hidden_size=5120, num_attention_heads=40, num_kv_heads=8, head_dim=128,
                 context_length=32768, license=_APACHE, **_list_price("qwen2.5-32b-instruct")),
    ModelVariant(name="qwen2.5-72b-instruct", hf_id="Qwen/Qwen2.5-72B-Instruct", family="qwen2.5", **_QWEN25,
                 params_b=72.7, num_layers=80, hidden_size=8192, num_attention_heads=64, num_kv_heads=8, head_dim=128,
                 context_length=32768, license=_QWEN, **_list_price("qwen2.5-72b-instruct")),
    # Qwen2.5-Coder Instruct: the cards give the same layers, heads and parameter counts as Qwen2.5 of the same
    # size; hidden sizes are taken from those Qwen2.5 configs (Coder configs read only for 1.5B). Sampling as
    # Qwen2.5-Instruct: the Coder generation_config.json files were not read.
    ModelVariant(name="qwen2.5-coder-1.5b-instruct", hf_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
                 family="qwen2.5-coder", **_QWEN25,
                 params_b=1.54, num_layers=28, hidden_size=1536, num_attention_heads=12, num_kv_heads=2, head_dim=128,
                 context_length=32768, license=_APACHE,
                 **_list_price("qwen2.5-7b-instruct", stand_in_for="qwen2.5-coder-1.5b-instruct")),
    ModelVariant(name="qwen2.5-coder-7b-instruct", hf_id="Qwen/Qwen2.5-Coder-7B-Instruct",
                 family="qwen2.5-coder", **_QWEN25,
                 params_b=7.61, num_layers=28, hidden_size=3584, num_attention_heads=28, num_kv_heads=4, head_dim=128,
                 context_length=32768, license=_APACHE,
                 **_list_price("qwen2.5-7b-instruct", stand_in_for="qwen2.5-coder-7b-instruct")),
    ModelVariant(name="qwen2.5-coder-14b-instruct", hf_id="Qwen/Qwen2.5-Coder-14B-Instruct",
                 family="qwen2.5-coder", **_QWEN25,
                 params_b=14.7, num_layers=48, hidden_size=5120, num_attention_heads=40, num_kv_heads=8, head_dim=128,
                 context_length=32768, license=_APACHE,
                 **_list_price("qwen2.5-14b-instruct", stand_in_for="qwen2.5-coder-14b-instruct")),
    ModelVariant(name="qwen2.5-coder-32b-instruct", hf_id="Qwen/Qwen2.5-Coder-32B-Instruct",
                 family="qwen2.5-coder", **_QWEN25,
                 params_b=32.5, num_layers=64, hidden_size=5120, num_attention_heads=40, num_kv_heads=8, head_dim=128,
                 context_length=32768, license=_APACHE,
                 **_list_price("qwen2.5-32b-instruct", stand_in_for="qwen2.5-coder-32b-instruct")),
    # Qwen2.5-Math Instruct: the cards state no shape or size. The Math models are trained from Qwen2.5 of the same
    # size (card metadata `base_model: Qwen/Qwen2.5-7B`), so shape and parameter count are Qwen2.5's; not read from
    # the Math configs. Context is 4096 (max_position_embeddings, rope_theta 10000) per the Math base models'
    # config.json as quoted in public issue threads; the Instruct configs were not read directly.
    ModelVariant(name="qwen2.5-math-1.5b-instruct", hf_id="Qwen/Qwen2.5-Math-1.5B-Instruct",
                 family="qwen2.5-math", architecture="Qwen2ForCausalLM", sampling=_GREEDY,
                 params_b=1.54, num_layers=28, hidden_size=1536, num_attention_heads=12, num_kv_heads=2, head_dim=128,
                 context_length=4096, license=_APACHE,
                 **_list_price("qwen2.5-7b-instruct", stand_in_for="qwen2.5-math-1.5b-instruct")),
    ModelVariant(name="qwen2.5-math-7b-instruct", hf_id="Qwen/Qwen2.5-Math-7B-Instruct",
                 family="qwen2.5-math", architecture="Qwen2ForCausalLM", sampling=_GREEDY,
                 params_b=7.61, num_layers=28, hidden_size=3584, num_attention_heads=28, num_kv_heads=4, head_dim=128,
                 context_length=4096, license=_APACHE,
                 **_list_price("qwen2.5-7b-instruct", stand_in_for="qwen2.5-math-7b-instruct")),
    ModelVariant(name="qwen2.5-math-72b-instruct", hf_id="Qwen/Qwen2.5-Math-72B-Instruct",
                 family="qwen2.5-math", architecture="Qwen2ForCausalLM", sampling=_GREEDY,
                 params_b=72.7, num_layers=80, hidden_size=8192, num_attention_heads=64, num_kv_heads=8, head_dim=128,
                 context_length=4096, license=_QWEN,
                 **_list_price("qwen2.5-72b-instruct", stand_in_for="qwen2.5-math-72b-instruct")),
    # Qwen2.5-VL Instruct: 7B and up have untied embeddings over a 152,064-token vocabulary (3B: 151,936, tied).
    ModelVariant(name="qwen2.5-vl-3b-instruct", hf_id="Qwen/Qwen2.5-VL-3B-Instruct", **_QWEN25_VL,
                 params_b=3.75, vision_params_b=0.67, num_layers=36, hidden_size=2048, num_attention_heads=16,
                 num_kv_heads=2, head_dim=128, license=_QWEN_RESEARCH,
                 **_list_price("qwen2.5-vl-7b-instruct", stand_in_for="qwen2.5-vl-3b-instruct")),
    ModelVariant(name="qwen2.5-vl-7b-instruct", hf_id="Qwen/Qwen2.5-VL-7B-Instruct", **_QWEN25_VL,
                 params_b=8.29, vision_params_b=0.68, num_layers=28, hidden_size=3584, num_attention_heads=28,
                 num_kv_heads=4, head_dim=128, license=_APACHE, **_list_price("qwen2.5-vl-7b-instruct")),
    ModelVariant(name="qwen2.5-vl-32b-instruct", hf_id="Qwen/Qwen2.5-VL-32B-Instruct", **_QWEN25_VL,
                 params_b=33.5, vision_params_b=0.68, num_layers=64, hidden_size=5120, num_attention_heads=40,
                 num_kv_heads=8, head_dim=128, license=_APACHE,
                 **_list_price("qwen2.5-vl-72b-instruct", stand_in_for="qwen2.5-vl-32b-instruct")),
    ModelVariant(name="qwen2.5-vl-72b-instruct", hf_id="Qwen/Qwen2.5-VL-72B-Instruct", **_QWEN25_VL,
                 params_b=73.4, vision_params_b=0.70, num_layers=80, hidden_size=8192, num_attention_heads=64,
                 num_kv_heads=8, head_dim=128, license=_QWEN, **_list_price("qwen2.5-vl-72b-instruct")),
    # Qwen3 dense
    ModelVariant(name="qwen3-0.6b", hf_id="Qwen/Qwen3-0.6B", **_QWEN3,
                 params_b=0.6, num_layers=28, hidden_size=1024, num_attention_heads=16, num_kv_heads=8,
                 **_list_price("qwen3-0.6b")),
    ModelVariant(name="qwen3-1.7b", hf_id="Qwen/Qwen3-1.7B", **_QWEN3,
                 params_b=1.7, num_layers=28, hidden_size=2048, num_attention_heads=16, num_kv_heads=8,
                 **_list_price("qwen3-1.7b")),
    ModelVariant(name="qwen3-4b", hf_id="Qwen/Qwen3-4B", **_QWEN3,
                 params_b=4.0, num_layers=36, hidden_size=2560, num_attention_heads=32, num_kv_heads=8,
                 **_list_price("qwen3-4b")),
    ModelVariant(name="qwen3-8b", hf_id="Qwen/Qwen3-8B", **_QWEN3,
                 params_b=8.2, num_layers=36, hidden_size=4096, num_attention_heads=32, num_kv_heads=8,
                 **_list_price("qwen3-8b")),
    ModelVariant(name="qwen3-14b", hf_id="Qwen/Qwen3-14B", **_QWEN3,
                 params_b=14.8, num_layers=40, hidden_size=5120, num_attention_heads=40, num_kv_heads=8,
                 **_list_price("qwen3-14b")),
    ModelVariant(name="qwen3-32b", hf_id="Qwen/Qwen3-32B", **_QWEN3,
                 params_b=32.8, num_layers=64, hidden_size=5120, num_attention_heads=64, num_kv_heads=8,
                 **_list_price("qwen3-32b")),
    # Qwen3 MoE
    ModelVariant(name="qwen3-30b-a3b", hf_id="Qwen/Qwen3-30B-A3B", **_QWEN3_MOE,
                 params_b=30.5, active_params_b=3.3, num_layers=48, hidden_size=2048, num_attention_heads=32,
                 num_kv_heads=4, **_list_price("qwen3-30b-a3b")),
    ModelVariant(name="qwen3-235b-a22b", hf_id="Qwen/Qwen3-235B-A22B", **_QWEN3_MOE,
                 params_b=235.0, active_params_b=22.0, num_layers=94, hidden_size=4096, num_attention_heads=64,
                 num_kv_heads=4, **_list_price("qwen3-235b-a22b")),
]

# Quantized checkpoints Qwen published under its own org. Qwen's quantized Qwen3 cards (the GGUF ones were read)
# also advise presence_penalty=1.5, which Sampling does not carry.
_PUBLISHED_QUANTIZATIONS: dict[str, tuple[Quantization, ...]] = {
    **{
        f"qwen2.5-{size}-instruct": ("awq", "gptq-int4", "gptq-int8")
        for size in ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b")
    },
    **{
        f"qwen2.5-coder-{size}-instruct": ("awq", "gptq-int4", "gptq-int8")
        for size in ("1.5b", "7b", "14b", "32b")
    },
    **{f"qwen2.5-vl-{size}-instruct": ("awq",) for size in ("3b", "7b", "32b", "72b")},
    "qwen3-0.6b": ("fp8", "gptq-int8"),
    "qwen3-1.7b": ("fp8", "gptq-int8"),
    "qwen3-4b": ("fp8", "awq"),
    "qwen3-8b": ("fp8", "awq"),
    "qwen3-14b": ("fp8", "awq"),
    "qwen3-32b": ("fp8", "awq"),
    "qwen3-30b-a3b": ("fp8", "gptq-int4"),
    "qwen3-235b-a22b": ("fp8", "gptq-int4"),
}

_HF_SUFFIX: dict[Quantization, str] = {"awq": "AWQ", "gptq-int4": "GPTQ-Int4", "gptq-int8": "GPTQ-Int8", "fp8": "FP8"}


def _quantized(base: ModelVariant, quantization: Quantization) -> ModelVariant:
    """The published `quantization` checkpoint of `base`: the same model and list price, smaller weights."""
    return ModelVariant(
        **{
            **base.model_dump(),
            "name": f"{base.name}-{quantization}",
            "hf_id": f"{base.hf_id}-{_HF_SUFFIX[quantization]}",
            "quantization": quantization,
            "price_source": f"Same list price as `{base.name}` (these are its weights, quantized). {base.price_source}",
        }
    )


def _tiny(name: str, architecture: Literal["Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                          "Qwen2_5_VLForConditionalGeneration"],
          priced_as: ModelVariant, thinking_sampling: Sampling | None,
          vision_params_b: float | None = None) -> ModelVariant:
    """A tiny random-weight test model, priced like `priced_as` so cost accounting is exercised."""
    return ModelVariant(
        name=name, hf_id=f"qwen-batch/{name}", family="tiny", architecture=architecture, params_b=0.02,
        vision_params_b=vision_params_b,
        num_layers=2, hidden_size=128, num_attention_heads=4, num_kv_heads=2, head_dim=32, context_length=2048,
        # float32: vLLM's CPU bf16 matmuls take a fallback path 6x slower at these tiny shapes.
        dtype="float32", license=_APACHE, thinking=thinking_sampling is not None, sampling=_GREEDY,
        thinking_sampling=thinking_sampling, input_per_mtok=priced_as.input_per_mtok,
        output_per_mtok=priced_as.output_per_mtok, thinking_output_per_mtok=priced_as.thinking_output_per_mtok,
        price_source=f"Test model with random weights; list prices of `{priced_as.name}` so costs are non-zero.",
    )


def _index(variants: list[ModelVariant]) -> dict[str, ModelVariant]:
    """Key variants by name, refusing duplicates."""
    catalog: dict[str, ModelVariant] = {}
    for variant in variants:
        if variant.name in catalog:
            raise ValueError(f"duplicate catalog name {variant.name!r}")
        catalog[variant.name] = variant
    return catalog


_BASES = _index(_BASE_VARIANTS)

CATALOG: dict[str, ModelVariant] = _index(
    [
        *_BASE_VARIANTS,
        *(
            _quantized(_BASES[base_name], quantization)
            for base_name, quantizations in _PUBLISHED_QUANTIZATIONS.items()
            for quantization in quantizations
        ),
        _tiny("tiny-qwen2", "Qwen2ForCausalLM", _BASES["qwen2.5-0.5b-instruct"], thinking_sampling=None),
        _tiny("tiny-qwen3", "Qwen3ForCausalLM", _BASES["qwen3-0.6b"], thinking_sampling=_QWEN3_THINKING_SAMPLING),
        _tiny("tiny-qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", _BASES["qwen2.5-vl-3b-instruct"],
              thinking_sampling=None, vision_params_b=0.00026),  # jobs.tiny_model's vision tower: 257k parameters
    ]
)


def get_variant(name: str) -> ModelVariant:
    """The catalog variant called `name`; SpecError with the closest names if there is none."""
    if name in CATALOG:
        return CATALOG[name]
    raise SpecError(
        f"model.variant: {name!r} is not in the catalog.{_closest_hint(name)} `qwen-batch models` lists them all; "
        "to run a local checkpoint, give `path:` (with `like:` a catalog name) instead."
    )


def _closest_hint(name: str) -> str:
    """' Closest: a, b, c.' for the catalog names nearest `name` (also matched by Hugging Face id), or ''."""
    query = name.strip().lower()
    keys = {variant.name: variant.name for variant in CATALOG.values()}
    keys.update({variant.hf_id.lower(): variant.name for variant in CATALOG.values()})
    extensions = sorted((key for key in keys if query and key.startswith(query)), key=len)
    similar = difflib.get_close_matches(query, keys, n=6, cutoff=0.6)
    suggestions = list(dict.fromkeys(keys[key] for key in [*extensions, *similar]))[:3]
    return f" Closest: {', '.join(suggestions)}." if suggestions else ""
