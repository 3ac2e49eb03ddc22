"""LoRA adapters: tiny ones in peft's format, checked against their base before any engine, cached once per node."""

from __future__ import annotations

import json
import os
from pathlib import Path

import boto3
import pyarrow as pa
import pytest
from safetensors import safe_open

from qwen_batch.jobs.driver import plan_job
from qwen_batch.jobs.tiny_lora import make_tiny_lora
from qwen_batch.pipelines import adapters
from qwen_batch.pipelines.adapters import Adapter, engine_args, inspect_adapter, local_path
from qwen_batch.pipelines.prompts import AdapterChoice
from qwen_batch.schemas.errors import RowError, SpecError
from qwen_batch.schemas.spec import load_spec


@pytest.fixture(scope="module")
def base(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["qwen2"]


@pytest.fixture(scope="module")
def model_config(base: Path) -> dict:
    return json.loads((base / "config.json").read_text())


@pytest.fixture(scope="module")
def adapter_dir(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_lora(base, tmp_path_factory.mktemp("lora") / "support-v3", rank=8)


def test_tiny_lora_is_written_in_peft_format(adapter_dir: Path, model_config: dict) -> None:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
        q_a = weights.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        k_b = weights.get_tensor("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight")
    assert len(keys) == 2 * 4 * model_config["num_hidden_layers"]
    hidden, kv = model_config["hidden_size"], model_config["num_key_value_heads"] * 32
    assert list(q_a.shape) == [8, hidden] and list(k_b.shape) == [kv, 8]
    assert k_b.abs().sum() > 0, "lora_B must not be zero, or the adapter would change nothing"


def test_a_good_adapter_is_inspected_without_reading_its_weights(adapter_dir: Path, model_config: dict) -> None:
    adapter = inspect_adapter("support-v3", str(adapter_dir) + "/", model_config, "model.adapters.support-v3")
    assert (adapter.name, adapter.url, adapter.rank) == ("support-v3", str(adapter_dir), 8)
    assert adapter.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")


def _edited(adapter_dir: Path, tmp_path: Path, **config: object) -> Path:
    """A copy of the adapter with its adapter_config.json fields replaced."""
    copy = tmp_path / "edited"
    copy.mkdir()
    (copy / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    (copy / "adapter_config.json").write_text(json.dumps(
        {**json.loads((adapter_dir / "adapter_config.json").read_text()), **config}))
    return copy


@pytest.mark.parametrize("config,complaint", [
    ({"r": 1024}, "its rank r is 1024; vLLM serves ranks 1 to 512"),
    ({"r": 16}, "lora_A.weight is [8, 128], of rank 8, where adapter_config.json says r=16"),
    ({"target_modules": ["q_proj", "lm_head"]}, "it targets ['lm_head'], which a Qwen decoder layer does not have"),
    ({"target_modules": "q_proj|v_proj"}, "its target_modules is 'q_proj|v_proj'; give the module names as a list"),
    ({"peft_type": "IA3"}, "its peft_type is 'IA3'; only LoRA adapters are served"),
    ({"use_dora": True}, "it is a DoRA adapter"),
])
def test_adapters_that_cannot_be_served_are_spec_errors_naming_field_and_reason(
    adapter_dir: Path, model_config: dict, tmp_path: Path, config: dict, complaint: str
) -> None:
    with pytest.raises(SpecError) as caught:
        inspect_adapter("a", str(_edited(adapter_dir, tmp_path, **config)), model_config, "model.adapters.a")
    assert str(caught.value).startswith("model.adapters.a: adapter 'a' at ")
    assert complaint in str(caught.value)


def test_an_adapter_of_another_base_model_is_refused(base: Path, model_config: dict, tmp_path: Path) -> None:
    wider = tmp_path / "wider-base"
    wider.mkdir()
    (wider / "config.json").write_text(json.dumps({**model_config, "hidden_size": 256, "num_hidden_layers": 3}))
    foreign = make_tiny_lora(wider, tmp_path / "foreign", rank=8)
    with pytest.raises(SpecError, match=r"lora_A.weight is \[8, 256\], where this model's k_proj takes \[8, 128\] "
                       r"\(the adapter was trained for another base model\)"):
        inspect_adapter("foreign", str(foreign), model_config, "model.adapters.foreign")
    deeper = tmp_path / "deeper-base"
    deeper.mkdir()
    (deeper / "config.json").write_text(json.dumps({**model_config, "num_hidden_layers": 3}))
    with pytest.raises(SpecError, match="its weights have layer 2; the model has 2 layers"):
        inspect_adapter("deep", str(make_tiny_lora(deeper, tmp_path / "deep")), model_config, "model.adapters.deep")


def test_a_missing_adapter_says_what_an_adapter_folder_holds(model_config: dict, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"model.adapters.x: found '.*/nothing', which holds no adapter_config.json "
                       "nor adapter_model.safetensors; an adapter is a folder as peft's save_pretrained writes it"):
        inspect_adapter("x", str(tmp_path / "nothing"), model_config, "model.adapters.x")


@pytest.mark.parametrize("ranks,on_cpu,max_loras,expected", [
    ([8], True, None, {"max_loras": 2, "max_lora_rank": 8, "max_cpu_loras": 2}),
    ([4, 16], False, None, {"max_loras": 2, "max_lora_rank": 16, "max_cpu_loras": 2}),
    ([20, 8, 8], False, 1, {"max_loras": 1, "max_lora_rank": 32, "max_cpu_loras": 3}),
    ([20, 8, 8], True, 1, {"max_loras": 4, "max_lora_rank": 32, "max_cpu_loras": 4}),
])
def test_engine_args_serve_every_adapter_and_keep_a_free_slot_on_the_cpu(ranks, on_cpu, max_loras, expected) -> None:
    served = [Adapter(f"a{i}", "/x", rank, ("q_proj",)) for i, rank in enumerate(ranks)]
    assert engine_args(served, max_loras, on_cpu) == {"enable_lora": True, **expected}
    assert engine_args([], max_loras, on_cpu) == {}


def test_adapter_choice_names_the_adapter_or_the_base_model() -> None:
    choice = AdapterChoice("model", frozenset({"support-v3"}), frozenset({"qwen2.5-7b-instruct", "gpt-4o-mini"}))
    assert choice.decide("support-v3") == "support-v3"
    assert [choice.decide(value) for value in (None, "", "gpt-4o-mini", "qwen2.5-7b-instruct")] == [None] * 4
    with pytest.raises(RowError) as caught:
        choice.decide("support-v4")
    assert caught.value.error_type == "unknown_adapter"
    assert str(caught.value).startswith("column 'model' is 'support-v4', which names none of the model's adapters "
                                        "['support-v3'] nor the model itself ['gpt-4o-mini', 'qwen2.5-7b-instruct']")


def _spec(tmp_path: Path, adapters: dict, **fields: object) -> dict:
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"q": "hi", "tuned": "support-v3"}) + "\n")
    return {"name": "lora", "input": {"path": str(data), "format": "jsonl"},
            "prompt": {"template": "{q}", "adapter_column": "tuned"},
            "model": {"variant": "tiny-qwen2", "adapters": adapters}, "output": {"path": str(tmp_path / "out")},
            **fields}


