"""Checkpoint files of a training run: HF weights in bf16, the prompt MLP, the config, and a resumable
trainer state (fp32 trainable weights + AdamW moments) in safetensors shards, never pickle.

Every file stays under MAX_FILE_BYTES (the most a file can weigh coming back from the GPU machine).

    DIR/config.json, generation_config.json, model*.safetensors   save_pretrained, bf16, sharded
    DIR/tokenizer.json, preprocessor_config.json, special_tokens.json
    DIR/prompt_mlp.safetensors + prompt_mlp.json                  PIP-MM stages (fp32, tiny)
    DIR/train_config.json                                         every choice of this run (+ its parent's)
    DIR/log.jsonl                                                 one line per logged step
    DIR/trainer_state.json + trainer_state-*.safetensors          resume: step, optimizer, fp32 weights
    DIR/trainer_extra.safetensors                                 fp32 trainables outside the model files (the
                                                                  stage-0 auxiliary head, the prompt MLP)

A portable copy (portable_copy, `python3 -m export.train.state portable SRC DST`) drops the shards: the bf16
model files + trainer_extra + trainer_state.json with "files": [] are what a device call can carry (a 19M model:
38 MB instead of 228 MB with fp32 weights and AdamW moments). --resume from it reloads the weights from the
model files and starts a fresh optimizer (train.py re-warms the learning rate over --rewarmup steps).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

MAX_FILE_BYTES = 15 * 1024 * 1024  # < 16 MiB
STATE_JSON = "trainer_state.json"
EXTRA_FILE = "trainer_extra.safetensors"


def save_model(model, out: Path) -> None:
    """HF layout, weights in bf16 (the model is trained in fp32 master weights), shards < 16 MiB."""
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    dtype = model.config.dtype if hasattr(model.config, "dtype") else None
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, state_dict=state, max_shard_size=MAX_FILE_BYTES, safe_serialization=True)
    if dtype is not None:
        model.config.dtype = dtype


def copy_assets(src: Path, out: Path) -> None:
    for name in ("tokenizer.json", "preprocessor_config.json", "special_tokens.json"):
        if (src / name).is_file() and src.resolve() != out.resolve():
            shutil.copyfile(src / name, out / name)


def _shards(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > MAX_FILE_BYTES - (1 << 16):
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    return shards + [current] if current else shards


def save_trainer_state(out: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer, extra: dict,
                       model_names: frozenset[str] = frozenset()) -> None:
    """fp32 trainable weights + optimizer state, by parameter name, in safetensors shards; the trainables
    not in model_names (the model's own parameter names, saved by save_model) also in EXTRA_FILE."""
    from safetensors.torch import save_file

    save_file({n: p.detach().float().cpu().contiguous() for n, p in params.items() if n not in model_names},
              str(out / EXTRA_FILE))
    names = {id(p): n for n, p in params.items()}
    tensors = {f"param.{n}": p.detach().float().cpu().contiguous() for n, p in params.items()}
    state = optimizer.state_dict()
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state["state"].items():
        for key, value in entry.items():
            tensors[f"optim.{order[index]}.{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
    for old in out.glob("trainer_state-*.safetensors"):
        old.unlink()
    shards = _shards(tensors)
    files = []
    for i, shard in enumerate(shards):
        name = f"trainer_state-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name))
        files.append(name)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    (out / STATE_JSON).write_text(json.dumps({"step": step, "files": files, "param_order": order,
                                              "param_groups": groups, **extra}, indent=1) + "\n")


def load_trainer_state(out: Path, params: dict[str, torch.nn.Parameter], optimizer) -> dict:
    """Restores weights and optimizer in place; returns the trainer_state.json dict (step, ...) with
    "optimizer_restored". From a portable copy ("files": []) only the EXTRA_FILE trainables are restored
    here: the caller has loaded the model's own weights from DIR's model files, and the optimizer stays fresh."""
    from safetensors.torch import load_file

    meta = json.loads((out / STATE_JSON).read_text())
    missing = [name for name in meta["files"] if not (out / name).is_file()]
    if missing:
        raise ValueError(f"{out} lacks {missing[0]} of its trainer state: copy every shard, or make a portable "
                         f"copy (python3 -m export.train.state portable SRC DST) to resume without the optimizer")
    if not meta["files"]:
        extra = load_file(str(out / EXTRA_FILE)) if (out / EXTRA_FILE).is_file() else {}
        with torch.no_grad():
            for n, p in params.items():
                if n in extra:
                    p.copy_(extra[n].to(p.device, p.dtype))
        return {**meta, "optimizer_restored": False}
    tensors = {}
    for name in meta["files"]:
        tensors.update(load_file(str(out / name)))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"].to(p.device, p.dtype))
    order = [n for group in optimizer.param_groups for n in (_name_of(params, p) for p in group["params"])]
    if order != meta["param_order"]:
        raise ValueError("the trainable parameters differ from the saved run's: resume with the same stage and flags")
    state = {"state": {}, "param_groups": []}
    for index, name in enumerate(order):
        entry = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"optim.{name}.")
                 and k[len(f"optim.{name}."):].count(".") == 0}
        if entry:
            state["state"][index] = entry
    start = 0
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        count = len(group["params"])
        state["param_groups"].append({**saved, "params": list(range(start, start + count))})
        start += count
    optimizer.load_state_dict(state)
    return {**meta, "optimizer_restored": True}


