"""The device side (sdk/, runtimes/) runs without torch or transformers and imports nothing from export/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from import_graph import ROOT, imports, source_files, top_level

DEVICE_PACKAGES = ("sdk", "runtimes")
WORKSTATION_ONLY = ("export", "torch", "transformers", "onnx", "onnxscript", "safetensors")
# The one exception: the CLI layer joins both sides. sdk/cli.py's registries name workstation modules as
# strings in a dict: VERBS (a verb's module, resolved only when that verb runs) and PEERS (an optional
# side-by-side peer such as `pipmm bench --compare-hf`, resolved only when its option is given); a
# runtime-only install gets a one-line "needs pipmm-edge[export]" message. Those dicts, by name, may name
# export/ modules; nothing else in that file or anywhere else on the device side may.
CLI_REGISTRIES = {(Path("sdk/cli.py"), "VERBS"), (Path("sdk/cli.py"), "PEERS")}


def device_side_violations(root: Path = ROOT) -> list[str]:
    """Every import (top-level, function-local, relative, import_module/__import__ of a literal) and
    registry string of sdk/ and runtimes/ that reaches the workstation side, as 'file:line kind module'."""
    found = []
    for path in source_files(root, DEVICE_PACKAGES):
        for imp in imports(path, root):
            root_package = top_level(imp.module)
            allowed = imp.kind == "string" and root_package == "export" \
                and (path.relative_to(root), imp.owner) in CLI_REGISTRIES
            if root_package in WORKSTATION_ONLY and not allowed:
                found.append(f"{imp.where(root)} {imp.kind} {imp.module}")
    return found


def test_no_torch_or_transformers_imports_in_device_code():
    assert device_side_violations() == []


def test_the_scan_sees_every_form_of_import(tmp_path):
    (tmp_path / "sdk" / "sub").mkdir(parents=True)
    (tmp_path / "runtimes").mkdir()
    (tmp_path / "sdk" / "__init__.py").write_text("")
    (tmp_path / "sdk" / "cli.py").write_text(
        'VERBS = {"export": ("export.cli_export", "help")}\n'
        'OTHER = {"train": "export.train.train:run"}\n')
    (tmp_path / "sdk" / "sub" / "bad.py").write_text(
        "import importlib\n"
        "import numpy, torch.nn\n"
        "from ..errors import PipmmError\n"
        "from ...export.writer import export_bundle\n"
        "def f():\n"
        "    from transformers import AutoModel\n"
        "    import safetensors.torch as st\n"
        "    return importlib.import_module('export.compare_hf'), __import__('onnx')\n"
        "VERBS = {'x': ('export.writer', 'a registry of that name, but not in sdk/cli.py')}\n")
    (tmp_path / "runtimes" / "late.py").write_text("class B:\n    def run(self):\n        import onnxscript\n")

    bad = tmp_path / "sdk" / "sub" / "bad.py"
    assert ("sdk.errors", ("PipmmError",)) in [(i.module, i.names) for i in imports(bad, tmp_path)]
    assert sorted(device_side_violations(tmp_path)) == sorted([
        "runtimes/late.py:3 import onnxscript",
        "sdk/cli.py:2 string export.train.train",
        "sdk/sub/bad.py:2 import torch.nn",
        "sdk/sub/bad.py:4 from export.writer",
        "sdk/sub/bad.py:6 from transformers",
        "sdk/sub/bad.py:7 import safetensors.torch",
        "sdk/sub/bad.py:8 call export.compare_hf",
        "sdk/sub/bad.py:8 call onnx",
        "sdk/sub/bad.py:9 string export.writer",
    ])


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
