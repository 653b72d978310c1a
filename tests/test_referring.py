"""Referring (ControlMLLM, docs/referring.md): the energy_grad graph against torch autograd, the device loop against
a torch autograd loop, regions mapped through the image's own resize and crop, overlay, and the typed errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import sdk  # noqa: E402
from sdk.errors import BundleError  # noqa: E402
from sdk.manifest import Manifest  # noqa: E402
from sdk.preprocess import preprocess, transform_plane  # noqa: E402
from sdk.referring import ReferringReport, optimise_latent  # noqa: E402
from sdk.regions import RegionError, overlay  # noqa: E402
from export.model.checkpoint import load_checkpoint  # noqa: E402
from export.model.energy import AttentionEnergy  # noqa: E402
from helpers import assert_energy_grad_matches_autograd  # noqa: E402
from tests.test_tensorrt_ops import AXES_INPUT, TABLE  # noqa: E402

PROMPT = "what is the color of the shape"
BOX = sdk.Box(14, 6, 44, 36)  # inside the 45x61 test image's center crop


@pytest.fixture(scope="module")
def bundle(referring_bundle):
    return referring_bundle


@pytest.fixture(scope="module")
def ref_pipe(bundle):
    return sdk.load(bundle, device="cpu")


@pytest.fixture(scope="module")
def pool_pipe(bundle, bundles, tmp_path_factory):
    """A pool bundle at sequence positions of the same checkpoint, given the same energy_grad graph (attach_graphs)."""
    from export.extra_graphs import attach_graphs

    root = tmp_path_factory.mktemp("referring-pool")
    out, scratch = root / "bundle", root / "scratch"
    shutil.copytree(bundles("llama", pipmm=True, budget="half", reducer="pool"), out)
    scratch.mkdir()
    # self-contained (its shared weights read back inline), as export_optional_graph writes it
    onnx.save(onnx.load(str(bundle / "energy_grad.onnx")), str(scratch / "energy_grad.onnx"))
    attach_graphs(out, {"energy_grad": scratch / "energy_grad.onnx"})
    return sdk.load(out, device="cpu")


@pytest.fixture(scope="module")
def energy(checkpoints):
    checkpoint = load_checkpoint(checkpoints["llama"])
    return AttentionEnergy(checkpoint.language_model, checkpoint.config.text_config).eval()


def _ort(bundle):
    import onnxruntime

    return onnxruntime.InferenceSession(str(bundle / "energy_grad.onnx"), providers=["CPUExecutionProvider"])


# -- the graph ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2_graph(checkpoints, tmp_path_factory):
    """energy_grad of the Qwen2 checkpoint (biased q/k/v projections), alone."""
    from export.extra_graphs import export_optional_graph

    path = export_optional_graph(checkpoints["qwen2"], "energy_grad",
                                 tmp_path_factory.mktemp("qwen2") / "energy_grad.onnx")
    checkpoint = load_checkpoint(checkpoints["qwen2"])
    return path.parent, AttentionEnergy(checkpoint.language_model, checkpoint.config.text_config).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_energy_grad_matches_torch_autograd(request, arch):
    """dE/d(inputs_embeds) of the ONNX graph within 1e-4 of max |grad| of torch autograd (fp32); energy to 1e-5,
    at a length other than the tracing example's (the sequence axis stays dynamic)."""
    bundle, energy = ((request.getfixturevalue("bundle"), request.getfixturevalue("energy")) if arch == "llama"
                      else request.getfixturevalue("qwen2_graph"))
    rng = np.random.default_rng(3)
    t, d = 19, energy.text_config.hidden_size
    embeds = rng.normal(0, 1, (1, t, d)).astype(np.float32)
    positions = (np.arange(t) + np.r_[np.zeros(12), np.full(7, 5)]).astype(np.int64)[None]  # a patch-position gap
    image = np.zeros(t, np.float32)
    image[3:12] = 1
    mask = np.zeros(t, np.float32)
    mask[5:8] = rng.uniform(0.3, 1, 3)
    queries = np.zeros(t, np.float32)
    queries[12:] = 1 / 7
    layers = np.full(energy.num_layers, 1 / energy.num_layers, np.float32)
    got_e, got_g = _ort(bundle).run(None, {"inputs_embeds": embeds, "position_ids": positions, "mask": mask,
                                          "image_weight": image, "query_weights": queries, "layer_weights": layers})
    assert_energy_grad_matches_autograd(
        got_e, got_g, lambda x: energy(x, torch.tensor(positions), *(torch.tensor(a) for a in (mask, image, queries,
                                                                                            layers))), embeds)