_STATE_SHARDS = "trainer_state-*.safetensors"


def portable_copy(src: Path, dst: Path) -> Path:
    """src (a run directory) -> dst: every file but the trainer-state shards (fp32 weights + AdamW moments), and
    trainer_state.json with "files": [], so --resume in dst continues from the bf16 model files without the
    optimizer."""
    src, dst = Path(src), Path(dst)
    meta = json.loads((src / STATE_JSON).read_text())
    if not (src / EXTRA_FILE).is_file():
        raise ValueError(f"{src} has no {EXTRA_FILE} (written by this version's checkpoints): resume there once first")
    dst.mkdir(parents=True, exist_ok=True)
    shards = {p.name for p in src.glob(_STATE_SHARDS)}
    for f in src.iterdir():
        if f.is_file() and f.name not in shards and f.name != STATE_JSON:
            shutil.copyfile(f, dst / f.name)
    (dst / STATE_JSON).write_text(json.dumps({**meta, "files": [], "optimizer": "dropped (portable copy)"},
                                             indent=1) + "\n")
    return dst


def _name_of(params: dict, p) -> str:
    return next(n for n, q in params.items() if q is p)


# ----------------------------------------------------------------------------- variants that share the vision tower
# Stage 1-2 runs freeze the vision tower after stage 0, so a variant trained from the same stage 0
# (the plain baseline, a merge-trained stage 2) ships only its other weights: WITHOUT_VISION plus
# its configs, and is made whole again with the default model's tower.

WITHOUT_VISION = "without_vision.safetensors"
_VARIANT_FILES = ("config.json", "generation_config.json", "train_config.json", "log.jsonl", "prompt_mlp.json",
                  "prompt_mlp.safetensors", "chat_template.jinja")
# besides WITHOUT_VISION; the prompt MLP only for PIP-MM variants, the template only for prompt-first ones
_SHARED_ASSETS = ("tokenizer.json", "preprocessor_config.json", "special_tokens.json")


