"""The typed manifest (sdk/manifest.py) and the staged writer (sdk/bundle.py).

tests/data/manifest_v1_default_bundle.json is sdk/default_bundle/manifest.json as written before the
typed manifest (format version 1), frozen: it must keep loading whatever the SDK writes today.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from sdk.bundle import load_bundle, staged_bundle, write_manifest
from sdk.errors import BundleError, ExportError
from sdk.manifest import FORMAT_VERSION, Cmai, Manifest, Precision

V1 = Path(__file__).parent / "data" / "manifest_v1_default_bundle.json"


def v1() -> dict:
    return json.loads(V1.read_text())


def _refused(data: dict) -> str:
    with pytest.raises(BundleError) as err:
        Manifest.from_dict(data, "b/manifest.json", sdk_version="0.1.0")
    message = str(err.value)
    assert "\n" not in message and len(message) <= 400, message
    return message


def test_the_v1_default_bundle_manifest_loads_as_written():
    data = v1()
    manifest = Manifest.from_dict(data, str(V1), sdk_version="0.1.0")
    assert manifest.format_version == 1 and manifest.visual_tokens.positions == "patch"
    assert manifest.cmai == Cmai(layers=[2, 3]) and manifest.prompt_vector.layer == -1
    assert manifest.graphs["decoder"].input("image_bias").shape == ["batch", 2, "total_sequence"]
    written = manifest.to_dict()
    # what v1 writers left out is written with its default; everything else round-trips unchanged
    assert written["precision"] == {**data["precision"], "tensorrt": True, "details": {}, "dropped_graphs": {}}
    assert {**written, "precision": data["precision"]} == data


def test_keys_absent_from_older_v1_bundles_take_their_defaults():
    data = v1()
    del data["visual_tokens"]["positions"], data["cmai"], data["prompt_mlp"], data["created"]
    del data["min_sdk_version"], data["chat_template"]["add_bos"]
    manifest = Manifest.from_dict(data, "old/manifest.json", sdk_version="0.1.0")
    assert manifest.visual_tokens.positions == "sequence"
    assert manifest.cmai is None and manifest.prompt_mlp is None and manifest.created is None
    assert manifest.chat_template.add_bos is True and manifest.precision.tensorrt is True


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, "1", None])
def test_an_unknown_format_version_is_refused_in_one_line(version):
    data = v1()
    data["format_version"] = version
    message = _refused(data)
    assert "format version" in message and "re-export" in message and "upgrade" in message


def test_a_newer_sdk_requirement_is_refused_in_one_line():
    data = v1()
    data["min_sdk_version"] = "9.0"
    assert "upgrade pipmm-edge" in _refused(data)


def test_unknown_keys_are_kept_and_written_back():
    data = v1()
    data["future_section"] = {"x": 1}
    data["model"]["rope_scaling"] = None
    data["graphs"]["vision"]["outputs"][0]["layout"] = "BKD"
    written = Manifest.from_dict(data, "b").to_dict()
    assert written["future_section"] == {"x": 1} and written["model"]["rope_scaling"] is None
    assert written["graphs"]["vision"]["outputs"][0]["layout"] == "BKD"


def _set(path: str, value):
    def change(d):
        *parents, last = path.split("/")
        for key in parents:
            d = d[int(key)] if isinstance(d, list) else d[key]
        d[last] = value
    return change


def _drop(path: str):
    def change(d):
        *parents, last = path.split("/")
        for key in parents:
            d = d[key]
        del d[last]
    return change


# one bad field per section: (change, words the message must hold)
BAD = {
    "model": (_set("model/num_layers", 0), ("model", "num_layers")),
    "model lacks a field": (_drop("model/vocab_size"), ("model", "lacks 'vocab_size'")),
    "precision": (_set("precision/default", "fp8"), ("precision", "default", "fp32")),
    "precision per graph": (_set("precision/graphs", {"vision": 3}), ("precision", "graphs")),
    "precision tensorrt": (_set("precision/tensorrt", "yes"), ("precision", "tensorrt")),
    "vision": (_set("vision/patch_size", "14"), ("vision", "patch_size")),
    "visual_tokens": (_set("visual_tokens/count", 0), ("visual_tokens", "count")),
    "visual_tokens positions": (_set("visual_tokens/positions", "diagonal"), ("positions", "'sequence' or 'patch'")),
    "prompt_vector": (_set("prompt_vector/pooling", "max"), ("prompt_vector", "pooling")),
    "prompt_mlp": (_set("prompt_mlp/d_llm", -1), ("prompt_mlp", "d_llm")),
    "image_preprocessing": (_set("image_preprocessing/resample", 9), ("image_preprocessing", "resample")),
    "chat_template": (_set("chat_template/add_bos", "yes"), ("chat_template", "add_bos")),
    "chat_template prompt": (_set("chat_template/prompt_encoder", "USER:"), ("chat_template", "{prompt}")),
    "special_tokens": (_set("special_tokens/image", None), ("special_tokens", "image")),
    "special_tokens texts": (_set("special_tokens/texts", [""]), ("special_tokens", "texts")),
    "generation": (_set("generation/max_new_tokens", 0), ("generation", "max_new_tokens")),
    "generation beyond the context": (_set("generation/max_new_tokens", 10_000), ("generation", "max_new_tokens")),
    "cmai": (_set("cmai/aggregate", "median"), ("cmai", "aggregate")),
    "cmai unknown setting": (_set("cmai/strength", 2), ("cmai", "strength")),
    "cmai layers": (_set("cmai/layers", "2,3"), ("cmai", "layers")),
    "created": (_set("created/by", 5), ("created", "by")),
    "tokenizer": (_set("tokenizer", 3), ("tokenizer",)),
    "graph opset": (_set("graphs/vision/opset", "18"), ("graph 'vision'", "opset")),
    "graph io shape": (_set("graphs/vision/inputs/0/shape", "batch"), ("graph 'vision' inputs[0]", "shape")),
    "graph io dtype": (_set("graphs/embed/outputs/0/dtype", ""), ("graph 'embed' outputs[0]", "dtype")),
    "file record": (_set("files/vision.onnx/bytes", -1), ("file 'vision.onnx'", "bytes")),
    "a section that is not an object": (_set("generation", [64]), ("'generation'", "object")),
}


@pytest.mark.parametrize("case", BAD)
def test_each_bad_field_is_named_in_one_line(case):
    change, words = BAD[case]
    data = copy.deepcopy(v1())
    change(data)
    message = _refused(data)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert "re-export" in message, message


def test_a_fresh_export_round_trips(bundles):
    path = bundles("llama", pipmm=True, budget="half", reducer="prompt-topk")
    written = json.loads((path / "manifest.json").read_text())
    manifest = load_bundle(path).manifest
    assert manifest.to_dict() == written
    assert Manifest.from_dict(manifest.to_dict(), "again") == manifest
    assert written["precision"] == {"default": "fp32", "graphs": {"vision": "fp32", "embed": "fp32", "decoder": "fp32"},
                                    "tensorrt": True, "details": {}, "dropped_graphs": {}}


# -- the staged writer ------------------------------------------------------------------------------


def test_the_staged_writer_leaves_nothing_on_failure_or_without_publish(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with staged_bundle(tmp_path / "b") as stage:
            (stage.directory / "vision.onnx").write_bytes(b"half a graph")
            raise KeyboardInterrupt
    with staged_bundle(tmp_path / "c") as stage:
        (stage.directory / "vision.onnx").write_bytes(b"never published")
    assert list(tmp_path.iterdir()) == []


def test_the_staged_writer_refuses_an_existing_bundle_before_writing(bundles, tmp_path):
    out = shutil.copytree(bundles("llama"), tmp_path / "b")
    with pytest.raises(ExportError, match="--overwrite"):
        with staged_bundle(out):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_publish_records_every_file_and_writes_the_manifest_last(bundles, tmp_path):
    source = load_bundle(bundles("llama"))
    out = tmp_path / "b"
    with staged_bundle(out) as stage:
        for name in source.manifest.files:
            shutil.copyfile(source.path / name, stage.directory / name)
        (stage.directory / ".scratch").write_text("hidden files are not bundle files")
        published = stage.publish(replace(source.manifest, files={}))
    assert published.files == source.manifest.files
    assert load_bundle(out).manifest == published
    assert (out.stat().st_mode & 0o777) == 0o755


def test_quantize_goes_through_the_staged_writer(bundles, tmp_path, monkeypatch):
    from export.precision import quantize

    fp32 = bundles("llama")
    real = quantize.METHODS["fp16"]

    def fail_on_decoder(name, src, dst, ctx):
        if name == "decoder":
            raise KeyboardInterrupt
        return real(name, src, dst, ctx)
    monkeypatch.setitem(quantize.METHODS, "fp16", fail_on_decoder)
    with pytest.raises(KeyboardInterrupt):
        quantize.quantize_bundle(fp32, tmp_path / "fp16", "fp16", progress=False)
    assert list(tmp_path.iterdir()) == []  # vision and embed were written: all of it went with the stage
    monkeypatch.setitem(quantize.METHODS, "fp16", real)
    out = quantize.quantize_bundle(fp32, tmp_path / "fp16", "fp16", progress=False)
    manifest = load_bundle(out).manifest
    assert manifest.precision.default == "fp16"
    assert manifest.precision.graphs == Precision.uniform("fp16", ("vision", "embed", "decoder")).graphs
    assert set(manifest.precision.details) == {"vision", "embed", "decoder"}
    assert manifest.created.from_fp32_bundle == str(fp32)
    assert manifest.to_dict() == json.loads((out / "manifest.json").read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["fp16"]


def test_add_graphs_rewrites_the_manifest_through_the_bundle_module(bundles, checkpoints, tmp_path, monkeypatch):
    from export import extra_graphs

    bundle = shutil.copytree(bundles("llama"), tmp_path / "b")
    before = load_bundle(bundle).manifest
    written = []

    def recording(directory, manifest):
        written.append(manifest)
        write_manifest(directory, manifest)
    monkeypatch.setattr(extra_graphs, "write_manifest", recording)
    extra_graphs.add_graphs(bundle, checkpoints["llama"])
    after = load_bundle(bundle).manifest
    assert written == [after]
    assert after.graphs["decoder_static"].kv_cache == "static" and after.precision.graphs["decoder_static"] == "fp32"
    assert replace(after, graphs=before.graphs, files=before.files, precision=before.precision) == before
    # a decoder that kept its weights inline lends them from decoder.onnx.data once a graph shares them
    # (export/extra_graphs.py): decoder.onnx itself changes then, every other file stays as it was
    moved = {"decoder.onnx"} if "decoder.onnx.data" not in before.files else set()
    assert moved <= set(after.files) and ("decoder.onnx.data" in after.files)
    assert {k: v for k, v in after.files.items() if k in before.files and k not in moved} == \
        {k: v for k, v in before.files.items() if k not in moved}
    assert not any(p.name.startswith(".") for p in bundle.iterdir())


def test_decoder_fused_settings_read_typed_with_the_defaults_of_older_bundles():
    """sdk/manifest_fused.py: the keys export/fused.py writes round-trip; an entry before the token step reads as
    one without it; a bad value is refused in one line."""
    from sdk.manifest_fused import FusedDecoderEntry

    written = FusedDecoderEntry(target="cuda", preferred_by={"onnxruntime": ["cuda"]}, cmai=False,
                                token_input="input_ids", next_token="next_token", extra={"nodes": 40}).to_dict()
    assert FusedDecoderEntry.from_extra(written, "m") == FusedDecoderEntry.from_extra(dict(written), "m")
    assert FusedDecoderEntry.from_extra(written, "m").extra == {"nodes": 40}
    older = FusedDecoderEntry.from_extra({"target": "cpu", "query_seqlens": True, "ops": {}}, "m")
    assert (older.token_input, older.next_token, older.cmai) == (None, None, True)
    with pytest.raises(BundleError, match="'next_token' must be an output name or null"):
        FusedDecoderEntry.from_extra({**written, "next_token": 3}, "m")
