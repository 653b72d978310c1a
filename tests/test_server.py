"""`pipmm serve` as a real process on 127.0.0.1, driven by the official openai client (docs/server.md)."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

from server_process import ServerProcess, data_url, png_bytes, user_turn

openai = pytest.importorskip("openai")

import sdk  # noqa: E402

KEY = "test-key"
TOKENS = 8


@pytest.fixture(scope="module")
def bundle_dir(bundles):
    return bundles("llama", pipmm=True, budget="half", reducer="prompt-topk")


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    process = ServerProcess(bundle_dir, "--workers", 2, "--api-key", KEY, "--max-body-mb", 1,
                            log=tmp_path_factory.mktemp("serve") / "server.log")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(bundle_dir):
    return bundle_dir.name


@pytest.fixture(scope="module")
def frames(image, tmp_path_factory):
    """(png path, data URL) of four different frames."""
    root = tmp_path_factory.mktemp("frames")
    out = []
    for i in range(4):
        png = png_bytes(np.roll(image, 9 * i, axis=1) if i else image)
        path = root / f"frame{i}.png"
        path.write_bytes(png)
        out.append((path, data_url(png)))
    return out


def ask(client, model, url, prompt="What is in the image?", **options):
    return client.chat.completions.create(model=model, messages=user_turn(prompt, url),
                                          max_tokens=options.pop("max_tokens", TOKENS), **options)


def test_answers_and_streams_equal_describe(client, model, frames, pipe):
    path, url = frames[0]
    expected = pipe.describe(path, "What is in the image?", max_new_tokens=TOKENS)
    answer = ask(client, model, url)
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason in ("stop", "length")
    prompt_tokens = len(pipe.prompter.prompt_ids("What is in the image?")[0])
    completion_tokens = len(pipe.generate(path, "What is in the image?", max_new_tokens=TOKENS).token_ids)
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert answer.usage.total_tokens == prompt_tokens + completion_tokens
    timings = answer.to_dict()["timings"]
    assert timings["prompt_n"] == prompt_tokens and timings["predicted_n"] == completion_tokens
    assert timings["visual_tokens"] == pipe.num_visual_tokens
    for key in ("prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_ms", "predicted_per_token_ms",
                "predicted_per_second", "vision_ms"):
        assert timings[key] >= 0, key
    assert timings["vision_ms"] > 0 and timings["prompt_ms"] >= timings["vision_ms"]

    chunks = list(ask(client, model, url, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].to_dict()["timings"]["predicted_n"] == completion_tokens
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == completion_tokens


def test_sampling_options_stop_strings_and_extensions(client, model, frames, pipe):
    path, url = frames[1]
    prompt = "Describe it."
    sampled = pipe.describe(path, prompt, max_new_tokens=TOKENS, temperature=0.9, top_p=0.8, seed=3)
    assert ask(client, model, url, prompt, temperature=0.9, top_p=0.8, seed=3).choices[0].message.content == sampled
    full = pipe.describe(path, prompt, max_new_tokens=24, min_new_tokens=24)
    assert len(full) >= 6
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = full[:full.find(stop)]
    options = dict(max_tokens=24, stop=[stop], extra_body={"min_tokens": 24})
    answer = ask(client, model, url, prompt, **options)
    assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (cut, "stop")
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, model, url, prompt, stream=True, **options))
    assert streamed == cut
    # Extensions: inhibit (CMAI), the visual-token budget (fixed per bundle)
    assert pipe.cmai is not None
    inhibited = pipe.describe(path, prompt, max_new_tokens=TOKENS, inhibit=0.5)
    assert ask(client, model, url, prompt, extra_body={"inhibit": 0.5}).choices[0].message.content == inhibited
    budget = pipe.num_visual_tokens
    assert ask(client, model, url, prompt, extra_body={"visual_tokens": budget}).choices[0].message.content
    with pytest.raises(openai.BadRequestError, match=f"fixed at {budget}"):
        ask(client, model, url, prompt, extra_body={"visual_tokens": budget + 1})
    # regions (tests/test_server_regions.py): overlay needs no graph; ControlMLLM needs energy_grad, which this lacks
    box = sdk.Box(5, 5, 40, 40)
    drawn = pipe.describe(path, prompt, max_new_tokens=TOKENS, region=box, referring="overlay")
    regions = [{"type": "box", "box": [5, 5, 40, 40], "referring": "overlay"}]
    assert ask(client, model, url, prompt, extra_body={"regions": regions}).choices[0].message.content == drawn
    with pytest.raises(openai.BadRequestError, match="no energy_grad graph") as caught:
        ask(client, model, url, prompt, extra_body={"regions": [{"type": "box", "box": [5, 5, 40, 40],
                                                                 "referring": "controlmllm"}]})
    assert caught.value.body["code"] == "unsupported_by_bundle"


def test_models_health_and_metrics(server, client, model, frames):
    ask(client, model, frames[0][1])  # at least one answer counted, whatever ran before
    listed = client.models.list().data
    assert [m.id for m in listed] == [model]
    assert listed[0].to_dict()["input_modalities"] == ["text", "image"]
    assert server.get("/health") == (200, b'{"status": "ok"}')  # no key needed
    status, text = server.get("/metrics", {"Authorization": f"Bearer {KEY}"})
    text = text.decode()
    assert status == 200 and "# TYPE pipmm_request_duration_seconds histogram" in text
    assert 'pipmm_request_duration_seconds_bucket{le="+Inf"}' in text and "pipmm_queue_depth 0" in text
    assert float(text.split("\npipmm_completion_tokens_total ")[1].split()[0]) > 0
    assert server.get("/metrics")[0] == 401


def error_of(status_body):
    status, body = status_body
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str), body
    assert "\n" not in body["error"]["message"]
    return status, body["error"]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, model, frames, pipe, tmp_path):
    path, url = frames[0]
    auth = {"Authorization": f"Bearer {KEY}"}
    good = {"model": model, "messages": user_turn("What is in the image?", url), "max_tokens": TOKENS}
    expected = pipe.describe(path, "What is in the image?", max_new_tokens=TOKENS)
    corrupt = data_url(png_bytes(np.zeros((8, 8, 3), np.uint8))[:40])
    cases = {
        "malformed JSON": (b'{"model": ', 400, "invalid_json"),
        "not an object": (b"[1, 2]", 400, "invalid_json"),
        "no image": ({**good, "messages": [{"role": "user", "content": "hi"}]}, 400, "image_required"),
        "two images": ({**good, "messages": user_turn("a", url) + user_turn("b", url)}, 400, "too_many_images"),
        "bad base64": ({**good, "messages": user_turn("a", "data:image/png;base64,@@@")}, 400, "invalid_image_url"),
        "not an image": ({**good, "messages": user_turn("a", "data:image/png;base64,aGVsbG8=")}, 400, "invalid_image"),
        "truncated png": ({**good, "messages": user_turn("a", corrupt)}, 400, "invalid_image"),
        "remote url": ({**good, "messages": user_turn("a", "http://example.com/x.png")}, 400, "invalid_image_url"),
        "local file": ({**good, "messages": user_turn("a", str(path))}, 400, "invalid_image_url"),
        "unknown model": ({**good, "model": "gpt-4o"}, 404, "model_not_found"),
        "bad max_tokens": ({**good, "max_tokens": 0}, 400, "invalid_value"),
        "bool temperature": ({**good, "temperature": True}, 400, "invalid_value"),
        "empty prompt": ({**good, "messages": user_turn(" ", url)}, 400, "invalid_prompt"),
        "n = 2": ({**good, "n": 2}, 400, "invalid_value"),
        "oversized body": (b"{" + b" " * (1024 * 1024 + 10) + b"}", 413, "body_too_large"),
    }
    for name, (body, status, code) in cases.items():
        got_status, error = error_of(server.post_json(body, auth))
        assert (got_status, error["code"]) == (status, code), (name, error)
        assert ask(client, model, url).choices[0].message.content == expected, name
    assert error_of(server.post_json(good, {"Authorization": "Bearer wrong"}))[1]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="not served here"):
        ask(client, "gpt-4o", url)
    assert error_of(server.request_json("GET", "/v2/nothing"))[0] == 404
    log = server.log.read_text()
    assert "error: the request body is not valid JSON" in log and "413" in log


def open_stream(server, model, url, tokens: int) -> socket.socket:
    """A raw streamed request whose client reads nothing yet: with a tiny receive buffer the server's writes
    block after a few chunks, so the worker stays busy for as long as this client wants."""
    body = json.dumps({"model": model, "messages": user_turn("Describe it.", url), "stream": True,
                       "max_tokens": tokens, "min_tokens": tokens}).encode()
    host, port = server.url.split("//")[1].split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect((host, int(port)))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert b"200 OK" in sock.recv(64)
    return sock


def metric(server, name: str) -> float:
    return float(server.get("/metrics")[1].decode().split(f"\n{name} ")[1].split()[0])


def test_full_queue_gets_429_and_a_client_that_leaves_frees_its_worker(bundle_dir, frames, tmp_path):
    path, url = frames[2]
    single = ServerProcess(bundle_dir, "--workers", 1, "--max-queue", 0, log=tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=single.url + "/v1", api_key="any", max_retries=0)
        model = bundle_dir.name
        stream = open_stream(single, model, url, 400)
        deadline = time.monotonic() + 10  # a loaded machine may take a while to hand the request to the worker
        while not metric(single, "pipmm_workers_busy") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metric(single, "pipmm_workers_busy") == 1
        with pytest.raises(openai.RateLimitError) as refused:
            ask(client, model, url)
        assert refused.value.status_code == 429 and refused.value.body["code"] == "queue_full"
        stream.close()  # gone mid-stream: the next write fails and the worker is freed
        deadline = time.monotonic() + 10
        while metric(single, "pipmm_workers_busy") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metric(single, "pipmm_stream_disconnects_total") == 1
        assert metric(single, "pipmm_completion_tokens_total") < 400
        assert ask(client, model, url).choices[0].message.content  # served again
    finally:
        single.stop()


def test_load_eight_clients_by_25_requests(server, model, frames, pipe):
    prompts = ["What is in the image?", "Describe it.", "What colour is it?"]
    jobs = [(i % len(frames), (i // len(frames)) % len(prompts)) for i in range(25)]
    expected = {(f, p): pipe.describe(frames[f][0], prompts[p], max_new_tokens=4) for f, p in set(jobs)}
    clients = [openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) for _ in range(8)]
    for f, p in expected:  # warm-up: every worker and connection path once
        ask(clients[0], model, frames[f][1], prompts[p], max_tokens=4)
    rss_before = server.rss_bytes()
    latencies, wrong, failures = [], [], []

    def run(client, offset):
        for f, p in jobs[offset:] + jobs[:offset]:
            start = time.perf_counter()
            try:
                text = ask(client, model, frames[f][1], prompts[p], max_tokens=4).choices[0].message.content
            except Exception as err:  # collected, asserted below
                failures.append(repr(err))
                continue
            latencies.append(time.perf_counter() - start)
            if text != expected[(f, p)]:
                wrong.append((f, p, text))

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(c, 3 * i)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    growth = server.rss_bytes() - rss_before
    p50, p95 = np.percentile(latencies, [50, 95]) * 1000
    print(f"\nload: 8 clients x 25 requests in {wall:.2f} s; latency p50 {p50:.1f} ms, p95 {p95:.1f} ms; "
          f"server RSS {rss_before / 2**20:.1f} MB -> growth {growth / 2**20:+.1f} MB")
    assert failures == [] and wrong == [] and len(latencies) == 200
    assert growth < RSS_GROWTH_BOUND


# 200 requests of a tiny bundle: threads come and go, ONNX Runtime's arenas are warm. Measured here: under 3 MB.
RSS_GROWTH_BOUND = 16 * 2**20


def test_health_is_503_while_loading_then_the_model_endpoints_say_so():
    """The server listens before its workers load (sdk.server.serve): the same app, in this process, with no pool."""
    from sdk.server.app import Service, make_server
    from sdk.server.config import ServerConfig

    service = Service(ServerConfig(port=0))
    httpd = make_server(service)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        import urllib.error
        import urllib.request

        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        for path, code in (("/health", None), ("/v1/models", "loading")):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base + path, timeout=10)
            body = json.loads(err.value.read())
            assert err.value.code == 503 and (body == {"status": "loading"} if code is None
                                              else body["error"]["code"] == code)
        assert urllib.request.urlopen(base + "/metrics", timeout=10).read().count(b"pipmm_workers 0") == 1
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("pieces, stops, shown, stopped", [
    (["Hel", "lo wo", "rld"], ["lo w"], "Hel", True),  # split over pieces, never shown
    (["ab", "c", "d"], ["cx"], "abcd", False),  # a held-back tail that turned out not to be a stop string
    (["a", "bcd"], ["d", "bc"], "a", True),  # the earliest of several
    (["xyz"], [], "xyz", False),
])
def test_stop_scanner(pieces, stops, shown, stopped):
    from sdk.server.completion import StopScanner

    scanner, out, hit = StopScanner(stops), "", False
    for piece in pieces:
        text, hit = scanner.feed(piece)
        out += text
        if hit:
            break
    assert (out + ("" if hit else scanner.flush()), hit) == (shown, stopped)


def test_the_embedded_default_model_answers_as_sdk_describe(tmp_path):
    """The README's example: `pipmm serve` without a bundle, model id pipmm-default."""
    import sdk
    from helpers import ROOT

    scene = ROOT / "samples" / "scene.png"
    prompt = "What color is the large cross?"
    default = ServerProcess(None, "--max-queue", 4, log=tmp_path / "server.log")  # no BUNDLE: the embedded model
    try:
        client = openai.OpenAI(base_url=default.url + "/v1", api_key="any", max_retries=0)
        answer = ask(client, "pipmm-default", data_url(scene.read_bytes()), prompt, max_tokens=12)
        assert answer.choices[0].message.content == sdk.describe(scene, prompt, max_new_tokens=12)
    finally:
        default.stop()


