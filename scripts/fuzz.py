"""Property-based fuzzing of a Pipeline: random image bytes, arrays and prompt strings must give a
valid answer or a documented error (a PipmmError subclass, one line), never anything else.

    python scripts/fuzz.py --examples 3000            # per property, the embedded default bundle
    python scripts/fuzz.py --bundle DIR --examples 500 --seed 7

tests/test_robustness_fuzz.py runs the same properties with a few dozen examples each. Image
bytes are real encodings (PNG, JPEG, GIF, BMP, TIFF, WebP, ICO, PPM; many modes) then damaged:
truncated, bytes flipped, header bytes overwritten (huge declared sizes), chunks inserted, or
replaced by noise behind a real magic number.
"""

from __future__ import annotations

import argparse
import collections
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import sdk  # noqa: E402
import sdk.preprocess  # noqa: E402
from sdk.errors import PipmmError  # noqa: E402

FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp",
           "ICO": ".ico", "PPM": ".ppm"}
MODES = ["RGB", "L", "RGBA", "P", "1", "CMYK", "I;16", "LA", "I", "F"]
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"RIFF\x00\x00\x00\x00WEBPVP8 "]
SPECIAL_FRAGMENTS = ["<image>", "</s>", "<s>", "<pad>", "<unk>", "<ima", "ge>", "USER:", "ASSISTANT:", "\x00",
                     "\n", "{prompt}", "\ud800", "\u202e", "\ufeff", "🤖", "ß", "\x1b[31m"]


# -- strategies ------------------------------------------------------------------------------------


def _picture(mode: str, h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "P":
        return rgb.quantize(colors=int(rng.integers(2, 64)))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    return rgb.convert(mode)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError, TypeError):  # this format cannot hold this mode
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format=fmt)
    return buffer.getvalue()


@st.composite
def image_files(draw):
    """(bytes, suffix): a real encoding, often damaged."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    kind = draw(st.sampled_from(["intact", "truncate", "flip", "header", "insert", "noise"]))
    if kind == "noise":
        data = draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=600))
        return data, FORMATS[fmt]
    mode = draw(st.sampled_from(MODES))
    h, w = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    data = bytearray(_encode(_picture(mode, h, w, draw(st.integers(0, 2**32 - 1))), fmt))
    if kind == "truncate":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] = draw(st.integers(0, 255))
    elif kind == "header":  # the first bytes hold the declared size: make it anything, huge included
        at = draw(st.integers(0, min(40, len(data) - 1)))
        patch = draw(st.binary(min_size=1, max_size=8))
        data[at:at + len(patch)] = patch
    elif kind == "insert":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data), FORMATS[fmt]


_DTYPES = [np.uint8, np.uint8, np.uint8, np.uint16, np.int8, np.int64, np.float32, np.float64, np.bool_]


@st.composite
def image_arrays(draw):
    """Arrays, mostly near the accepted form (uint8 HxWxC), with wrong dtypes, ranks, channels, NaN."""
    dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
    shape = draw(st.one_of(
        st.tuples(st.integers(0, 40), st.integers(0, 40), st.sampled_from([1, 2, 3, 3, 3, 4, 5])),
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9),
        st.sampled_from([(1, 3000, 3), (3000, 1, 3), (2, 2)]),
    ))
    if dtype.kind == "f":
        elements = st.floats(allow_nan=True, allow_infinity=True, width=dtype.itemsize * 8)
    else:
        elements = None
    return draw(hnp.arrays(dtype, shape, elements=elements, fill=st.nothing() if elements is None else None))


def prompts():
    text = st.text(st.characters(exclude_categories=()), max_size=80)  # surrogates and controls included
    pieces = st.lists(st.one_of(text, st.sampled_from(SPECIAL_FRAGMENTS)), max_size=8).map("".join)
    return st.one_of(pieces, st.integers(0, 3000).map(lambda n: "ab " * n), st.none(), st.binary(max_size=10),
                     st.integers())


# -- checks ----------------------------------------------------------------------------------------


def check(pipeline, image, prompt, max_new_tokens: int = 2) -> str:
    """Run one request; return its outcome ("ok" or the error's type name); fail on anything else."""
    try:
        result = pipeline.generate(image, prompt, max_new_tokens=max_new_tokens)
    except PipmmError as err:
        message = str(err)
        assert message and "\n" not in message and len(message) <= 600, repr(message)
        return type(err).__name__
    vocab = pipeline.manifest.model.vocab_size
    assert isinstance(result.text, str) and len(result.token_ids) <= max_new_tokens
    assert all(isinstance(t, int) and 0 <= t < vocab for t in result.token_ids)
    assert result.finish_reason in ("eos", "length", "context")
    if isinstance(prompt, str):  # the turn kept its shape: K image slots, no end of turn inside
        ids = pipeline.prompter.prompt_ids(prompt)[0].tolist()
        special = pipeline.manifest.special_tokens
        assert ids.count(special.image) == pipeline.num_visual_tokens
        assert not set(ids) & set(special.eos)
    return "ok"


def properties(pipeline, examples: int, derandomize: bool, counts: dict, image, folder: Path,
               max_pixels: int | None = None):
    """The three properties as hypothesis tests (call each to run it); outcomes tallied in counts."""
    config = settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
                      suppress_health_check=list(HealthCheck), print_blob=True)
    limit = sdk.preprocess.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels

    def tally(name: str, outcome: str) -> None:
        counts.setdefault(name, collections.Counter())[outcome] += 1

    @config
    @given(file=image_files(), prompt=st.sampled_from(["What is here?", "Describe the image."]))
    def image_bytes_property(file, prompt):
        data, suffix = file
        path = folder / f"fuzz{suffix}"
        path.write_bytes(data)
        old, sdk.preprocess.MAX_IMAGE_PIXELS = sdk.preprocess.MAX_IMAGE_PIXELS, limit
        try:
            tally("image bytes", check(pipeline, path, prompt))
        finally:
            sdk.preprocess.MAX_IMAGE_PIXELS = old

    @config
    @given(array=image_arrays())
    def array_property(array):
        tally("arrays", check(pipeline, array, "What is here?"))

    @config
    @given(prompt=prompts())
    def prompt_property(prompt):
        tally("prompts", check(pipeline, image, prompt))

    return {"image bytes": image_bytes_property, "arrays": array_property, "prompts": prompt_property}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default=None, help="bundle directory (default: the embedded model)")
    parser.add_argument("--examples", type=int, default=1000, help="examples per property")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    args = parser.parse_args(argv)

    pipeline = sdk.load(args.bundle, device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    counts: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, prop in properties(pipeline, args.examples, False, counts, image, Path(tmp)).items():
            if args.seed is not None:
                from hypothesis import seed

                prop = seed(args.seed)(prop)
            start = time.perf_counter()
            prop()  # raises, with the falsifying example, if a property fails
            total = sum(counts.get(name, {}).values())
            print(f"{name}: {total} examples in {time.perf_counter() - start:.1f} s, outcomes "
                  f"{dict(sorted(counts.get(name, {}).items()))}")
    print("all properties held")
    return 0


if __name__ == "__main__":
    sys.exit(main())
