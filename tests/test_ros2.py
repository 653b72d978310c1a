"""The ROS 2 node (samples/ros2/, issue 17): frame decoding without ROS, then the real node with a real publisher
on a domain of its own: answers equal sdk's describe on the same frame, describe_now, bad encodings refused."""

import io
import json
import os
import queue
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image as PILImage

import sdk
from helpers import ROOT

sys.path.insert(0, str(ROOT / "samples" / "ros2"))
from pipmm_ros2.frames import FrameError, decode_compressed, decode_raw  # noqa: E402

PROMPT = "what is the color of the star left of the circle?"


# -- decoding, no ROS --------------------------------------------------------------------------------

def padded(rows: np.ndarray, pad: int) -> bytes:
    h = rows.shape[0]
    flat = rows.reshape(h, -1)
    return np.concatenate([flat, np.full((h, pad), 7, np.uint8)], axis=1).tobytes()


def test_raw_encodings_decode_with_their_step(image):
    h, w, _ = image.shape
    np.testing.assert_array_equal(decode_raw("rgb8", h, w, w * 3, image.tobytes()), image)
    np.testing.assert_array_equal(decode_raw("bgr8", h, w, w * 3 + 5, padded(image[..., ::-1], 5)), image)
    gray = image[..., 1].copy()
    np.testing.assert_array_equal(decode_raw("mono8", h, w, w + 3, padded(gray, 3)), gray)
    rgba = np.dstack([image, np.full((h, w), 200, np.uint8)])
    out = decode_raw("rgba8", h, w, w * 4, memoryview(rgba.tobytes()))
    np.testing.assert_array_equal(out, rgba)
    assert out.flags["C_CONTIGUOUS"] and out.dtype == np.uint8


@pytest.mark.parametrize("fields, match", [
    (("16UC1", 4, 4, 8, bytes(32)), "encoding '16UC1' is not supported"),
    (("rgb8", 4, 4, 11, bytes(48)), "step 11 < 12"),
    (("rgb8", 4, 4, 12, bytes(47)), "needs 48 bytes"),
])
def test_unreadable_frames_are_one_line_errors(fields, match):
    with pytest.raises(FrameError, match=match) as err:
        decode_raw(*fields)
    assert "\n" not in str(err.value)


def test_compressed_frames_decode_with_pil(image):
    buffer = io.BytesIO()
    PILImage.fromarray(image).save(buffer, format="PNG")
    np.testing.assert_array_equal(np.asarray(decode_compressed(buffer.getvalue())), image)
    with pytest.raises(FrameError, match="not an image PIL can read"):
        decode_compressed(b"not a jpeg")


# -- the node ---------------------------------------------------------------------------------------

try:  # the [ros] extra; CI installs it, so only a plain install skips the node's tests
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import String
    from std_srvs.srv import Trigger

    from pipmm_ros2.node import DescribeNode
except ImportError:
    rclpy = None

needs_ros = pytest.mark.skipif(rclpy is None, reason="rclpy is not installed: pip install 'pipmm-edge[ros]'")
WAIT_S = 30


