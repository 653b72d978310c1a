"""The bundle manifest, typed: one frozen dataclass per section of manifest.json (docs/bundle.md).

Written by the bundle writers through sdk.bundle.staged_bundle (to_dict), read by sdk.bundle.load_bundle
(Manifest.from_dict: every field checked once, a one-line BundleError naming the first bad one); derived
bundles (quantize, add-graphs) make a new Manifest with dataclasses.replace.

Version policy: FORMAT_VERSION changes only when a reader of the previous version would misread a new
bundle. A key that an older reader may ignore is added without a bump, with a default here for bundles
that lack it (visual_tokens.positions = "sequence", cmai = none, precision.tensorrt = true, ...).
Unknown keys are kept (each section's `extra`, written back by to_dict) and otherwise ignored, so a
bundle from a newer SDK of the same format version loads and round-trips; the CMAI settings are the
exception, refused when unknown (sdk.cmai.check_settings), since they change what inhibition computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import cmai as cmai_settings
from .errors import BundleError, PipmmError
from .manifest_fields import (REEXPORT, Fields, Section, extra_field, is_dict, is_int, is_name, is_real, is_str,
                              list_of, map_of, omit_none, optional, show)
from .generation import GenerationArgs
from .manifest_multi import MultiImage
from .manifest_referring import Referring
from .manifest_visual_prompt import VisualPromptSection
from .preprocess import BadPreprocessing, normalize_config

FORMAT = "pipmm-bundle"
FORMAT_VERSION = 1
MIN_SDK_VERSION = "0.1.0"
MANIFEST_FILE = "manifest.json"
REQUIRED_GRAPHS = ("vision", "embed", "decoder")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
VISUAL_POSITIONS = ("sequence", "patch")  # decoder positions of the visual tokens (runtimes/positions.py)
POOLINGS = ("last", "mean")
# PIP-MM's T-CLS in the ViT: in the class embedding's slot (CLIP), or an extra first token, dropped at the output
# (towers without a class embedding: SigLIP)
TCLS = ("class-slot", "prepended")
# the prompt vector of a multi-turn conversation (sdk/conversation.py): the question of the image's turn, encoded once
CONVERSATION_PROMPT = ("first-question",)  # prompt vector: hidden state of the last prompt token, or the mean over the prompt
# -- graphs and files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphIO(Section):
    name: str
    dtype: str
    shape: list  # ints for fixed axes, axis names ("batch", "sequence", ...) for dynamic ones
    extra: dict = extra_field()

    @classmethod
    def from_dict(cls, d, where: str, source: str) -> "GraphIO":
        r = Fields(d, where, source)
        return cls(name=r.get("name", is_name, "a name"), dtype=r.get("dtype", is_name, "a dtype name"),
                   shape=r.get("shape", list_of(lambda a: is_int(a, 0) or is_name(a)), "a list of sizes or axis names"),
                   extra=r.extra(cls))


@dataclass(frozen=True)
class Graph(Section):
    file: str
    inputs: list[GraphIO]
    outputs: list[GraphIO]
    opset: int | None = omit_none()
    kv_cache: str | None = omit_none()  # "static": decoder_static, the cache preallocated (docs/gpu.md)
    shares_weights_with: str | None = omit_none()  # the graph whose external data file holds our weights
    sharing: dict | None = omit_none()  # what export/extra_graphs.py share_weights found
    extra: dict = extra_field()

    @classmethod
    def from_dict(cls, d, name: str, source: str) -> "Graph":
        where = f"graph {name!r}"
        r = Fields(d, where, source)
        if not (isinstance(d.get("file"), str) and all(isinstance(d.get(k), list) for k in ("inputs", "outputs"))):
            raise BundleError(f"{source}: {where} needs a 'file' and 'inputs'/'outputs' lists of named entries; "
                              f"{REEXPORT}")
        ios = {key: [GraphIO.from_dict(io, f"{where} {key}[{i}]", source) for i, io in enumerate(d[key])]
               for key in ("inputs", "outputs")}
        return cls(file=r.get("file", is_name, "a file name"), **ios,
                   opset=r.get("opset", optional(lambda v: is_int(v, 1)), "an opset number", None),
                   kv_cache=r.get("kv_cache", optional(is_str), "a string", None),
                   shares_weights_with=r.get("shares_weights_with", optional(is_str), "a graph name", None),
                   sharing=r.get("sharing", optional(is_dict), "an object", None), extra=r.extra(cls))

    def input(self, name: str) -> GraphIO | None:
        return next((io for io in self.inputs if io.name == name), None)

    def output(self, name: str) -> GraphIO | None:
        return next((io for io in self.outputs if io.name == name), None)


@dataclass(frozen=True)
class FileRecord(Section):
    sha256: str
    bytes: int
    extra: dict = extra_field()

    @classmethod
    def from_dict(cls, d, name: str, source: str) -> "FileRecord":
        r = Fields(d, f"file {name!r}", source)
        if not (isinstance(d.get("sha256"), str) and is_int(d.get("bytes"), 0)):
            raise BundleError(f"{source}: file {name!r} needs a 'sha256' string and a 'bytes' count; {REEXPORT}")
        return cls(sha256=d["sha256"], bytes=int(d["bytes"]), extra=r.extra(cls))


# -- what the model is -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Model(Section):
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_context: int  # capped at a sliding window, if any
    source: str = ""  # the checkpoint's directory name
    text_architecture: str = ""  # transformers' model_type of the LLM
    vision_hidden_size: int | None = None
    pipmm: bool = False
    extra: dict = extra_field()

    @classmethod
    def from_dict(cls, d, source: str) -> "Model":
        r = Fields(d, "model", source)
        sizes = {key: int(r.get(key, lambda v: is_int(v, 1), "a positive integer"))
                 for key in ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size", "max_context")}
        return cls(**sizes, source=r.get("source", is_str, "a string", ""),
                   text_architecture=r.get("text_architecture", is_str, "a string", ""),
                   vision_hidden_size=r.get("vision_hidden_size", optional(lambda v: is_int(v, 1)),
                                            "a positive integer", None),
                   pipmm=r.get("pipmm", lambda v: isinstance(v, bool), "true or false", False), extra=r.extra(cls))


@dataclass(frozen=True)
class Precision(Section):
    """One shape for every writer: `default`, per graph `graphs`, whether TensorRT can build every graph, and
    per graph `details` (tool, method, block size, ops kept in float, encoding, runtimes: docs/precision.md)."""
    default: str = "fp32"
    graphs: dict[str, str] = field(default_factory=dict)
    tensorrt: bool = True  # bundles before the key: fp32 graphs of standard ops
    details: dict[str, dict] = field(default_factory=dict)
    dropped_graphs: dict[str, str] = field(default_factory=dict)  # graphs of the source bundle not carried over
    extra: dict = extra_field()

    @classmethod
    def uniform(cls, precision: str, graphs, **details) -> "Precision":
        return cls(default=precision, graphs={name: precision for name in graphs}, **details)

    @classmethod
    def from_dict(cls, d, source: str) -> "Precision":
        r = Fields(d, "precision", source)
        known = f"one of {', '.join(PRECISIONS)}"
        return cls(default=r.get("default", lambda v: v in PRECISIONS, known),
                   graphs=dict(r.get("graphs", map_of(lambda v: v in PRECISIONS), f"a map of graph names to {known}")),
                   tensorrt=r.get("tensorrt", lambda v: isinstance(v, bool), "true or false", True),
                   details=dict(r.get("details", map_of(is_dict), "a map of graph names to objects", {})),
                   dropped_graphs=dict(r.get("dropped_graphs", map_of(is_str), "a map of graph names to reasons", {})),
                   extra=r.extra(cls))


# -- visual tokens and the prompt vector -----------------------------------------------------------


@dataclass(frozen=True)
class Vision(Section):
    """The vision graph's config as exported (export/model/vision.py VisionConfig.to_dict)."""
    image_size: int
    patch_size: int
    feature_layers: list[int]
    select_strategy: str  # "default" drops the class token, "full" keeps it
    budget: str | int  # as asked: "full", "half", "quarter" or an int
    num_tokens: int  # K, resolved
    reducer: str
    reducer_options: dict = field(default_factory=dict)  # the reducer's settings, defaults filled in
    grid: list[int] = field(default_factory=list)  # patches per side [rows, columns]
    num_patches: int = 0
    class_token: bool | None = omit_none()  # False: the tower has no class embedding (SigLIP); None: it has (CLIP)
    tcls: str | None = omit_none()  # PIP-MM: "class-slot" (T-CLS replaces the class embedding) or "prepended"
    extra: dict = extra_field()

    @classmethod
    def from_dict(cls, d, source: str) -> "Vision":
        r = Fields(d, "vision", source)
        positive = (lambda v: is_int(v, 1), "a positive integer")
        return cls(image_size=r.get("image_size", *positive), patch_size=r.get("patch_size", *positive),
                   feature_layers=r.get("feature_layers", list_of(lambda v: is_int(v, 0)), "a list of layer indices"),
                   select_strategy=r.get("select_strategy", is_name, "a strategy name"),
                   budget=r.get("budget", lambda v: is_name(v) or is_int(v, 1), "a budget name or a token count"),
                   num_tokens=r.get("num_tokens", *positive), reducer=r.get("reducer", is_name, "a reducer name"),
                   reducer_options=r.get("reducer_options", is_dict, "an object", {}),
                   grid=r.get("grid", list_of(lambda v: is_int(v, 1)), "[rows, columns]", []),
                   num_patches=r.get("num_patches", lambda v: is_int(v, 0), "a patch count", 0),
                   class_token=r.get("class_token", optional(lambda v: isinstance(v, bool)), "true or false", None),
                   tcls=r.get("tcls", optional(lambda v: v in TCLS), " or ".join(map(repr, TCLS)), None),
                   extra=r.extra(cls))


