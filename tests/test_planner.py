"""The capacity planner against hand-computed cases; pure arithmetic, no GPU, Ray or vLLM.

Shared hand numbers (GiB = 2**30 B; h100-80gb: 79.1 GiB usable device memory, 3,350 GB/s, 989 dense bf16 TFLOPS):
    usable per GPU at utilization 0.9 = 79.1 x 0.9 = 71.19 GiB; minus the 3 GiB overhead = 68.19 GiB for
    weights + KV cache. KV tokens are counted in whole blocks of 16.
"""

from __future__ import annotations

import pytest

from qwen_batch.cluster.planner import (
    GPU_TYPES,
    embedding_params,
    estimate_run,
    feeding_throughput,
    kv_bytes_per_token,
    lognormal_lengths,
    plan_variant,
    vision_encoder_bytes,
    weight_bytes,
)
from qwen_batch.schemas.catalog import CATALOG, get_variant
from qwen_batch.schemas.errors import SpecError

GIB = 2**30
H100 = GPU_TYPES["h100-80gb"]
L4 = GPU_TYPES["l4-24gb"]


def test_gpu_table_covers_the_common_types_with_dense_rates():
    expected = {"h100-80gb", "h200-141gb", "a100-80gb", "a100-40gb", "l40s-48gb", "l4-24gb", "a10g-24gb"}
    assert expected <= set(GPU_TYPES)
    # Dense, not "with sparsity": an H100 SXM is 989 bf16 TFLOPS, an L4 121 (datasheet 242 with sparsity).
    assert H100.bf16_tflops == 989 and L4.bf16_tflops == 121
    assert not GPU_TYPES["a100-80gb"].supports_fp8 and H100.supports_fp8
    for gpu in GPU_TYPES.values():
        assert gpu.memory_gib > 0 and gpu.bandwidth_gb_s > 0 and gpu.usd_per_hour > 0


def test_kv_bytes_per_token_splits_kv_heads_and_replicates_past_them():
    variant = CATALOG["qwen2.5-7b-instruct"]  # 28 layers, 4 KV heads of 128
    # 2 (K and V) x 28 layers x 4 heads x 128 dim x 2 B = 57,344 B; halved per rank at tp 2.
    assert kv_bytes_per_token(variant) == 57_344
    assert kv_bytes_per_token(variant, 2) == 28_672
    # Qwen3-235B-A22B has 4 KV heads: at tp 8 each rank still holds one (replicated), 2 x 94 x 1 x 128 x 2.
    assert kv_bytes_per_token(CATALOG["qwen3-235b-a22b"], 8) == 48_128


def test_weight_bytes_count_quantization_scales_and_16_bit_embeddings():
    assert weight_bytes(CATALOG["qwen2.5-72b-instruct"]) == pytest.approx(72.7e9 * 2)
    # AWQ 72B: embedding + lm_head (untied) = 151,936 x 8,192 x 2 = 2,489,319,424 params kept at 2 B; the rest at
    # 0.5 B + (2 B scale + 0.5 B zero) / 128 = 0.51953125 B: (72.7e9 - 2.489e9) x 0.5195 + 2.489e9 x 2 = 41.46e9 B.
    awq = CATALOG["qwen2.5-72b-instruct-awq"]
    assert embedding_params(awq) == 151_936 * 8_192 * 2
    assert weight_bytes(awq) == pytest.approx((72.7e9 - 2_489_319_424) * 0.51953125 + 2_489_319_424 * 2)
    # Small dense models tie lm_head to the embedding: one matrix, 151,936 x 896 for Qwen2.5-0.5B.
    assert embedding_params(CATALOG["qwen2.5-0.5b-instruct-awq"]) == 151_936 * 896


