"""Tiny random LoRA adapters for a checkpoint, in peft's on-disk format, built offline for tests and demos."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen_batch.pipelines.adapters import module_shapes
from qwen_batch.schemas.errors import SpecError

__all__ = ["make_tiny_lora"]

# peft's `LoraConfig(r=16, target_modules=[q_proj, k_proj, v_proj, o_proj])`, the fine-tune our users run.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_tiny_lora(base: str | Path, out_dir: str | Path, *, rank: int = 8, alpha: int | None = None,
                   target_modules: tuple[str, ...] = ATTENTION_MODULES, seed: int = 1) -> Path:
    """Write a random LoRA adapter for the checkpoint folder `base` to `out_dir` and return it.

    The files are what `peft`'s `save_pretrained` writes: adapter_config.json and adapter_model.safetensors with
    `base_model.model.<module>.lora_A.weight` (rank x in) and `lora_B.weight` (out x rank) per target module. Unlike
    a fresh peft adapter (lora_B zero), both matrices are random, so the adapter changes what the model says.
    """
    base, out_dir = Path(base), Path(out_dir)
    config = json.loads((base / "config.json").read_text())
    shapes = module_shapes(config)
    unknown = sorted(set(target_modules) - set(shapes))
    if unknown:
        raise SpecError(f"target_modules: found {unknown}, which are not modules of {base}; choose from "
                        f"{sorted(shapes)}")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in target_modules:
            block = "self_attn" if module in ATTENTION_MODULES else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            fan_in, fan_out = shapes[module]
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) / rank ** 0.5
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": rank,
        "lora_alpha": alpha if alpha is not None else 2 * rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(target_modules), "fan_in_fan_out": False, "inference_mode": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out_dir