@dataclass(frozen=True)
class VisualTokens(Section):
    count: int  # K: what the vision graph returns and the image slots of the chat turn
    budget: str | int = "full"
    reducer: str = "full"
    positions: str = "sequence"  # VISUAL_POSITIONS; bundles before the key: sequence
    extra: dict = extra_field()

    @classmethod
    def from_dict(cls, d, source: str) -> "VisualTokens":
        r = Fields(d, "visual_tokens", source)
        return cls(count=r.get("count", lambda v: is_int(v, 1), "a positive integer"),
                   budget=r.get("budget", lambda v: is_name(v) or is_int(v, 1), "a budget name or a token count",
                                "full"),
                   reducer=r.get("reducer", is_name, "a reducer name", "full"),
                   positions=r.get("positions", lambda v: v in VISUAL_POSITIONS,
                                   f"{' or '.join(map(repr, VISUAL_POSITIONS))} (this SDK is older than the bundle, "
                                   "or the manifest was edited)", "sequence"),
                   extra=r.extra(cls))


@dataclass(frozen=True)
class PromptVector(Section):
    """PIP-MM's prompt vector: the decoder's `hidden` output over the prompt_encoder template (no image)."""
    layer: int = -1  # -1 = last layer after the final norm; k >= 0 = output of decoder layer k
    pooling: str = "last"  # POOLINGS
    source: str = "decoder graph output 'hidden' over the prompt_encoder template (no image)"
    conversation: str | None = omit_none()  # CONVERSATION_PROMPT (None: "first-question"): encoded once per chat
    # Decoder layers the prompt vector needs (layer + 1) when fewer than all: the bundle's prompt_encoder graph
    # (export/model/prompt_encoder.py) runs only those. None: the decoder graph is the prompt encoder.
    encoder_layers: int | None = omit_none()
    # The chat template puts the question first, so the prompt encoder's ids are the prefill's first ids: the
    # runtime takes the prompt vector from the decoder's pass over them and keeps its KV cache for the prefill
    # (sdk/prompt_pass.py). None/false: the prompt pass is a separate run.
    prefill_prefix: bool | None = omit_none()
    extra: dict = extra_field()

    @classmethod
    def from_dict(cls, d, source: str) -> "PromptVector":
        r = Fields(d, "prompt_vector", source)
        return cls(layer=r.get("layer", is_int, "a layer index", -1),
                   pooling=r.get("pooling", lambda v: v in POOLINGS, " or ".join(map(repr, POOLINGS)), "last"),
                   source=r.get("source", is_str, "a string", cls.source),
                   conversation=r.get("conversation", optional(lambda v: v in CONVERSATION_PROMPT),
                                      " or ".join(map(repr, CONVERSATION_PROMPT)), None),
                   encoder_layers=r.get("encoder_layers", optional(lambda v: is_int(v, 1)), "a layer count", None),
                   prefill_prefix=r.get("prefill_prefix", optional(lambda v: isinstance(v, bool)), "true or false",
                                        None),
                   extra=r.extra(cls))


