"""The pipmm ROS 2 node: the latest camera frame -> sdk Pipeline.generate -> std_msgs/String answers.

    image_topic      sensor_msgs/Image (rgb8, bgr8, mono8, rgba8)  ┐ only the latest frame is kept
    compressed_topic sensor_msgs/CompressedImage (jpeg, png, ...)  ┘
    query_topic      std_msgs/String: replaces the prompt for the following answers
    answer_topic     std_msgs/String: the answer
    status_topic     std_msgs/String: JSON {"state": "ok" | "refused" | "error", answer, prompt, frame, timings...}
    describe_now     std_srvs/Trigger: describe the latest frame now; message = the answer

A worker thread describes the latest frame at most rate_hz times a second (0 = only on describe_now);
subscription callbacks only store the frame. Run it:

    python3 -m pipmm_ros2.node --ros-args -p bundle:=/path/to/bundle -p prompt:="Is the gripper empty?"
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass

import rclpy
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from std_srvs.srv import Trigger

import sdk
from sdk.errors import PipmmError

from .frames import FrameError, check_encoding, decode_compressed, decode_raw

# name -> default; every one is a ROS parameter (read once, at start)
PARAMETERS: dict[str, object] = {
    "bundle": "",  # bundle directory; "" = the embedded default model
    "prompt": "Describe the image.",
    "rate_hz": 1.0,  # at most this many descriptions a second; 0 = only on describe_now
    "image_topic": "image",
    "compressed_topic": "image/compressed",
    "query_topic": "query",
    "answer_topic": "answer",
    "status_topic": "status",
    "device": "auto",  # auto, cpu or cuda
    "max_new_tokens": 0,  # 0 = the bundle's default
}


@dataclass(frozen=True)
class Frame:
    number: int  # 1, 2, ... in arrival order
    source: str  # "image" or "compressed"
    message: object  # the sensor_msgs message, decoded only when described
    received: float  # time.monotonic()


def decode_frame(frame: Frame):
    """The frame -> an image sdk accepts (uint8 array or PIL image)."""
    m = frame.message
    if frame.source == "compressed":
        return decode_compressed(m.data)
    return decode_raw(m.encoding, m.height, m.width, m.step, m.data)


class DescribeNode(Node):
    def __init__(self, node_name: str = "pipmm", pipeline=None, **node_options):
        super().__init__(node_name, **node_options)
        self.stopping = threading.Event()  # first: destroy_node() reads it, even after a failed start
        self.worker = None
        self.settings = {name: self.declare_parameter(name, default).value for name, default in PARAMETERS.items()}
        s = self.settings
        self.pipeline = pipeline or sdk.load(s["bundle"] or None, device=s["device"])
        self.prompt = s["prompt"]
        self.latest: Frame | None = None
        self.frames = self.dropped = 0
        self.described = 0  # number of the last frame the worker described
        self.frame_lock = threading.Lock()
        self.fresh = threading.Event()

        self.answers = self.create_publisher(String, s["answer_topic"], 10)
        self.status = self.create_publisher(String, s["status_topic"], 10)
        frames_group = MutuallyExclusiveCallbackGroup()
        self.create_subscription(Image, s["image_topic"], self.on_image, qos_profile_sensor_data,
                                 callback_group=frames_group)
        self.create_subscription(CompressedImage, s["compressed_topic"], self.on_compressed, qos_profile_sensor_data,
                                 callback_group=frames_group)
        self.create_subscription(String, s["query_topic"], self.on_query, 10, callback_group=frames_group)
        self.create_service(Trigger, "describe_now", self.on_describe_now, callback_group=ReentrantCallbackGroup())
        if float(s["rate_hz"]) > 0:
            self.worker = threading.Thread(target=self.run_worker, args=(1.0 / float(s["rate_hz"]),),
                                           name="pipmm-describe", daemon=True)
            self.worker.start()
        self.get_logger().info(f"pipmm: {self.pipeline.source} ({self.pipeline.num_visual_tokens} visual tokens), "
                               f"listening on {s['image_topic']} and {s['compressed_topic']}")

    # -- subscriptions: store, never describe here ----------------------------------------------

    def on_image(self, message: Image) -> None:
        try:
            check_encoding(message.encoding)  # cheap: refuse before the frame replaces a good one
        except FrameError as err:
            self.refuse(str(err))
            return
        self.keep("image", message)

    def on_compressed(self, message: CompressedImage) -> None:
        self.keep("compressed", message)

    def on_query(self, message: String) -> None:
        self.prompt = message.data

    def keep(self, source: str, message) -> None:
        with self.frame_lock:
            if self.latest is not None and self.latest.number > self.described:
                self.dropped += 1  # replaced before the worker reached it
            self.frames += 1
            self.latest = Frame(self.frames, source, message, time.monotonic())
        self.fresh.set()

    # -- describing -----------------------------------------------------------------------------

    def run_worker(self, period: float) -> None:
        next_start = 0.0
        while not self.stopping.is_set():
            if not self.fresh.wait(timeout=0.1):
                continue
            delay = next_start - time.monotonic()
            if delay > 0 and self.stopping.wait(delay):
                break
            with self.frame_lock:
                frame = self.latest
                self.fresh.clear()
            next_start = time.monotonic() + period
            self.describe(frame)

    def describe(self, frame: Frame) -> str | None:
        """Describe one frame, publish the answer and the status -> the answer (None when it failed)."""
        prompt = self.prompt
        with self.frame_lock:
            self.described = max(self.described, frame.number)
        try:
            image = decode_frame(frame)
            max_new = int(self.settings["max_new_tokens"]) or None
            result = self.pipeline.generate(image, prompt, max_new_tokens=max_new)
        except PipmmError as err:
            self.refuse(str(err), frame, state="error")
            return None
        self.answers.publish(String(data=result.text))
        header = getattr(frame.message, "header", None)
        self.publish_status({"state": "ok", "answer": result.text, "prompt": prompt, "frame": frame.number,
                             "source": frame.source, "encoding": getattr(frame.message, "encoding", None)
                             or getattr(frame.message, "format", ""),
                             "stamp": None if header is None else header.stamp.sec + header.stamp.nanosec * 1e-9,
                             "queued_ms": (time.monotonic() - frame.received) * 1000.0 - result.timings["total_ms"],
                             "dropped_frames": self.dropped, "visual_tokens": result.visual_tokens,
                             "finish_reason": result.finish_reason, "timings": result.timings})
        return result.text

    def on_describe_now(self, request, response):
        with self.frame_lock:
            frame = self.latest
        if frame is None:
            response.success, response.message = False, (f"no frame yet on {self.settings['image_topic']} or "
                                                         f"{self.settings['compressed_topic']}: publish one first")
            return response
        answer = self.describe(frame)
        response.success = answer is not None
        response.message = answer if answer is not None else "the frame could not be described: see the status topic"
        return response

    def refuse(self, message: str, frame: Frame | None = None, state: str = "refused") -> None:
        if state == "refused":  # a camera publishing an unsupported encoding would otherwise log at its frame rate
            self.get_logger().error(message, throttle_duration_sec=5.0)
        else:
            self.get_logger().error(message)
        self.publish_status({"state": state, "error": message, "frame": None if frame is None else frame.number})

    def publish_status(self, fields: dict) -> None:
        self.status.publish(String(data=json.dumps(fields)))

    def destroy_node(self):
        self.stopping.set()
        if self.worker is not None:
            self.worker.join(timeout=30)
        return super().destroy_node()


def main(args=None) -> int:
    rclpy.init(args=args)
    try:
        node = DescribeNode()
    except PipmmError as err:  # a bundle that does not load, a device that is not there: one line, not a traceback
        print(f"error: {err}", file=sys.stderr)
        rclpy.try_shutdown()
        return 1
    executor = MultiThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
