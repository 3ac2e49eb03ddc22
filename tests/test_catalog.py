"""The variant catalog: internal consistency, a few known facts checked against the published configs, lookups."""

from __future__ import annotations

import pytest

from qwen_batch.schemas.catalog import CATALOG, ModelVariant, get_variant
from qwen_batch.schemas.errors import SpecError

VARIANTS = list(CATALOG.values())
ARCHITECTURE_FACTS = (
    "family", "architecture", "params_b", "active_params_b", "num_layers", "hidden_size", "num_attention_heads",
    "num_kv_heads", "head_dim", "num_experts", "num_experts_per_token", "context_length", "license", "thinking",
    "sampling", "thinking_sampling", "vision_params_b",
)


def _ids(variant: ModelVariant) -> str:
    return variant.name


def _base_of(variant: ModelVariant) -> ModelVariant:
    return CATALOG[variant.name.removesuffix(f"-{variant.quantization}")]


def test_every_entry_is_keyed_by_its_name():
    assert all(key == variant.name for key, variant in CATALOG.items())


def test_names_are_lowercase_and_hf_ids_are_unique():
    assert all(name == name.lower() for name in CATALOG)
    hf_ids = [variant.hf_id for variant in VARIANTS]
    assert len(hf_ids) == len(set(hf_ids))


def test_catalog_covers_the_requested_models():
    required = {
        *(f"qwen2.5-{size}-instruct" for size in ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b")),
        *(f"qwen2.5-coder-{size}-instruct" for size in ("1.5b", "7b", "14b", "32b")),
        *(f"qwen2.5-math-{size}-instruct" for size in ("1.5b", "7b", "72b")),
        *(f"qwen3-{size}" for size in ("0.6b", "1.7b", "4b", "8b", "14b", "32b", "30b-a3b", "235b-a22b")),
        "qwen2.5-7b-instruct-awq", "qwen2.5-7b-instruct-gptq-int4", "qwen2.5-7b-instruct-gptq-int8",
        "qwen3-8b-fp8", "qwen3-8b-awq", "tiny-qwen2", "tiny-qwen3",
        *(f"qwen2.5-vl-{size}-instruct{awq}" for size in ("3b", "7b", "32b", "72b") for awq in ("", "-awq")),
        "tiny-qwen2_5_vl",
    }
    assert required <= CATALOG.keys()


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.family.startswith("qwen2.5")], ids=_ids)
def test_qwen25_head_dim_times_heads_is_hidden_size(variant: ModelVariant):
    assert variant.head_dim * variant.num_attention_heads == variant.hidden_size


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_query_heads_divide_evenly_over_kv_heads(variant: ModelVariant):
    assert variant.num_attention_heads % variant.num_kv_heads == 0


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_moe_facts_are_present_exactly_for_moe_models(variant: ModelVariant):
    is_moe = variant.architecture == "Qwen3MoeForCausalLM"
    assert (variant.num_experts is not None) is is_moe
    assert (variant.num_experts_per_token is not None) is is_moe
    assert (variant.active_params_b is not None) is is_moe
    if is_moe:
        assert variant.num_experts_per_token < variant.num_experts
        assert variant.active_params_b < variant.params_b


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.quantization], ids=_ids)
def test_quantized_entries_share_architecture_and_price_with_their_base(variant: ModelVariant):
    base = _base_of(variant)
    assert base.quantization is None
    assert {fact: getattr(variant, fact) for fact in ARCHITECTURE_FACTS} == {
        fact: getattr(base, fact) for fact in ARCHITECTURE_FACTS
    }
    assert (variant.input_per_mtok, variant.output_per_mtok, variant.thinking_output_per_mtok) == (
        base.input_per_mtok, base.output_per_mtok, base.thinking_output_per_mtok
    )
    assert variant.hf_id.startswith(f"{base.hf_id}-")
    assert base.name in variant.price_source


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_thinking_models_and_only_they_have_thinking_sampling(variant: ModelVariant):
    assert (variant.thinking_sampling is not None) is variant.thinking
    assert variant.thinking is (variant.family in {"qwen3", "qwen3-moe"} or variant.name == "tiny-qwen3")


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_prices_are_positive_and_sourced(variant: ModelVariant):
    assert variant.input_per_mtok > 0
    assert variant.output_per_mtok >= variant.input_per_mtok
    if variant.thinking_output_per_mtok is not None:
        assert variant.thinking_output_per_mtok >= variant.output_per_mtok
    assert variant.price_source


def test_qwen25_72b_matches_its_config():
    variant = CATALOG["qwen2.5-72b-instruct"]
    assert (variant.num_layers, variant.hidden_size, variant.num_attention_heads, variant.num_kv_heads) == (
        80, 8192, 64, 8
    )
    assert variant.license != "Apache-2.0"


