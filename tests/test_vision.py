"""Images through the prompt stage for the tiny Qwen2.5-VL model: from Parquet bytes, local files, the S3 server and
OpenAI image_url parts; bad images as error rows; image tokens as the engine counts them."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import uuid
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qwen_batch.jobs.driver import plan_job
from qwen_batch.jobs.tiny_model import make_tiny_model
from qwen_batch.pipelines import storage
from qwen_batch.pipelines.images import ImageConfig, image_token_counts
from qwen_batch.pipelines.prompts import PromptConfig, PromptStage
from qwen_batch.pipelines.read import ReadConfig, plan_shards, read_shard
from qwen_batch.schemas.errors import SpecError
from qwen_batch.schemas.spec import ImagesSpec, InputSpec, load_spec
from s3server import S3Server

VISION = [151652, 151655, 151653]  # <|vision_start|><|image_pad|><|vision_end|>
LIMITS = ImagesSpec(max_bytes=100_000, max_pixels=500_000, max_per_row=2)


def encoded(width: int, height: int, format: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(out, format=format)
    return out.getvalue()


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("vl"))


@pytest.fixture(scope="module")
def tokenizer(vl_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(vl_dir))


def stage(vl_dir: Path, **fields: Any) -> PromptStage:
    defaults: dict[str, Any] = dict(tokenizer=str(vl_dir), system=None, template=None, messages_column=None,
                                    max_model_len=1024, max_tokens=16, images=ImageConfig((), LIMITS, {}))
    return PromptStage(PromptConfig(**{**defaults, **fields}))


def read(path: Path, fmt: str, columns: list[str]) -> pa.Table:
    spec = InputSpec(path=str(path), format=fmt)
    shards, _ = plan_shards(spec, storage.list_files(str(path)))
    config = ReadConfig.of(spec, columns)
    return pa.concat_tables([read_shard(shard, config) for shard in shards])


def expected(tokenizer: PreTrainedTokenizerBase, content: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def errors(block: pa.Table) -> list[tuple[str | None, str | None]]:
    return list(zip(block.column("_error_type").to_pylist(), block.column("_error").to_pylist()))


@pytest.mark.s3
def test_template_images_from_bytes_local_files_and_s3_become_the_templates_vision_tokens(
    vl_dir: Path, tokenizer: PreTrainedTokenizerBase, tmp_path: Path, s3: S3Server
) -> None:
    photo = encoded(300, 200, "JPEG")
    pq.write_table(pa.table({"note": ["scratch on the lid"], "photo": [photo]}), tmp_path / "rows.parquet")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(encoded(64, 48))
    url = f"s3://{s3.bucket}/{uuid.uuid4().hex}/b.webp"
    storage.write_bytes(url, encoded(120, 90, "WEBP"))
    (tmp_path / "paths").mkdir()
    (tmp_path / "paths" / "rows.jsonl").write_text(
        "".join(json.dumps({"note": note, "photo": photo_ref}) + "\n"
                for note, photo_ref in (("dent", str(tmp_path / "pics" / "a.png")), ("crack", "../pics/a.png"),
                                        ("stain", url))))
    describe = stage(vl_dir, template="Describe the defect in this photo: {note}",
                     images=ImageConfig(("photo",), LIMITS, {}))

    from_bytes = describe(read(tmp_path / "rows.parquet", "parquet", ["note", "photo"]))
    from_paths = describe(read(tmp_path / "paths", "jsonl", ["note", "photo"]))

    assert errors(from_bytes) + errors(from_paths) == [(None, None)] * 4
    assert from_bytes.column("prompt_token_ids")[0].as_py() == expected(tokenizer, [
        {"type": "image"}, {"type": "text", "text": "Describe the defect in this photo: scratch on the lid"}])
    assert from_bytes.column("_images")[0].as_py() == [photo]
    assert from_bytes.column("_image_info")[0].as_py() == [
        {"source": "column 'photo'", "format": "JPEG", "width": 300, "height": 200, "bytes": len(photo), "tokens": 0}]
    info = [row[0] for row in from_paths.column("_image_info").to_pylist()]
    assert [(i["source"], i["format"], i["width"]) for i in info] == [
        (str(tmp_path / "pics" / "a.png"), "PNG", 64), (str(tmp_path / "paths" / "../pics/a.png"), "PNG", 64),
        (url, "WEBP", 120)]
    for ids in from_paths.column("prompt_token_ids").to_pylist():
        assert ids.count(151655) == 1 and ids[ids.index(151652):ids.index(151652) + 3] == VISION


@pytest.mark.s3
def test_openai_image_url_parts_are_the_rows_images_in_order(
    vl_dir: Path, tokenizer: PreTrainedTokenizerBase, s3: S3Server
) -> None:
    url = f"s3://{s3.bucket}/{uuid.uuid4().hex}/second.png"
    storage.write_bytes(url, encoded(56, 56))
    first = encoded(28, 28)
    content = [{"type": "text", "text": "Compare "},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(first).decode()}},
               {"type": "text", "text": " with "},
               {"type": "input_image", "image_url": url}]
    chats = stage(vl_dir, messages_column="messages")
    block = read_rows(chats, [{"messages": [{"role": "developer", "content": "Be terse."},
                                            {"role": "user", "content": content}]}])

    out = chats(block)

    assert errors(out) == [(None, None)]
    ids = out.column("prompt_token_ids")[0].as_py()
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be terse."},
         {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                      {"type": "text", "text": " with "}, {"type": "image"}]}],
        tokenize=False, add_generation_prompt=True)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert [i["source"] for i in out.column("_image_info")[0].as_py()] == ["data:image/png", url]
    assert out.column("_images")[0].as_py()[0] == first


def read_rows(prompt_stage: PromptStage, rows: list[dict[str, Any]]) -> pa.Table:
    """A block of rows as the reader builds it from a JSONL file."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qb-") as folder:
        path = Path(folder) / "rows.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return read(path, "jsonl", [prompt_stage.config.messages_column or "photo"])