def test_vision_tower_stays_16_bit_in_awq_and_its_encoder_takes_kv_cache():
    awq = CATALOG["qwen2.5-vl-7b-instruct-awq"]
    embeddings = 151_936 * 3_584 * 2  # untied at 7B
    vision = 0.68e9
    assert weight_bytes(awq) == pytest.approx((8.29e9 - embeddings - vision) * 0.51953125 + (embeddings + vision) * 2)
    # Profiled at 12,845,056 pixels = 16,384 image tokens = 65,536 patches, each 2 x 3420 + 4 x 1280 + 1176 values
    # of 2 B, plus 16,384 tokens x 3,584 wide x 2 B in the encoder cache: 1.7129 GiB.
    encoder = 65_536 * (2 * 3420 + 4 * 1280 + 1176) * 2 + 16_384 * 3_584 * 2
    assert vision_encoder_bytes(awq) == encoder
    assert vision_encoder_bytes(CATALOG["qwen2.5-7b-instruct"]) == 0
    vl = plan_variant(CATALOG["qwen2.5-vl-7b-instruct"], H100, gpus=1, max_model_len=32_768)
    assert vl.vision_encoder_gib == pytest.approx(encoder / 2**30)
    assert vl.kv_cache_per_gpu_gib == pytest.approx(vl.usable_gib_per_gpu - 8.29e9 * 2 / 2**30 - 3 - encoder / 2**30)
    assert "1.7 GiB vision encoder" in vl.summary()


def test_7b_bf16_fits_one_h100_at_tp_1_with_hand_computed_kv_capacity():
    # Weights 7.61e9 x 2 B = 15.22e9 B = 14.1747 GiB. KV cache = 71.19 - 14.1747 - 3 = 54.0153 GiB
    # = 57,998,454,978 B; / (57,344 B x 16 tokens) = 63,213 whole blocks = 1,011,408 tokens;
    # // 32,768 = 30 full-length sequences >= 16.
    plan = plan_variant(CATALOG["qwen2.5-7b-instruct"], H100, gpus=1, max_model_len=32_768)
    assert (plan.tensor_parallel_size, plan.replicas, plan.fits, plan.warning) == (1, 1, True, None)
    assert plan.weights_per_gpu_gib == pytest.approx(14.1747, abs=1e-4)
    assert plan.kv_cache_per_gpu_gib == pytest.approx(54.0153, abs=1e-4)
    assert plan.kv_bytes_per_token_per_gpu == 57_344
    assert plan.kv_capacity_tokens == 1_011_408
    assert plan.max_concurrent_seqs == 30


def test_72b_bf16_needs_a_whole_node_of_h100s_at_32k():
    # Weights 72.7e9 x 2 B = 135.41 GiB: more than one GPU's 68.19 GiB before any KV cache.
    # tp 2: 67.71 GiB per GPU leaves 0.48 GiB of KV: not one 32k sequence.
    # tp 4: 33.85 GiB per GPU leaves 34.34 GiB; 2 x 80 x 2 heads x 128 x 2 = 81,920 B/token -> 450,048 tokens
    #       = 13 sequences of 32,768 < 16.
    # tp 8: 16.93 GiB leaves 51.26 GiB; 40,960 B/token -> 1,343,824 tokens = 41 sequences: chosen.
    plan = plan_variant(CATALOG["qwen2.5-72b-instruct"], H100, gpus=8, max_model_len=32_768)
    assert plan.tensor_parallel_size == 8 and plan.tensor_parallel_size >= 4
    assert plan.kv_capacity_tokens == 1_343_824 and plan.max_concurrent_seqs == 41


def test_explicit_tp_1_for_72b_is_honoured_with_a_warning_in_gib():
    plan = plan_variant(CATALOG["qwen2.5-72b-instruct"], H100, gpus=8, max_model_len=32_768, tensor_parallel_size=1)
    assert plan.tensor_parallel_size == 1 and plan.replicas == 8
    assert not plan.fits and plan.kv_capacity_tokens == 0 and plan.kv_cache_per_gpu_gib == 0
    # 135.4 GiB of weights + 3 GiB overhead - 71.19 GiB usable = 67.2 GiB too much.
    assert "135.4 GiB of weights" in plan.warning
    assert "71.2 GiB vLLM may use" in plan.warning
    assert "67.2 GiB too much" in plan.warning
    assert "tensor_parallel_size 8 fits 41 sequences" in plan.warning


def test_explicit_tp_that_fits_has_no_warning():
    plan = plan_variant(CATALOG["qwen2.5-72b-instruct"], H100, gpus=8, max_model_len=8_192, tensor_parallel_size=8)
    assert plan.fits and plan.warning is None and plan.replicas == 1