def test_media_dir_and_remote_images_when_enabled(bundle_dir, frames, pipe, tmp_path):
    import functools
    import os
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    media = tmp_path / "media"
    media.mkdir()
    path = frames[3][0]
    (media / "frame.png").write_bytes(path.read_bytes())
    os.mkfifo(media / "pipe.png")
    expected = pipe.describe(path, "What is in the image?", max_new_tokens=TOKENS)
    files = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=str(media)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{files.server_address[1]}"
    served = ServerProcess(bundle_dir, "--media-dir", media, "--allow-remote-images", "--remote-timeout", 5,
                           log=tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="any", max_retries=0)
        for url in ("frame.png", f"file://{media / 'frame.png'}", f"{remote}/frame.png"):
            assert ask(client, bundle_dir.name, url).choices[0].message.content == expected, url
        refusals = {"../outside.png": 403, "pipe.png": 400, f"{remote}/missing.png": 400}
        for url, status in refusals.items():
            with pytest.raises(openai.APIStatusError) as err:
                ask(client, bundle_dir.name, url)
            assert err.value.status_code == status, (url, err.value.body)
        assert "not a regular file" in served.log.read_text()
    finally:
        served.stop()
        files.shutdown()
        files.server_close()


def test_explain_endpoint_returns_the_pipelines_explanation(server, model, frames, pipe):
    """POST /v1/explain (the page's overlay): the same grid and kept patches as Pipeline.explain, the PNG at the
    input image's size."""
    import base64
    import io

    from PIL import Image

    path, url = frames[1]
    status, body = server.post_json({"model": model, "messages": user_turn("What is in the image?", url)},
                                    {"Authorization": f"Bearer {KEY}"}, path="/v1/explain")
    assert status == 200, body
    expected = pipe.explain(path, "What is in the image?")
    assert np.allclose(np.asarray(body["grid"]), expected.grid, atol=1e-6)
    assert body["kept"] == expected.kept.tolist()
    png = Image.open(io.BytesIO(base64.b64decode(body["png"].split(",", 1)[1])))
    assert png.size == Image.open(path).size
    status, error = server.post_json({"model": model, "messages": []}, {"Authorization": f"Bearer {KEY}"},
                                     path="/v1/explain")
    assert status == 400 and "error" in error


