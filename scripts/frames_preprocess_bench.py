"""Host preprocessing of camera frames for a multi-frame request, through Pipeline.generate, beside transformers'
CLIP processor on the same frames (issue 16: preprocessing was 56 of concat's 116 ms TTFT at 8 frames on the H200
host; docs/multi-image.md "Preprocessing the frames").

    python scripts/frames_preprocess_bench.py --label after --json docs/multi-image-results/preprocess-after.json

Each request is Pipeline.generate(frames, prompt, max_new_tokens=1) on a copy of the embedded default bundle with
a random mivpg adapter for N_max = 8 frames (every mode preprocesses alike); frames are HxWx3 uint8 arrays
(sdk.bench.bench_image, 640x480 and 1280x720) to 224x224; reported per frame size and count (1, 8): the Result's
preprocess_ms, as a median over interleaved rounds, with the frames' pool on (sdk.frames.PREPROCESS_THREADS, as
users get it) and off (1 thread: the per-frame work itself), and transformers' CLIPImageProcessorPil (the
checkpoint's own processor, one thread) on the same list of frames. To measure the code of another commit, run
this file from a tree of that commit (docs/multi-image.md has the command).
"""

from __future__ import annotations

import argparse
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

SIZES = {"640x480": (480, 640), "1280x720": (720, 1280)}
COUNTS = (1, 8)
PROMPT = "Is there a red object in every frame?"


def bundle(scratch: Path) -> Path:
    from export.model.mivpg import random_adapter
    from export.multi_image import attach_adapter
    from sdk.bundle import default_bundle_path

    out = scratch / "bundle"
    shutil.copytree(default_bundle_path(), out)
    width = json.loads((out / "manifest.json").read_text())["graphs"]["embed"]["outputs"][0]["shape"][-1]
    attach_adapter(out, random_adapter("mivpg", width), n_max=max(COUNTS), overwrite=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--label", default="current")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import PIL
    import transformers
    from transformers import CLIPImageProcessorPil

    import sdk
    import sdk.frames
    from sdk.bench import bench_image

    pool_threads = sdk.frames.PREPROCESS_THREADS
    with tempfile.TemporaryDirectory() as scratch:
        pipe = sdk.load(bundle(Path(scratch)), device="cpu")
        processor = CLIPImageProcessorPil.from_dict(pipe.preprocessing)  # the checkpoint's processor settings
        frames = {name: [bench_image(size, seed=i) for i in range(max(COUNTS))] for name, size in SIZES.items()}
        for name in SIZES:  # the two agree (the parity tests' tolerance), and a warm-up
            ours = pipe.generate(frames[name][:2], PROMPT, max_new_tokens=1)
            theirs = processor(images=frames[name][:2], return_tensors="np")["pixel_values"]
            mine = sdk.frames.preprocess_frames(pipe.pixel_values, frames[name][:2])
            assert np.abs(mine - theirs).max() <= 1e-5 and ours.frames == 2
        keys = [(name, n, who) for name in SIZES for n in COUNTS for who in ("pool", "serial", "hf")]
        samples = {key: [] for key in keys}
        load = [os.getloadavg()[0]]
        for r in range(args.rounds):
            for name, n, who in keys[r % len(keys):] + keys[:r % len(keys)]:
                images = frames[name][:n]
                if who == "hf":
                    start = time.perf_counter()
                    processor(images=images, return_tensors="np")
                    samples[(name, n, who)].append((time.perf_counter() - start) * 1e3)
                    continue
                sdk.frames.PREPROCESS_THREADS = pool_threads if who == "pool" else 1
                timings = pipe.generate(images, PROMPT, max_new_tokens=1).timings
                samples[(name, n, who)].append(timings["preprocess_ms"])
            load.append(os.getloadavg()[0])
        sdk.frames.PREPROCESS_THREADS = pool_threads

    medians = {f"{name}/{n}/{who}": float(np.median(samples[(name, n, who)])) for name, n, who in keys}
    result = {"schema": "pipmm-frames-preprocess-bench/1", "label": args.label,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": "python scripts/frames_preprocess_bench.py "
                         + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": {"cpus": os.cpu_count(), "pool_threads": pool_threads,
                          "shared": "yes: other processes ran on the same cores", "load_average_1min": load},
              "versions": {"pillow": PIL.__version__, "numpy": np.__version__,
                           "transformers": transformers.__version__},
              "rounds": args.rounds, "medians_ms": medians,
              "runs": {f"{name}/{n}/{who}": samples[(name, n, who)] for name, n, who in keys}}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.label}: preprocess ms of the request (per frame), pool of {pool_threads} threads\n"
          "| frames | n | pool | 1 thread | HF CLIPImageProcessorPil |\n|---|---|---|---|---|")
    for name in SIZES:
        for n in COUNTS:
            cells = [f"{medians[f'{name}/{n}/{who}']:.1f} ({medians[f'{name}/{n}/{who}'] / n:.2f})"
                     for who in ("pool", "serial", "hf")]
            print(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