def test_awq_72b_fits_on_fewer_gpus_than_bf16():
    # AWQ weights 41.46e9 B = 38.61 GiB (see the weight test).
    # tp 1: 29.58 GiB KV / 327,680 B/token = 96,928 tokens = 2 sequences of 32k.
    # tp 2: 48.89 GiB / 163,840 = 320,368 tokens = 9.   tp 4: 58.54 GiB / 81,920 = 767,264 tokens = 23 >= 16.
    awq = plan_variant(CATALOG["qwen2.5-72b-instruct-awq"], H100, gpus=8, max_model_len=32_768)
    bf16 = plan_variant(CATALOG["qwen2.5-72b-instruct"], H100, gpus=8, max_model_len=32_768)
    assert awq.tensor_parallel_size == 4 and awq.kv_capacity_tokens == 767_264
    assert awq.tensor_parallel_size < bf16.tensor_parallel_size
    assert awq.replicas == 2 and bf16.replicas == 1


def test_qwen3_235b_bf16_needs_two_pipeline_stages_of_8_h100s_but_fp8_fits_one_node():
    # bf16: 235e9 x 2 B = 470e9 B = 437.7 GiB; / 8 = 54.72 GiB per GPU leaves 13.47 GiB of KV at 48,128 B/token
    # = 300,624 tokens = 9 sequences of 32,768 < 16: one node (tp 8) is not enough. Two stages of tp 8: 27.36 GiB
    # of weights per GPU leaves 40.84 GiB of KV at 24,064 B/token (47 of 94 layers) = 1,822,320 tokens = 55 sequences.
    with pytest.raises(SpecError) as error:
        plan_variant(CATALOG["qwen3-235b-a22b"], H100, gpus=8, max_model_len=32_768)
    message = str(error.value)
    assert "tensor_parallel_size 8 x pipeline_parallel_size 2 (16 GPUs on 2 nodes)" in message
    assert "qwen3-235b-a22b-fp8 at tensor_parallel_size 8" in message
    two_nodes = plan_variant(CATALOG["qwen3-235b-a22b"], H100, gpus=16, max_model_len=32_768)
    assert (two_nodes.tensor_parallel_size, two_nodes.pipeline_parallel_size, two_nodes.replicas) == (8, 2, 1)
    assert two_nodes.weights_per_gpu_gib == pytest.approx(27.36, abs=0.01) and two_nodes.kv_bytes_per_token_per_gpu == 24_064
    assert two_nodes.max_concurrent_seqs == 55 and two_nodes.gpus_used == 16
    # fp8: (235e9 - 1.245e9 embedding params) x (1 + 4/16384) B + 1.245e9 x 2 B = 220.07 GiB.
    # tp 4: 55.02 GiB per GPU leaves 13.17 GiB = 293,856 tokens = 8 sequences (tp 4 still gives 1 KV head/rank).
    # tp 8: 27.51 GiB leaves 40.68 GiB = 907,584 tokens = 27 sequences: fits.
    plan = plan_variant(CATALOG["qwen3-235b-a22b-fp8"], H100, gpus=8, max_model_len=32_768)
    assert plan.tensor_parallel_size == 8 and plan.fits
    assert plan.weights_gib == pytest.approx(220.07, abs=0.01)
    assert plan.kv_capacity_tokens == 907_584 and plan.max_concurrent_seqs == 27


def test_tp_must_divide_the_attention_heads():
    variant = CATALOG["qwen2.5-7b-instruct"]  # 28 heads: tp 1, 2 or 4; never 8
    # L4: 22 x 0.9 = 19.8 GiB usable, 16.8 after overhead; weights 14.17 GiB.
    # tp 1: 2.63 GiB KV = 1 sequence of 32k; tp 2: 9.71 GiB / 28,672 B = 11; tp 4: 13.26 GiB / 14,336 B = 30.
    assert plan_variant(variant, L4, gpus=8, max_model_len=32_768).tensor_parallel_size == 4
    with pytest.raises(SpecError, match="does not divide qwen2.5-7b-instruct's 28 attention heads"):
        plan_variant(variant, L4, gpus=8, max_model_len=32_768, tensor_parallel_size=8)
    # Needing 64 sequences, tp 4 (30) is not enough and tp 8 is not allowed: two pipeline stages of tp 4, never tp 8.
    deep = plan_variant(variant, L4, gpus=8, max_model_len=32_768, min_concurrent_seqs=64)
    assert (deep.tensor_parallel_size, deep.pipeline_parallel_size, deep.replicas) == (4, 2, 1)