@dataclass(frozen=True)
class PromptMlp(Section):
    """The prompt MLP's config (export/model/prompt.py PromptMLPConfig), fused into the vision graph."""
    d_llm: int
    d_vit: int
    d_mid: int = 0
    prompt_layer: int = -1
    pooling: str = "last"
    extra: dict = extra_field()

    @classmethod
    def from_dict(cls, d, source: str) -> "PromptMlp":
        r = Fields(d, "prompt_mlp", source)
        return cls(d_llm=r.get("d_llm", lambda v: is_int(v, 1), "a positive integer"),
                   d_vit=r.get("d_vit", lambda v: is_int(v, 1), "a positive integer"),
                   d_mid=r.get("d_mid", lambda v: is_int(v, 0), "a width (0 = d_vit)", 0),
                   prompt_layer=r.get("prompt_layer", is_int, "a layer index", -1),
                   pooling=r.get("pooling", lambda v: v in POOLINGS, " or ".join(map(repr, POOLINGS)), "last"),
                   extra=r.extra(cls))


# -- text: template, tokens, generation, CMAI ------------------------------------------------------


@dataclass(frozen=True)
class ChatTemplate(Section):
    """One user turn as the checkpoint's processor renders and tokenizes it (export/model/chat_template.py).

    Defaults: LLaVA-1.5's format with BOS by the `add_bos` flag (bundles written before templates came from
    the checkpoint, and training). Exports set `add_special_tokens` instead: the tokenizer's own
    post-processor then decides BOS, as transformers' processor does.
    """
    prompt: str = "USER: <image>\n{prompt} ASSISTANT:"
    prompt_encoder: str = "USER: {prompt}"  # the same turn without the image, up to the end of the question
    image_placeholder: str = "<image>"
    add_bos: bool | None = True  # BOS by hand (SDKs before add_special_tokens read only this); add_special_tokens wins
    add_special_tokens: bool | None = omit_none()
    template: str | None = omit_none()  # the checkpoint's Jinja source (multi-turn rendering)
    source: str | None = omit_none()  # the file it came from, or the fallback's name
    bos_rule: str | None = omit_none()  # in words, for people reading the manifest
    variables: dict | None = omit_none()  # the template's special-token variables (tokenizer.special_tokens_map)
    extra: dict = extra_field()

    @classmethod
    def from_dict(cls, d, source: str) -> "ChatTemplate":
        r = Fields(d, "chat_template", source)
        if not all(isinstance(d.get(k), str) and "{prompt}" in d[k] for k in ("prompt", "prompt_encoder")):
            raise BundleError(f"{source}: 'chat_template' needs 'prompt' and 'prompt_encoder' strings holding "
                              f"{{prompt}}; {REEXPORT}")
        flag = optional(lambda v: isinstance(v, bool))
        text = optional(is_str)
        add_special_tokens = r.get("add_special_tokens", flag, "true, false or null", None)
        return cls(prompt=d["prompt"], prompt_encoder=d["prompt_encoder"],
                   image_placeholder=r.get("image_placeholder", is_name, "a string", cls.image_placeholder),
                   add_bos=r.get("add_bos", flag, "true, false or null", None if add_special_tokens is not None else True),
                   add_special_tokens=add_special_tokens, template=r.get("template", text, "a string or null", None),
                   source=r.get("source", text, "a string or null", None),
                   bos_rule=r.get("bos_rule", text, "a string or null", None),
                   variables=r.get("variables", optional(map_of(is_str)), "a map of names to token texts", None),
                   extra=r.extra(cls))