def test_energy_grad_ops_are_tensorrt_ops(bundle):
    model = onnx.load(str(bundle / "energy_grad.onnx"), load_external_data=False)
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        assert node.domain in ("", "ai.onnx") and TABLE.get(node.op_type, {}).get("supported"), node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type.startswith("Scatter"):  # TensorRT has no ScatterND with reduction
            assert attrs.get("reduction", b"none") == b"none", node.name
        index = AXES_INPUT.get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index]:
            assert node.input[index] in constants, f"{node.op_type} axes must be constant"


def test_manifest_records_graph_and_settings(bundle):
    d = json.loads((bundle / "manifest.json").read_text())
    entry, settings = d["graphs"]["energy_grad"], d["referring"]
    assert [i["name"] for i in entry["inputs"]] == ["inputs_embeds", "position_ids", "mask", "image_weight",
                                                    "query_weights", "layer_weights"]
    assert [o["name"] for o in entry["outputs"]] == ["energy", "grad_inputs_embeds"]
    # every matrix once, in the decoder's layout: all of the graph's weight bytes are the decoder's, and read from
    # decoder.onnx.data (the decoder kept its weights inline; add-graphs moved them there)
    sharing = entry["sharing"]
    assert sharing["found_in_source_bytes"] == sharing["shared_bytes"] == sharing["weight_bytes"] > 0
    assert "decoder.onnx.data" in d["files"] and "energy_grad.onnx.data" not in d["files"]
    assert settings["graph_layers"] == d["model"]["num_layers"]
    assert settings["variants"]["controlmllm"]["optimizer"] == "gradient-ema"
    assert settings["variants"]["controlmllm++"] == {**settings["variants"]["controlmllm++"], "optimizer": "adam",
                                                    "steps": 3, "lr": 0.03, "eps": 1e-3, "queries": "last"}
    manifest = Manifest.from_dict(d)
    assert Manifest.from_dict(manifest.to_dict()).referring == manifest.referring
    d["referring"]["variants"]["controlmllm"]["layers"] = [0, 99]
    with pytest.raises(BundleError, match="reads layers"):
        Manifest.from_dict(d)