def test_replicas_are_gpus_floor_divided_by_tp():
    variant = CATALOG["qwen2.5-72b-instruct"]
    # At 8,192 tokens tp 4 holds 450,048 // 8,192 = 54 sequences >= 16.
    plan = plan_variant(variant, H100, gpus=13, max_model_len=8_192)
    assert (plan.tensor_parallel_size, plan.replicas, plan.gpus_used) == (4, 3, 12)


def test_too_few_gpus_for_the_tp_is_a_spec_error_suggesting_more_gpus_or_quantization():
    with pytest.raises(SpecError) as error:
        plan_variant(CATALOG["qwen2.5-72b-instruct"], H100, gpus=4, max_model_len=32_768)
    message = str(error.value)
    assert "needs tensor_parallel_size 8" in message and "only 4 GPU(s)" in message
    assert "at least 8 GPUs" in message and "qwen2.5-72b-instruct-awq at tensor_parallel_size 4" in message


def test_impossible_arguments_are_spec_errors():
    with pytest.raises(SpecError, match="gpu_memory_utilization"):
        plan_variant(CATALOG["qwen2.5-7b-instruct"], H100, gpus=1, max_model_len=4_096, gpu_memory_utilization=1.5)
    with pytest.raises(SpecError, match="not a power of two"):
        plan_variant(CATALOG["qwen2.5-7b-instruct"], H100, gpus=8, max_model_len=4_096, tensor_parallel_size=3)


def test_7b_decode_throughput_matches_the_roofline_by_hand():
    plan = plan_variant(CATALOG["qwen2.5-7b-instruct"], H100, gpus=1, max_model_len=32_768)
    estimate = estimate_run(plan, H100, rows=10_000, prompt_tokens_per_row=512, output_tokens_per_row=256)
    # Batch = min(256, 1,011,408 KV tokens // 768 tokens a row = 1,316, 10,000 rows) = 256.
    # Average context while decoding = 512 + 256 / 2 = 640 tokens.
    # Bytes per step = 15.22e9 weights + 256 x 640 x 57,344 = 15.22e9 + 9.395e9 = 24.615e9 B.
    # Memory time = 24.615e9 / (3,350e9 x 0.6) = 12.246 ms; matmuls = 2 x 7.61e9 x 256 / (989e12 x 0.4) = 9.85 ms,
    # so memory-bound: 256 tokens / 12.246 ms = 20,904 tokens/s.
    assert estimate.batch_size == 256
    assert estimate.decode_step_s == pytest.approx(0.0122464, rel=1e-4)
    assert estimate.decode_tokens_per_s_per_replica == pytest.approx(20_904, rel=1e-4)
    # Prefill = 989e12 x 0.4 / (2 x 7.61e9) = 25,992 tokens/s. Time = 5.12e6 / 25,992 + 2.56e6 / 20,904
    # = 197.0 + 122.5 = 319.4 s = 0.08874 h on one GPU: $0.2218 at $2.50, vs list price
    # 10,000 x (512 x $0.175 + 256 x $0.70) / 1e6 = $2.688.
    assert estimate.prefill_tokens_per_s_per_replica == pytest.approx(25_992, rel=1e-4)
    assert estimate.hours == pytest.approx(319.45 / 3600, rel=1e-3)
    assert estimate.gpu_hours == pytest.approx(estimate.hours)
    assert estimate.compute_cost_usd == pytest.approx(estimate.gpu_hours * 2.50)
    assert estimate.list_price_cost_usd == pytest.approx(2.688)
    assert estimate.output_tokens_per_s == pytest.approx(2.56e6 / 319.45, rel=1e-3)


def test_short_contexts_at_full_batch_are_compute_bound():
    plan = plan_variant(CATALOG["qwen2.5-7b-instruct"], H100, gpus=1, max_model_len=4_096)
    estimate = estimate_run(plan, H100, rows=1_000, prompt_tokens_per_row=64, output_tokens_per_row=32)
    # Memory: (15.22e9 + 256 x 80 x 57,344) / 2.01e12 = 8.16 ms < matmuls 2 x 7.61e9 x 256 / 395.6e12 = 9.85 ms.
    assert estimate.decode_step_s == pytest.approx(0.009849, rel=1e-3)


