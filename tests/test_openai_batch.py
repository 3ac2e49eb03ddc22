"""OpenAI Batch API files in and out, checked against the example lines of OpenAI's Batch API guide."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest

from qwen_batch.jobs.driver import run_job
from qwen_batch.pipelines.openai_batch import parse_request, response_line
from qwen_batch.pipelines.structured import StructuredOutput
from qwen_batch.schemas.catalog import get_variant
from qwen_batch.schemas.errors import RowError
from qwen_batch.schemas.spec import load_spec

# The two request lines of OpenAI's Batch API guide ("Preparing your batch file"), verbatim.
GUIDE_LINES = [
    '{"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": '
    '"gpt-3.5-turbo-0125", "messages": [{"role": "system", "content": "You are a helpful assistant."},{"role": '
    '"user", "content": "Hello world!"}],"max_tokens": 1000}}',
    '{"custom_id": "request-2", "method": "POST", "url": "/v1/chat/completions", "body": {"model": '
    '"gpt-3.5-turbo-0125", "messages": [{"role": "system", "content": "You are an unhelpful assistant."},{"role": '
    '"user", "content": "Hello world!"}],"max_tokens": 1000}}',
]
SCHEMA = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]}}, "required": ["mood"],
          "additionalProperties": False}
MORE_LINES = [
    json.dumps({"custom_id": "request-3", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "How do you feel?"}], "max_tokens": 20,
        "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {"name": "m", "schema": SCHEMA}}}}),
    json.dumps({"custom_id": "request-4", "method": "POST", "url": "/v1/embeddings",
                "body": {"model": "text-embedding-3-small", "input": "hi"}}),
]


def test_guide_request_line_parses_to_messages_model_and_overrides():
    columns, overrides = parse_request(json.loads(GUIDE_LINES[0]))
    assert columns["custom_id"] == "request-1" and columns["model"] == "gpt-3.5-turbo-0125"
    assert columns["messages"][1] == {"role": "user", "content": "Hello world!"}
    assert overrides == {"max_tokens": 1000}


def test_request_fields_become_sampling_and_response_format_overrides():
    _, overrides = parse_request(json.loads(MORE_LINES[0]))
    assert overrides == {"max_tokens": 20, "temperature": 0,
                         "response_format": StructuredOutput("json_schema", json_schema=SCHEMA)}


@pytest.mark.parametrize("line,message", [
    ({"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {}}, "only chat completions"),
    ({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": "hi"}, "`body` must be an object"),
    ({"custom_id": "x", "url": "/v1/chat/completions", "body": {"messages": [], "tools": []}}, "['tools'] are not"),
    ({"custom_id": "x", "url": "/v1/chat/completions", "body": {"messages": [], "n": 2}}, "body.n > 1"),
    ({"custom_id": "x", "url": "/v1/chat/completions", "body": {"messages": [], "stream": True}}, "body.stream"),
    ({"custom_id": "x", "url": "/v1/chat/completions", "body": {"top_logprobs": 3}}, "needs body.logprobs: true"),
    ({"custom_id": "x", "url": "/v1/chat/completions", "body": {"logprobs": True, "top_logprobs": 21}},
     "body.top_logprobs: found 21; allowed: an integer in [0, 20]"),
    ({"custom_id": "x", "url": "/v1/chat/completions", "body": {"logprobs": 1}}, "body.logprobs: found 1"),
    ({"custom_id": "x", "url": "/v1/chat/completions", "body": {"messages": [], "max_tokens": 0}}, "allowed: an integer > 0"),
    ({"custom_id": "x", "url": "/v1/chat/completions", "body": {"response_format": {"type": "xml"}}}, "json_schema"),
])
def test_requests_we_cannot_honour_are_refused_with_a_reason(line, message):
    with pytest.raises(RowError, match=message.replace("[", r"\[").replace("]", r"\]")) as caught:
        parse_request(line)
    assert caught.value.error_type == "invalid_request"


@pytest.mark.parametrize("body,logprobs", [
    ({"logprobs": True, "top_logprobs": 3}, 3), ({"logprobs": True}, 0), ({"logprobs": False}, None),
])
def test_logprobs_requests_name_how_many_alternatives_per_token(body, logprobs):
    _, overrides = parse_request({"custom_id": "x", "url": "/v1/chat/completions", "body": {"messages": [], **body}})
    assert overrides.get("logprobs") == logprobs


def test_response_lines_are_openais_own_chat_completion_type():
    """Lines with and without logprobs, a structured answer and an error row, held to the `openai` package's types."""
    from openai.types.chat import ChatCompletion

    row = {"id": "r", "variant": "tiny-qwen2", "generated_text": "Hi there", "finish_reason": "length",
           "prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11, "cached_tokens": 0, "reasoning_tokens": 0,
           "reasoning_text": None, "error_type": None, "error": None,
           "logprobs": [{"token": "Hi", "logprob": -0.5, "top_logprobs": [{"token": "Hi", "logprob": -0.5},
                                                                         {"token": "Hello", "logprob": -1.2}]},
                        {"token": " thé", "logprob": -2.0, "top_logprobs": []}]}
    body = ChatCompletion.model_validate(response_line(row, "job", 1)["response"]["body"])
    content = body.choices[0].logprobs.content
    assert [t.token for t in content] == ["Hi", " thé"] and content[1].bytes == list(" thé".encode())
    assert [t.token for t in content[0].top_logprobs] == ["Hi", "Hello"]
    plain = ChatCompletion.model_validate(response_line({**row, "logprobs": None}, "job", 1)["response"]["body"])
    assert plain.choices[0].logprobs is None and plain.usage.total_tokens == 11