def test_qwen25_7b_matches_its_config_and_card():
    variant = CATALOG["qwen2.5-7b-instruct"]
    assert (variant.num_layers, variant.hidden_size, variant.num_attention_heads, variant.num_kv_heads) == (
        28, 3584, 28, 4
    )
    assert variant.head_dim == 128
    assert variant.params_b == 7.61
    assert variant.context_length == 32768
    assert variant.sampling.temperature == 0.7 and variant.sampling.repetition_penalty == 1.05


def test_qwen25_3b_is_under_the_research_licence():
    assert CATALOG["qwen2.5-3b-instruct"].license == "Qwen Research License"


def test_qwen3_235b_a22b_matches_its_config_and_card():
    variant = CATALOG["qwen3-235b-a22b"]
    assert (variant.num_layers, variant.num_experts, variant.num_experts_per_token) == (94, 128, 8)
    assert (variant.num_attention_heads, variant.num_kv_heads, variant.head_dim) == (64, 4, 128)
    assert (variant.params_b, variant.active_params_b) == (235.0, 22.0)


def test_qwen3_sampling_follows_the_card():
    variant = CATALOG["qwen3-8b"]
    assert (variant.sampling.temperature, variant.sampling.top_p, variant.sampling.top_k) == (0.7, 0.8, 20)
    assert variant.thinking_sampling is not None
    assert (
        variant.thinking_sampling.temperature, variant.thinking_sampling.top_p, variant.thinking_sampling.top_k
    ) == (0.6, 0.95, 20)


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_vision_towers_are_exactly_on_the_vl_architecture(variant: ModelVariant):
    is_vl = variant.architecture == "Qwen2_5_VLForConditionalGeneration"
    assert (variant.vision_params_b is not None) == is_vl
    if is_vl:
        assert 0 < variant.vision_params_b < variant.params_b


def test_qwen25_vl_7b_matches_its_config_and_card():
    variant = CATALOG["qwen2.5-vl-7b-instruct"]
    assert (variant.hf_id, variant.family, variant.params_b) == ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2.5-vl", 8.29)
    assert (variant.num_layers, variant.hidden_size, variant.num_attention_heads, variant.num_kv_heads) == (
        28, 3584, 28, 4)
    # ViT: 32 blocks of (qkv 1280x3840 + proj 1280^2 + 3 x 1280x3420 MLP) = 630M, merger 5120^2 + 5120x3584 = 45M.
    assert variant.vision_params_b == pytest.approx((32 * (1280 * 3840 + 1280**2 + 3 * 1280 * 3420)
                                                     + 5120**2 + 5120 * 3584) / 1e9, abs=0.01)
    assert (variant.input_per_mtok, variant.output_per_mtok) == (0.35, 1.05)
    assert CATALOG["qwen2.5-vl-72b-instruct-awq"].hf_id == "Qwen/Qwen2.5-VL-72B-Instruct-AWQ"


def test_qwen25_math_has_a_4k_context():
    assert {CATALOG[f"qwen2.5-math-{size}-instruct"].context_length for size in ("1.5b", "7b", "72b")} == {4096}


def test_tiny_models_are_priced_like_the_smallest_real_models():
    tiny2, tiny3 = CATALOG["tiny-qwen2"], CATALOG["tiny-qwen3"]
    small2, small3 = CATALOG["qwen2.5-0.5b-instruct"], CATALOG["qwen3-0.6b"]
    assert (tiny2.input_per_mtok, tiny2.output_per_mtok) == (small2.input_per_mtok, small2.output_per_mtok)
    assert (tiny3.input_per_mtok, tiny3.output_per_mtok, tiny3.thinking_output_per_mtok) == (
        small3.input_per_mtok, small3.output_per_mtok, small3.thinking_output_per_mtok
    )
    assert tiny2.sampling.temperature == 0 and not tiny2.thinking
    assert tiny3.thinking and tiny3.thinking_sampling == small3.thinking_sampling


def test_get_variant_returns_the_entry():
    assert get_variant("qwen3-8b-fp8") is CATALOG["qwen3-8b-fp8"]


def test_get_variant_names_the_unknown_name_and_the_closest_ones():
    with pytest.raises(SpecError) as raised:
        get_variant("qwen2.5-7b-instrct")
    message = str(raised.value)
    assert "'qwen2.5-7b-instrct'" in message
    assert "qwen2.5-7b-instruct" in message.split("Closest:")[1]
    assert "qwen-batch models" in message
    assert "path:" in message


def test_get_variant_suggests_the_catalog_name_for_a_hugging_face_id():
    with pytest.raises(SpecError, match=r"Closest: qwen3-8b\b"):
        get_variant("Qwen/Qwen3-8B")


def test_get_variant_without_a_close_name_still_says_where_to_look():
    with pytest.raises(SpecError) as raised:
        get_variant("llama-3")
    message = str(raised.value)
    assert "Closest" not in message
    assert "qwen-batch models" in message and "path:" in message
