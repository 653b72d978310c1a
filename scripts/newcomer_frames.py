"""The newcomer frames (samples/frames.json, issue 19): every question through the SDK, as README's first command
asks it, against the answer a person would give.

    python3 scripts/newcomer_frames.py [--bundle DIR] [--json docs/default-model-results/r11/newcomer-frames.json]

Prints one line per question (right/wrong, the question, the expected and the given answer) and the count.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sdk  # noqa: E402
from export.tasks.answers import normalize  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None, help="default: the embedded default bundle")
    parser.add_argument("--json", default=None, help="write every answer here")
    args = parser.parse_args(argv)
    pipeline = sdk.load(args.bundle, device="cpu")
    rows = []
    for frame in json.loads((ROOT / "samples" / "frames.json").read_text()):
        for q in frame["questions"]:
            given = pipeline.describe(ROOT / "samples" / frame["file"], q["prompt"])
            rows.append({"file": frame["file"], "style": frame["style"], **q, "output": given,
                         "correct": normalize(given) == normalize(q["answer"])})
            print(f"{'ok  ' if rows[-1]['correct'] else 'MISS'} {frame['file']}: {q['prompt']!r} -> {given!r}"
                  + ("" if rows[-1]["correct"] else f" (expected {q['answer']!r})"))
    right = sum(r["correct"] for r in rows)
    print(f"{right} of {len(rows)} answered as a person would")
    if args.json:
        Path(args.json).write_text(json.dumps({"correct": right, "questions": len(rows), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
