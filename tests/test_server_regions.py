"""The `regions` extension of /v1/chat/completions (docs/server.md), through the official openai client's
extra_body: answers equal the SDK's with the same region, the report comes back, bad regions are typed 400s."""

from __future__ import annotations

import numpy as np
import pytest

from server_process import ServerProcess, data_url, png_bytes, user_turn

openai = pytest.importorskip("openai")
pytest.importorskip("torch")

import sdk  # noqa: E402

PROMPT = "what is the color of the shape"
TOKENS = 6
BOX = [14, 6, 44, 36]  # inside the 45x61 test image's center crop


@pytest.fixture(scope="module")
def server(referring_bundle, tmp_path_factory):
    process = ServerProcess(referring_bundle, log=tmp_path_factory.mktemp("serve-regions") / "server.log")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="any", max_retries=0)


@pytest.fixture(scope="module")
def ref_pipe(referring_bundle):
    return sdk.load(referring_bundle, device="cpu")


@pytest.fixture(scope="module")
def url(image):
    return data_url(png_bytes(image))


def ask(client, model, url, regions, prompt=PROMPT, **options):
    return client.chat.completions.create(model=model, messages=user_turn(prompt, url), max_tokens=TOKENS,
                                          extra_body={"regions": regions}, **options)


def test_a_box_answers_as_generate_with_the_box(client, referring_bundle, url, image, ref_pipe):
    model = referring_bundle.name
    want = ref_pipe.generate(image, PROMPT, max_new_tokens=TOKENS, region=sdk.Box(*BOX), referring="controlmllm++")
    answer = ask(client, model, url, [{"type": "box", "box": BOX, "referring": "controlmllm++"}])
    assert answer.choices[0].message.content == want.text
    report = answer.to_dict()["referring"]
    assert report["method"] == "controlmllm++" and report["region"] == "box" and report["steps"] == 3
    np.testing.assert_allclose(report["energies"], want.referring["energies"], rtol=1e-5)
    chunks = list(ask(client, model, url, [{"type": "box", "box": BOX, "referring": "controlmllm++"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].to_dict()["referring"]["steps"] == 3
    meta = client.models.list().data[0].to_dict()["meta"]
    assert meta["referring"] == ["controlmllm", "controlmllm++", "overlay"]


def test_every_region_type_and_a_conversation(client, referring_bundle, url, image, ref_pipe):
    model = referring_bundle.name
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[10:30, 20:40] = 255
    sent = {"point": ({"type": "point", "points": [[30, 20], [25, 18]]}, sdk.Point([(30, 20), (25, 18)])),
            "scribble": ({"type": "scribble", "points": [[15, 10], [45, 35]]}, sdk.Scribble([(15, 10), (45, 35)])),
            "mask": ({"type": "mask", "mask": data_url(png_bytes(mask)), "referring": "overlay"}, sdk.Mask(mask))}
    for kind, (spec, region) in sent.items():
        want = ref_pipe.generate(image, PROMPT, max_new_tokens=TOKENS, region=region, referring=spec.get("referring"))
        answer = ask(client, model, url, [spec])
        assert answer.choices[0].message.content == want.text, kind
        assert answer.to_dict()["referring"]["region"] == kind
    messages = user_turn(PROMPT, url) + [{"role": "assistant", "content": "red"},
                                         {"role": "user", "content": "and this one?"}]
    region = {"type": "box", "box": BOX, "referring": "controlmllm"}
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=TOKENS,
                                            extra_body={"regions": [region]})
    sdk_messages = [{"role": "user", "content": [{"type": "text", "text": PROMPT}, {"type": "image", "image": image}]},
                    {"role": "assistant", "content": "red"}, {"role": "user", "content": "and this one?"}]
    want = ref_pipe.chat(sdk_messages, max_new_tokens=TOKENS, region=sdk.Box(*BOX), referring="controlmllm")
    assert answer.choices[0].message.content == want.text and answer.to_dict()["referring"]["steps"] > 0


@pytest.mark.parametrize("regions, match", [
    ([{"type": "box", "box": [0, 0, 500, 10]}], "not inside the 61x45 image"),
    ([{"type": "box", "box": [1, 2, 3]}], "list of 4 numbers"),
    ([{"type": "arrow"}], "type 'arrow' is unknown"),
    ([{"type": "box", "box": BOX}, {"type": "point", "point": [3, 4]}], "one region per request"),
    ({"type": "box", "box": BOX}, "list of one region"),
    ([{"type": "point", "point": [30, 20], "referring": "gaze"}], "referring 'gaze' is unknown"),
    ([{"type": "point", "points": []}], "non-empty list"),
    ([{"type": "mask", "mask": "data:image/png;base64,!!"}], "regions\\[0\\].mask: image_url data: URL holds invalid"),
    ([{"type": "point", "point": [0, 0]}], "outside the part of the image the model sees"),
])
def test_bad_regions_are_typed_400s(client, referring_bundle, url, regions, match):
    with pytest.raises(openai.BadRequestError, match=match) as caught:
        ask(client, referring_bundle.name, url, regions)
    assert caught.value.body["code"] == "invalid_region" and caught.value.body["param"] in ("regions", None)


def test_masks_of_another_size_or_empty_are_refused(client, referring_bundle, url, image):
    for mask, match in [(np.full((10, 10), 255, np.uint8), "mask is 10x10 but the image is 61x45"),
                        (np.zeros(image.shape[:2], np.uint8), "mask is empty")]:
        with pytest.raises(openai.BadRequestError, match=match):
            ask(client, referring_bundle.name, url, [{"type": "mask", "mask": data_url(png_bytes(mask))}])