def split_variant(checkpoint: Path, out: Path, llm: bool = True) -> Path:
    """checkpoint (a whole HF checkpoint directory) -> out: its non-vision weights, configs and prompt MLP, and a
    stage-mv run's adapter in bf16 (FrameAdapter.load casts it back). llm=False: a run whose LLM stayed frozen
    ships no weights but the adapter (it runs beside the model it was trained from, unchanged)."""
    from safetensors.torch import load_file, save_file

    from export.model.mivpg import CONFIG_FILE as ADAPTER_CONFIG, WEIGHTS_FILE as ADAPTER_WEIGHTS

    checkpoint, out = Path(checkpoint), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if llm:
        weights = {}
        for shard in sorted(checkpoint.glob("model*.safetensors")):
            weights.update(load_file(str(shard)))
        save_file({k: v for k, v in weights.items() if "vision_tower" not in k}, str(out / WITHOUT_VISION),
                  metadata={"format": "pt"})
    if (checkpoint / ADAPTER_WEIGHTS).is_file():
        adapter = load_file(str(checkpoint / ADAPTER_WEIGHTS))
        save_file({k: v.bfloat16().contiguous() for k, v in adapter.items()}, str(out / ADAPTER_WEIGHTS))
        shutil.copyfile(checkpoint / ADAPTER_CONFIG, out / ADAPTER_CONFIG)
    for name in _VARIANT_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, out / name)
    return out


VARIANT_JSON = "variant.json"  # {"base": "models/r11"}: the checkpoint (repository-relative) whose tower it shares
REPOSITORY = Path(__file__).resolve().parents[2]


def variant_base(variant: Path, default: Path = REPOSITORY / "models" / "default_model") -> Path:
    """The base a variant is made whole with: its VARIANT_JSON's, else `default` (a variant trained from the
    shipped default model; r11's variants name models/r11, the default before m20)."""
    recorded = Path(variant) / VARIANT_JSON
    if not recorded.is_file():
        return Path(default)
    return REPOSITORY / json.loads(recorded.read_text())["base"]


def assemble_variant(base: Path, variant: Path, out: Path) -> Path:
    """A whole checkpoint directory in out (one model.safetensors): base's vision tower and assets (base: one file
    or shards) + variant's other weights."""
    from safetensors.torch import load_file, save_file

    base, variant, out = Path(base), Path(variant), Path(out)
    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tower = {}
    for shard in sorted(base.glob("model*.safetensors")):  # one file, or a sharded checkpoint's shards
        tower.update(load_file(str(shard)))
    if not tower:
        raise ValueError(f"{base} has no model*.safetensors")
    rest = load_file(str(variant / WITHOUT_VISION))
    missing = [k for k in tower if "vision_tower" not in k and k not in rest]
    if missing:
        raise ValueError(f"{variant / WITHOUT_VISION} lacks {len(missing)} tensors, e.g. {missing[0]}")
    other = [k for k in tower if k in rest and rest[k].shape != tower[k].shape]
    if other:
        raise ValueError(f"{variant} was trained from another model than {base} ({other[0]}: "
                         f"{tuple(rest[other[0]].shape)} against {tuple(tower[other[0]].shape)}): "
                         f"use its base ({VARIANT_JSON}, export.train.state.variant_base)")
    merged = {k: (v if "vision_tower" in k else rest[k]) for k, v in tower.items()}
    for name in _SHARED_ASSETS:
        shutil.copyfile(base / name, out / name)
    for name in _VARIANT_FILES:
        if (variant / name).is_file():
            shutil.copyfile(variant / name, out / name)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# the shell scripts' entry points: command -> (function, its path arguments)
COMMANDS = {"portable": (portable_copy, "SRC DST"), "split": (split_variant, "CHECKPOINT OUT"),
            "assemble": (assemble_variant, "BASE VARIANT OUT"), "base": (variant_base, "VARIANT")}

if __name__ == "__main__":  # python3 -m export.train.state COMMAND PATH...: prints the resulting path
    import sys

    command, paths = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else (None, [])
    if command not in COMMANDS or len(paths) != len(COMMANDS[command][1].split()):
        sys.exit("usage: python3 -m export.train.state " + " | ".join(f"{c} {a}" for c, (_, a) in COMMANDS.items()))
    print(COMMANDS[command][0](*map(Path, paths)))
