"""Tensor-parallel and capacity planning for one Qwen variant on one GPU type, and a roofline estimate of a run.

Pure arithmetic on the catalog's architecture facts: no Ray, vLLM or torch. Sizes are in GiB (2**30 bytes).

Memory model, per GPU, after vLLM's own accounting (the KV cache gets what is left of its share of the GPU):

    usable   = memory_gib x gpu_memory_utilization
    kv_cache = usable - weights / tp - OVERHEAD_GIB_PER_GPU - vision_encoder_gib

- Weights: parameters x bytes per weight: 2 for bf16 (4 for the float32 test models), 1 for fp8 and int8, 0.5 for
  4-bit AWQ/GPTQ, plus the quantization scales (see QUANTIZED_WEIGHT_BYTES). Quantized checkpoints keep the
  embedding and lm_head in 16 bits, so those are counted at 2 bytes (see `embedding_params`).
- Sharding: all weights divide evenly over the tp ranks, the embedding and lm_head included (vLLM shards them with
  its vocab-parallel layers). Small replicated pieces (norms, biases, and the K/V projections once tp exceeds the
  KV heads) are ignored.
- Overhead: a fixed OVERHEAD_GIB_PER_GPU for the activation peak vLLM profiles, CUDA graphs, NCCL buffers and
  allocator slack; an approximation, not a measurement.
- Vision tower (Qwen2.5-VL): its weights are in params_b, and stay 16-bit in quantized checkpoints (AWQ leaves the
  `visual` modules unquantized). vLLM's start-up profile also runs the encoder on the largest image the processor
  makes (its max_pixels, 12.8 MP = 16,384 image tokens = 65,536 patches) and reserves the encoder cache for it:
  `vision_encoder_gib` per GPU = patches x (the ViT's MLP gate and up outputs + 4 widths of buffers + the patch's
  pixel values) x 2 bytes + image tokens x hidden_size x 2 bytes, not divided over tp ranks (an upper bound).
- KV cache: one token takes 2 (K and V) x layers x KV heads per rank x head_dim x dtype bytes on each GPU. The KV
  heads are split over the ranks, and replicated once tp exceeds them (KV heads per rank = max(1, kv_heads // tp)).
  Every rank holds its share of every token, so a replica holds as many tokens as one of its GPUs, in whole blocks
  of KV_BLOCK_TOKENS.
- Choice: the smallest tp (a power of two, dividing the attention heads, dividing or divisible by the KV heads, at
  most MAX_TENSOR_PARALLEL = one node) whose KV cache holds `min_concurrent_seqs` sequences of `max_model_len`
  tokens. Replicas = gpus // tp.

Time model, a roofline per replica (rows are split evenly over the replicas):

- Decode: a step over a batch of B sequences reads each GPU's weights once plus the batch's KV cache, at
  DECODE_BANDWIDTH_EFFICIENCY of the memory bandwidth, and yields B tokens:
      step = (weights / tp + B x avg_context x kv_bytes_per_token_per_gpu) / (bandwidth x 0.6)
  where avg_context = prompt + output / 2 and B = min(max_num_seqs, KV capacity // (prompt + output), rows per
  replica): vLLM allocates KV blocks as sequences grow, so real lengths bound the batch, not max_model_len. When the
  step's matrix work, 2 x active params x B / (bf16 TFLOPS x tp x PREFILL_MFU), takes longer, that time counts
  instead (large batches of small models turn compute-bound).
- MoE: FLOPs use the active parameters; the bytes read are all the weights, since at decode batch sizes nearly
  every expert is routed a token each step (8 of 128 experts per token: 1 - (120/128)**64 = 98% of experts at B=64).
- Prefill is compute-bound: 2 x active params x prompt tokens / (bf16 TFLOPS x tp x PREFILL_MFU). Attention FLOPs
  are left out, and fp8 variants are timed at bf16 rates too (fp8 matrix units could double prefill speed).
- Prefill and decode times add up; vLLM overlaps them (chunked prefill), so the estimate errs long. Engine start
  and model loading are not counted.

Feeding model (`feeding_throughput`): the same decode step, stepped through a run whose rows have their own output
lengths. Continuously fed, finished rows are replaced from the queue at once, so the batch stays at its cap until
the run's end; fed shard by shard (one `generate` per shard), the batch drains to the shard's longest row before the
next shard starts. The difference is what continuous feeding is worth on real length distributions.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from qwen_batch.schemas.catalog import CATALOG, ModelVariant
from qwen_batch.schemas.errors import SpecError

__all__ = [
    "GPU_TYPES",
    "GpuType",
    "RunEstimate",
    "VariantPlan",
    "embedding_params",
    "estimate_run",
    "feeding_throughput",
    "kv_bytes_per_token",
    "lognormal_lengths",
    "plan_variant",
    "vision_encoder_bytes",
    "weight_bytes",
]

GIB = 2**30
# Tensor parallelism stays inside one node: vLLM's all-reduces need NVLink/PCIe, not the network.
MAX_TENSOR_PARALLEL = 8
# Pipeline stages tried, one node each, when a whole node's tensor parallelism does not fit a model.
PIPELINE_STAGES = (2, 4, 8)
# Activation peak, CUDA graphs, NCCL buffers and allocator slack per GPU; vLLM measures it, we assume it.
OVERHEAD_GIB_PER_GPU = 3.0
# vLLM's default paged-attention block size on GPUs.
KV_BLOCK_TOKENS = 16
# Share of peak HBM bandwidth a decode step achieves, and of peak dense bf16 FLOPS a prefill achieves.
DECODE_BANDWIDTH_EFFICIENCY = 0.6
PREFILL_MFU = 0.4
# vLLM's long-standing default for max_num_seqs; newer versions pick larger values on large GPUs.
DEFAULT_MAX_NUM_SEQS = 256
# Padded vocabulary of Qwen2.5 (0.5B-3B) and Qwen3 checkpoints; Qwen2.5 7B+ pad to 152,064 (0.1% more).
QWEN_VOCAB_SIZE = 151_936
# Qwen2.5-VL's vision encoder at its processor's largest image (preprocessor_config.json max_pixels), where vLLM
# profiles it: one image token per 28x28 pixels, 4 patches of 14x14x3 pixels x 2 frames each; the ViT is 1280 wide
# with a 3420-wide MLP in every size.
VISION_MAX_PIXELS = 12_845_056
VISION_PIXELS_PER_TOKEN = 28 * 28
VISION_PATCHES_PER_TOKEN = 4
VISION_PATCH_VALUES = 3 * 2 * 14 * 14
VISION_WIDTH = 1280
VISION_MLP_WIDTH = 3420
# Dense models this small tie lm_head to the embedding (`tie_word_embeddings` in Qwen2.5 <= 3B and Qwen3 <= 4B).
TIED_EMBEDDINGS_BELOW_B = 5.0

DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float32": 4}
# Bytes per quantized weight, scales included: AWQ and GPTQ store one fp16 scale and a zero point (4 or 8 bits)
# per group of 128 weights; Qwen's FP8 checkpoints one fp32 scale per 128x128 block.
QUANTIZED_WEIGHT_BYTES: dict[str, float] = {
    "fp8": 1 + 4 / (128 * 128),
    "gptq-int8": 1 + (2 + 1) / 128,
    "awq": 0.5 + (2 + 0.5) / 128,
    "gptq-int4": 0.5 + (2 + 0.5) / 128,
}


@dataclass(frozen=True)
class GpuType:
    """One accelerator model, as the planner sees it."""

    name: str
    memory_gib: float  # usable device memory: what CUDA reports as total, a little under the marketed size
    bandwidth_gb_s: float  # peak memory bandwidth, 1e9 bytes per second
    bf16_tflops: float  # peak dense bf16 tensor-core TFLOPS (datasheets quote twice this "with sparsity")
    supports_fp8: bool  # fp8 tensor cores (Hopper, Ada); Ampere runs fp8 checkpoints as weight-only
    usd_per_hour: float  # typical on-demand price of one GPU


# Sources (stored public copies, read via search; re-check before relying on a bill):
# - Bandwidth and TFLOPS: NVIDIA datasheets as mirrored by hpctech.co.jp (H100 SXM: 3,350 GB/s, bf16 1,979 TFLOPS
#   "with sparsity, 1/2 lower without"), glennklockwood.com (H100 dense bf16 989.4; A100 40GB 1,555 GB/s, 80GB
#   2,039 GB/s, dense bf16 312 citing nvidia-a100-datasheet), aiwiki.ai's H200 entry citing NVIDIA (141 GB
#   HBM3e, 4.8 TB/s, the H100's compute), the L40S datasheet table on mullet.se (864 GB/s, bf16 362.05 dense /
#   733 sparse), the L4 datasheet as quoted by grokipedia (300 GB/s, 242 TFLOPS fp16 with sparsity, so 121
#   dense). A10G: 600 GB/s per Baseten's "A10 vs A10G" post; its tensor rate is lower than the
#   A10's 125 dense TFLOPS (lower clocks) and ~70 is an approximation from that post, not a datasheet.
# - Usable memory: CUDA totals in out-of-memory messages and tools: H100 80GB HBM3 79.11 GiB (vllm#27508), A100
#   80GB 79.25 GiB (levihsu/OOTDiffusion#235), A100 40GB 42,405,855,232 B = 39.49 GiB (deviceQuery, PC2 wiki),
#   L40 44.40 GiB (QwenLM/Qwen3-VL#2097; the L40S has the same 48 GB GDDR6), H200 about 139 GiB (seen on a
#   single-H200 cloud machine; approximate). L4 (nvidia-smi 23,034 MiB, vllm#4959) and A10G ("~22GB usable",
#   signalnine/q27#1) are approximations at 22 GiB.
# - Prices, USD per GPU-hour on demand: H100 $2.49 (Lambda, quoted by computespec.pages.dev; the spec's default
#   accelerator_hour is 2.50), A100 80GB $1.35 and L40S $0.87 (aihardwareindex.com, Dec 2025), H200 $3.50 (low end
#   of mercatus-ai.com's specialty-cloud range $3.50-4.50), A10G $1.006 (AWS g5.xlarge us-east-1, the whole
#   instance). A100 40GB $1.10 and L4 $0.70 are approximations not read from a stored page.
GPU_TYPES: dict[str, GpuType] = {
    gpu.name: gpu
    for gpu in (
        GpuType("h100-80gb", memory_gib=79.1, bandwidth_gb_s=3350, bf16_tflops=989, supports_fp8=True,
                usd_per_hour=2.50),
        GpuType("h200-141gb", memory_gib=139.0, bandwidth_gb_s=4800, bf16_tflops=989, supports_fp8=True,
                usd_per_hour=3.50),
        GpuType("a100-80gb", memory_gib=79.2, bandwidth_gb_s=2039, bf16_tflops=312, supports_fp8=False,
                usd_per_hour=1.35),
        GpuType("a100-40gb", memory_gib=39.5, bandwidth_gb_s=1555, bf16_tflops=312, supports_fp8=False,
                usd_per_hour=1.10),
        GpuType("l40s-48gb", memory_gib=44.4, bandwidth_gb_s=864, bf16_tflops=362, supports_fp8=True,
                usd_per_hour=0.87),
        GpuType("l4-24gb", memory_gib=22.0, bandwidth_gb_s=300, bf16_tflops=121, supports_fp8=True,
                usd_per_hour=0.70),
        GpuType("a10g-24gb", memory_gib=22.0, bandwidth_gb_s=600, bf16_tflops=70, supports_fp8=False,
                usd_per_hour=1.006),
    )
}


@dataclass(frozen=True)
class VariantPlan:
    """How one variant is laid out on a set of GPUs of one type, and how much KV cache each replica gets."""

    variant: ModelVariant = field(repr=False)
    gpu: str  # GPU_TYPES key
    gpus: int  # GPUs available to the job
    tensor_parallel_size: int
    replicas: int  # gpus // (tensor_parallel_size x pipeline_parallel_size)
    max_model_len: int
    gpu_memory_utilization: float
    usable_gib_per_gpu: float  # memory_gib x gpu_memory_utilization: what vLLM may take
    weights_gib: float  # the whole model
    weights_per_gpu_gib: float
    overhead_per_gpu_gib: float
    kv_cache_per_gpu_gib: float  # 0 when weights and overhead alone exceed usable_gib_per_gpu
    kv_bytes_per_token_per_gpu: int
    kv_capacity_tokens: int  # tokens one replica's KV cache holds
    max_concurrent_seqs: int  # sequences of max_model_len tokens that fit at once
    min_concurrent_seqs: int
    fits: bool  # max_concurrent_seqs >= min_concurrent_seqs
    warning: str | None = None  # why an explicit tensor_parallel_size does not fit, and which one would
    pipeline_parallel_size: int = 1  # stages of tensor_parallel_size GPUs each, one node per stage
    vision_encoder_gib: float = 0.0  # per GPU: the vision encoder's profiled peak and encoder cache (VL models)
    lora_gib: float = 0.0  # per GPU: the LoRA adapter slots (max_loras x max_lora_rank) of every linear module

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def gpus_used(self) -> int:
        """GPUs the replicas hold together; the rest of `gpus` stay idle."""
        return self.gpus_per_replica * self.replicas

    def summary(self) -> str:
        """One line for logs and the CLI."""
        stages = f" x pipeline_parallel_size {self.pipeline_parallel_size}" if self.pipeline_parallel_size > 1 else ""
        text = (
            f"{self.variant.name} on {self.gpus} x {self.gpu}: tensor_parallel_size {self.tensor_parallel_size}{stages}, "
            f"{self.replicas} replica(s); per GPU {self.weights_per_gpu_gib:.1f} GiB weights + "
            f"{self.overhead_per_gpu_gib:.1f} GiB overhead + "
            + (f"{self.vision_encoder_gib:.1f} GiB vision encoder + " if self.vision_encoder_gib else "")
            + (f"{self.lora_gib:.2f} GiB LoRA slots + " if self.lora_gib else "")
            + f"{self.kv_cache_per_gpu_gib:.1f} GiB KV cache of "
            f"{self.usable_gib_per_gpu:.1f} GiB usable; {self.kv_capacity_tokens:,} KV tokens per replica = "
            f"{self.max_concurrent_seqs} sequences of {self.max_model_len:,}"
        )
        return text + (f". WARNING: {self.warning}" if self.warning else "")


@dataclass(frozen=True)
class RunEstimate:
    """Roofline time and cost of a batch run under a VariantPlan."""

    rows: int
    prompt_tokens: float
    output_tokens: float
    batch_size: int  # sequences each replica decodes per step
    decode_step_s: float
    decode_tokens_per_s_per_replica: float  # while decoding
    prefill_tokens_per_s_per_replica: float
    output_tokens_per_s_per_replica: float  # over the whole run, prefill included
    output_tokens_per_s: float  # all replicas together
    hours: float  # wall clock, engine start and model load not included
    gpu_hours: float  # hours x GPUs the replicas hold
    compute_cost_usd: float  # gpu_hours at the GPU type's hourly price
    list_price_cost_usd: float  # the same tokens at the variant's hosted-API list prices, for comparison


def embedding_params(variant: ModelVariant) -> float:
    """Parameters of the embedding and lm_head: one shared matrix in small dense models that tie them."""
    tied = variant.num_experts is None and variant.params_b < TIED_EMBEDDINGS_BELOW_B
    return min(variant.params_b * 1e9, QWEN_VOCAB_SIZE * variant.hidden_size * (1 if tied else 2))


def weight_bytes(variant: ModelVariant) -> float:
    """Bytes of the variant's weights as loaded: quantized layers with their scales, 16-bit embeddings and vision
    tower."""
    dtype_bytes = DTYPE_BYTES[variant.dtype]
    total = variant.params_b * 1e9
    if variant.quantization is None:
        return total * dtype_bytes
    unquantized = embedding_params(variant) + (variant.vision_params_b or 0.0) * 1e9
    return (total - unquantized) * QUANTIZED_WEIGHT_BYTES[variant.quantization] + unquantized * dtype_bytes


def vision_encoder_bytes(variant: ModelVariant) -> float:
    """Bytes each GPU holds for the vision encoder beyond its weights: the activation peak of vLLM's profile run on
    the largest image and that image's embeddings in the encoder cache (0 for text-only models)."""
    if variant.vision_params_b is None:
        return 0.0
    tokens = VISION_MAX_PIXELS // VISION_PIXELS_PER_TOKEN
    patches = tokens * VISION_PATCHES_PER_TOKEN
    dtype_bytes = DTYPE_BYTES[variant.dtype]
    per_patch = 2 * VISION_MLP_WIDTH + 4 * VISION_WIDTH + VISION_PATCH_VALUES
    return patches * per_patch * dtype_bytes + tokens * variant.hidden_size * dtype_bytes


