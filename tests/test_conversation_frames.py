"""Conversations about several frames (sdk/conversation.py, sdk/frames.py): the frames sit in the first user turn,
their tokens are cached as the image's, and a follow-up turn equals a fresh run of the whole conversation:
transformers' own generate for concat, a stateless chat() and the PyTorch reference for an adapter bundle."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sdk  # noqa: E402
from chat_checkpoints import transformers_run  # noqa: E402
from helpers import adapter_bundle, frames  # noqa: E402
from export.reference import reference_pipeline  # noqa: E402
from sdk.conversation import common_prefix  # noqa: E402
from sdk.errors import PromptError  # noqa: E402
from sdk.frames import FrameCountError  # noqa: E402

FIRST = "what is the color of the star left of the circle?"
SECOND = "how many squares are there?"
NEW = 12
N_MAX = 4


def messages(images, answer: str | None = None, pil: bool = False) -> list[dict]:
    """The conversation with the frames in its first user turn (PIL images for transformers' processor)."""
    from PIL import Image

    parts = [{"type": "image", "image": Image.fromarray(im) if pil else im} for im in images]
    turns = [{"role": "user", "content": [*parts, {"type": "text", "text": FIRST}]}]
    if answer is not None:
        turns += [{"role": "assistant", "content": [{"type": "text", "text": answer}]},
                  {"role": "user", "content": [{"type": "text", "text": SECOND}]}]
    return turns


@pytest.mark.parametrize("case", ["llama-bos-llava15", "qwen2-chatml"])
def test_concat_follow_up_equals_transformers_on_the_whole_conversation(case, chat_bundles):
    path, bundle = chat_bundles(case)
    pipeline = sdk.load(bundle, device="cpu")
    images = frames(2, seed=8)  # a random model's answer without control bytes (the SDK strips them from messages)
    conv = pipeline.conversation(images)
    first = conv.ask(FIRST, max_new_tokens=NEW)
    assert first.token_ids == transformers_run(path, None, messages=messages(images, pil=True), new_tokens=NEW)[1]
    assert (first.frames, first.visual_tokens) == (2, 2 * pipeline.num_visual_tokens)
    before = list(conv.cached_ids)
    first_prompt = len(pipeline.frames.prompt_ids(pipeline.prompter, FIRST, 2)[0])
    second = conv.ask(SECOND, max_new_tokens=NEW)
    expected_ids, expected_tokens = transformers_run(path, None, messages=messages(images, first.text, pil=True),
                                                     new_tokens=NEW)
    assert conv.cached_ids[:len(expected_ids)] == expected_ids
    assert second.token_ids == expected_tokens and len(expected_tokens) >= 4
    # both frames and the first question come from the cache: only the new turn (and whatever of the generated
    # answer re-tokenizes differently) is prefilled
    assert second.cached_tokens == common_prefix(before, expected_ids) >= first_prompt
    assert conv.prefilled == len(expected_ids) - second.cached_tokens
    assert pipeline.chat(messages(images, first.text), max_new_tokens=NEW).token_ids == expected_tokens


@pytest.fixture(scope="module")
def adapter(bundles, tmp_path_factory):
    """(bundle, adapter module): the PIP-MM half-budget bundle with a random mivpg adapter for N_MAX frames."""
    return adapter_bundle(bundles("llama", pipmm=True, budget="half", reducer="prompt-topk"),
                          tmp_path_factory.mktemp("mivpg") / "bundle", "mivpg", N_MAX, seed=4)


def test_adapter_follow_up_equals_a_fresh_run_and_the_reference(adapter, checkpoints, prompt_mlp):
    path, module = adapter
    pipeline = sdk.load(path, device="cpu")
    images = frames(3, seed=6)
    conv = pipeline.conversation(images)
    first = conv.ask(FIRST, max_new_tokens=NEW)
    # one turn: the single-turn request's layout, one placeholder holding the adapter's R tokens
    assert first.token_ids == pipeline.generate(images, FIRST, max_new_tokens=NEW).token_ids
    assert (first.frames, first.visual_tokens) == (3, 6)
    assert [p["type"] for p in conv.messages[0]["content"]] == ["image", "text"]
    # PIP-MM: every frame encoded once, with the first question's prompt vector; the pooled tokens are cached
    pixels = np.concatenate([pipeline.pixel_values(im) for im in images])
    for question, same in ((FIRST, True), (SECOND, False)):
        vision = pipeline.backend.vision(pixels, np.repeat(pipeline.encode_prompt(question), 3, axis=0))
        pooled = pipeline.frames.combine(pipeline.backend, vision.visual_tokens, vision.kept_patches)[0]
        assert np.allclose(conv.cached_visual, pooled, atol=1e-5) == same, question
    second = conv.ask(SECOND, max_new_tokens=NEW)
    first_prompt = len(pipeline.frames.prompt_ids(pipeline.prompter, FIRST, 3)[0])
    assert second.cached_tokens >= first_prompt and conv.prefilled < len(conv.cached_ids) - first_prompt
    fresh = pipeline.chat(messages(images, first.text), max_new_tokens=NEW)
    assert fresh.cached_tokens == 0 and second.token_ids == fresh.token_ids and len(fresh.token_ids) > 0
    reference = reference_pipeline(checkpoints["llama"], prompt_mlp=prompt_mlp, budget="half", reducer="prompt-topk",
                                   adapter=module, n_max=N_MAX)
    assert reference.chat(messages(images, first.text), max_new_tokens=NEW).token_ids == second.token_ids
    streamed = "".join(pipeline.conversation(images).stream(FIRST, max_new_tokens=NEW))
    assert streamed == first.text


def test_frame_errors_in_conversations(adapter):
    pipeline = sdk.load(adapter[0], device="cpu")
    with pytest.raises(FrameCountError, match=f"5 images, but this bundle takes at most {N_MAX}"):
        pipeline.conversation(frames(5))
    with pytest.raises(FrameCountError, match="no image given"):
        pipeline.conversation([])
    with pytest.raises(FrameCountError, match="takes one image: this conversation holds 2 frames") as err:
        pipeline.conversation(frames(2)).ask(FIRST, region=sdk.Box(0, 0, 5, 5))
    assert "\n" not in str(err.value)
    two_turns = messages(frames(1), "a") + [{"role": "user", "content": [{"type": "image", "image": frames(1)[0]},
                                                                          {"type": "text", "text": SECOND}]}]
    del two_turns[2]
    with pytest.raises(PromptError, match="in 2 user turns"):
        pipeline.chat(two_turns)