@pytest.mark.s3
def test_bad_images_are_error_rows_and_the_other_rows_go_on(vl_dir: Path, s3: S3Server, tmp_path: Path) -> None:
    good = encoded(40, 30)
    wide = encoded(1000, 600)  # 600,000 pixels: over max_pixels 500,000, under max_bytes
    rows = {
        "good": good, "absent": f"s3://{s3.bucket}/{uuid.uuid4().hex}/none.png", "corrupt": b"\x89PNG\r\n\x1a\nbroken",
        "wide": wide, "heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "heavy": encoded(400, 300, "BMP"),
        "null": None,
    }
    pq.write_table(pa.table({"note": list(rows), "photo": pa.array(list(rows.values()), pa.binary())}),
                   tmp_path / "rows.parquet")
    describe = stage(vl_dir, template="{note}", images=ImageConfig(("photo",), LIMITS, {}))
    block = read(tmp_path / "rows.parquet", "parquet", ["note", "photo"])
    # The absent object is named by URL: a string in a binary column is not possible, so put it in by hand.
    prompts = [json.loads(p) for p in block.column("_prompt").to_pylist()]
    prompts[1]["photo"] = rows["absent"]
    block = block.set_column(block.schema.get_field_index("_prompt"), "_prompt",
                             pa.array([json.dumps(p) for p in prompts]))

    out = describe(block)

    found = dict(zip(rows, errors(out)))
    assert found["good"] == (None, None)
    assert found["absent"][0] == "image_fetch_failed" and "none.png" in found["absent"][1]
    assert found["corrupt"][0] == "invalid_image"
    assert found["wide"][0] == "image_too_large" and "1000x600 = 600,000 pixels" in found["wide"][1]
    assert found["heic"][0] == "unsupported_image_format"
    assert found["heavy"][0] == "image_too_large" and "images.max_bytes" in found["heavy"][1]
    assert found["null"] == ("invalid_field", "column 'photo' is null; give every row an image there")
    assert out.column("prompt_token_ids").to_pylist()[1:] == [None] * 6
    assert out.column("_images").to_pylist()[1:] == [None] * 6


def test_too_many_images_and_images_for_a_blind_model(vl_dir: Path, tmp_path: Path) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                + base64.b64encode(encoded(28, 28)).decode()}}
    chats = stage(vl_dir, messages_column="messages")
    out = chats(read_rows(chats, [{"messages": [{"role": "user", "content": [image, image, image]}]},
                                  {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}]))
    assert out.column("_error_type").to_pylist() == ["invalid_request", "invalid_messages"]
    assert "3 images, over images.max_per_row (2)" in out.column("_error")[0].as_py()


def test_image_tokens_are_the_runs_of_the_image_token_in_the_engines_prompt() -> None:
    prompt = [151644, 872, 198, *VISION[:1], *[151655] * 77, VISION[2], 1234, VISION[0], *[151655] * 4, VISION[2]]
    assert image_token_counts(prompt, 151655) == [77, 4]
    assert image_token_counts([1, 2, 3], 151655) == []


