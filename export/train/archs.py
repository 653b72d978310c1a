"""Named model architectures for `pipmm train --arch NAME` (stage 0 from scratch): a registry, not flags.

An Arch is the ModelSizes of the LLaVA that export.train.model.build_llava makes from transformers' configs
(CLIP ViT with a class token, MLP projector, Llama with GQA) plus how its own BPE tokenizer is trained on the
generator's text. The resolved Arch is written into train_config.json ("arch"), and a resume reads the sizes
from there, so a run is continued with the architecture it started with.

Why the tokenizer setting: the generator's text has about 1,050 distinct words, so a BPE of 1024 runs out of
words and starts merging pairs of label glyphs ("pz" -> one token) in 15% of the test split's label answers
(the 512 of r11: 1.4%). With the label answers left out of the tokenizer's corpus (answerless=("label",)) the
1024-BPE stops at 842 tokens and merges 2.5% (English bigrams such as "le"), so a label is still read out one
token per glyph (scripts/big_model_plan.py labels; tests/test_big_model.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from export.train.model import ModelSizes


@dataclass(frozen=True)
class Arch:
    sizes: ModelSizes
    answerless: tuple[str, ...] = ()  # families whose answers the tokenizer's corpus leaves out (see above)
    note: str = ""
    name: str = ""  # its key in ARCHS ("" for sizes given by flags)

    def to_dict(self) -> dict:
        return {"name": self.name, "sizes": self.sizes.to_dict(), "answerless": list(self.answerless),
                "note": self.note}


ARCHS: dict[str, Arch] = {
    # r9-r11, the shipped default: 5.21M parameters
    "r11": Arch(ModelSizes(), note="the shipped default (r9-r11)"),
    # The next default (docs/default-model.md, "The next model: plan"): 19.0M parameters, bf16 38 MB, so an
    # FP16 bundle stays near the 40 MB limit and the bf16 checkpoint fits a device call's carry beside the
    # slimmed tree. The ViT gets the larger share: it runs once per scene, the LLM once per question
    # (7.3 questions a scene), so ViT parameters are ~7x cheaper to train per step than LLM parameters.
    "m20": Arch(ModelSizes(vision_hidden=320, vision_layers=8, vision_heads=5, vision_mlp=1280,
                       text_hidden=384, text_layers=6, text_heads=6, text_kv_heads=2, text_mlp=768,
                       vocab_size=1024),
                answerless=("label",), note="ViT 320x8, Llama 384x6 (GQA 6/2), BPE 1024 without label merges"),
    # m20 at 336 px (24x24 = 576 patches): label glyphs 1.5x larger in pixels (cap height 8-12 -> 12-18 px, about
    # a patch per glyph) for 2.25x the visual tokens; the plan's fallback for labels.
    "m20-336": Arch(ModelSizes(image_size=336, vision_hidden=320, vision_layers=8, vision_heads=5, vision_mlp=1280,
                           text_hidden=384, text_layers=6, text_heads=6, text_kv_heads=2, text_mlp=768,
                           vocab_size=1024, max_positions=1024),
                    answerless=("label",), note="m20 at 336 px (576 patches)"),
    # m20's settings at tiny widths: what the CPU tests and smoke runs train (seconds).
    "m20-tiny": Arch(ModelSizes(image_size=112, vision_hidden=32, vision_layers=2, vision_heads=2, vision_mlp=64,
                            text_hidden=48, text_layers=2, text_heads=4, text_kv_heads=2, text_mlp=96,
                            vocab_size=1024),
                     answerless=("label",), note="m20's tokenizer setting at tiny widths (tests)"),
}


def resolve(name: str) -> Arch:
    """The Arch of `name` (a fresh copy of its sizes, so a caller may override fields)."""
    arch = ARCHS[name]
    return Arch(ModelSizes(**asdict(arch.sizes)), arch.answerless, arch.note, name)


def from_dict(record: dict) -> Arch:
    """train_config.json's "arch" -> Arch."""
    return Arch(ModelSizes(**record["sizes"]), tuple(record["answerless"]), record.get("note", ""),
                record.get("name") or "")

