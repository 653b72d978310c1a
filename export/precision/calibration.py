"""Calibration sets for static INT8: image+prompt pairs, turned into the graphs' real inputs.

A calibration set is one of

    (nothing)        generated scenes, val split (export.tasks.scenes.iter_examples('val', n, questions_per_scene=1):
                     n different scenes, families round-robin), never the test split that eval scores
    FILE.json        a list of {"image": path, "prompt": text}, or LLaVA-style records
                     {"image": path, "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}
                     as `pipmm scenes --out DIR` writes them; image paths relative to the JSON file
    DIR              DIR/calibration.json, else the one *.json in DIR (so `pipmm scenes --out DIR` output
                     works as is), else every image in DIR (png, jpg, jpeg, bmp, webp), each paired with the
                     lines of DIR/prompts.txt in turn (default prompt: "Describe the image.")

Everything is read and checked up front (load_pairs): a missing, empty or unreadable set raises
CalibrationError before any graph is exported or any file written.

The pairs then run through the FP32 bundle itself (sdk.load + Pipeline.generate, a few greedy
tokens each), and every feed that reaches a graph's InferenceSession is recorded: the vision graph
sees real pixel_values and prompt vectors, the decoder sees the prompt-encoder pass, the prefill
with visual tokens in their slots, and decode steps with a KV cache, exactly as at run time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sdk.errors import ExportError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_PROMPT = "Describe the image."
DEFAULT_SIZE = 32        # pairs
DEFAULT_DECODE_STEPS = 4  # greedy tokens generated per pair, so decode-step (T=1, with cache) inputs are seen


class CalibrationError(ExportError):
    """The calibration set is missing, empty or unreadable."""


@dataclass
class Pair:
    image: object  # PIL image (RGB)
    prompt: str
    source: str    # where it came from, for error messages


def _open_image(path: Path, where: str):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise CalibrationError(f"calibration image {path} (from {where}) does not exist: fix the path or the set")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise CalibrationError(f"calibration image {path} cannot be read ({type(err).__name__}): "
                               "replace it or remove it from the set") from err


def _prompt_of(record: dict) -> str | None:
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    for turn in record.get("conversations") or []:
        if isinstance(turn, dict) and turn.get("from") == "human" and isinstance(turn.get("value"), str):
            return turn["value"].replace("<image>", "").strip()
    return None


def _from_json(file: Path, size: int) -> list[Pair]:
    try:
        records = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CalibrationError(f"calibration file {file} is not readable JSON ({type(err).__name__}): "
                               "give a JSON list of {\"image\": path, \"prompt\": text}") from err
    if isinstance(records, dict):
        records = records.get("pairs") or records.get("data") or []
    if not isinstance(records, list):
        raise CalibrationError(f"calibration file {file} must hold a JSON list of {{\"image\", \"prompt\"}} records")
    if not records:
        raise CalibrationError(f"calibration file {file} is empty: it needs at least one image+prompt pair")
    pairs = []
    for i, record in enumerate(records[:size]):
        where = f"{file} record {i}"
        prompt = _prompt_of(record) if isinstance(record, dict) else None
        image = record.get("image") if isinstance(record, dict) else None
        if not isinstance(image, str) or not prompt:
            raise CalibrationError(f"{where} needs an \"image\" path and a \"prompt\" (or LLaVA \"conversations\")")
        pairs.append(Pair(_open_image(file.parent / image, where), prompt, where))
    return pairs


def _from_dir(folder: Path, size: int) -> list[Pair]:
    named = folder / "calibration.json"
    jsons = [named] if named.is_file() else sorted(folder.glob("*.json"))
    if len(jsons) == 1:
        return _from_json(jsons[0], size)
    if len(jsons) > 1:
        raise CalibrationError(f"calibration folder {folder} holds several JSON files "
                               f"({', '.join(p.name for p in jsons[:4])}): name one, or call it calibration.json")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CalibrationError(f"calibration folder {folder} is empty: it needs images ({', '.join(IMAGE_SUFFIXES)}) "
                               "or a JSON list of image+prompt pairs")
    prompts_file = folder / "prompts.txt"
    prompts = [DEFAULT_PROMPT]
    if prompts_file.is_file():
        try:
            prompts = [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise CalibrationError(f"{prompts_file} cannot be read ({type(err).__name__}): fix or remove it") from err
        if not prompts:
            raise CalibrationError(f"{prompts_file} is empty: one prompt a line, or remove it")
    return [Pair(_open_image(p, str(folder)), prompts[i % len(prompts)], str(p)) for i, p in enumerate(images[:size])]


def load_pairs(source: str | Path | None = None, size: int = DEFAULT_SIZE) -> tuple[list[Pair], dict]:
    """Read and check a calibration set: (pairs, description for the manifest). Raises CalibrationError."""
    if size < 1:
        raise CalibrationError(f"--calibration-size must be at least 1, got {size}")
    if source is None:
        from export.tasks import scenes

        pairs = [Pair(ex.image.convert("RGB"), ex.prompt, f"scene {ex.scene_seed}")
                 for ex in scenes.iter_examples("val", size, questions_per_scene=1)]
        return pairs, {"source": "generated scenes (val split, one question per scene)", "pairs": len(pairs)}
    path = Path(source)
    if not path.exists():
        raise CalibrationError(f"calibration set {path} does not exist: pass a folder of images, a JSON list of "
                               "image+prompt pairs, or leave --calibration out to use generated scenes")
    pairs = _from_dir(path, size) if path.is_dir() else _from_json(path, size)
    return pairs, {"source": str(path), "pairs": len(pairs)}


class _Recorder:
    """Stands in for an InferenceSession: records every feed, then runs it."""

    def __init__(self, session, feeds: list):
        self._session, self._feeds = session, feeds

    def run(self, output_names, feeds, *args, **kwargs):
        self._feeds.append({k: v.copy() for k, v in feeds.items()})
        return self._session.run(output_names, feeds, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._session, name)


def record_feeds(fp32_bundle: str | Path, pairs: list[Pair], decode_steps: int = DEFAULT_DECODE_STEPS,
                 progress: bool = True) -> dict[str, list[dict]]:
    """Graph name -> the feeds the FP32 bundle's graphs receive while answering the pairs. The plain decoder runs
    (the graph quantized; decoder_fused's in-place calls go through IO binding, which no recorder sees), and its
    prefills' session, where it is a second one (runtimes/decoder_flavour.py separate_prefill), records into the
    decoder's feeds too."""
    import sdk
    from runtimes.onnxruntime import OnnxRuntimeBackend

    pipeline = sdk.load(fp32_bundle, backend="onnxruntime", device="cpu")
    backend = pipeline.backend = OnnxRuntimeBackend(pipeline.backend.bundle, device="cpu", decoder_flavour="plain")
    separate = backend.prefill_session is not backend.sessions[backend.decoder_graph]
    feeds: dict[str, list[dict]] = {name: [] for name in backend.sessions}
    for name, session in list(backend.sessions.items()):
        backend.sessions[name] = _Recorder(session, feeds[name])
    backend.prefill_session = _Recorder(backend.prefill_session, feeds[backend.decoder_graph]) if separate else \
        backend.sessions[backend.decoder_graph]
    iterator = pairs
    if progress:
        try:
            from tqdm import tqdm

            iterator = tqdm(pairs, desc="calibration", unit="pair")
        except ImportError:
            pass
    for pair in iterator:
        pipeline.generate(pair.image, pair.prompt, max_new_tokens=decode_steps)
    return feeds