@dataclass(frozen=True)
class SpecialTokens(Section):
    image: int
    eos: list[int]
    bos: int | None = None
    pad: int | None = None
    texts: list[str] = field(default_factory=list)  # every special token's text: stripped from user prompts
    extra: dict = extra_field()

    @classmethod
    def from_dict(cls, d, source: str) -> "SpecialTokens":
        r = Fields(d, "special_tokens", source)
        token = (optional(lambda v: is_int(v, 0)), "a token id or null", None)
        return cls(image=r.get("image", lambda v: is_int(v, 0), "a token id"),
                   eos=r.get("eos", list_of(lambda v: is_int(v, 0)), "a list of token ids"),
                   bos=r.get("bos", *token), pad=r.get("pad", *token),
                   texts=r.get("texts", list_of(is_name), "a list of non-empty strings", []), extra=r.extra(cls))


@dataclass(frozen=True)
class Generation(Section):
    """Generation defaults (a request's own arguments override them)."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    extra: dict = extra_field()

    @classmethod
    def from_dict(cls, d, source: str) -> "Generation":
        r = Fields(d, "generation", source)
        return cls(max_new_tokens=r.get("max_new_tokens", is_int, "an integer", 64),
                   temperature=r.get("temperature", is_real, "a finite number", 0.0),
                   top_p=r.get("top_p", is_real, "a finite number", 1.0), extra=r.extra(cls))

    def check(self, max_context: int, source: str) -> None:
        try:
            GenerationArgs.checked(self.max_new_tokens, self.temperature, self.top_p, None, max_context)
        except PipmmError as err:
            raise BundleError(f"{source}: generation defaults: {err}; {REEXPORT}") from None


@dataclass(frozen=True)
class Cmai(Section):
    """CMAI (docs/vmtc-cmai.md): the decoder's bias input and attention output at `layers`."""
    layers: list[int]
    bias_input: str = "image_bias"
    attention_output: str = "attention"
    aggregate: str = cmai_settings.DEFAULTS["aggregate"]  # sdk.cmai.AGGREGATES
    mask_value: float = cmai_settings.DEFAULTS["mask_value"]

    @classmethod
    def from_dict(cls, d, source: str) -> "Cmai":
        r = Fields(d, "cmai", source)

        def refused(message: str) -> BundleError:
            return BundleError(f"{source}: cmai: {message}; re-export the bundle")
        settings = cmai_settings.check_settings(d, error=refused)
        return cls(layers=r.get("layers", list_of(lambda v: is_int(v, 0)), "a list of decoder layers"),
                   bias_input=r.get("bias_input", is_name, "an input name", cls.bias_input),
                   attention_output=r.get("attention_output", is_name, "an output name", cls.attention_output),
                   aggregate=settings["aggregate"], mask_value=float(settings["mask_value"]))

    @property
    def extra(self) -> dict:  # unknown CMAI settings are refused, not kept
        return {}