def test_a_conversation_is_answered_with_its_earlier_turns(client, model, frames, pipe):
    """Several turns go through the SDK's Conversation (the bundle's chat template over the whole conversation):
    the answer equals Pipeline.chat on the same messages, whole and streamed."""
    from PIL import Image

    path, url = frames[3]
    first = pipe.describe(path, "What is in the image?", max_new_tokens=TOKENS)
    sdk_messages = [{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": [{"type": "text", "text": "What is in the image?"},
                                                 {"type": "image", "image": Image.open(path)}]},
                    {"role": "assistant", "content": first},
                    {"role": "user", "content": "What colour is it?"}]
    expected = pipe.chat(sdk_messages, max_new_tokens=TOKENS).text
    messages = [{"role": "system", "content": "Answer briefly."}, *user_turn("What is in the image?", url),
                {"role": "assistant", "content": first}, {"role": "user", "content": "What colour is it?"}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=TOKENS)
    assert whole.choices[0].message.content == expected
    assert whole.usage.prompt_tokens > len(pipe.prompter.prompt_ids("What colour is it?")[0])  # all turns counted
    streamed = client.chat.completions.create(model=model, messages=messages, max_tokens=TOKENS, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    with pytest.raises(openai.BadRequestError, match="inhibit"):
        client.chat.completions.create(model=model, messages=messages, max_tokens=TOKENS, extra_body={"inhibit": 0.5})