def test_response_line_has_openais_output_shape_with_usage():
    row = {"id": "request-2", "variant": "tiny-qwen2", "generated_text": "Hello.", "finish_reason": "stop",
           "prompt_tokens": 22, "completion_tokens": 2, "total_tokens": 24, "cached_tokens": 0, "reasoning_tokens": 0,
           "reasoning_text": None, "error_type": None, "error": None}
    line = response_line(row, "job-1", 1711652795)
    assert set(line) == {"id", "custom_id", "response", "error"} and line["custom_id"] == "request-2"
    assert line["id"].startswith("batch_req_") and line["error"] is None
    body = line["response"]["body"]
    assert line["response"]["status_code"] == 200 and body["object"] == "chat.completion"
    assert body["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": "Hello."}, "logprobs": None,
                                  "finish_reason": "stop"}
    assert body["usage"]["prompt_tokens"] == 22 and body["usage"]["total_tokens"] == 24
    assert response_line(row, "job-1", 1) ["id"] == line["id"], "ids must not change when a shard is rewritten"


# Requests as they really come, for the tiny-qwen2 model and its two LoRA adapters: the developer role, content parts,
# max_completion_tokens, logprobs, and `model` naming an adapter.
CHAT = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Say hello."}, {"type": "text", "text": "Now."}]}]
SAME_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello.\nNow."}]
ADAPTER_LINES = [
    json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": model, "messages": CHAT, "max_completion_tokens": 8, **extra}})
    for custom_id, model, extra in [
        ("tuned-1", "support-v3", {"logprobs": True, "top_logprobs": 2}),
        ("tuned-2", "legal-v1", {}),
        ("base-1", "gpt-3.5-turbo-0125", {"logprobs": True}),
        ("image-1", "support-v3", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": "s3://b/cat.png"}}]}]}),
    ]
]


def reference_text(model_dir: Path, adapter_dir: Path | None, messages: list[dict[str, str]], tokens: int
                   ) -> tuple[int, str]:
    """(prompt tokens, greedy answer) from transformers itself, with the adapter merged into the weights as peft's
    `merge_and_unload` does (W + alpha / r x B A): what vLLM's LoRA path must reproduce."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
        for key, lora_a in weights.items():
            if ".lora_A." in key:
                module = model.get_submodule(key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"))
                module.weight.data += config["lora_alpha"] / config["r"] * weights[key.replace("lora_A", "lora_B")] @ lora_a
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=[151645, 151643])
    return ids.shape[1], tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.engine
def test_openai_batch_file_in_and_out_changing_only_the_model_names(tmp_path: Path, ray_local, s3, tiny_models):
    """One job for OpenAI batch files as they come: two models routed by body.model, two LoRA adapters of one of
    them (one on S3, one local) named by body.model as well, content parts and the developer role, logprobs, and the
    rows we cannot answer; every line is an `openai` ChatCompletion, and each answer is transformers' own."""
    from openai.types.chat import ChatCompletion

    from qwen_batch.jobs.tiny_lora import make_tiny_lora

    support = make_tiny_lora(tiny_models["qwen2"], tmp_path / "lora" / "support-v3", rank=8, seed=1)
    legal = make_tiny_lora(tiny_models["qwen2"], tmp_path / "lora" / "legal-v1", rank=16, seed=2,
                           target_modules=("q_proj", "v_proj", "down_proj"))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        boto3.client("s3").upload_file(str(support / name), s3.bucket, f"{tmp_path.name}/support-v3/{name}")
    batch = tmp_path / "batch" / "requests.jsonl"
    batch.parent.mkdir()
    batch.write_text("\n".join(GUIDE_LINES + MORE_LINES + ADAPTER_LINES) + "\n")
    cache = tmp_path / "adapter-cache"
    spec = {
        "name": "moved-off-openai",
        "input": {"path": str(batch), "format": "openai-batch"},
        "models": [{"variant": "tiny-qwen2", "aliases": ["gpt-3.5-turbo-0125"], "adapters": {
                        "support-v3": f"s3://{s3.bucket}/{tmp_path.name}/support-v3/",
                        "legal-v1": {"path": str(legal), "output_per_mtok": 9.0}}},
                   {"variant": "tiny-qwen3", "aliases": ["gpt-4o-mini"]}],
        "route_column": "model",
        "sampling": {"max_tokens": 16, "temperature": 0},
        "engine": {"env": {"QWEN_BATCH_ADAPTER_CACHE": str(cache)}},
        "output": {"path": str(tmp_path / "out"), "format": "openai-batch"},
    }
    manifest = run_job(load_spec(spec))
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    lines = {line["custom_id"]: line for line in map(json.loads, (tmp_path / "out/_openai/output.jsonl").open())}
    assert set(rows) == set(lines) == {"request-1", "request-2", "request-3", "request-4", "tuned-1", "tuned-2",
                                       "base-1", "image-1"}
    for custom_id, line in lines.items():
        if line["response"] is not None:
            ChatCompletion.model_validate(line["response"]["body"])
    for custom_id in ("request-1", "request-2"):
        row, body = rows[custom_id], lines[custom_id]["response"]["body"]
        assert row["variant"] == "tiny-qwen2" and row["error_type"] is None and row["adapter"] is None
        assert row["completion_tokens"] <= 1000 and row["finish_reason"] in ("stop", "length")
        assert body["usage"]["prompt_tokens"] == row["prompt_tokens"]
        assert body["usage"]["completion_tokens"] == row["completion_tokens"]
        assert body["choices"][0]["message"]["content"] == row["generated_text"]
    structured = rows["request-3"]
    assert structured["variant"] == "tiny-qwen3" and json.loads(structured["parsed"])["mood"] in ("happy", "sad")
    assert lines["request-4"]["response"] is None and lines["request-4"]["error"]["code"] == "invalid_request"

    # Each adapter answers its rows, and the base model the rest (the same chat, so the answers differ only by it).
    variant = get_variant("tiny-qwen2")
    for custom_id, adapter, adapter_dir, output_price in [("tuned-1", "support-v3", support, variant.output_per_mtok),
                                                          ("tuned-2", "legal-v1", legal, 9.0),
                                                          ("base-1", None, None, variant.output_per_mtok)]:
        row, body = rows[custom_id], lines[custom_id]["response"]["body"]
        assert (row["variant"], row["adapter"], row["error_type"]) == ("tiny-qwen2", adapter, None), custom_id
        assert body["model"] == (adapter or "tiny-qwen2"), "the response names the model that answered"
        assert (row["prompt_tokens"], row["generated_text"]) == reference_text(
            tiny_models["qwen2"], adapter_dir, SAME_CHAT, row["completion_tokens"]), custom_id
        assert row["completion_tokens"] == 8 and row["finish_reason"] == "length"
        assert row["input_cost_usd"] == row["prompt_tokens"] * variant.input_per_mtok / 1e6
        assert row["output_cost_usd"] == row["completion_tokens"] * output_price / 1e6
    assert len({rows[c]["generated_text"] for c in ("tuned-1", "tuned-2", "base-1")}) == 3
    # The S3 adapter was copied once to this node's cache; the local one is read where it is.
    assert [p.name.split("-")[:2] for p in cache.iterdir() if not p.name.startswith(".")] == [["support", "v3"]]

    tuned = rows["tuned-1"]["logprobs"]
    assert len(tuned) == 8 and all(len(token["top_logprobs"]) == 2 for token in tuned)
    assert all(token["top_logprobs"][0] == {"token": token["token"], "logprob": token["logprob"]} for token in tuned)
    assert "".join(token["token"] for token in tuned) == rows["tuned-1"]["generated_text"]
    content = lines["tuned-1"]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in content] == [t["token"] for t in tuned]
    assert [len(t["top_logprobs"]) for t in rows["base-1"]["logprobs"]] == [0] * 8
    assert rows["tuned-2"]["logprobs"] is None and lines["tuned-2"]["response"]["body"]["choices"][0]["logprobs"] is None
    image = rows["image-1"]
    assert image["error_type"] == "invalid_request" and "image" in image["error"]
    assert image["completion_tokens"] == image["prompt_tokens"] == 0 and image["adapter"] is None
    assert manifest.rows_in == 8 and manifest.rows_failed == 2 and manifest.structured_validity_rate == 1.0
    assert manifest.totals.completion_tokens == sum(r["completion_tokens"] for r in rows.values())


