"""Several image parts in a user message are several frames (sdk/frames.py, docs/multi-image.md), through
`pipmm serve` and the official openai client: concat and an adapter bundle, whole and streamed, and the 400s."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from server_process import ServerProcess, data_url, png_bytes

openai = pytest.importorskip("openai")

import sdk  # noqa: E402
from export.multi_image import set_concat  # noqa: E402
from helpers import adapter_bundle  # noqa: E402
from sdk.server.config import ServerConfig  # noqa: E402
from sdk.server.errors import ApiError  # noqa: E402
from sdk.server.parsing import parse_chat  # noqa: E402

QUESTION = "How many crosses are there in all the frames?"
TOKENS = 8
N_MAX = 3


@pytest.fixture(scope="module")
def pngs(image):
    """Four different frames as PNG bytes."""
    return [png_bytes(np.roll(image, 11 * i, axis=0)) for i in range(4)]


def frames_turn(prompt: str, pngs: list[bytes]) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": prompt},
                                         *({"type": "image_url", "image_url": {"url": data_url(p)}} for p in pngs)]}]


def decoded(pngs: list[bytes]) -> list[Image.Image]:
    import io
    return [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs]


@pytest.fixture(scope="module")
def bundle_dirs(bundles, tmp_path_factory):
    """mode -> bundle: the PIP-MM half-budget bundle as concat with N_MAX frames, and with a random mivpg adapter."""
    source = bundles("llama", pipmm=True, budget="half", reducer="prompt-topk")
    root = tmp_path_factory.mktemp("frame-bundles")
    concat = set_concat(shutil.copytree(source, root / "concat"), n_max=N_MAX)
    mivpg = adapter_bundle(source, root / "mivpg", "mivpg", N_MAX, seed=3)[0]
    return {"concat": concat, "mivpg": mivpg}


@pytest.fixture(scope="module")
def served(bundle_dirs, tmp_path_factory):
    """mode -> (openai client, model name, the same bundle's Pipeline), one server process per mode."""
    processes, out = [], {}
    for mode, bundle in bundle_dirs.items():
        processes.append(ServerProcess(bundle, log=tmp_path_factory.mktemp("serve") / f"{mode}.log"))
        client = openai.OpenAI(base_url=processes[-1].url + "/v1", api_key="none", max_retries=0)
        out[mode] = client, bundle.name, sdk.load(bundle, device="cpu")
    yield out
    for process in processes:
        process.stop()


@pytest.mark.parametrize("mode", ["concat", "mivpg"])
def test_several_image_parts_are_frames_whole_and_streamed(mode, served, pngs):
    client, model, pipeline = served[mode]
    for n in (1, 2, N_MAX):
        images = decoded(pngs[:n])
        expected = pipeline.generate(images if n > 1 else images[0], QUESTION, max_new_tokens=TOKENS)
        answer = client.chat.completions.create(model=model, messages=frames_turn(QUESTION, pngs[:n]),
                                                max_tokens=TOKENS)
        assert answer.choices[0].message.content == expected.text, n
        timings = answer.to_dict()["timings"]
        assert timings["visual_tokens"] == expected.visual_tokens == (6 if mode == "mivpg" else n * 25)
        prompt_ids = pipeline.frames.prompt_ids(pipeline.prompter, QUESTION, n)[0]
        assert answer.usage.prompt_tokens == len(prompt_ids)
        assert answer.usage.completion_tokens == len(expected.token_ids)
        streamed = client.chat.completions.create(model=model, messages=frames_turn(QUESTION, pngs[:n]),
                                                  max_tokens=TOKENS, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected.text


@pytest.mark.parametrize("mode", ["concat", "mivpg"])
def test_more_frames_than_n_max_and_misplaced_images_are_400(mode, served, pngs):
    client, model, _ = served[mode]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match=f"4 images, but this bundle takes at most {N_MAX}") as err:
            client.chat.completions.create(model=model, messages=frames_turn(QUESTION, pngs), max_tokens=TOKENS,
                                           stream=stream)
        assert err.value.code == "too_many_images"
    split = frames_turn("a", pngs[:1]) + [{"role": "assistant", "content": "b"}] + frames_turn("c", pngs[1:2])
    with pytest.raises(openai.BadRequestError, match="belong in one user message") as err:
        client.chat.completions.create(model=model, messages=split, max_tokens=TOKENS)
    assert err.value.code == "too_many_images"
    with pytest.raises(openai.BadRequestError, match="a region refers to one image") as err:
        client.chat.completions.create(model=model, messages=frames_turn(QUESTION, pngs[:2]), max_tokens=TOKENS,
                                       extra_body={"regions": [{"type": "box", "box": [1, 1, 9, 9]}]})
    assert err.value.code == "invalid_region"
    answer = client.chat.completions.create(model=model, messages=frames_turn(QUESTION, pngs[:2]), max_tokens=2)
    assert answer.choices[0].message.content is not None  # still serving


def test_a_bundle_that_takes_one_frame_refuses_several(bundles, tmp_path, pngs):
    """n_max 1 (the embedded default bundle's case: 256 patch positions a frame in a context of 512): a 400 that
    says so, before any image is decoded; explain takes one image whatever the bundle."""
    source = bundles("llama", pipmm=True, budget="half", reducer="prompt-topk")
    one = sdk.load(set_concat(shutil.copytree(source, tmp_path / "one"), n_max=1), device="cpu")
    config = ServerConfig(bundle=str(tmp_path / "one"))
    body = {"model": "one", "messages": frames_turn(QUESTION, [b"not decoded"] * 2)}
    with pytest.raises(ApiError, match="2 images, but this bundle takes at most 1 per request") as err:
        parse_chat(body, config, one.num_visual_tokens, one.frames)
    assert (err.value.status, err.value.code) == (400, "too_many_images")
    with pytest.raises(ApiError, match="this endpoint takes one image"):
        parse_chat(body, config, one.num_visual_tokens)
    single = parse_chat({**body, "messages": frames_turn(QUESTION, pngs[:1])}, config, one.num_visual_tokens,
                        one.frames)
    assert isinstance(single.image, Image.Image) and single.turns is None


@pytest.mark.parametrize("mode", ["concat", "mivpg"])
def test_a_conversation_about_several_frames(mode, served, pngs):
    """The frames in the first user message, a follow-up question: answered as Pipeline.chat on the same messages
    (the SDK's Conversation over the whole conversation), whole and streamed."""
    client, model, pipeline = served[mode]
    first = pipeline.describe(decoded(pngs[:2]), QUESTION, max_new_tokens=TOKENS)
    sdk_messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                 *({"type": "image", "image": im} for im in decoded(pngs[:2]))]},
                    {"role": "assistant", "content": first}, {"role": "user", "content": "Which frame is darker?"}]
    expected = pipeline.chat(sdk_messages, max_new_tokens=TOKENS)
    messages = [*frames_turn(QUESTION, pngs[:2]), {"role": "assistant", "content": first},
                {"role": "user", "content": "Which frame is darker?"}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=TOKENS)
    assert whole.choices[0].message.content == expected.text
    assert whole.to_dict()["timings"]["visual_tokens"] == expected.visual_tokens == (6 if mode == "mivpg" else 50)
    streamed = client.chat.completions.create(model=model, messages=messages, max_tokens=TOKENS, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected.text
