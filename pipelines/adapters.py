"""LoRA adapters: checked against their base model before any engine starts, fetched once per node, served by vLLM.

An adapter is a folder in peft's format (adapter_config.json and adapter_model.safetensors) on object storage or a
local disk. Planning reads its config and its weights' header (a few KiB, never the weights): a missing file, a
rank vLLM cannot serve, a module the model lacks or weights shaped for another base model are spec errors then.
An engine actor copies each remote adapter to a node-local cache keyed by its URL and its files' ETags, under a
file lock, so the engines of one node download it once; vLLM then loads it from there (`LoRARequest`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_batch.pipelines import storage
from qwen_batch.pipelines.weights import node_copy
from qwen_batch.schemas.errors import SpecError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# vLLM's max_lora_rank takes one of these (vllm/config/lora.py, MaxLoRARanks); an adapter's rank may be any up to it.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CACHE_ENV = "QWEN_BATCH_ADAPTER_CACHE"
_WEIGHT_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class Adapter:
    """A checked LoRA adapter: what the engine loads and what planning and the output say about it."""

    name: str
    url: str  # its folder
    rank: int
    target_modules: tuple[str, ...]


def module_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in features, out features) of each linear module LoRA can target in a Qwen decoder layer, from a config.json
    (the MLP's only when the config gives intermediate_size)."""
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
              "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden)}
    if config.get("intermediate_size"):
        intermediate = config["intermediate_size"]
        shapes |= {"gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
                   "down_proj": (intermediate, hidden)}
    return shapes


LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def inspect_adapter(name: str, url: str, model: dict[str, Any], where: str) -> Adapter:
    """The adapter at `url`, checked against `model` (its config.json fields); SpecError naming `where` and the fix.
    Object storage is reached with the environment's credentials and endpoint (AWS_*, GOOGLE_*)."""
    shown = storage.display_url(url)
    folder = url.rstrip("/")
    if not storage.location(folder).store:
        folder = os.path.abspath(folder.removeprefix("file://"))  # engines run in another working directory
    try:
        files = {info.relpath: info for info in storage.list_files(folder)}
    except (FileNotFoundError, SpecError):
        files = {}
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if name not in files]
    if missing:
        raise SpecError(f"{where}: found {shown!r}, which holds no {' nor '.join(missing)}; an adapter is a folder as "
                        f"peft's save_pretrained writes it ({CONFIG_FILE} and {WEIGHTS_FILE}). Check the path")
    config = json.loads(storage.read_bytes(files[CONFIG_FILE].url))
    rank, modules = config.get("r"), config.get("target_modules")
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"its peft_type is {config.get('peft_type')!r}; only LoRA adapters are served")
    if config.get("use_dora"):
        problems.append("it is a DoRA adapter (use_dora: true), which vLLM does not serve")
    if not isinstance(rank, int) or not 1 <= rank <= VLLM_LORA_RANKS[-1]:
        problems.append(f"its rank r is {rank!r}; vLLM serves ranks 1 to {VLLM_LORA_RANKS[-1]}")
    if not isinstance(modules, list) or not modules:
        problems.append(f"its target_modules is {modules!r}; give the module names as a list (e.g. [q_proj, v_proj])")
    else:
        shapes = module_shapes(model)
        unknown = sorted(set(modules) - set(LORA_MODULES))
        if unknown:
            problems.append(f"it targets {unknown}, which a Qwen decoder layer does not have (it has "
                            f"{', '.join(LORA_MODULES)})")
        elif not problems:
            problems += _weight_problems(files[WEIGHTS_FILE].url, rank, shapes, model["num_hidden_layers"])
    if problems:
        raise SpecError(f"{where}: adapter {name!r} at {shown} cannot be served with this model: {'; '.join(problems)}")
    return Adapter(name, folder, rank, tuple(modules))


def _weight_problems(url: str, rank: int, shapes: dict[str, tuple[int, int]],
                     layers: int) -> list[str]:
    """What in the weights' safetensors header does not fit the model: shapes of another base, layers it lacks."""
    size = int.from_bytes(storage.read_bytes(url, start=0, end=8), "little")
    header = json.loads(storage.read_bytes(url, start=8, end=8 + size))
    for key, tensor in header.items():
        match = _WEIGHT_KEY.search(key)
        if match is None:
            continue
        layer, module, side = int(match[1]), match[2], match[3]
        if layer >= layers:
            return [f"its weights have layer {layer}; the model has {layers} layers (trained for a deeper base "
                    "model?)"]
        if module not in shapes:
            continue  # an MLP module of a catalog model whose intermediate size the catalog does not give
        fan_in, fan_out = shapes[module]
        expected = [rank, fan_in] if side == "A" else [fan_out, rank]
        found = tensor["shape"]
        if len(found) == 2 and found[0 if side == "A" else 1] != rank:
            return [f"{key} is {found}, of rank {found[0 if side == 'A' else 1]}, where {CONFIG_FILE} says r={rank}; "
                    "the config and the weights are of different adapters"]
        if found != expected:
            return [f"{key} is {found}, where this model's {module} takes {expected} (the adapter was trained for "
                    "another base model)"]
    return []


def max_lora_rank(adapters: list[Adapter]) -> int:
    """vLLM's max_lora_rank for these adapters: the smallest value it takes that holds the largest rank."""
    largest = max(adapter.rank for adapter in adapters)
    return next(rank for rank in VLLM_LORA_RANKS if rank >= largest)


def engine_args(adapters: list[Adapter], max_loras: int | None, on_cpu: bool) -> dict[str, Any]:
    """vLLM engine arguments that serve these adapters side by side (multi-LoRA batching).

    On the CPU one slot more than the adapters: vLLM's CPU LoRA kernels (vllm/lora/ops/torch_ops/lora_ops.py) index
    the slots with a row's adapter index, and a base-model row's -1 picks the last slot, so a row without an adapter
    would be answered by whichever adapter fills it. A slot that is never filled keeps base rows base."""
    if not adapters:
        return {}
    slots = len(adapters) + 1 if on_cpu else min(len(adapters), max_loras or len(adapters))
    return {"enable_lora": True, "max_loras": slots, "max_lora_rank": max_lora_rank(adapters),
            "max_cpu_loras": max(slots, len(adapters))}


def cache_dir() -> Path:
    """The node-local folder adapters are copied to: $QWEN_BATCH_ADAPTER_CACHE, else one under the temp folder."""
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "qwen-batch" / "adapters")


def local_path(adapter: Adapter) -> str:
    """A local folder holding the adapter: its own for a local one, else this node's copy, downloaded once and named
    by the files' sizes and ETags as the store lists them now, so a changed adapter is a new copy."""
    if not storage.location(adapter.url).store:
        return adapter.url
    files = [f for f in storage.list_files(adapter.url) if f.relpath in (CONFIG_FILE, WEIGHTS_FILE)]
    return str(node_copy(adapter.url, files, cache_dir(), prefix=f"{adapter.name}-")[0])