def test_specs_with_images_need_a_vision_model_and_an_engine_that_loads_it(tmp_path: Path) -> None:
    pq.write_table(pa.table({"note": ["x"], "photo": [encoded(28, 28)]}), tmp_path / "rows.parquet")
    spec = {"name": "defects", "input": {"path": str(tmp_path / "rows.parquet"), "format": "parquet"},
            "prompt": {"template": "Describe the defect in this photo.", "images": ["photo"]},
            "model": {"variant": "qwen2.5-vl-7b-instruct"}, "output": {"path": str(tmp_path / "out")}}
    with pytest.raises(SpecError, match="has no vision tower"):
        load_spec({**spec, "model": {"variant": "qwen2.5-7b-instruct"}})
    with pytest.raises(SpecError, match="with messages_column, give images as content parts"):
        load_spec({**spec, "prompt": {"messages_column": "chat", "images": ["photo"]}})
    with pytest.raises(SpecError, match=r"over images.max_per_row \(1\)"):
        load_spec({**spec, "prompt": {"template": "{note}", "images": ["photo", "note"]},
                   "images": {"max_per_row": 1}})
    job = load_spec(spec)
    assert job.prompt.columns == ["photo"]
    with_images = job.output_hash()
    assert load_spec({**spec, "prompt": {"template": "Describe the defect in this photo."}}).output_hash() != with_images
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(SpecError, match=r"model: qwen2.5-vl-7b-instruct has a vision tower, and vLLM's Qwen2.5-VL "
                                            r"code needs torchvision"):
            plan_job(job)


def test_image_tokens_count_toward_max_model_len_as_the_processor_makes_them(vl_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoImageProcessor

    from qwen_batch.pipelines.images import VisionGrid, load_image

    grid, processor = VisionGrid.of_checkpoint(str(vl_dir)), AutoImageProcessor.from_pretrained(str(vl_dir))
    for width, height in ((300, 200), (28, 28), (10, 1000), (1000, 13)):
        image = load_image(encoded(width, height), "column 'photo'", ImagesSpec(), {})
        thw = processor(images=[Image.new("RGB", (width, height))], return_tensors="np")["image_grid_thw"][0]
        assert grid.tokens(image) == thw[0] * thw[1] * thw[2] // 4, (width, height)
    stretched = encoded(2010, 10)
    with pytest.raises(Exception, match="aspect ratio over 200:1"):
        load_image(stretched, "column 'photo'", ImagesSpec(), {})
    pq.write_table(pa.table({"note": ["a", "b"], "photo": [encoded(300, 200), encoded(28, 28)]}),
                   tmp_path / "rows.parquet")
    block = read(tmp_path / "rows.parquet", "parquet", ["note", "photo"])
    short = stage(vl_dir, template="{note}", images=ImageConfig(("photo",), LIMITS, {}), max_model_len=80,
                  max_tokens=16)

    out = short(block)

    # 300x200 takes 77 tokens: with the 22 of the text and chat markup and max_tokens 16 that is 115; a 28x28
    # image takes 1.
    [(too_long, message), fine] = errors(out)
    assert (too_long, fine) == ("prompt_too_long", (None, None))
    assert message.startswith("prompt is 99 tokens (77 of them for its images); with max_tokens 16 that is 115")


@pytest.mark.s3
def test_on_ray_the_prompt_stages_images_reach_the_next_stage_intact(
    vl_dir: Path, s3: S3Server, ray_local: None, tmp_path: Path
) -> None:
    import ray

    photos = [encoded(300, 200, "JPEG"), encoded(64, 64)]
    urls = [f"s3://{s3.bucket}/{uuid.uuid4().hex}/{i}.img" for i in range(2)]
    for url, photo in zip(urls, photos):
        storage.write_bytes(url, photo)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"note": str(i), "photo": url}) + "\n"
                                                 for i, url in enumerate(urls)))
    block = read(tmp_path / "rows.jsonl", "jsonl", ["note", "photo"])
    config = PromptConfig(tokenizer=str(vl_dir), system=None, template="{note}", messages_column=None,
                          max_model_len=1024, max_tokens=16, images=ImageConfig(("photo",), LIMITS, {}))

    out = pa.concat_tables(ray.get(ray.data.from_arrow([block]).map_batches(
        PromptStage, fn_constructor_args=(config,), batch_size=None, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5).to_arrow_refs()))

    assert out.column("_error_type").to_pylist() == [None, None]
    assert out.column("_images").to_pylist() == [[photos[0]], [photos[1]]]
    assert [row[0]["width"] for row in out.column("_image_info").to_pylist()] == [300, 64]
