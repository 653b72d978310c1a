"""`pipmm bench` on a CPU (tiny bundles): the JSON schema, the same tokens as generate(), the tokens/s
definition, transformers side by side, the chart; device info."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("torch")

import sdk  # noqa: E402
from export.extra_graphs import add_graphs  # noqa: E402
from runtimes import device_info  # noqa: E402
from sdk import bench  # noqa: E402
from sdk.cli import main  # noqa: E402
from sdk.errors import PipmmError  # noqa: E402

PATCH = dict(arch="llama", pipmm=True, budget="half", reducer="prompt-topk", positions="patch")
CMAI = dict(arch="llama", pipmm=True, budget="half", reducer="merge")


def generated(bundle, new_tokens: int, inhibit: float = 0.0) -> list[int]:
    """What a user's greedy generate() of bench's request returns."""
    return sdk.load(bundle, device="cpu").generate(bench.bench_image(), bench.DEFAULT_PROMPT,
                                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                   temperature=0, inhibit=inhibit).token_ids


@pytest.fixture(scope="module")
def plain_static(bundles, checkpoints, tmp_path_factory):
    out = shutil.copytree(bundles("llama"), tmp_path_factory.mktemp("bench") / "plain-static")
    return add_graphs(out, checkpoints["llama"])


def test_bench_cli_writes_json_that_matches_the_schema(bundles, tmp_path, capsys):
    bundle = bundles("llama", pipmm=True, budget="half", reducer="prompt-topk")
    out = tmp_path / "bench.json"
    code = main(["bench", str(bundle), "--device", "cpu", "--new-tokens", "6", "--runs", "3", "--warmup", "1",
                 "--json", str(out), "--label", "tiny cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ttft_ms" in printed and "decode_tokens_per_s" in printed and "peak host RSS" in printed
    result = json.loads(out.read_text())
    bench.validate(result)
    assert result["schema"] == bench.SCHEMA and result["label"] == "tiny cpu"
    assert result["device"]["kind"] == "cpu" and result["backend"]["backend"] == "onnxruntime"
    assert result["backend"]["kv_cache"] == "numpy" and result["backend"]["cuda_graph"] is False
    assert result["bundle"]["visual_tokens"]["count"] == 25 and result["bundle"]["pipmm"] is True
    assert result["bundle"]["decoder_weight_bytes"] > 0
    assert len(result["tokens"]) == 6
    stages = result["stages"]
    assert all(len(stages[name]["runs"]) == 3 for name in bench.STAGES)
    assert stages["ttft_ms"]["median"] >= stages["prefill_ms"]["median"] > 0
    assert stages["total_ms"]["median"] >= stages["ttft_ms"]["median"]
    assert stages["prompt_ms"]["median"] > 0  # PIP-MM: the prompt is encoded by the decoder
    assert result["memory"]["host_peak_rss_mb"] > 0 and result["memory"]["device_source"] is None
    assert result["bandwidth"] is None and result["compare_hf"] is None


def test_bench_decodes_the_tokens_generate_decodes_with_patch_positions(bundles):
    bundle = bundles(**PATCH)
    result = bench.bench(bundle, device="cpu", new_tokens=8, runs=2, warmup=0)
    assert result["bundle"]["visual_tokens"]["positions"] == "patch"
    assert result["tokens"] == generated(bundle, 8)


def test_bench_inhibit_decodes_the_tokens_generate_decodes_with_cmai(bundles, tmp_path):
    bundle = bundles(**CMAI)
    out = tmp_path / "bench.json"
    assert main(["bench", str(bundle), "--device", "cpu", "--new-tokens", "10", "--runs", "1", "--warmup", "0",
                 "--inhibit", "0.5", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["inhibit"] == 0.5
    assert result["tokens"] == generated(bundle, 10, inhibit=0.5)
    assert result["tokens"] != generated(bundle, 10), "inhibition should change this answer; pick another setting"


def test_tokens_per_s_is_decoder_steps_after_the_first_token_over_their_time(bundles):
    n = 7
    timings = sdk.load(bundles("llama"), device="cpu").generate(
        bench.bench_image(), bench.DEFAULT_PROMPT, max_new_tokens=n, min_new_tokens=n).timings
    assert timings["tokens_per_s"] * timings["decode_ms"] / 1000 == pytest.approx(n - 1)
    assert timings["decode_ms_per_token"] * (n - 1) == pytest.approx(timings["decode_ms"])
    assert timings["ttft_ms"] + timings["decode_ms"] <= timings["total_ms"]
    stages = bench.bench(bundles("llama"), device="cpu", new_tokens=n, runs=2, warmup=0)["stages"]
    for rate, per_token in zip(stages["decode_tokens_per_s"]["runs"], stages["decode_ms_per_token"]["runs"]):
        assert rate * per_token / 1000 == pytest.approx(1.0)
    one = bench.bench(bundles("llama"), device="cpu", new_tokens=1, runs=1, warmup=0)["stages"]
    assert one["decode_tokens_per_s"]["median"] is None and one["ttft_ms"]["median"] > 0


def test_bench_beside_transformers_generates_the_same_tokens(plain_static, checkpoints, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(plain_static), "--device", "cpu", "--new-tokens", "8", "--runs", "2", "--warmup", "1",
                 "--kv-cache", "static", "--compare-hf", str(checkpoints["llama"]), "--json", str(out)]) == 0
    assert "transformers" in capsys.readouterr().out
    result = json.loads(out.read_text())
    bench.validate(result)
    hf = result["compare_hf"]
    assert hf["visual_tokens"] == 49 and hf["dtype"] == "fp32" and hf["attn"] == "eager"
    assert hf["stages"]["ttft_ms"]["median"] > 0 and hf["stages"]["decode_tokens_per_s"]["median"] > 0
    # plain LLaVA, FP32, full budget: greedy tokens equal transformers' (end-of-sequence suppressed on both sides)
    assert result["ratios"]["leading_tokens_identical"] == 8
    assert result["ratios"]["ttft_ms"] > 0
    assert result["backend"]["kv_cache"] == "static" and result["backend"]["static_cache_slots"] == 256
    assert "transformers" in bench.table(result)


def test_compare_hf_needs_its_peer_and_the_export_extra(bundles, checkpoints):
    with pytest.raises(PipmmError, match="peer=export.compare_hf.run_hf"):
        bench.bench(bundles("llama"), device="cpu", new_tokens=2, runs=1, compare_hf=checkpoints["llama"])
    # a runtime-only install: torch cannot be imported, so the peer cannot be either
    code = ("import sys; sys.modules['torch'] = None; from sdk.cli import main; "
            f"sys.exit(main(['bench', {str(bundles('llama'))!r}, '--device', 'cpu', '--compare-hf', "
            f"{str(checkpoints['llama'])!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == "error: 'pipmm bench --compare-hf' needs torch: pip install 'pipmm-edge[export]'"


def test_bench_plot_draws_variants(bundles, tmp_path):
    pytest.importorskip("matplotlib")
    results = [bench.bench(bundles("llama"), device="cpu", new_tokens=3, runs=1, warmup=0, label=name)
               for name in ("a", "b")]
    results[0]["bandwidth"] = {"bound_tokens_per_s": 1000.0}
    path = bench.plot(results, tmp_path / "chart.png")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validate_refuses_what_the_schema_does_not_promise(bundles):
    result = bench.bench(bundles("llama"), device="cpu", new_tokens=2, runs=1, warmup=0)
    bench.validate(result)
    for broken in ({**result, "schema": "other/9"}, {**result, "stages": {}},
                   {**result, "memory": {"host_peak_rss_mb": 1.0}}):
        with pytest.raises(ValueError):
            bench.validate(broken)
    assert result["stages"]["decode_tokens_per_s"]["median"] is not None


def test_summary_median_and_p90():
    s = bench.summary([float(v) for v in range(1, 11)])
    assert s["median"] == 5.5 and s["p90"] == pytest.approx(9.1)
    assert bench.summary([None])["median"] is None


def test_bench_refuses_bad_counts_and_names_a_missing_backend(bundles, capsys):
    path = str(bundles("llama"))
    capsys.readouterr()  # the fixture's export progress
    assert main(["bench", path, "--device", "cpu", "--runs", "0"]) == 1
    assert "--runs" in capsys.readouterr().err
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert main(["bench", path, "--backend", "tensorrt", "--device", "cuda"]) == 1
        err = capsys.readouterr().err.strip()
        assert "TensorRT is not installed" in err and len(err.splitlines()) == 1


# -- device info ----------------------------------------------------------------------------------

def test_jetson_detection_from_device_tree_and_release_files(tmp_path):
    assert device_info.jetson_info(tmp_path) is None
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic\n")
    (tmp_path / "var/lib/nvpmodel").mkdir(parents=True)
    (tmp_path / "var/lib/nvpmodel/status").write_text("pmode:0002 fmode:quiet")
    info = device_info.jetson_info(tmp_path)
    assert info == {"model": "NVIDIA Jetson AGX Orin Developer Kit", "l4t": "R36.3.0", "power_mode": "mode 2"}
    assert device_info.parse_nvpmodel("NV Power Mode: MAXN\n0\n") == "MAXN"


def test_unified_memory_from_meminfo():
    text = "MemTotal:       32000000 kB\nMemFree:  1000 kB\nMemAvailable:   30000000 kB\n"
    assert device_info.meminfo_used_bytes(text) == 2_000_000 * 1024
    assert device_info.meminfo_used_bytes("garbage") is None


def test_memory_sampler_and_description_on_a_cpu():
    with device_info.MemorySampler("cpu") as sampler:
        block = bytearray(30 << 20)
        block[::4096] = b"x" * len(block[::4096])
    peaks = sampler.peaks()
    assert peaks["host_peak_rss_mb"] > 30 and peaks["device_peak_mb"] is None
    described = device_info.describe("cpu")
    assert described["kind"] == "cpu" and described["name"]