@dataclass(frozen=True)
class Created(Section):
    by: str = ""
    time: str = ""
    torch: str | None = omit_none()
    from_fp32_bundle: str | None = omit_none()  # quantized bundles: the FP32 bundle they were made from
    extra: dict = extra_field()

    @classmethod
    def from_dict(cls, d, source: str) -> "Created":
        r = Fields(d, "created", source)
        text = (optional(is_str), "a string", None)
        return cls(by=r.get("by", is_str, "a string", ""), time=r.get("time", is_str, "a string", ""),
                   torch=r.get("torch", *text), from_fp32_bundle=r.get("from_fp32_bundle", *text), extra=r.extra(cls))


# -- the whole manifest ----------------------------------------------------------------------------


def version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in str(version).split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@dataclass(frozen=True)
class Manifest(Section):
    model: Model
    precision: Precision
    vision: Vision
    visual_tokens: VisualTokens
    prompt_vector: PromptVector | None  # None: plain LLaVA
    image_preprocessing: dict  # CLIPImageProcessor's settings, every key explicit (sdk.preprocess.normalize_config)
    special_tokens: SpecialTokens
    chat_template: ChatTemplate = field(default_factory=ChatTemplate)
    generation: Generation = field(default_factory=Generation)
    prompt_mlp: PromptMlp | None = None
    cmai: Cmai | None = None  # None: the decoder has no image_bias input nor attention output
    referring: Referring | None = omit_none()  # ControlMLLM over the energy_grad graph (sdk/manifest_referring.py)
    multi_image: MultiImage | None = omit_none()  # how frames combine (sdk/manifest_multi.py); None: concat defaults
    visual_prompt: VisualPromptSection | None = omit_none()  # a TVP pixel frame (sdk/manifest_visual_prompt.py)
    created: Created | None = omit_none()
    tokenizer: str = "tokenizer.json"
    graphs: dict[str, Graph] = field(default_factory=dict)  # filled by the staged writer
    files: dict[str, FileRecord] = field(default_factory=dict)  # every file but the manifest: filled at publish
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    min_sdk_version: str = MIN_SDK_VERSION
    extra: dict = extra_field()

    def to_dict(self) -> dict:
        d = super().to_dict()
        order = ("format", "format_version", "min_sdk_version", "created", "model", "precision", "vision",
                 "visual_tokens", "prompt_vector", "prompt_mlp", "image_preprocessing", "chat_template",
                 "special_tokens", "generation", "cmai", "referring", "multi_image", "visual_prompt", "tokenizer",
                 "graphs", "files")
        return {**{k: d.pop(k) for k in order if k in d}, **d}

    @property
    def pipmm(self) -> bool:
        return self.prompt_vector is not None

    @classmethod
    def from_dict(cls, d, source: str = "manifest.json", sdk_version: str | None = None) -> "Manifest":
        """Check every field of a manifest.json's content; `sdk_version` (this SDK's) checks min_sdk_version."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise BundleError(f"{source} is not a {FORMAT} manifest: re-export with 'pipmm export'")
        version = d.get("format_version")
        if not is_int(version) or not 1 <= version <= FORMAT_VERSION:
            raise BundleError(f"bundle format version {show(version)} is not supported by this SDK (reads 1 to "
                              f"{FORMAT_VERSION}): upgrade pipmm-edge, or re-export the bundle with this one's "
                              "'pipmm export'")
        needed = d.get("min_sdk_version", "0")
        if sdk_version is not None and version_tuple(needed) > version_tuple(sdk_version):
            raise BundleError(f"bundle needs pipmm-edge >= {needed} (this is {sdk_version}): upgrade pipmm-edge")
        for key in ("graphs", "files", "tokenizer", "special_tokens", "chat_template", "image_preprocessing",
                    "visual_tokens", "model", "generation", "prompt_vector", "precision", "vision"):
            if key not in d:
                raise BundleError(f"{source} lacks '{key}': the bundle is incomplete; re-export it")
        r = Fields(d, "manifest", source)
        graphs = r.get("graphs", map_of(is_dict), "a map of graph names to objects")
        files = r.get("files", map_of(is_dict), "a map of file names to objects")
        model = Model.from_dict(d["model"], source)
        manifest = cls(
            graphs={name: Graph.from_dict(g, name, source) for name, g in graphs.items()},
            files={name: FileRecord.from_dict(f, name, source) for name, f in files.items()},
            tokenizer=r.get("tokenizer", is_name, "a file name"),
            model=model,
            special_tokens=SpecialTokens.from_dict(d["special_tokens"], source),
            chat_template=ChatTemplate.from_dict(d["chat_template"], source),
            visual_tokens=VisualTokens.from_dict(d["visual_tokens"], source),
            prompt_vector=None if d["prompt_vector"] is None else PromptVector.from_dict(d["prompt_vector"], source),
            prompt_mlp=None if d.get("prompt_mlp") is None else PromptMlp.from_dict(d["prompt_mlp"], source),
            image_preprocessing=normalize_config(d["image_preprocessing"], BadPreprocessing),
            generation=Generation.from_dict(d["generation"], source),
            precision=Precision.from_dict(d["precision"], source),
            vision=Vision.from_dict(d["vision"], source),
            cmai=None if d.get("cmai") is None else Cmai.from_dict(d["cmai"], source),
            referring=None if d.get("referring") is None else Referring.from_dict(d["referring"], source),
            multi_image=None if d.get("multi_image") is None else MultiImage.from_dict(d["multi_image"], source),
            visual_prompt=None if d.get("visual_prompt") is None else VisualPromptSection.from_dict(
                d["visual_prompt"], source),
            created=None if d.get("created") is None else Created.from_dict(d["created"], source),
            format=FORMAT, format_version=version, min_sdk_version=str(needed),
            extra=r.extra(cls))
        manifest.generation.check(model.max_context, source)
        manifest.check_visual_count(source)
        if manifest.visual_prompt is not None:
            manifest.visual_prompt.check_files(manifest.files, source)
        return manifest

    def check_visual_count(self, source: str) -> None:
        """visual_tokens.count must be what the vision graph returns (when its manifest shape says so)."""
        vision = self.graphs.get("vision")
        tokens = vision.output("visual_tokens") if vision is not None else None
        if tokens is not None and len(tokens.shape) == 3 and is_int(tokens.shape[1]):
            if tokens.shape[1] != self.visual_tokens.count:
                raise BundleError(f"{source}: visual_tokens count {self.visual_tokens.count} differs from the vision "
                                  f"graph's {tokens.shape[1]} tokens; {REEXPORT}")
