"""TensorRT without TensorRT: profiles, cache keys, refusal of foreign engines, the missing-TensorRT error, and the
builder's call sequence against a stand-in module. Real engines are built and run only where `import tensorrt`
works (last test); TensorRT was not available where this project is developed (docs/gpu.md)."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import replace

import pytest

pytest.importorskip("torch")

from runtimes import tensorrt as trt_runtime  # noqa: E402
from runtimes.tensorrt import EngineKey, EngineMismatchError, EngineMissingError, Limits  # noqa: E402
from sdk.bundle import load_bundle  # noqa: E402
from sdk.cli import main  # noqa: E402
from sdk.errors import BackendError  # noqa: E402

try:
    import tensorrt as _real_trt  # noqa: F401
    HAVE_TRT = True
except ImportError:
    HAVE_TRT = False


@pytest.fixture
def bundle(bundles):
    return load_bundle(bundles("llama", pipmm=True, budget="half", reducer="prompt-topk"))


def test_decoder_profiles_from_the_manifest(bundle):
    limits = trt_runtime.limits_for(bundle.manifest, max_batch=2)
    assert limits.max_context == 512 and limits.opt_sequence == 25 + 64
    prefill, decode = trt_runtime.derive_profiles(bundle.manifest, "decoder", limits)
    n = bundle.manifest.model.num_layers
    assert set(prefill) == {"inputs_embeds", "attention_mask", "position_ids", "image_bias",
                            *[f"past_key_values.{i}.{p}" for i in range(n) for p in ("key", "value")]}
    assert decode["image_bias"] == ((1, 1, 2), (1, 1, limits.opt_past + 1), (2, 1, 512))  # CMAI: [B,L_c,P+T]
    assert prefill["past_key_values.0.key"] == ((1, 2, 0, 16), (1, 2, 0, 16), (2, 2, 0, 16))
    assert prefill["inputs_embeds"] == ((1, 1, 64), (1, 89, 64), (2, 512, 64))
    assert decode["inputs_embeds"] == ((1, 1, 64), (1, 1, 64), (2, 1, 64))
    assert decode["past_key_values.1.value"][0][2] == 1 and decode["past_key_values.1.value"][2][2] == 511
    assert decode["attention_mask"] == ((1, 2), (1, limits.opt_past + 1), (2, 512))
    for profile in (prefill, decode):
        for lo, opt, hi in profile.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))


def test_vision_and_embed_profiles_and_unknown_axes(bundle):
    limits = Limits(max_batch=4, max_context=128, opt_sequence=40, opt_past=50)
    (vision,) = trt_runtime.derive_profiles(bundle.manifest, "vision", limits)
    assert vision["pixel_values"] == ((1, 3, 28, 28), (1, 3, 28, 28), (4, 3, 28, 28))
    assert vision["prompt_vector"] == ((1, 64), (1, 64), (4, 64))
    (embed,) = trt_runtime.derive_profiles(bundle.manifest, "embed", limits)
    assert embed["input_ids"] == ((1, 1), (1, 40), (4, 128))
    embed = bundle.graphs["embed"]
    odd = replace(embed, inputs=[replace(embed.inputs[0], shape=["batch", "tokens_of_some_kind"])])
    manifest = replace(bundle.manifest, graphs={**bundle.graphs, "embed": odd})
    with pytest.raises(BackendError, match="tokens_of_some_kind"):
        trt_runtime.derive_profiles(manifest, "embed", limits)


def test_engine_key_names_what_an_engine_depends_on():
    key = EngineKey("NVIDIA H100 80GB HBM3", "9.0", "10.3.0", "ab" * 32, "fp16")
    assert key.dirname == "nvidia-h100-80gb-hbm3_sm90_trt10.3.0_fp16_abababababababab"
    other = EngineKey("NVIDIA A100-SXM4-40GB", "8.0", "10.3.0", "ab" * 32, "fp16")
    assert key.mismatch(other) == ["GPU", "compute capability"]
    assert key.mismatch(key) == []


def _write_engines(directory, key: EngineKey, graphs=trt_runtime.GRAPHS):
    directory.mkdir(parents=True)
    for graph in graphs:
        (directory / f"{graph}.engine").write_bytes(b"engine")
    meta = {"format": trt_runtime.ENGINE_FORMAT, "key": {k: getattr(key, k) for k in
                                                         ("gpu", "compute_capability", "tensorrt", "bundle", "precision")}}
    (directory / "engine.json").write_text(json.dumps(meta))


def test_engines_of_another_gpu_or_version_are_refused_in_one_line(tmp_path):
    here = EngineKey("NVIDIA H100 80GB HBM3", "9.0", "10.3.0", "cd" * 32, "fp16")
    with pytest.raises(EngineMissingError, match="pipmm build-engines B --precision fp16"):
        trt_runtime.find_engines(tmp_path, here, "B")
    elsewhere = EngineKey("Orin (nvgpu)", "8.7", "10.3.0", "cd" * 32, "fp16")
    _write_engines(tmp_path / elsewhere.dirname, elsewhere)
    with pytest.raises(EngineMismatchError) as err:
        trt_runtime.find_engines(tmp_path, here, "B")
    assert "Orin" in str(err.value) and "\n" not in str(err.value)
    # handed an explicit directory built elsewhere (copied from another machine): refused, with the rebuild command
    older = EngineKey("NVIDIA H100 80GB HBM3", "9.0", "10.0.1", "cd" * 32, "fp16")
    _write_engines(tmp_path / "copied", older)
    with pytest.raises(EngineMismatchError, match="TensorRT version.*--rebuild"):
        trt_runtime.find_engines(tmp_path, here, "B", explicit=tmp_path / "copied")
    _write_engines(tmp_path / here.dirname, here, graphs=("vision", "embed"))
    with pytest.raises(EngineMissingError, match="lack decoder"):
        trt_runtime.find_engines(tmp_path, here, "B")
    (tmp_path / here.dirname / "decoder.engine").write_bytes(b"engine")
    assert trt_runtime.find_engines(tmp_path, here, "B") == tmp_path / here.dirname


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_missing_tensorrt_is_a_one_line_error(bundle, bundles, capsys):
    with pytest.raises(trt_runtime.TensorRTMissingError, match="TensorRT is not installed"):
        trt_runtime.TensorRTBackend(bundle)
    assert trt_runtime.TensorRTBackend.available() is False
    path = str(bundles("llama"))
    capsys.readouterr()  # the fixture's export progress
    assert main(["build-engines", path]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: TensorRT is not installed") and len(err.splitlines()) == 1


def test_onnxruntime_tensorrt_provider_options(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(trt_runtime, "gpu_identity", lambda device_id=0: ("NVIDIA H100 80GB HBM3", "9.0"))
    options = trt_runtime.ort_tensorrt_options(bundle, "decoder", root=tmp_path)
    assert options["trt_engine_cache_enable"] == "1" and options["trt_fp16_enable"] == "1"
    assert options["trt_int8_enable"] == "0"
    assert bundle.content_hash[:16] in options["trt_engine_cache_path"]
    assert "sm90" in options["trt_engine_cache_path"]
    mins = dict(item.split(":") for item in options["trt_profile_min_shapes"].split(","))
    maxs = dict(item.split(":") for item in options["trt_profile_max_shapes"].split(","))
    assert mins["past_key_values.0.key"] == "1x2x0x16" and maxs["past_key_values.0.key"] == "1x2x511x16"
    assert mins["inputs_embeds"] == "1x1x64" and maxs["attention_mask"] == "1x512"
    vision = trt_runtime.ort_tensorrt_options(bundle, "vision", root=tmp_path)
    assert "pixel_values" not in vision.get("trt_profile_min_shapes", "")  # batch 1 only: nothing dynamic


# -- the builder's call sequence, against a stand-in for the TensorRT 10 module ------------------------

def _fake_tensorrt(calls: list):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0-fake"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            calls.append(("Logger", level))

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            calls.append(("parse", path.rsplit("/", 1)[-1]))
            return True

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            assert len(lo) == len(opt) == len(hi)
            self.shapes[name] = (lo, opt, hi)

    class Cache:
        def serialize(self):
            return b"timing"

    class Config:
        def __init__(self):
            self.flags, self.profiles = set(), []

        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", size))

        def set_flag(self, flag):
            self.flags.add(flag)

        def create_timing_cache(self, data):
            calls.append(("timing_cache_in", len(data)))
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            assert ignore_mismatch is False

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

        def get_timing_cache(self):
            return Cache()

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            assert flags == 0
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build", sorted(config.flags), len(config.profiles)))
            return b"serialized-engine"

    trt.Logger, trt.OnnxParser, trt.Builder = Logger, Parser, Builder
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
    return trt


def test_build_engines_with_a_stand_in_tensorrt(bundles, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(calls))
    monkeypatch.setattr(trt_runtime, "gpu_identity", lambda device_id=0: ("NVIDIA H100 80GB HBM3", "9.0"))
    path = bundles("llama")
    directory = trt_runtime.build_engines(path, "fp16", root=tmp_path, log=lambda *_: None)
    assert sorted(p.name for p in directory.iterdir()) == ["decoder.engine", "embed.engine", "engine.json",
                                                          "vision.engine"]
    assert [c[1] for c in calls if c[0] == "parse"] == ["vision.onnx", "embed.onnx", "decoder.onnx"]
    builds = [c for c in calls if c[0] == "build"]
    assert builds == [("build", ["FP16"], 1), ("build", ["FP16"], 1), ("build", ["FP16"], 2)]
    meta = json.loads((directory / "engine.json").read_text())
    assert meta["key"]["tensorrt"] == "10.99.0-fake" and meta["key"]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert len(meta["profiles"]["decoder"]) == 2
    timing = list(tmp_path.glob("timing_*.cache"))
    assert len(timing) == 1 and timing[0].read_bytes() == b"timing"
    # up to date: nothing is built again; --rebuild builds again; the directory is what the backend would load
    calls.clear()
    trt_runtime.build_engines(path, "fp16", root=tmp_path, log=lambda *_: None)
    assert not [c for c in calls if c[0] == "build"]
    trt_runtime.build_engines(path, "fp16", root=tmp_path, rebuild=True, log=lambda *_: None)
    assert len([c for c in calls if c[0] == "build"]) == 3
    assert ("timing_cache_in", len(b"timing")) in calls  # the timing cache of the first build was read back
    key = trt_runtime.current_key(load_bundle(path), "fp16", tensorrt_version="10.99.0-fake")
    assert trt_runtime.find_engines(tmp_path, key, path) == directory
    with pytest.raises(BackendError, match="int8"):
        trt_runtime.build_engines(path, "int8", root=tmp_path, log=lambda *_: None)


# -- real engines, wherever TensorRT exists -------------------------------------------------------

@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (it cannot be installed here; docs/gpu.md)")
def test_tensorrt_engines_generate_the_tokens_of_onnxruntime(bundles, image, tmp_path):
    from runtimes.onnxruntime import OnnxRuntimeBackend
    from sdk.pipeline import Pipeline

    path = bundles("llama", pipmm=True, budget="half", reducer="prompt-topk")
    trt_runtime.build_engines(path, "fp32", root=tmp_path, log=lambda *_: None)
    loaded = load_bundle(path)
    engines = trt_runtime.TensorRTBackend(loaded, precision="fp32", engine_cache=tmp_path)
    reference = Pipeline(loaded.manifest, loaded.tokenizer_path, OnnxRuntimeBackend(loaded, device="cpu"))
    ours = Pipeline(loaded.manifest, loaded.tokenizer_path, engines)
    prompt = "what is the color of the shape?"
    assert ours.generate(image, prompt, max_new_tokens=16).token_ids == \
        reference.generate(image, prompt, max_new_tokens=16).token_ids
