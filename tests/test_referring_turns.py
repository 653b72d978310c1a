"""Regions beyond generate() (docs/referring.md): Pipeline.stream (the same loop, then a streamed decode) and
conversations (a region on a turn's image, for that turn; the cache re-prefilled from the image where the
visual tokens change)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import sdk  # noqa: E402
from sdk.regions import RegionError  # noqa: E402

PROMPT = "what is the color of the shape"
BOX = sdk.Box(14, 6, 44, 36)  # inside the 45x61 test image's center crop
TOKENS = 6


@pytest.fixture(scope="module")
def ref_pipe(referring_bundle):
    return sdk.load(referring_bundle, device="cpu")


@pytest.mark.parametrize("method", ["controlmllm", "controlmllm++", "overlay"])
def test_stream_with_a_region_equals_generate(ref_pipe, image, method):
    want = ref_pipe.generate(image, PROMPT, max_new_tokens=TOKENS, region=BOX, referring=method)
    result = ref_pipe.new_result()
    pieces = list(ref_pipe.stream(image, PROMPT, max_new_tokens=TOKENS, region=BOX, referring=method, result=result))
    assert "".join(pieces) == want.text and result.token_ids == want.token_ids
    assert result.referring["method"] == method and result.referring["steps"] == want.referring["steps"]
    np.testing.assert_allclose(result.referring["energies"], want.referring["energies"], rtol=1e-6)
    if method != "overlay":
        assert want.referring["steps"] > 0 and "referring_ms" in result.timings


def test_stream_refuses_a_bad_region_before_any_token(ref_pipe, image):
    stream = ref_pipe.stream(image, PROMPT, region=sdk.Box(0, 0, 500, 10))
    with pytest.raises(RegionError, match="not inside the 61x45 image"):
        next(stream)


@pytest.mark.parametrize("method", ["controlmllm++", "overlay"])
def test_a_first_turn_with_a_region_equals_generate(ref_pipe, image, method):
    """The LLaVA-1.5 conversation of one turn is the single-turn prompt (test_conversation.py), so the latent is
    optimised over the same embeddings and the answer is the same."""
    want = ref_pipe.generate(image, PROMPT, max_new_tokens=TOKENS, region=BOX, referring=method)
    got = ref_pipe.conversation(image).ask(PROMPT, max_new_tokens=TOKENS, region=BOX, referring=method)
    assert got.token_ids == want.token_ids and got.referring["steps"] == want.referring["steps"]
    np.testing.assert_allclose(got.referring["energies"], want.referring["energies"], rtol=1e-5)


def test_a_regions_turn_steers_that_turn_only(ref_pipe, image):
    conv = ref_pipe.conversation(image)
    first = conv.ask(PROMPT, max_new_tokens=TOKENS)
    steered = conv.ask("and this one?", max_new_tokens=TOKENS, region=BOX, referring="controlmllm")
    slot = int(ref_pipe.prompter.conversation_ids(conv.renderer.render(conv.messages))[1][0])
    assert steered.referring["steps"] > 0 and steered.cached_tokens <= slot  # prefilled again from the image on
    # what a fresh conversation answers with the same history and the same region
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]},
                {"role": "assistant", "content": first.text}, {"role": "user", "content": "and this one?"}]
    fresh = ref_pipe.chat(messages, max_new_tokens=TOKENS, region=BOX, referring="controlmllm")
    assert fresh.token_ids == steered.token_ids
    np.testing.assert_allclose(fresh.referring["energies"], steered.referring["energies"], rtol=1e-5)
    # the next plain turn sees the plain visual tokens again: as a conversation that never had a region
    plain = conv.ask("what else?", max_new_tokens=TOKENS)
    assert plain.referring is None and plain.cached_tokens <= slot
    again = ref_pipe.conversation(image)
    again.ask(PROMPT, max_new_tokens=TOKENS)
    again.messages += [{"role": "user", "content": [{"type": "text", "text": "and this one?"}]},
                       {"role": "assistant", "content": [{"type": "text", "text": steered.text}]}]
    assert again.ask("what else?", max_new_tokens=TOKENS).token_ids == plain.token_ids
    # and a plain turn after it keeps the whole cache
    assert conv.ask("one more?", max_new_tokens=TOKENS).cached_tokens > slot


def test_a_bad_region_leaves_the_conversation_as_it_was(ref_pipe, image):
    conv = ref_pipe.conversation(image)
    with pytest.raises(RegionError, match="outside"):
        conv.ask(PROMPT, region=sdk.Point(200, 5))
    with pytest.raises(RegionError, match="unknown"):
        conv.stream(PROMPT, region=BOX, referring="arrow")
    assert conv.messages == []
    assert conv.ask(PROMPT, max_new_tokens=TOKENS).token_ids == ref_pipe.generate(image, PROMPT,
                                                                                  max_new_tokens=TOKENS).token_ids


def test_cli_streams_with_a_region(referring_bundle, ref_pipe, image, tmp_path, capsys):
    from PIL import Image

    from sdk.cli import main

    path = tmp_path / "frame.png"
    Image.fromarray(image).save(path)
    assert main(["describe", str(path), PROMPT, "--bundle", str(referring_bundle), "--device", "cpu",
                 "--max-new-tokens", "4", "--box", "14,6,44,36", "--referring", "controlmllm++", "--stream"]) == 0
    want = ref_pipe.generate(image, PROMPT, region=BOX, referring="controlmllm++", max_new_tokens=4).text
    assert capsys.readouterr().out == want + "\n"
