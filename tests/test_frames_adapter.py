"""The frame adapters (export/model/mivpg.py): masked frames, frame order, the exported static graph against the
module, TensorRT's operator table."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from export.model.mivpg import AdapterConfig, FrameAdapter, random_adapter
from helpers import adapter_bundle
from sdk.errors import ExportError
from test_tensorrt_ops import AXES_INPUT, TABLE

D = 64  # the tiny checkpoints' LLM width
SMALL = dict(d_model=32, heads=4, queries=6, frame_queries=4, csa_points=3, max_frames=5)
CASES = {"qformer": dict(mode="qformer"), "mivpg-induced": dict(mode="mivpg", csa="induced"),
         "mivpg-full": dict(mode="mivpg", csa="full")}
# Written tolerances, FP32 on CPU: a different number of padded keys or another frame order only reorders sums.
MODULE_ATOL = 1e-5
GRAPH_ATOL = 1e-4  # ONNX Runtime fuses LayerNormalization and reorders MatMul sums


def adapter(case: str, seed: int = 0, **extra) -> FrameAdapter:
    settings = {**SMALL, **CASES[case], **extra}
    return random_adapter(settings.pop("mode"), D, seed=seed, **settings)


def frames(n: int, k: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(1, n, k, D)).astype(np.float32))


def padded(tokens: torch.Tensor, slots: int, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """[1,n,K,D] -> [1,slots,K,D] with `fill` in the absent slots, and the mask [1,slots]."""
    n = tokens.shape[1]
    out = torch.full((1, slots) + tokens.shape[2:], fill)
    out[:, :n] = tokens
    mask = torch.zeros(1, slots)
    mask[:, :n] = 1
    return out, mask


@pytest.mark.parametrize("order", ["ignored", "embedded"])
@pytest.mark.parametrize("case", CASES)
def test_absent_frames_change_nothing(case, order):
    module = adapter(case, frame_order=order)
    tokens = frames(2)
    with torch.no_grad():
        alone = module(tokens, torch.ones(1, 2))
        for fill in (0.0, 1e3):  # zeros (what the device feeds) or anything else: masked out either way
            got = module(*padded(tokens, 5, fill))
            torch.testing.assert_close(got, alone, atol=MODULE_ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_permuting_frames_leaves_the_output_unchanged(case):
    tokens, perm = frames(4), torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        module = adapter(case)
        torch.testing.assert_close(module(tokens[:, perm], torch.ones(1, 4)), module(tokens, torch.ones(1, 4)),
                                   atol=MODULE_ATOL, rtol=0)
        ordered = adapter(case, frame_order="embedded")  # the recorded alternative: order-aware by design
        delta = (ordered(tokens[:, perm], torch.ones(1, 4)) - ordered(tokens, torch.ones(1, 4))).abs().max()
        assert delta > 1e-3


@pytest.mark.parametrize("case", CASES)
def test_permuting_patches_within_a_frame_leaves_the_output_unchanged(case):
    tokens, perm = frames(3), torch.randperm(7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        module = adapter(case)
        torch.testing.assert_close(module(tokens[:, :, perm], torch.ones(1, 3)), module(tokens, torch.ones(1, 3)),
                                   atol=MODULE_ATOL, rtol=0)


def test_frames_are_not_pooled_alike_by_the_two_modes():
    """mivpg is not qformer with other weights: the same frames give different outputs for the two structures."""
    tokens = frames(3)
    with torch.no_grad():
        a, b = adapter("qformer")(tokens, torch.ones(1, 3)), adapter("mivpg-induced")(tokens, torch.ones(1, 3))
    assert a.shape == b.shape == (1, SMALL["queries"], D)
    assert (a - b).abs().max() > 1e-3


def test_save_load_and_bad_settings(tmp_path):
    module = adapter("mivpg-induced", seed=3)
    module.save(tmp_path / "a")
    loaded = FrameAdapter.load(tmp_path / "a")
    assert loaded.config == module.config
    tokens = frames(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, torch.ones(1, 2)), module(tokens, torch.ones(1, 2)), atol=0, rtol=0)
    for bad in (dict(mode="perceiver"), dict(csa="linformer"), dict(frame_order="sorted"), dict(d_model=30)):
        with pytest.raises(ExportError, match="adapter config"):
            AdapterConfig(**{"d_in": D, **bad})
    with pytest.raises(ExportError, match="adapter not found"):
        FrameAdapter.load(tmp_path / "missing")


# -- the exported graph --------------------------------------------------------------------------

N_MAX = 4


@pytest.fixture(scope="module")
def adapter_bundles(bundles, tmp_path_factory):
    """case -> (bundle with the adapter graph, the module): PIP-MM half budget (K = 25), N_MAX frames."""
    source = bundles("llama", pipmm=True, budget="half", reducer="prompt-topk")
    out = {}
    for case in ("qformer", "mivpg-induced"):
        settings = dict(CASES[case])
        out[case] = adapter_bundle(source, tmp_path_factory.mktemp(case) / "bundle", settings.pop("mode"), N_MAX,
                                   seed=1, max_frames=SMALL["max_frames"], **settings)
    return out


@pytest.mark.parametrize("case", ["qformer", "mivpg-induced"])
def test_adapter_graph_matches_the_module(case, adapter_bundles):
    import onnxruntime

    path, module = adapter_bundles[case]
    session = onnxruntime.InferenceSession(str(path / "adapter.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 3, N_MAX):
        tokens = frames(n, k=25, seed=n)
        with torch.no_grad():
            want = module(tokens, torch.ones(1, n)).numpy()
        for fill in (0.0, 50.0):
            feed, mask = padded(tokens, N_MAX, fill)
            got = session.run(None, {"frame_tokens": feed.numpy(), "frame_mask": mask.numpy()})[0]
            np.testing.assert_allclose(got, want, atol=GRAPH_ATOL, rtol=0, err_msg=f"{n} frames, fill {fill}")


@pytest.mark.parametrize("case", ["qformer", "mivpg-induced"])
def test_adapter_graph_is_static_and_every_operator_is_in_tensorrts_table(case, adapter_bundles):
    path, module = adapter_bundles[case]
    model = onnx.load(str(path / "adapter.onnx"))
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.input) + list(model.graph.output)}
    assert shapes == {"frame_tokens": [1, N_MAX, 25, D], "frame_mask": [1, N_MAX],
                      "visual_tokens": [1, SMALL["queries"], D]}
    constants = {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        assert node.domain in ("", "ai.onnx") and TABLE.get(node.op_type, {}).get("supported"), node.op_type
        index = AXES_INPUT.get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index]:
            assert node.input[index] in constants, f"{node.op_type} axes must be constant"


def test_tensorrt_builds_the_adapter_at_its_one_shape(adapter_bundles):
    """runtimes/tensorrt.py derives the adapter's profile from the manifest: fixed shapes, min = opt = max."""
    from runtimes.tensorrt import ADAPTER, derive_profiles, limits_for
    from sdk.bundle import load_bundle

    manifest = load_bundle(adapter_bundles["mivpg-induced"][0]).manifest
    profiles = derive_profiles(manifest, ADAPTER, limits_for(manifest))
    assert profiles == [{"frame_tokens": ((1, N_MAX, 25, D),) * 3, "frame_mask": ((1, N_MAX),) * 3}]