def test_spec_takes_adapters_as_paths_or_with_prices(tmp_path: Path) -> None:
    spec = load_spec(_spec(tmp_path, {"support-v3": "s3://models/lora/support-v3/",
                                      "legal": {"path": "/lora/legal", "output_per_mtok": 3.0}}))
    assert spec.model.adapters["support-v3"].path == "s3://models/lora/support-v3/"
    assert spec.model.adapters["legal"].output_per_mtok == 3.0 and spec.prompt.columns == ["q", "tuned"]
    batch = load_spec({"name": "b", "input": {"path": "b.jsonl", "format": "openai-batch"}, "output": {"path": "o"},
                       "model": {"variant": "tiny-qwen2", "adapters": {"support-v3": "/lora/s"}}})
    assert batch.prompt.adapter_column == "model", "an OpenAI request's body.model names its adapter"


@pytest.mark.parametrize("change,complaint", [
    ({"model": {"variant": "tiny-qwen2"}}, "prompt.adapter_column names each row's LoRA adapter, but no model has "
     "`adapters`"),
    ({"prompt": {"template": "{q}"}}, "the model has `adapters`; set prompt.adapter_column"),
    ({"model": {"variant": "tiny-qwen2", "adapters": {"tiny-qwen2": "/x"}}}, "adapters ['tiny-qwen2'] have the name "
     "of the model itself"),
    ({"model": {"variant": "tiny-qwen2", "adapters": {"bad name": "/x"}}}, "model.adapters.bad name.[key]"),
])
def test_adapter_spec_mistakes_are_spec_errors(tmp_path: Path, change: dict, complaint: str) -> None:
    with pytest.raises(SpecError, match=None) as caught:
        load_spec({**_spec(tmp_path, {"support-v3": "/x"}), **change})
    assert complaint in str(caught.value)