def test_moe_prefill_uses_active_parameters_and_replicas_multiply_throughput():
    plan = plan_variant(CATALOG["qwen3-30b-a3b"], H100, gpus=4, max_model_len=8_192)
    estimate = estimate_run(plan, H100, rows=4_000, prompt_tokens_per_row=1_000, output_tokens_per_row=200)
    # 3.3B active: 989e12 x tp x 0.4 / (2 x 3.3e9) tokens/s per replica.
    assert estimate.prefill_tokens_per_s_per_replica == pytest.approx(
        989e12 * plan.tensor_parallel_size * 0.4 / (2 * 3.3e9))
    assert estimate.output_tokens_per_s == pytest.approx(estimate.output_tokens_per_s_per_replica * plan.replicas)
    assert estimate.gpu_hours == pytest.approx(estimate.hours * plan.gpus_used)


def test_estimate_refuses_a_plan_for_another_gpu_type():
    plan = plan_variant(CATALOG["qwen2.5-7b-instruct"], H100, gpus=1, max_model_len=4_096)
    with pytest.raises(ValueError, match="h100-80gb"):
        estimate_run(plan, L4, rows=1, prompt_tokens_per_row=10, output_tokens_per_row=10)


def test_continuous_feeding_keeps_the_batch_full_where_shard_by_shard_feeding_drains() -> None:
    variant, gpu = get_variant("qwen2.5-7b-instruct"), GPU_TYPES["h100-80gb"]
    plan = plan_variant(variant, gpu, 1, 4096, 0.9)
    long_tail = lognormal_lengths(5000, median=45, sigma=1.5, cap=2048, seed=1)
    continuous = feeding_throughput(plan, gpu, long_tail, 200, 1024)
    per_shard = feeding_throughput(plan, gpu, long_tail, 200, 1024, rows_per_shard=512)
    assert continuous > 4 * per_shard
    # With one length for every row nothing drains early: both feedings decode at the same rate.
    same = [round(sum(long_tail) / len(long_tail))] * len(long_tail)
    assert feeding_throughput(plan, gpu, same, 200, 1024, rows_per_shard=1024) == pytest.approx(
        feeding_throughput(plan, gpu, same, 200, 1024), rel=0.02)


def test_lognormal_lengths_are_deterministic_and_capped() -> None:
    lengths = lognormal_lengths(4096, median=24, sigma=1.0, cap=400, seed=3)
    assert lengths == lognormal_lengths(4096, median=24, sigma=1.0, cap=400, seed=3)
    assert min(lengths) >= 1 and max(lengths) == 400 and 20 <= sorted(lengths)[2048] <= 28


def test_lora_slots_of_every_linear_module_take_kv_cache_room():
    """vLLM gives each of a layer's seven linear modules max_loras slots of rank max_lora_rank, whatever modules the
    adapters target; hand-computed for Qwen2.5-7B (hidden 3,584, 28 query and 4 KV heads of 128, MLP 18,944)."""
    from qwen_batch.cluster.planner import lora_bytes, mlp_width

    variant = get_variant("qwen2.5-7b-instruct")
    assert abs(mlp_width(variant) - 18_944) / 18_944 < 0.002
    mlp = mlp_width(variant)
    per_rank = (3584 + 3584) + 2 * (3584 + 512) + (3584 + 3584) + 2 * (3584 + mlp) + (mlp + 3584)
    assert lora_bytes(variant, 4, 16) == 4 * 16 * per_rank * 28 * 2
    assert lora_bytes(variant, 0, 16) == 0.0
    sharded = (3584 + 3584 / 2) + 2 * (3584 + 256) + (3584 / 2 + 3584) + 2 * (3584 + mlp / 2) + (mlp / 2 + 3584)
    assert lora_bytes(variant, 4, 16, tensor_parallel_size=2) == 4 * 16 * sharded * 28 * 2
    gpu = GPU_TYPES["h100-80gb"]
    plain = plan_variant(variant, gpu, 1, 32_768)
    tuned = plan_variant(variant, gpu, 1, 32_768, lora_slots=(8, 64))
    assert tuned.lora_gib == lora_bytes(variant, 8, 64) / GIB and plain.lora_gib == 0.0
    assert tuned.kv_cache_per_gpu_gib == pytest.approx(plain.kv_cache_per_gpu_gib - tuned.lora_gib)
    assert tuned.max_concurrent_seqs < plain.max_concurrent_seqs and "GiB LoRA slots" in tuned.summary()