def mlp_width(variant: ModelVariant) -> int:
    """A dense variant's MLP intermediate size, from its parameter count: what each layer holds beyond attention is
    the gate, up and down projections (3 x hidden x intermediate). Within 1.3 % of the published sizes (Qwen2.5-7B:
    18,929 for 18,944; 72B: 29,567 for 29,568; 0.5B: 4,803 for 4,864)."""
    hidden = variant.hidden_size
    attention = 2 * hidden * variant.num_attention_heads * variant.head_dim + 2 * hidden * variant.num_kv_heads * variant.head_dim
    per_layer = (variant.params_b * 1e9 - embedding_params(variant)) / variant.num_layers
    return max(0, round((per_layer - attention) / (3 * hidden)))


def lora_bytes(variant: ModelVariant, max_loras: int, max_lora_rank: int, tensor_parallel_size: int = 1,
               pipeline_parallel_size: int = 1) -> float:
    """Bytes each GPU of a replica sets aside for LoRA adapters. With enable_lora vLLM gives every linear module of
    every layer (q, k, v, o, gate, up, down, whatever modules the adapters target) `max_loras` slots of A (rank x in)
    and B (out x rank) at `max_lora_rank`, in the model's dtype; a column-parallel module shards B over the
    tensor-parallel ranks, a row-parallel one A. MoE experts are left out (their LoRA slots are vLLM's fused-MoE
    kernels', not planned here)."""
    if not max_loras:
        return 0.0
    tp, hidden = tensor_parallel_size, variant.hidden_size
    q, kv = variant.num_attention_heads * variant.head_dim, variant.num_kv_heads * variant.head_dim
    column = [q, kv, kv]  # out features of q, k, v; each A is rank x hidden
    row = [q]  # in features of o; its B is hidden x rank
    if variant.num_experts is None:
        column += [mlp_width(variant)] * 2  # gate, up
        row += [mlp_width(variant)]  # down
    per_rank = sum(hidden + out / tp for out in column) + sum(fan_in / tp + hidden for fan_in in row)
    layers = math.ceil(variant.num_layers / pipeline_parallel_size)
    return max_loras * max_lora_rank * per_rank * layers * DTYPE_BYTES[variant.dtype]


