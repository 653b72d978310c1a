"""TVP on the device (sdk/visual_prompt.py): the numpy transform against the torch training transform, the
manifest section, attach/detach through the CLI, refusals in one line, and prompts in the Pipeline."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sdk  # noqa: E402
from sdk.bundle import load_bundle, sha256_file  # noqa: E402
from sdk.cli import main  # noqa: E402
from sdk.errors import BundleError  # noqa: E402
from sdk.manifest import Manifest  # noqa: E402
from sdk.preprocess import clip_processor_config, config_from_processor, preprocess, siglip_processor_config  # noqa: E402
from sdk.visual_prompt import (PROMPT_CONFIG, PROMPT_WEIGHTS, VisualPrompt, VisualPromptError, attach,  # noqa: E402
                               detach, read_tensor)

from export.tvp.train import save_prompt  # noqa: E402
from export.tvp.transform import channel_stats, frame_mask, inner_batch, prompted  # noqa: E402


def random_delta(size: int, frame: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=generator) * frame_mask(size, frame)


def overlay_delta(size: int, frame: int, seed: int = 0) -> torch.Tensor:
    """An overlay prompt's delta: uniform in [-1, 1] on the band (so the band's clip to [0, 1] is exercised)."""
    return (random_delta(size, frame, seed) * 2 - 1) * frame_mask(size, frame)


def write_prompt(out, size: int = 28, frame: int = 4, seed: int = 0, geometry: str = "pad"):
    out.mkdir(parents=True, exist_ok=True)
    inner = size - 2 * frame if geometry == "pad" else size
    settings = {"frame": frame, "geometry": geometry, "image_size": size, "inner_size": inner,
                "source": {"checkpoint": "test"}}
    delta = (random_delta if geometry == "pad" else overlay_delta)(size, frame, seed)
    save_prompt(out, delta, settings, {"completed_steps": 1})
    return out


def one_line_error(argv, capsys) -> str:
    capsys.readouterr()  # what earlier steps printed
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.strip().count("\n") == 0, err
    return err


@pytest.mark.parametrize("processor", [clip_processor_config(56), siglip_processor_config(56),
                                       {**clip_processor_config(56), "size": {"shortest_edge": 64}}])
def test_numpy_preprocessing_equals_the_torch_training_transform(image, processor):
    cfg = config_from_processor(processor)
    delta = random_delta(56, 9, seed=3)
    prompt = VisualPrompt(delta.numpy(), 9, 56)
    device = prompt.preprocess(image, cfg)  # [1, 3, 56, 56]
    training = prompted(inner_batch([image], prompt, cfg), delta, 9, channel_stats(cfg)).numpy()
    assert device.shape == training.shape == (1, 3, 56, 56) and device.dtype == np.float32
    np.testing.assert_allclose(device, training, rtol=0, atol=1e-6)
    # inside the frame: the bundle's own preprocessing at the inner side; the frame: normalised delta
    inner = preprocess(image, prompt.inner_config(cfg))
    np.testing.assert_allclose(device[..., 9:47, 9:47], inner, rtol=0, atol=1e-6)
    mean, std = (np.asarray(cfg[k], np.float32)[:, None] for k in ("image_mean", "image_std"))
    np.testing.assert_allclose(device[0, :, 0, :], (delta.numpy()[:, 0, :] - mean) / std, rtol=0, atol=1e-6)


@pytest.mark.parametrize("processor", [clip_processor_config(56), siglip_processor_config(56),
                                       {**clip_processor_config(56), "size": {"shortest_edge": 64}}])
def test_the_overlay_geometry_equals_the_torch_training_transform(image, processor):
    cfg = config_from_processor(processor)
    delta = overlay_delta(56, 9, seed=4)
    prompt = VisualPrompt(delta.numpy(), 9, 56, geometry="overlay")
    assert prompt.inner_size == 56 and prompt.inner_config(cfg) == config_from_processor(processor)
    device = prompt.preprocess(image, cfg)  # [1, 3, 56, 56]
    training = prompted(inner_batch([image], prompt, cfg), delta, 9, channel_stats(cfg), "overlay").numpy()
    assert device.shape == training.shape == (1, 3, 56, 56) and device.dtype == np.float32
    np.testing.assert_allclose(device, training, rtol=0, atol=1e-6)
    # inside the band: the bundle's own preprocessing, untouched and at full size; the band: clip(x + delta, 0, 1)
    plain = preprocess(image, cfg)
    np.testing.assert_array_equal(device[..., 9:47, 9:47], plain[..., 9:47, 9:47])
    mean, std = (np.asarray(cfg[k], np.float32)[:, None] for k in ("image_mean", "image_std"))
    x = plain[0, :, 0, :] * std + mean  # the top row, back in [0, 1]
    summed = x + delta.numpy()[:, 0, :]
    assert (summed < 0).any() and (summed > 1).any()  # the clip is exercised
    np.testing.assert_allclose(device[0, :, 0, :], (np.clip(summed, 0, 1) - mean) / std, rtol=0, atol=1e-5)


def test_prompt_files_round_trip_and_damage_is_refused(tmp_path):
    d = write_prompt(tmp_path / "p", size=28, frame=4)
    prompt = VisualPrompt.load(d)
    assert prompt.inner_size == 20 and prompt.sha256 == sha256_file(d / PROMPT_WEIGHTS)
    np.testing.assert_array_equal(prompt.delta, random_delta(28, 4).numpy())
    np.testing.assert_array_equal(read_tensor(d / PROMPT_WEIGHTS, "delta"), prompt.delta)

    (d / PROMPT_WEIGHTS).write_bytes((d / PROMPT_WEIGHTS).read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(VisualPromptError, match="sha256"):
        VisualPrompt.load(d)
    (d / PROMPT_WEIGHTS).write_bytes(b"\x10\0\0\0\0\0\0\0{}")
    with pytest.raises(VisualPromptError, match="not a safetensors"):
        read_tensor(d / PROMPT_WEIGHTS, "delta")
    config = json.loads((d / PROMPT_CONFIG).read_text())
    (d / PROMPT_CONFIG).write_text(json.dumps({**config, "inner_size": 19}))
    with pytest.raises(VisualPromptError, match="inner_size"):
        VisualPrompt.load(d)
    with pytest.raises(VisualPromptError, match="no visual_prompt.json"):
        VisualPrompt.load(tmp_path / "nothing")
    save_prompt(d, torch.ones(3, 28, 28), {"frame": 4, "image_size": 28, "inner_size": 20}, {})
    with pytest.raises(VisualPromptError, match="not zero inside"):
        VisualPrompt.load(d)

    overlay = VisualPrompt.load(write_prompt(tmp_path / "o", geometry="overlay"))
    assert overlay.geometry == "overlay" and overlay.inner_size == 28 and overlay.delta.min() < 0
    config = json.loads((tmp_path / "o" / PROMPT_CONFIG).read_text())
    for change, needle in (({"geometry": "spiral"}, "geometry"), ({"inner_size": 20}, "inner_size")):
        (tmp_path / "o" / PROMPT_CONFIG).write_text(json.dumps({**config, **change}))
        with pytest.raises(VisualPromptError, match=needle) as err:
            VisualPrompt.load(tmp_path / "o")
        assert "\n" not in str(err.value)
    write_prompt(tmp_path / "p")
    legacy = {k: v for k, v in json.loads((tmp_path / "p" / PROMPT_CONFIG).read_text()).items() if k != "geometry"}
    (tmp_path / "p" / PROMPT_CONFIG).write_text(json.dumps(legacy))  # written before geometry existed: pad
    assert VisualPrompt.load(tmp_path / "p").geometry == "pad"


def test_attach_detach_round_trip_through_the_cli(bundles, image, tmp_path, capsys):
    original = bundles("llama", pipmm=True)
    bundle = tmp_path / "b"
    shutil.copytree(original, bundle)
    prompt_dir = write_prompt(tmp_path / "p")
    assert main(["prompt", "attach", str(bundle), str(prompt_dir)]) == 0
    loaded = load_bundle(bundle)  # every file verified, the prompt's too
    section = loaded.manifest.visual_prompt
    assert section.frame == 4 and section.inner_size == 20 and section.image_size == 28
    assert section.sha256 == loaded.manifest.files[PROMPT_WEIGHTS].sha256 == sha256_file(prompt_dir / PROMPT_WEIGHTS)
    assert section.settings["source"] == {"checkpoint": "test"}
    assert Manifest.from_dict(loaded.manifest.to_dict(), "m", sdk_version="0.1.0") == loaded.manifest

    attached = sdk.load(bundle, device="cpu")
    loose = sdk.load(original, device="cpu", visual_prompt=prompt_dir)
    plain = sdk.load(original, device="cpu")
    np.testing.assert_array_equal(attached.pixel_values(image), VisualPrompt.load(prompt_dir).preprocess(
        image, plain.preprocessing))
    np.testing.assert_array_equal(attached.pixel_values(image), loose.pixel_values(image))
    np.testing.assert_array_equal(plain.pixel_values(image, visual_prompt=prompt_dir), loose.pixel_values(image))
    np.testing.assert_array_equal(attached.pixel_values(image, visual_prompt=False), plain.pixel_values(image))
    ids = attached.generate(image, "what is it?", max_new_tokens=5).token_ids
    assert loose.generate(image, "what is it?", max_new_tokens=5).token_ids == ids
    assert plain.generate(image, "what is it?", max_new_tokens=5, visual_prompt=prompt_dir).token_ids == ids
    assert "".join(plain.stream(image, "what is it?", max_new_tokens=5, visual_prompt=prompt_dir)) == \
        attached.describe(image, "what is it?", max_new_tokens=5)
    framed = attached.backend.vision(attached.pixel_values(image), attached.encode_prompt("what is it?"))
    unframed = plain.backend.vision(plain.pixel_values(image), plain.encode_prompt("what is it?"))
    assert not np.allclose(framed.visual_tokens, unframed.visual_tokens)

    err = one_line_error(["prompt", "attach", bundle, prompt_dir], capsys)
    assert "already carries a visual prompt" in err
    assert main(["prompt", "attach", str(bundle), str(write_prompt(tmp_path / "q", seed=1)), "--overwrite"]) == 0
    assert load_bundle(bundle).manifest.visual_prompt.sha256 == sha256_file(tmp_path / "q" / PROMPT_WEIGHTS)

    assert main(["prompt", "detach", str(bundle)]) == 0
    after = load_bundle(bundle).manifest
    assert after.visual_prompt is None and not (bundle / PROMPT_WEIGHTS).exists()
    assert after.files == load_bundle(original).manifest.files
    assert "carries no visual prompt" in one_line_error(["prompt", "detach", bundle], capsys)


def test_attach_to_a_new_bundle_leaves_the_original_alone(bundles, tmp_path, capsys):
    original = bundles("llama")
    before = (original / "manifest.json").read_text()
    prompt_dir = write_prompt(tmp_path / "p")
    assert main(["prompt", "attach", str(original), str(prompt_dir), "--out", str(tmp_path / "new")]) == 0
    assert (original / "manifest.json").read_text() == before and not (original / PROMPT_WEIGHTS).exists()
    new = load_bundle(tmp_path / "new")
    assert new.manifest.visual_prompt is not None and set(new.manifest.files) == \
        set(load_bundle(original).manifest.files) | {PROMPT_WEIGHTS}
    assert main(["prompt", "detach", str(tmp_path / "new"), "--out", str(tmp_path / "bare")]) == 0
    assert load_bundle(tmp_path / "bare").manifest.files == load_bundle(original).manifest.files
    capsys.readouterr()
    assert main(["prompt", "show", str(tmp_path / "new")]) == 0
    assert json.loads(capsys.readouterr().out)["frame"] == 4


def test_a_prompt_of_another_input_size_is_refused_in_one_line(bundles, image, tmp_path, capsys):
    bundle = bundles("llama")
    other = write_prompt(tmp_path / "p32", size=32, frame=4)
    err = one_line_error(["prompt", "attach", bundle, other, "--out", tmp_path / "x"], capsys)
    assert "is for 32x32 input" in err and "takes 28x28" in err and not (tmp_path / "x").exists()
    err = one_line_error(["describe", tmp_path / "none.png", "hi", "--bundle", bundle, "--visual-prompt", other],
                         capsys)
    assert "is for 32x32 input" in err
    with pytest.raises(VisualPromptError, match="is for 32x32"):
        sdk.load(bundle, device="cpu").generate(image, "hi", visual_prompt=other)
    assert "no visual_prompt.json" in one_line_error(["prompt", "attach", bundle, tmp_path], capsys)


def test_an_overlay_prompt_attaches_and_frames_the_full_size_image(bundles, image, tmp_path, capsys):
    original = bundles("llama", pipmm=True)
    prompt_dir = write_prompt(tmp_path / "o", geometry="overlay")
    bundle = attach(original, prompt_dir, tmp_path / "b")
    section = load_bundle(bundle).manifest.visual_prompt
    assert section.geometry == "overlay" and section.inner_size == section.image_size == 28
    attached, plain = sdk.load(bundle, device="cpu"), sdk.load(original, device="cpu")
    framed, unframed = attached.pixel_values(image), plain.pixel_values(image)
    np.testing.assert_array_equal(framed, VisualPrompt.load(prompt_dir).preprocess(image, plain.preprocessing))
    np.testing.assert_array_equal(framed[..., 4:24, 4:24], unframed[..., 4:24, 4:24])  # the inside untouched
    assert not np.allclose(framed[..., :4, :], unframed[..., :4, :])
    assert attached.generate(image, "what is it?", max_new_tokens=4).token_ids == \
        plain.generate(image, "what is it?", max_new_tokens=4, visual_prompt=prompt_dir).token_ids
    assert VisualPrompt.load(prompt_dir).model_box((1.0, 2.0, 3.0, 4.0)) == (1.0, 2.0, 3.0, 4.0)
    capsys.readouterr()
    assert main(["prompt", "show", str(bundle)]) == 0
    assert json.loads(capsys.readouterr().out)["geometry"] == "overlay"
    other = write_prompt(tmp_path / "o32", size=32, frame=4, geometry="overlay")
    assert "is for 32x32 input" in one_line_error(["prompt", "attach", original, other, "--out", tmp_path / "x"],
                                                  capsys)
    data = json.loads((bundle / "manifest.json").read_text())
    for change, needle in (({"geometry": "spiral"}, "geometry"), ({"inner_size": 20}, "inner_size")):
        with pytest.raises(BundleError, match=needle):
            Manifest.from_dict({**data, "visual_prompt": {**data["visual_prompt"], **change}}, "b/manifest.json",
                               sdk_version="0.1.0")


def test_the_manifest_section_is_checked_field_by_field(bundles, tmp_path):
    bundle = attach(bundles("llama"), write_prompt(tmp_path / "p"), tmp_path / "b")
    data = json.loads((bundle / "manifest.json").read_text())
    for change, needle in [({"frame": 14}, "frame"), ({"inner_size": 21}, "inner_size"),
                           ({"sha256": "abc"}, "sha256"), ({"sha256": "0" * 64}, "not listed")]:
        bad = {**data, "visual_prompt": {**data["visual_prompt"], **change}}
        with pytest.raises(BundleError, match=needle) as err:
            Manifest.from_dict(bad, "b/manifest.json", sdk_version="0.1.0")
        assert "\n" not in str(err.value)
    manifest = Manifest.from_dict(data, "b/manifest.json", sdk_version="0.1.0")
    assert replace(manifest, visual_prompt=None).to_dict().get("visual_prompt") is None


def test_describe_and_eval_take_a_prompt_directory(bundles, image, tmp_path, capsys):
    from PIL import Image

    bundle, prompt_dir = bundles("llama"), write_prompt(tmp_path / "p")
    Image.fromarray(image).save(tmp_path / "frame.png")
    argv = ["describe", str(tmp_path / "frame.png"), "what is it?", "--bundle", str(bundle), "--json",
            "--max-new-tokens", "4", "--device", "cpu"]
    assert main(argv + ["--visual-prompt", str(prompt_dir)]) == 0
    framed = json.loads(capsys.readouterr().out)["token_ids"]
    expected = sdk.load(bundle, device="cpu").generate(image, "what is it?", max_new_tokens=4,
                                                       visual_prompt=prompt_dir).token_ids
    assert framed == expected
    assert main(["eval", str(bundle), "--n", "3", "--quiet", "--device", "cpu", "--visual-prompt", str(prompt_dir),
                 "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["source"]["visual_prompt"] == str(prompt_dir)
    assert "export the checkpoint" in one_line_error(["eval", "--checkpoint", tmp_path, "--visual-prompt",
                                                      prompt_dir], capsys)
