"""Preprocess time of a 640x480 and a 1920x1080 camera frame through Pipeline.generate, float pixels against
uint8 pixels normalised in the vision graph (issue 18: host work off the critical path; docs/gpu.md, CPU).

    python scripts/preprocess_bench.py                                   # the default bundle, a uint8 copy of it
    python scripts/preprocess_bench.py --bundle B --rounds 15 --json docs/gpu-results/cpu-preprocess.json

Each request is Pipeline.generate(frame, prompt, max_new_tokens=1) on the bundle as given ("float": RGB,
resize, crop, rescale and normalise on the host) and on a copy converted by `pipmm add-graphs --pixel-input
uint8` ("uint8": the host stops after the crop; export/pixel_input.py), frames given as HxWx3 uint8 arrays
and as JPEG files (quality 90, decoded inside the request). Reported per frame and path: the Result's
preprocess_ms and vision_ms (the graph now normalises: its time is shown beside), medians over interleaved
rounds, and the thread CPU time of pixel_input() alone (this machine is shared: CPU time is the work itself,
wall time includes waiting for a core). Before timing, the two paths' visual tokens and greedy tokens are
compared. Also measured, and not used: PIL's approximate fast paths (JPEG draft decoding at a reduced
scale, resize with reducing_gap), with their largest pixel difference from the exact path, the reason they
are off (transformers' processor decodes the full image and resizes it once, with no reduce step).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FRAMES = {"640x480": (480, 640), "1920x1080": (1080, 1920)}
PATHS = ("float", "uint8")
PROMPT = "Describe the image."


def jpeg_file(array: np.ndarray, directory: Path, name: str) -> Path:
    from PIL import Image

    path = directory / f"{name}.jpg"
    Image.fromarray(array).save(path, quality=90)
    return path


def cpu_ms(fn, repeats: int) -> float:
    """Median thread CPU time of fn() in ms (PIL and numpy run it on this thread)."""
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append((time.thread_time() - start) * 1e3)
    return float(np.median(times))


def approximations(array: np.ndarray, jpeg: Path, cfg: dict) -> dict:
    """PIL's fast but inexact paths against the exact crop: time (thread CPU ms) and max |difference| in levels."""
    from PIL import Image

    from sdk.preprocess import resized_pixels

    exact = resized_pixels(jpeg, cfg)
    side = cfg["size"]["shortest_edge"]  # CLIP's shortest-edge resize (the long edge truncated), then the crop
    h, w = array.shape[:2]
    height, width = (side, int(side * w / h)) if h <= w else (int(side * h / w), side)
    ch, cw = cfg["crop_size"]["height"], cfg["crop_size"]["width"]

    def crop(pixels):
        top, left = (pixels.shape[0] - ch) // 2, (pixels.shape[1] - cw) // 2
        return pixels[top:top + ch, left:left + cw]

    def drafted():
        with Image.open(jpeg) as image:
            image.draft("RGB", (width, height))  # DCT-domain downscale by 1/2, 1/4 or 1/8 while decoding
            return crop(np.asarray(image.convert("RGB").resize((width, height), cfg["resample"])))

    def gapped():
        with Image.open(jpeg) as image:
            return crop(np.asarray(image.convert("RGB").resize((width, height), cfg["resample"], reducing_gap=2.0)))

    out = {}
    for name, fn in (("jpeg_draft", drafted), ("reducing_gap_2", gapped)):
        got = fn()
        out[name] = {"cpu_ms": cpu_ms(fn, 15), "max_abs_levels": int(np.abs(got.astype(int) - exact).max()),
                     "mean_abs_levels": float(np.abs(got.astype(int) - exact).mean())}
    out["exact_jpeg_cpu_ms"] = cpu_ms(lambda: resized_pixels(jpeg, cfg), 15)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "sdk" / "default_bundle")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "gpu-results" / "cpu-preprocess.json")
    args = parser.parse_args(argv)

    import onnxruntime
    import PIL

    import sdk
    from export.pixel_input import convert_bundle
    from sdk.bench import bench_image
    from sdk.preprocess import UINT8_NHWC, pixel_input

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        converted = scratch / "bundle-uint8"
        shutil.copytree(args.bundle, converted)
        convert_bundle(converted)
        pipes = {"float": sdk.load(args.bundle, device="cpu"), "uint8": sdk.load(converted, device="cpu")}
        assert UINT8_NHWC == pipes["uint8"].preprocessing.get("pixel_input")
        inputs = {}
        for frame, size in FRAMES.items():
            array = bench_image(size)
            inputs[(frame, "array")] = array
            inputs[(frame, "jpeg")] = jpeg_file(array, scratch, frame)

        checks = {}
        for frame in FRAMES:
            array = inputs[(frame, "array")]
            vector = pipes["float"].encode_prompt(PROMPT) if pipes["float"].prompt_vector_spec else None
            seen = {name: p.backend.vision(pixel_input(array, p.preprocessing), vector) for name, p in pipes.items()}
            said = {name: p.generate(array, PROMPT, max_new_tokens=16, temperature=0).token_ids
                    for name, p in pipes.items()}
            checks[frame] = {"visual_tokens_max_abs_diff": float(np.abs(
                seen["float"].visual_tokens - seen["uint8"].visual_tokens).max()),
                "greedy_tokens_identical": said["float"] == said["uint8"]}
        print("checks:", checks, flush=True)

        keys = [(frame, kind, path) for frame in FRAMES for kind in ("array", "jpeg") for path in PATHS]
        samples = {key: {"preprocess_ms": [], "vision_ms": []} for key in keys}
        load = [os.getloadavg()[0]]
        for name, pipe in pipes.items():  # warm-up: sessions, PIL's first decode
            pipe.generate(inputs[("640x480", "array")], PROMPT, max_new_tokens=1)
        for r in range(args.rounds):
            for key in keys[r % len(keys):] + keys[: r % len(keys)]:
                frame, kind, path = key
                timings = pipes[path].generate(inputs[(frame, kind)], PROMPT, max_new_tokens=1).timings
                for metric in ("preprocess_ms", "vision_ms"):
                    samples[key][metric].append(timings[metric])
            load.append(os.getloadavg()[0])
        cpu = {f"{frame}/{kind}/{path}": cpu_ms(lambda: pixel_input(inputs[(frame, kind)], pipes[path].preprocessing),
                                                 15)
               for frame, kind, path in keys}
        approx = {frame: approximations(inputs[(frame, "array")], inputs[(frame, "jpeg")],
                                        pipes["float"].preprocessing) for frame in FRAMES}

    medians = {f"{frame}/{kind}/{path}": {m: float(np.median(v)) for m, v in samples[(frame, kind, path)].items()}
               for frame, kind, path in keys}
    result = {
        "schema": "pipmm-preprocess-bench/1", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python scripts/preprocess_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "shared": "yes: other processes ran on the same cores",
                    "load_average_1min_per_round": load},
        "versions": {"onnxruntime": onnxruntime.__version__, "pillow": PIL.__version__},
        "bundle": str(args.bundle), "rounds": args.rounds, "checks": checks,
        "medians_wall_ms": medians, "pixel_input_cpu_ms": cpu, "approximations_not_used": approx,
        "runs": {f"{f}/{k}/{p}": samples[(f, k, p)] for f, k, p in keys},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print("| frame | input | path | preprocess ms (wall) | pixel_input CPU ms | vision ms |\n|---|---|---|---|---|---|")
    for frame, kind, path in keys:
        m = medians[f"{frame}/{kind}/{path}"]
        print(f"| {frame} | {kind} | {path} | {m['preprocess_ms']:.2f} | {cpu[f'{frame}/{kind}/{path}']:.2f} | "
              f"{m['vision_ms']:.2f} |")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