def kv_bytes_per_token(variant: ModelVariant, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1) -> int:
    """KV-cache bytes one token takes on each GPU of a replica (KV heads split over ranks, replicated past them;
    layers split over pipeline stages)."""
    kv_heads_per_rank = max(1, variant.num_kv_heads // tensor_parallel_size)
    layers_per_stage = math.ceil(variant.num_layers / pipeline_parallel_size)
    return 2 * layers_per_stage * kv_heads_per_rank * variant.head_dim * DTYPE_BYTES[variant.dtype]


def plan_variant(
    variant: ModelVariant,
    gpu: GpuType,
    gpus: int,
    max_model_len: int,
    gpu_memory_utilization: float = 0.9,
    tensor_parallel_size: int | None = None,
    min_concurrent_seqs: int = 16,
    pipeline_parallel_size: int | None = None,
    node_gpus: int = MAX_TENSOR_PARALLEL,
    lora_slots: tuple[int, int] = (0, 0),
) -> VariantPlan:
    """The smallest tensor parallelism that holds `min_concurrent_seqs` full-length sequences, or the one asked for.

    When no tensor-parallel size up to one node fits, pipeline parallelism spans nodes: a whole node's tensor
    parallelism in each stage, and the fewest stages (2, 4, 8) that fit. An explicit `tensor_parallel_size` is
    honoured even when it does not fit: the plan then has `fits=False` and a `warning` naming the shortfall and the
    size that would fit. SpecError when nothing fits, or when the plan needs more GPUs than `gpus`. `lora_slots`
    (max_loras, max_lora_rank) is what the model's LoRA adapters take (see lora_bytes).
    """
    _check_plan_inputs(gpus, max_model_len, gpu_memory_utilization, min_concurrent_seqs)
    sizes = [tp for tp in _valid_tensor_parallel_sizes(variant) if tp <= node_gpus] or [1]
    stages = [pipeline_parallel_size] if pipeline_parallel_size else [1, *PIPELINE_STAGES]
    candidates = [
        _plan_at(variant, gpu, gpus, tp, max_model_len, gpu_memory_utilization, min_concurrent_seqs, pp, lora_slots)
        for pp in stages for tp in (sizes if pp == 1 else sizes[-1:])
    ]
    smallest_fit = next((plan for plan in candidates if plan.fits), None)
    if tensor_parallel_size is not None:
        problem = _tensor_parallel_problem(variant, tensor_parallel_size)
        if problem:
            raise SpecError(f"resources.tensor_parallel_size: found {problem}; use one of "
                            f"{_valid_tensor_parallel_sizes(variant)}")
    if smallest_fit is None:
        raise SpecError(_no_fit_message(variant, gpu, candidates[-1]))
    plan = smallest_fit
    if tensor_parallel_size is not None:
        plan = _plan_at(variant, gpu, gpus, tensor_parallel_size, max_model_len, gpu_memory_utilization,
                        min_concurrent_seqs, pipeline_parallel_size or smallest_fit.pipeline_parallel_size, lora_slots)
        if not plan.fits:
            plan = replace(plan, warning=f"{variant.name} does not fit: {_shortfall(plan)}. tensor_parallel_size "
                                         f"{smallest_fit.tensor_parallel_size} fits "
                                         f"{smallest_fit.max_concurrent_seqs} sequences of {max_model_len:,}")
    if gpus < plan.gpus_per_replica:
        raise SpecError(_too_few_gpus_message(plan, gpu))
    return plan


def estimate_run(
    plan: VariantPlan,
    gpu: GpuType,
    rows: int,
    prompt_tokens_per_row: float,
    output_tokens_per_row: float,
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
) -> RunEstimate:
    """Roofline throughput, wall time and cost of `rows` rows under `plan` (the module docstring gives the model)."""
    if gpu.name != plan.gpu:
        raise ValueError(f"the plan is for {plan.gpu}, not {gpu.name}")
    if rows < 1 or prompt_tokens_per_row < 0 or output_tokens_per_row < 0 or max_num_seqs < 1:
        raise ValueError("rows and max_num_seqs must be at least 1 and token counts at least 0")
    variant = plan.variant
    rows_per_replica = math.ceil(rows / plan.replicas)
    sequence_tokens = max(1, math.ceil(prompt_tokens_per_row + output_tokens_per_row))
    batch = min(max_num_seqs, plan.kv_capacity_tokens // sequence_tokens, rows_per_replica)
    if batch < 1:
        raise SpecError(f"a row of {sequence_tokens:,} tokens does not fit the {plan.kv_capacity_tokens:,}-token KV "
                        f"cache of one {variant.name} replica; {_shortfall(plan)}")
    active_params = (variant.active_params_b or variant.params_b) * 1e9
    replica_flops_per_s = gpu.bf16_tflops * 1e12 * plan.gpus_per_replica * PREFILL_MFU
    step_s = _decode_step_s(plan, gpu, batch, prompt_tokens_per_row + output_tokens_per_row / 2, active_params)
    decode_rate = batch / step_s
    prefill_rate = replica_flops_per_s / (2 * active_params)
    replica_output = rows_per_replica * output_tokens_per_row
    replica_s = rows_per_replica * prompt_tokens_per_row / prefill_rate + replica_output / decode_rate
    hours = replica_s / 3600
    gpu_hours = hours * plan.gpus_used
    prompt_tokens, output_tokens = rows * prompt_tokens_per_row, rows * output_tokens_per_row
    return RunEstimate(
        rows=rows,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        batch_size=batch,
        decode_step_s=step_s,
        decode_tokens_per_s_per_replica=decode_rate,
        prefill_tokens_per_s_per_replica=prefill_rate,
        output_tokens_per_s_per_replica=replica_output / replica_s if replica_s else 0.0,
        output_tokens_per_s=output_tokens / replica_s if replica_s else 0.0,
        hours=hours,
        gpu_hours=gpu_hours,
        compute_cost_usd=gpu_hours * gpu.usd_per_hour,
        list_price_cost_usd=(prompt_tokens * variant.input_per_mtok + output_tokens * variant.output_per_mtok) / 1e6,
    )


def feeding_throughput(plan: VariantPlan, gpu: GpuType, output_lengths: Sequence[int], prompt_tokens: float,
                       max_num_seqs: int = DEFAULT_MAX_NUM_SEQS, rows_per_shard: int | None = None) -> float:
    """Decode-only output tokens/s of one replica over rows of the given output lengths: fed continuously
    (`rows_per_shard` None), or one shard at a time, each drained before the next (see the module docstring)."""
    if not output_lengths:
        raise ValueError("output_lengths is empty")
    variant = plan.variant
    active_params = (variant.active_params_b or variant.params_b) * 1e9
    mean_length = sum(output_lengths) / len(output_lengths)
    cap = max(1, min(max_num_seqs, plan.kv_capacity_tokens // max(1, math.ceil(prompt_tokens + mean_length))))
    every = rows_per_shard or len(output_lengths)
    seconds = 0.0
    for first in range(0, len(output_lengths), every):
        queue, running, started_sum, step = deque(output_lengths[first:first + every]), [], 0, 0
        # Event by event: between two rows finishing, the batch is constant and its context grows by one a step.
        while queue or running:
            while queue and len(running) < cap:
                heapq.heappush(running, (step + queue.popleft(), step))
                started_sum += step
            finish = running[0][0]
            context = prompt_tokens + (step + finish) / 2 - started_sum / len(running)
            seconds += (finish - step) * _decode_step_s(plan, gpu, len(running), context, active_params)
            step = finish
            while running and running[0][0] == step:
                started_sum -= heapq.heappop(running)[1]
    return sum(output_lengths) / seconds


def lognormal_lengths(count: int, median: float, sigma: float, cap: int, seed: int = 0) -> list[int]:
    """Output lengths as real batches have them: lognormal around `median`, at least 1, at most `cap`."""
    draw = random.Random(seed)
    return [min(cap, max(1, round(draw.lognormvariate(math.log(median), sigma)))) for _ in range(count)]


def _decode_step_s(plan: VariantPlan, gpu: GpuType, batch: int, avg_context: float, active_params: float) -> float:
    """Seconds of one decode step: the weights and the batch's KV read from memory, or the matmuls if slower."""
    step_bytes = plan.weights_per_gpu_gib * GIB + batch * avg_context * plan.kv_bytes_per_token_per_gpu
    memory_s = step_bytes / (gpu.bandwidth_gb_s * 1e9 * DECODE_BANDWIDTH_EFFICIENCY)
    compute_s = 2 * active_params * batch / (gpu.bf16_tflops * 1e12 * plan.gpus_per_replica * PREFILL_MFU)
    return max(memory_s, compute_s)


def _plan_at(variant: ModelVariant, gpu: GpuType, gpus: int, tensor_parallel_size: int, max_model_len: int,
             gpu_memory_utilization: float, min_concurrent_seqs: int, pipeline_parallel_size: int = 1,
             lora_slots: tuple[int, int] = (0, 0)) -> VariantPlan:
    """The memory budget of `variant` at one tensor- and pipeline-parallel size, judged against `min_concurrent_seqs`."""
    usable = gpu.memory_gib * gpu_memory_utilization
    weights = weight_bytes(variant) / GIB
    per_gpu = weights / (tensor_parallel_size * pipeline_parallel_size)
    vision = vision_encoder_bytes(variant) / GIB
    adapters = lora_bytes(variant, *lora_slots, tensor_parallel_size, pipeline_parallel_size) / GIB
    kv_cache = usable - per_gpu - OVERHEAD_GIB_PER_GPU - vision - adapters
    per_token = kv_bytes_per_token(variant, tensor_parallel_size, pipeline_parallel_size)
    blocks = max(0, math.floor(kv_cache * GIB / (per_token * KV_BLOCK_TOKENS)))
    tokens = blocks * KV_BLOCK_TOKENS
    seqs = tokens // max_model_len
    return VariantPlan(
        variant=variant, gpu=gpu.name, gpus=gpus, tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        replicas=gpus // (tensor_parallel_size * pipeline_parallel_size), max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization, usable_gib_per_gpu=usable, weights_gib=weights,
        weights_per_gpu_gib=per_gpu, overhead_per_gpu_gib=OVERHEAD_GIB_PER_GPU,
        kv_cache_per_gpu_gib=max(0.0, kv_cache), kv_bytes_per_token_per_gpu=per_token, kv_capacity_tokens=tokens,
        max_concurrent_seqs=seqs, min_concurrent_seqs=min_concurrent_seqs, fits=seqs >= min_concurrent_seqs,
        vision_encoder_gib=vision, lora_gib=adapters,
    )


def _check_plan_inputs(gpus: int, max_model_len: int, gpu_memory_utilization: float,
                       min_concurrent_seqs: int) -> None:
    """SpecError for arguments no plan can have."""
    problems = []
    if gpus < 1:
        problems.append(f"gpus: found {gpus}; at least 1 is needed")
    if max_model_len < 1:
        problems.append(f"model.max_model_len: found {max_model_len}; it must be positive")
    if not 0 < gpu_memory_utilization <= 1:
        problems.append(f"engine.gpu_memory_utilization: found {gpu_memory_utilization}; it must be in (0, 1]")
    if min_concurrent_seqs < 1:
        problems.append(f"min_concurrent_seqs: found {min_concurrent_seqs}; at least 1 is needed")
    if problems:
        raise SpecError(problems)


def _valid_tensor_parallel_sizes(variant: ModelVariant) -> list[int]:
    """Tensor-parallel sizes vLLM accepts for `variant` within one node, smallest first."""
    sizes = (2**power for power in range(MAX_TENSOR_PARALLEL.bit_length()))
    return [size for size in sizes if _tensor_parallel_problem(variant, size) is None]


def _tensor_parallel_problem(variant: ModelVariant, tensor_parallel_size: int) -> str | None:
    """Why `variant` cannot be split over `tensor_parallel_size` GPUs, or None if it can."""
    tp, kv_heads = tensor_parallel_size, variant.num_kv_heads
    if tp < 1 or tp & (tp - 1):
        return f"{tp}, which is not a power of two"
    if tp > MAX_TENSOR_PARALLEL:
        return f"{tp}, more than the {MAX_TENSOR_PARALLEL} GPUs of one node that tensor parallelism is kept to"
    if variant.num_attention_heads % tp:
        return f"{tp}, which does not divide {variant.name}'s {variant.num_attention_heads} attention heads"
    if (kv_heads % tp) if kv_heads >= tp else (tp % kv_heads):
        return f"{tp}, which neither divides nor is a multiple of {variant.name}'s {kv_heads} KV heads"
    return None


def _shortfall(plan: VariantPlan) -> str:
    """Why `plan` does not hold its minimum of sequences, in GiB."""
    where = (f"at tensor_parallel_size {plan.tensor_parallel_size} each GPU holds {plan.weights_per_gpu_gib:.1f} GiB "
             f"of weights + {plan.overhead_per_gpu_gib:.1f} GiB overhead of the {plan.usable_gib_per_gpu:.1f} GiB vLLM "
             f"may use ({plan.gpu_memory_utilization:g} x {GPU_TYPES[plan.gpu].memory_gib:g} GiB of {plan.gpu})")
    excess = plan.weights_per_gpu_gib + plan.overhead_per_gpu_gib - plan.usable_gib_per_gpu
    if excess >= 0:
        return f"{where}: {excess:.1f} GiB too much, with no room for a KV cache"
    needed_gib = plan.min_concurrent_seqs * plan.max_model_len * plan.kv_bytes_per_token_per_gpu / GIB
    return (f"{where}, leaving {plan.kv_cache_per_gpu_gib:.1f} GiB of KV cache = {plan.kv_capacity_tokens:,} tokens "
            f"at {plan.kv_bytes_per_token_per_gpu:,} B/token, {plan.max_concurrent_seqs} sequences of "
            f"{plan.max_model_len:,} tokens where {plan.min_concurrent_seqs} need {needed_gib:.1f} GiB")


def _no_fit_message(variant: ModelVariant, gpu: GpuType, largest: VariantPlan) -> str:
    """SpecError text for a variant that fits at no tensor-parallel size on one node, with what would work."""
    fixes = [f"a GPU type with more memory than {gpu.name}"]
    lighter = _lighter_variants_that_fit(largest, gpu)
    if lighter:
        fixes.insert(0, f"a quantized catalog variant ({', '.join(lighter)})")
    shortest = largest.kv_capacity_tokens // largest.min_concurrent_seqs
    if shortest >= KV_BLOCK_TOKENS:
        fixes.append(f"model.max_model_len of at most {shortest:,}")
    return (f"{variant.name} does not fit on {gpu.name} at any tensor_parallel_size it allows "
            f"({_valid_tensor_parallel_sizes(variant)}: powers of two dividing its {variant.num_attention_heads} "
            f"attention heads, within one node of {MAX_TENSOR_PARALLEL} GPUs): {_shortfall(largest)}. "
            f"Use {' or '.join(fixes)}.")


def _too_few_gpus_message(plan: VariantPlan, gpu: GpuType) -> str:
    """SpecError text for a plan whose one replica needs more GPUs than the job has."""
    fixes = [f"at least {plan.gpus_per_replica} GPUs"]
    lighter = _lighter_variants_that_fit(plan, gpu, within_gpus=True)
    if lighter:
        fixes.append(f"a quantized catalog variant ({', '.join(lighter)})")
    stages = (f" x pipeline_parallel_size {plan.pipeline_parallel_size} ({plan.gpus_per_replica} GPUs on "
              f"{plan.pipeline_parallel_size} nodes)" if plan.pipeline_parallel_size > 1 else "")
    return (f"{plan.variant.name} needs tensor_parallel_size {plan.tensor_parallel_size}{stages} on {gpu.name} at "
            f"max_model_len {plan.max_model_len:,} ({plan.weights_per_gpu_gib:.1f} GiB of weights per GPU), but only "
            f"{plan.gpus} GPU(s) are given. Use {' or '.join(fixes)}.")


def _lighter_variants_that_fit(plan: VariantPlan, gpu: GpuType, within_gpus: bool = False) -> list[str]:
    """'name at tensor_parallel_size N' for catalog quantizations of the same model that fit where `plan` does not."""
    variant = plan.variant
    found = []
    for other in CATALOG.values():
        if _base_name(other) != _base_name(variant) or weight_bytes(other) >= weight_bytes(variant):
            continue
        fit = next((tp for tp in _valid_tensor_parallel_sizes(other)
                    if _plan_at(other, gpu, plan.gpus, tp, plan.max_model_len, plan.gpu_memory_utilization,
                                plan.min_concurrent_seqs).fits), None)
        if fit is not None and (not within_gpus or fit <= plan.gpus):
            found.append(f"{other.name} at tensor_parallel_size {fit}")
    return found


def _base_name(variant: ModelVariant) -> str:
    """The catalog name of the bf16 model a quantized variant was made from."""
    return variant.name.removesuffix(f"-{variant.quantization}") if variant.quantization else variant.name