def test_calibrate_gives_the_first_pooled_tokens_the_frame_tokens_scale():
    """The LLM was trained on projector tokens of norm ~100 (models/default_model); an adapter's plain output
    (LayerNorm -> Linear) has norm ~5 whatever its input. Calibrated, its first outputs have the per-channel
    mean and std of the frame tokens, and they still depend on the frames."""
    rng = np.random.default_rng(3)
    centre = rng.normal(size=D).astype(np.float32) * 8
    tokens = torch.from_numpy(centre + 5 * rng.normal(size=(6, 3, 7, D)).astype(np.float32))  # [B,F,K,D]
    mask = torch.ones(6, 3)
    module = adapter("mivpg-induced", seed=2)
    assert module.config.output == "calibrated"
    norm = float(tokens.norm(dim=-1).mean())
    assert float(module(tokens, mask).norm(dim=-1).mean()) < 0.2 * norm  # far smaller than what the LLM reads
    stats = module.calibrate(tokens, mask)
    assert stats["tokens"] == 6 * 3 * 7 and abs(stats["token_norm"] - norm) < 1e-3
    out = module(tokens, mask)  # [6,R,D]
    assert 0.7 < float(out.norm(dim=-1).mean()) / norm < 1.4
    mean, std = tokens.mean((0, 1, 2)), tokens.std((0, 1, 2))
    assert float(((out - mean) / std).abs().mean()) < 1.5  # each channel within about a std of the tokens'
    assert float(out.std(0).mean()) > 1e-3  # different frames, different pooled tokens
    plain = adapter("mivpg-induced", seed=2, output="plain")
    with pytest.raises(ExportError, match="calibrate"):
        plain.calibrate(tokens, mask)
    assert "out_scale" not in plain.state_dict() and "out_scale" in module.state_dict()
