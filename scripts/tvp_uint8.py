"""What a TVP prompt on a uint8-pixel bundle moves (docs/tvp.md, "uint8 bundles"): the float bundle with the
prompt against its `add-graphs --pixel-input uint8` copy with the same prompt, whose frame reaches the graph
rounded to uint8 levels (sdk/visual_prompt.py), on the shifted test split's first N questions.

    python scripts/tvp_uint8.py [--bundle sdk/default_bundle] [--prompt DIR | --frame 30 --seed 0] [--n 200] \\
        [--json docs/tvp-results/uint8.json]

Without --prompt the prompt is a random frame, uniform in [0, 1] (a clamped prompt's range; the rounding error
does not depend on the frame's content, the vision tower's response to it may). Reported per condition (with
the prompt, and without one as the floor: the graph front's float32 rounding alone): the framed input's largest
difference after normalising (on the frame and inside it), the T-CLS attention's largest difference, how often
the kept patches differ (prompt-topk: a near-tie ranks the other way), the visual tokens' largest absolute and
relative L2 difference where the kept patches agree, how often the greedy answers differ, and both bundles'
exact-match accuracy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def random_prompt(size: int, frame: int, seed: int):
    from sdk.visual_prompt import VisualPrompt

    delta = np.random.default_rng(seed).random((3, size, size), dtype=np.float32)
    delta[:, frame:size - frame, frame:size - frame] = 0
    return VisualPrompt(delta, frame, size, settings={"random": {"seed": seed}}, source=f"random frame {frame}")


def compare(floating, uint8, examples, prompt, max_new_tokens: int) -> dict:
    """Per-example differences between the two bundles under one prompt (False: none)."""
    from export.pixel_input import affine
    from export.train.evaluate import summarize
    from sdk.preprocess import BadPreprocessing, normalize_config

    scale, shift = affine(normalize_config(uint8.preprocessing, BadPreprocessing))
    frame = prompt.frame if prompt else 0
    rows, records = [], {"float": [], "uint8": []}
    for ex in examples:
        want = floating.pixel_values(ex.image, prompt)  # float32 [1, 3, S, S]
        got = uint8.pixel_values(ex.image, prompt)  # uint8 [1, S, S, 3]
        seen = (got.astype(np.float32) * scale + shift).transpose(0, 3, 1, 2)  # what the graph's front computes
        diff = np.abs(seen - want)
        inside = diff[..., frame:diff.shape[-2] - frame, frame:diff.shape[-1] - frame]
        vector = floating.encode_prompt(ex.prompt)
        a, b = floating.backend.vision(want, vector), uint8.backend.vision(got, vector)
        kept_differ = not np.array_equal(a.kept_patches, b.kept_patches)  # then tokens are other patches'
        rows.append({"pixels_max": float(diff.max()), "inside_max": float(inside.max()),
                     "attention_max": float(np.abs(a.cls_attention - b.cls_attention).max()),
                     "tokens_max": None if kept_differ else float(np.abs(a.visual_tokens - b.visual_tokens).max()),
                     "tokens_rel": None if kept_differ else float(np.linalg.norm(a.visual_tokens - b.visual_tokens)
                                                                  / np.linalg.norm(a.visual_tokens)),
                     "kept_differ": bool(kept_differ)})
        for name, pipe in (("float", floating), ("uint8", uint8)):
            out = pipe.generate(ex.image, ex.prompt, max_new_tokens=max_new_tokens, visual_prompt=prompt)
            records[name].append({"family": ex.family, "prompt": ex.prompt, "answer": ex.answer, "output": out.text, "ms": None,
                                  "ids": out.token_ids})
        rows[-1]["answers_differ"] = records["float"][-1]["ids"] != records["uint8"][-1]["ids"]
    accuracy = {name: summarize([{k: v for k, v in r.items() if k != "ids"} for r in recs], floating.manifest,
                                {})["overall"]["accuracy"] for name, recs in records.items()}
    return {"n": len(rows),
            "pixels_max": max(r["pixels_max"] for r in rows), "inside_max": max(r["inside_max"] for r in rows),
            "cls_attention_max": max(r["attention_max"] for r in rows),
            # visual tokens where both kept the same patches
            "tokens_max": max((r["tokens_max"] for r in rows if not r["kept_differ"]), default=None),
            "tokens_rel_mean": float(np.mean([r["tokens_rel"] for r in rows if not r["kept_differ"]])),
            "tokens_rel_max": max((r["tokens_rel"] for r in rows if not r["kept_differ"]), default=None),
            "kept_patches_differ": sum(r["kept_differ"] for r in rows),
            "answers_differ": sum(r["answers_differ"] for r in rows), "accuracy": accuracy}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(ROOT / "sdk" / "default_bundle"), help="a float-pixel bundle")
    parser.add_argument("--prompt", help="a prompt directory (default: a random frame)")
    parser.add_argument("--frame", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import sdk
    from export.pixel_input import convert_bundle
    from export.tvp.domain import questions
    from sdk.visual_prompt import VisualPrompt, input_size

    floating = sdk.load(args.bundle, device="cpu", visual_prompt=False)
    size = input_size(floating.preprocessing)[0]
    prompt = VisualPrompt.load(args.prompt) if args.prompt else random_prompt(size, args.frame, args.seed)
    examples = questions("test", args.n)
    with tempfile.TemporaryDirectory(prefix="tvp-uint8-") as scratch:
        copy = Path(scratch) / "bundle"
        shutil.copytree(args.bundle, copy)
        convert_bundle(copy)
        uint8 = sdk.load(copy, device="cpu", visual_prompt=False)
        result = {"bundle": args.bundle, "prompt": prompt.source, "frame": prompt.frame, "split": "shifted test",
                  "with_prompt": compare(floating, uint8, examples, prompt, args.max_new_tokens),
                  "without_prompt": compare(floating, uint8, examples, False, args.max_new_tokens)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