def test_planning_refuses_an_adapter_it_cannot_serve_before_any_engine(
    tmp_path: Path, adapter_dir: Path, base: Path
) -> None:
    spec = load_spec(_spec(tmp_path, {"support-v3": str(adapter_dir), "gone": str(tmp_path / "gone")}))
    with pytest.raises(SpecError, match="model.adapters.gone: found .*gone', which holds no adapter_config.json"):
        plan_job(spec)
    plan = plan_job(load_spec(_spec(tmp_path, {"support-v3": str(adapter_dir)})))
    assert [(a.name, a.rank) for a in plan.models[0].adapters] == [("support-v3", 8)]


def test_validate_lists_each_models_adapters(tmp_path: Path, adapter_dir: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from qwen_batch.jobs.cli import main

    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(_spec(tmp_path, {"support-v3": str(adapter_dir)})))
    capsys.readouterr()
    assert main(["validate", str(spec_file)]) == 0
    assert f"  adapter support-v3: rank 8 on q_proj, k_proj, v_proj, o_proj from {adapter_dir}" in \
        capsys.readouterr().out.splitlines()


@pytest.mark.s3
def test_an_adapter_on_s3_is_checked_there_and_downloaded_once_per_node(
    s3, adapter_dir: Path, model_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, prefix = boto3.client("s3"), f"lora/{tmp_path.name}/support-v3"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        client.upload_file(str(adapter_dir / name), s3.bucket, f"{prefix}/{name}")
    url = f"s3://{s3.bucket}/{prefix}/"
    monkeypatch.setenv(adapters.CACHE_ENV, str(tmp_path / "cache"))
    adapter = inspect_adapter("support-v3", url, model_config, "model.adapters.support-v3")
    assert adapter.url == url.rstrip("/") and adapter.rank == 8
    copy = Path(local_path(adapter))
    assert copy.parent == tmp_path / "cache" and copy.name.startswith("support-v3-")
    assert (copy / "adapter_model.safetensors").read_bytes() == (adapter_dir / "adapter_model.safetensors").read_bytes()
    stamp = os.stat(copy / "adapter_config.json").st_mtime_ns
    assert local_path(adapter) == str(copy) and os.stat(copy / "adapter_config.json").st_mtime_ns == stamp
    # New weights under the same URL have a new ETag: a new copy, never the stale one.
    client.put_object(Bucket=s3.bucket, Key=f"{prefix}/adapter_config.json",
                      Body=(adapter_dir / "adapter_config.json").read_bytes() + b"\n")
    changed = inspect_adapter("support-v3", url, model_config, "model.adapters.support-v3")
    assert local_path(changed) != str(copy)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")) == sorted(
        [copy.name, Path(local_path(changed)).name])