class Probe:
    """A second node in the same process: publishes frames and queries, collects answers and status."""

    def __init__(self, context):
        self.node = Node("probe", context=context)
        self.images = self.node.create_publisher(Image, "camera/image", 10)
        self.compressed = self.node.create_publisher(CompressedImage, "camera/compressed", 10)
        self.queries = self.node.create_publisher(String, "camera/query", 10)
        self.answers, self.status = queue.Queue(), queue.Queue()
        self.node.create_subscription(String, "camera/answer", lambda m: self.answers.put(m.data), 10)
        self.node.create_subscription(String, "camera/status", lambda m: self.status.put(json.loads(m.data)), 10)
        self.trigger = self.node.create_client(Trigger, "describe_now")

    def wait_status(self, publish, accept) -> dict:
        """publish() until a status message accept()s (discovery takes a moment; the node keeps the latest only)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            publish()
            try:
                status = self.status.get(timeout=0.3)
            except queue.Empty:
                continue
            if accept(status):
                return status
        raise AssertionError("no matching status from the node")


def raw_message(array: np.ndarray, encoding: str):
    h, w = array.shape[:2]
    return Image(height=h, width=w, encoding=encoding, step=array[0].size, data=array.tobytes())


@pytest.fixture(scope="module")
def ros(pipe):
    context = Context()
    rclpy.init(context=context, domain_id=os.getpid() % 100 + 1)  # a domain of its own: parallel runs stay apart
    names = dict(image_topic="camera/image", compressed_topic="camera/compressed", query_topic="camera/query",
                 answer_topic="camera/answer", status_topic="camera/status")
    overrides = [Parameter("bundle", value=pipe.source), Parameter("device", value="cpu"),
                 Parameter("rate_hz", value=50.0), Parameter("prompt", value=PROMPT)]
    overrides += [Parameter(name, value=topic) for name, topic in names.items()]
    node = DescribeNode(context=context, parameter_overrides=overrides)
    probe = Probe(context)
    executor = MultiThreadedExecutor(context=context)
    executor.add_node(node)
    executor.add_node(probe.node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    node.executor_for_tests, node.context_for_tests = executor, context
    yield node, probe
    executor.shutdown()
    node.destroy_node()
    probe.node.destroy_node()
    rclpy.shutdown(context=context)
    spinner.join(timeout=10)


@pytest.fixture(scope="module")
def reference(pipe):
    return sdk.load(pipe.source, device="cpu")  # a Pipeline of its own, as a user's sdk.load would give


@needs_ros
def test_rgb8_and_bgr8_frames_are_answered_as_sdk_describes_them(ros, reference, image):
    node, probe = ros
    expected = reference.describe(image, PROMPT)
    status = probe.wait_status(lambda: probe.images.publish(raw_message(image, "rgb8")),
                               lambda s: s["state"] == "ok" and s["encoding"] == "rgb8")
    assert status["answer"] == expected and status["prompt"] == PROMPT and status["source"] == "image"
    assert {"vision_ms", "prefill_ms", "total_ms"} <= set(status["timings"])
    assert expected in drain(probe.answers)
    bgr = image[..., ::-1].copy()
    status = probe.wait_status(lambda: probe.images.publish(raw_message(bgr, "bgr8")),
                               lambda s: s["state"] == "ok" and s["encoding"] == "bgr8")
    assert status["answer"] == expected


@needs_ros
def test_compressed_frames_and_queries(ros, reference, image):
    node, probe = ros
    buffer = io.BytesIO()
    PILImage.fromarray(image).save(buffer, format="PNG")
    message = CompressedImage(format="png", data=buffer.getvalue())
    status = probe.wait_status(lambda: probe.compressed.publish(message), lambda s: s.get("source") == "compressed")
    assert status["state"] == "ok" and status["answer"] == reference.describe(image, PROMPT)
    other = "is there a red square?"
    status = probe.wait_status(lambda: (probe.queries.publish(String(data=other)), probe.compressed.publish(message)),
                               lambda s: s.get("prompt") == other)
    assert status["answer"] == reference.describe(image, other)
    node.prompt = PROMPT


@needs_ros
def test_describe_now_returns_the_answer_of_the_latest_frame(ros, reference, image):
    node, probe = ros
    mono = image[..., 0].copy()
    probe.wait_status(lambda: probe.images.publish(raw_message(mono, "mono8")),
                      lambda s: s.get("encoding") == "mono8")
    assert probe.trigger.wait_for_service(timeout_sec=WAIT_S)
    future = probe.trigger.call_async(Trigger.Request())
    deadline = time.monotonic() + WAIT_S
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    response = future.result()
    assert response.success and response.message == reference.describe(mono, PROMPT)


@needs_ros
def test_unsupported_encodings_are_refused_and_not_described(ros, image):
    node, probe = ros
    frames_before = node.frames
    h, w = image.shape[:2]
    bad = Image(height=h, width=w, encoding="16UC1", step=w * 2, data=bytes(h * w * 2))
    status = probe.wait_status(lambda: probe.images.publish(bad), lambda s: s["state"] == "refused")
    assert "'16UC1' is not supported" in status["error"] and "\n" not in status["error"]
    assert node.frames == frames_before  # never kept: the last good frame stays the latest
    broken = CompressedImage(format="jpeg", data=b"not a jpeg at all")
    status = probe.wait_status(lambda: probe.compressed.publish(broken), lambda s: s["state"] == "error")
    assert "not an image PIL can read" in status["error"]  # the worker logs it and keeps serving


@needs_ros
def test_a_bundle_that_does_not_load_is_one_line(tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, "-m", "pipmm_ros2.node", "--ros-args", "-p", f"bundle:={tmp_path}"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT / "samples" / "ros2",
                          env={**os.environ, "PYTHONPATH": str(ROOT), "ROS_DOMAIN_ID": str(os.getpid() % 100 + 1)})
    assert done.returncode == 1 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


def drain(answers: queue.Queue) -> list[str]:
    got = []
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            got.append(answers.get(timeout=0.2))
        except queue.Empty:
            if got:
                break
    return got


@needs_ros
def test_the_launch_file_declares_every_node_parameter():
    import ast

    from pipmm_ros2.node import PARAMETERS

    tree = ast.parse((ROOT / "samples/ros2/launch/pipmm.launch.py").read_text())
    declared = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "ARGUMENTS")
    assert ast.literal_eval(declared) == {name: str(default) for name, default in PARAMETERS.items()}


@needs_ros
def test_at_most_rate_hz_descriptions_of_the_latest_frame(ros, pipe, image):
    node, probe = ros
    slow = DescribeNode("pipmm_slow", pipeline=node.pipeline, context=node.context_for_tests, parameter_overrides=[
        Parameter("rate_hz", value=2.0), Parameter("image_topic", value="slow/image"),
        Parameter("status_topic", value="slow/status"), Parameter("answer_topic", value="slow/answer")])
    statuses = queue.Queue()
    probe.node.create_subscription(String, "slow/status", lambda m: statuses.put(json.loads(m.data)), 10)
    frames = probe.node.create_publisher(Image, "slow/image", 10)
    node.executor_for_tests.add_node(slow)
    try:
        deadline = time.monotonic() + WAIT_S
        while slow.frames == 0 and time.monotonic() < deadline:  # discovery
            frames.publish(raw_message(image, "rgb8"))
            time.sleep(0.05)
        start, first = time.monotonic(), slow.frames
        while time.monotonic() - start < 1.6:  # 2 Hz for 1.6 s: at most 4 descriptions of ~30 frames
            frames.publish(raw_message(image, "rgb8"))
            time.sleep(0.05)
        time.sleep(0.3)
        seen = [statuses.get() for _ in range(statuses.qsize())]
        assert slow.frames - first >= 20 and 2 <= len(seen) <= 5
        # every frame is described, replaced before that (dropped), or still the latest
        assert slow.frames - len(seen) - 2 <= slow.dropped <= slow.frames - len(seen)
    finally:
        node.executor_for_tests.remove_node(slow)
        slow.destroy_node()