def test_weights_point_into_the_decoders_external_data(bundle, tmp_path):
    """As in a bundle whose decoder keeps its weights in a side file (real checkpoints): energy_grad then holds
    no weight of its own, and computes the same."""
    from export.extra_graphs import share_weights

    for name in ("decoder", "energy_grad"):
        model = onnx.load(str(bundle / f"{name}.onnx"))
        onnx.save(model, str(tmp_path / f"{name}.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{name}.onnx.data", size_threshold=4096)
    report = share_weights(tmp_path / "energy_grad.onnx", tmp_path / "decoder.onnx")
    assert report["shared_bytes"] == report["weight_bytes"] > 0
    own = tmp_path / "energy_grad.onnx.data"
    assert not own.exists() or own.stat().st_size < 8192  # at most the small constants
    rng = np.random.default_rng(0)
    t = 9
    feeds = {"inputs_embeds": rng.normal(0, 1, (1, t, 64)).astype(np.float32), "position_ids": np.arange(t)[None],
             "mask": np.r_[0, 0, 1, 1, 0, 0, 0, 0, 0].astype(np.float32),
             "image_weight": np.r_[0, 1, 1, 1, 1, 0, 0, 0, 0].astype(np.float32),
             "query_weights": np.r_[0, 0, 0, 0, 0, 0.25, 0.25, 0.25, 0.25].astype(np.float32),
             "layer_weights": np.full(2, 0.5, np.float32)}
    import onnxruntime

    shared = onnxruntime.InferenceSession(str(tmp_path / "energy_grad.onnx"), providers=["CPUExecutionProvider"])
    for got, want in zip(shared.run(None, feeds), _ort(bundle).run(None, feeds)):
        np.testing.assert_array_equal(got, want)


# -- the device loop against a torch autograd loop --------------------------------------------------


def _spliced(pipe, image, prompt):
    """The prefill's embeddings, image slots, positions and kept patches, as Pipeline._tokens builds them."""
    ids, slots = pipe.prompter.prompt_ids(prompt)
    vision = pipe.backend.vision(preprocess(image, pipe.preprocessing), pipe.encode_prompt(prompt))
    embeds = pipe.backend.embed(ids[None]).copy()
    embeds[0, slots] = vision.visual_tokens[0]
    return embeds, slots, pipe.prefill_positions(len(ids), slots, vision), vision


def _torch_loop(energy, embeds, positions, slots, tokens, variant, graph_layers):
    """ControlMLLM with torch autograd and torch.optim: energies (alpha-scaled) and the final latent."""
    t = embeds.shape[1]
    mask, image, queries = torch.zeros(t), torch.zeros(t), torch.zeros(t)
    image[slots] = 1
    mask[slots] = torch.tensor(tokens)
    after = np.arange(slots[-1] + 1, t)
    chosen = after[-1:] if variant.queries == "last" else after
    queries[chosen] = 1 / len(chosen)
    layers = torch.zeros(graph_layers)
    layers[variant.layers] = 1 / len(variant.layers)
    latent = torch.zeros(len(slots), embeds.shape[2], requires_grad=True)
    adam = torch.optim.Adam([latent], lr=variant.lr, betas=(variant.beta, variant.beta2), eps=variant.eps)
    base, rows, history = torch.tensor(embeds), torch.tensor(slots), []
    for _ in range(variant.steps):
        x = base.index_add(1, rows, latent.unsqueeze(0))
        e = variant.alpha * energy(x, torch.tensor(positions), mask, image, queries, layers)
        history.append(float(e.detach()))
        if variant.stop_ratio is not None and abs(history[-1] - history[0]) / history[0] > variant.stop_ratio:
            break
        grad, = torch.autograd.grad(e, latent)
        with torch.no_grad():
            if variant.optimizer == "adam":
                latent.grad = grad
                adam.step()
            else:
                latent.copy_(variant.beta * latent + (1 - variant.beta) * (latent - variant.lr * grad))
    return history, latent.detach().numpy()


@pytest.mark.parametrize("method, layout", [("controlmllm", "topk-patch"), ("controlmllm++", "topk-patch"),
                                            ("controlmllm", "pool-sequence")])
def test_ort_loop_matches_torch_autograd_loop(request, energy, image, method, layout):
    from sdk.regions import patch_weights, token_weights

    pipe = request.getfixturevalue({"topk-patch": "ref_pipe", "pool-sequence": "pool_pipe"}[layout])
    settings = pipe.manifest.referring
    variant = settings.variants[method]
    embeds, slots, positions, vision = _spliced(pipe, image, PROMPT)
    v = pipe.manifest.vision
    tokens = token_weights(patch_weights(BOX, image, pipe.preprocessing, v.grid, v.patch_size, variant.sigma),
                           pipe.manifest.visual_tokens.reducer, len(slots), vision.kept_patches, v.grid)
    assert (positions is None) == (layout == "pool-sequence")
    sequence = np.arange(embeds.shape[1])[None] if positions is None else positions
    want_history, want_latent = _torch_loop(energy, embeds, sequence, slots, tokens, variant,
                                            settings.graph_layers)

    result = pipe.generate(image, PROMPT, region=BOX, referring=method, max_new_tokens=8)
    report = result.referring
    assert report["method"] == method and report["region"] == "box" and report["steps"] >= 1
    assert len(report["energies"]) == len(want_history)
    np.testing.assert_allclose(report["energies"], want_history, rtol=1e-4)
    assert report["energies"][-1] < report["energies"][0]  # the latent pulls attention into the box

    steered = embeds.copy()
    steered[0, slots] += want_latent
    logits, cache = pipe.prefill(steered, positions)
    plain = pipe.new_result()
    args = pipe.generation_args(8, 0.0, None, None)
    want_tokens = list(pipe.decode_tokens(logits, cache, args, plain, 0.0))
    assert result.token_ids == want_tokens
    assert result.to_dict()["stats"]["referring"]["steps"] == report["steps"]


def test_ort_loop_reports_energy_per_step(ref_pipe, image):
    report = ReferringReport(method="controlmllm", region="box")
    variant = ref_pipe.manifest.referring.variants["controlmllm"]
    calls = []

    def flat(embeds, positions, mask, image_weight, queries, layers):  # an energy that never changes: no early stop
        calls.append(embeds.copy())
        return 0.5, np.ones_like(embeds)

    slots = np.arange(2, 6)
    latent = optimise_latent(flat, np.zeros((1, 9, 4), np.float32), np.arange(9)[None], slots,
                             np.ones(4, np.float32), variant, 2, report)
    assert report.steps == variant.steps and report.energies == [0.5 * variant.alpha] * variant.steps
    assert len(report.step_ms) == variant.steps
    # v <- beta v + (1 - beta)(v - lr alpha g): after n steps v = -(1 - beta) lr alpha n
    np.testing.assert_allclose(latent, -(1 - variant.beta) * variant.lr * variant.alpha * variant.steps)
    assert np.all(calls[1][0, slots] != 0) and np.all(calls[1][0, :2] == 0)  # only the image rows move


# -- regions onto the patch grid and the kept tokens ------------------------------------------------


def test_region_follows_the_images_resize_and_crop(ref_pipe):
    """A white rectangle drawn on the image lands where transform_plane puts the same box."""
    h, w = 45, 61
    drawn = np.zeros((h, w, 3), np.uint8)
    drawn[10:30, 20:50] = 255
    pixels = preprocess(drawn, ref_pipe.preprocessing)[0, 0]
    bright = pixels > pixels.min() + 0.5 * (pixels.max() - pixels.min())
    plane = transform_plane(sdk.Box(20, 10, 50, 30).plane(w, h), ref_pipe.preprocessing) > 0.5
    assert plane.shape == bright.shape and (plane != bright).mean() < 0.03 and plane.any()


def test_point_and_scribble_weights_fall_off_with_distance(ref_pipe, image):
    from sdk.regions import patch_weights

    v = ref_pipe.manifest.vision
    point = patch_weights(sdk.Point(30, 20), image, ref_pipe.preprocessing, v.grid, v.patch_size, 0.1)
    assert point.max() == pytest.approx(1.0) and 0 < point.min() < 0.5
    line = patch_weights(sdk.Scribble([(15, 10), (45, 35)]), image, ref_pipe.preprocessing, v.grid, v.patch_size, 0.1)
    assert (line > 0.99).sum() > (point > 0.99).sum()


def test_overlay_draws_the_region(image):
    drawn = np.asarray(overlay(image, BOX))
    changed = np.any(drawn != image, axis=-1)
    assert changed[6, 20] and changed[35, 30] and not changed[20, 28] and not changed[2, 2]
    assert np.any(np.asarray(overlay(image, sdk.Point(30, 20))) != image)
    assert np.any(np.asarray(overlay(image, sdk.Scribble([(5, 5), (50, 40)]))) != image)


def test_overlay_needs_no_energy_graph(pipe, image):
    result = pipe.generate(image, PROMPT, region=BOX, referring="overlay", max_new_tokens=4)
    assert result.referring == {"method": "overlay", "region": "box", "steps": 0, "energies": [], "step_ms": []}


# -- typed one-line errors ------------------------------------------------------------------------


@pytest.mark.parametrize("region, match", [
    (sdk.Box(10, 10, 70, 30), "not inside the 61x45 image"),
    (sdk.Point(61, 3), "outside the 61x45 image"),
    (sdk.Scribble([(3, 3), (-1, 4)]), "outside the 61x45 image"),
    (sdk.Mask(np.zeros((45, 61), bool)), "mask is empty"),
    (sdk.Mask(np.ones((44, 61), bool)), "mask is 61x44 but the image is 61x45"),
    (sdk.Box(0, 0, 3, 45), "outside the part of the image the model sees"),
])
def test_bad_regions_are_refused(ref_pipe, image, region, match):
    with pytest.raises(RegionError, match=match) as err:
        ref_pipe.generate(image, PROMPT, region=region, referring="controlmllm", max_new_tokens=2)
    assert "\n" not in str(err.value)


def test_bundle_without_energy_grad_is_refused(pipe, image):
    with pytest.raises(BundleError, match="no energy_grad graph.*--controlmllm"):
        pipe.generate(image, PROMPT, region=BOX, referring="controlmllm")


def test_bad_method_and_method_without_region(ref_pipe, image):
    with pytest.raises(RegionError, match="unknown"):
        ref_pipe.generate(image, PROMPT, region=BOX, referring="arrow")
    with pytest.raises(RegionError, match="needs a region"):
        ref_pipe.generate(image, PROMPT, referring="controlmllm")
    with pytest.raises(RegionError, match="not a referring region"):
        ref_pipe.generate(image, PROMPT, region=(1, 2, 3, 4))


# -- the CLI --------------------------------------------------------------------------------------


def test_cli_describe_with_regions(bundle, ref_pipe, image, tmp_path, capsys):
    from PIL import Image

    from sdk.cli import main

    path, mask_path = tmp_path / "frame.png", tmp_path / "mask.png"
    Image.fromarray(image).save(path)
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask).save(mask_path)
    common = ["describe", str(path), PROMPT, "--bundle", str(bundle), "--device", "cpu", "--max-new-tokens", "4",
              "--json"]
    runs = {"box": ["--box", "14,6,44,36"], "point": ["--point", "30,20", "--point", "25,18"],
            "scribble": ["--scribble", "15,10;45,35"], "mask": ["--mask", str(mask_path), "--referring", "overlay"]}
    for kind, flags in runs.items():
        assert main(common + flags) == 0
        stats = json.loads(capsys.readouterr().out)["stats"]["referring"]
        assert stats["region"] == kind and stats["method"] == ("overlay" if kind == "mask" else "controlmllm")
    assert main(common + ["--box", "14,6,44,36", "--referring", "controlmllm++"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = ref_pipe.generate(image, PROMPT, region=BOX, referring="controlmllm++", max_new_tokens=4)
    assert got["token_ids"] == want.token_ids and got["stats"]["referring"]["steps"] == 3
    assert main(common + ["--box", "14,6"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --box '14,6': pass 4") and err.count("\n") == 1


def test_referring_settings_over_the_defaults():
    from export.cli_add_graphs import referring_settings
    from sdk.errors import ExportError
    from sdk.manifest_referring import defaults_for, middle_band, with_settings

    settings = referring_settings(["controlmllm.lr=100", "controlmllm.stop_ratio=null", "controlmllm++.lr=1.5"])
    assert settings == {"controlmllm": {"lr": 100, "stop_ratio": None}, "controlmllm++": {"lr": 1.5}}
    chosen = with_settings(defaults_for(4), settings, ExportError)
    assert chosen.variants["controlmllm"].lr == 100.0 and chosen.variants["controlmllm"].stop_ratio is None
    assert chosen.variants["controlmllm++"].layers == middle_band(4) == [1, 2]
    for bad, match in [({"arrow": {}}, "unknown: choose"), ({"controlmllm": {"lrr": 1}}, "'lrr' of controlmllm"),
                       ({"controlmllm": {"lr": "a"}}, "finite number"), ({"controlmllm": {"layers": [9]}}, "runs 4")]:
        with pytest.raises(ExportError, match=match):
            with_settings(defaults_for(4), bad, ExportError)
    with pytest.raises(ExportError, match="VARIANT.KEY=VALUE"):
        referring_settings(["lr=3"])
