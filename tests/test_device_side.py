"""The device side (sdk/, runtimes/) runs without torch or transformers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_torch_or_transformers_imports_in_device_code():
    pattern = re.compile(r"^\s*(import|from)\s+(torch|transformers|onnx|onnxscript)\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for folder in ("sdk", "runtimes") for p in (ROOT / folder).rglob("*.py")
                 if pattern.search(p.read_text())]
    assert offenders == []


def test_describe_in_a_subprocess_loads_neither_torch_nor_transformers(bundles, image, tmp_path):
    import numpy as np
    from PIL import Image

    path = tmp_path / "frame.png"
    Image.fromarray(image).save(path)
    bundle = bundles("llama", pipmm=True, budget="half", reducer="pool")
    code = (
        "import sys, json, sdk\n"
        f"text = sdk.load({str(bundle)!r}, device='cpu').describe({str(path)!r}, 'what is here?', max_new_tokens=5)\n"
        "print(json.dumps({'text': text, 'modules': sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'onnx', 'onnxscript'))}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert isinstance(report["text"], str)
    assert report["modules"] == []
    assert np is not None