@pytest.mark.parametrize("body,message", [
    ({"temperature": -1}, "body.temperature: found -1; input should be greater than or equal to 0; allowed: a finite "
     "number in [0, 2]"),
    ({"temperature": 2.5}, "body.temperature: found 2.5; input should be less than or equal to 2; allowed: a finite "
     "number in [0, 2]"),
    ({"temperature": float("nan")}, "body.temperature: found nan; input should be a finite number"),
    ({"top_p": 0}, "body.top_p: found 0; input should be greater than 0; allowed: a finite number in (0, 1]"),
    ({"top_p": 1.01}, "body.top_p: found 1.01; input should be less than or equal to 1"),
    ({"stop": [""]}, "body.stop.0: found ''; string should have at least 1 character; allowed: a string or a list of "
     "non-empty strings"),
    ({"stop": ["END", 3]}, "body.stop.1: found 3; input should be a valid string"),
    ({"seed": "abc"}, "body.seed: found 'abc'; input should be a valid integer; allowed: an integer in "
     "[-9223372036854775808, 9223372036854775808)"),
    ({"seed": 1.5}, "body.seed: found 1.5; input should be a valid integer"),
    ({"seed": 2**64}, "body.seed: found 18446744073709551616; input should be less than 9223372036854775808"),
    ({"repetition_penalty": 0}, "body.repetition_penalty: found 0; input should be greater than 0; allowed: a finite "
     "number > 0"),
    ({"repetition_penalty": float("inf")}, "body.repetition_penalty: found inf; input should be a finite number"),
    ({"presence_penalty": -2.5}, "body.presence_penalty: found -2.5; input should be greater than or equal to -2; "
     "allowed: a finite number in [-2, 2]"),
    ({"frequency_penalty": float("-inf")}, "body.frequency_penalty: found -inf; input should be a finite number; "
     "allowed: a finite number in [-2, 2]"),
    ({"max_tokens": True}, "body.max_tokens: found True; input should be a valid integer; allowed: an integer > 0"),
    ({"max_completion_tokens": -1}, "body.max_completion_tokens: found -1; input should be greater than 0"),
    ({"temperature": "0.5"}, "body.temperature: found '0.5'; input should be a valid number"),
])
def test_sampling_outside_vllms_ranges_is_an_invalid_request_naming_field_and_range(body, message):
    with pytest.raises(RowError) as caught:
        parse_request({"custom_id": "x", "url": "/v1/chat/completions", "body": {"messages": [], **body}})
    assert caught.value.error_type == "invalid_request"
    assert str(caught.value).startswith(message)


def test_sampling_inside_vllms_ranges_passes_through():
    body = {"messages": [], "temperature": 2, "top_p": 1, "stop": "END", "seed": -1, "presence_penalty": -2,
            "frequency_penalty": 2, "repetition_penalty": 1.1, "max_completion_tokens": 7}
    _, overrides = parse_request({"custom_id": "x", "url": "/v1/chat/completions", "body": body})
    assert overrides == {"temperature": 2, "top_p": 1, "stop": ["END"], "seed": -1, "presence_penalty": -2,
                         "frequency_penalty": 2, "repetition_penalty": 1.1, "max_tokens": 7}


def test_every_request_field_we_honour_has_a_typed_column():
    from qwen_batch.pipelines.openai_batch import SAMPLING_FIELDS
    from qwen_batch.pipelines.read import REQUEST_TYPE

    assert {*SAMPLING_FIELDS, "max_tokens", "response_format", "logprobs"} == {field.name for field in REQUEST_TYPE}
