"""Stage mv's visual setting: the budget each frame is encoded at and the decoder positions its tokens take.

The default is the --init model's own (its train_config.json: the default model is half budget, patch positions),
so a frame reaches the LLM as the single-frame model was trained to read it. It is kept where the LLM's context
holds the request at N_max frames, else the next candidate that fits is taken and why is recorded:

    own budget, own positions -> own budget, sequence positions -> quarter, own -> quarter, sequence

Positions a request needs (what sdk/frames.py and Pipeline.prefill_positions lay out; TEXT_ROOM tokens of
template, question and answer, as sdk.frames.Frames.fitting leaves):
    concat, patch     n * N + (n - 1) * separator + TEXT_ROOM   every frame its own block of N patch positions,
                                                                in order (frame f's tokens at its block's start +
                                                                their patch index, the text after at its
                                                                full-budget place): frames differ by block and
                                                                by the separator between them
    concat, sequence  n * K + (n - 1) * separator + TEXT_ROOM
    qformer, mivpg    R + TEXT_ROOM                              the adapter's R tokens take sequence positions
                                                                whatever the frames' setting (the per-frame
                                                                tokens only reach the adapter)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sdk.frames import TEXT_ROOM
from sdk.manifest_multi import ADAPTER_MODES

from export.model.reducers import REDUCERS, resolve_budget


@dataclass
class VisualSetting:
    budget: str | int
    positions: str  # "patch" or "sequence": what `pipmm export --visual-positions` writes for this run
    source: str  # "init" (the init model's own), "fallback" (its own did not fit) or "given" (flags)
    needed_positions: int  # at n_max frames, by the rule above
    context: int  # the LLM's max_position_embeddings
    rejected: list[dict] = field(default_factory=list)  # candidates before it: setting, positions needed, why not

    def to_dict(self) -> dict:
        return asdict(self)


def needed(mode: str, frames: int, tokens: int, patches: int, positions: str, slots: int, separator: int) -> int:
    """Decoder positions of a request of `frames` frames (module docstring)."""
    if mode in ADAPTER_MODES:
        return slots + TEXT_ROOM
    per_frame = patches if positions == "patch" else tokens
    return frames * per_frame + (frames - 1) * separator + TEXT_ROOM


def own_setting(parent: dict | None) -> tuple[str | int, str]:
    """The init model's budget and positions (a checkpoint without train_config.json: half, sequence)."""
    parent = parent or {}
    return parent.get("budget") or parent.get("vision", {}).get("budget") or "half", \
        parent.get("visual_positions") or parent.get("positions") or "sequence"  # stage 2's key, stage mv's


def choose(mode: str, parent: dict | None, reducer: str, n_max: int, patches: int, context: int, slots: int,
           separator: int, budget: str | int | None = None, positions: str | None = None) -> VisualSetting:
    """The setting of a stage-mv run (module docstring). `budget` / `positions` given: those, checked to fit."""
    own_budget, own_positions = own_setting(parent)
    allowed = REDUCERS[reducer].positions
    first = (budget or own_budget, positions or own_positions)
    candidates = [first] if budget is not None and positions is not None else \
        [first, (first[0], "sequence"), ("quarter", first[1]), ("quarter", "sequence")]
    rejected = []
    for b, p in dict.fromkeys(candidates):  # in order, without repeats
        if budget is not None and b != budget or positions is not None and p != positions:
            continue  # a given flag is kept
        need = needed(mode, n_max, resolve_budget(b, patches), patches, p, slots, separator)
        if p not in allowed:
            rejected.append({"budget": b, "positions": p, "why": f"reducer {reducer} takes {'/'.join(allowed)} only"})
        elif need > context:
            rejected.append({"budget": b, "positions": p, "needed_positions": need,
                             "why": f"{mode} at {n_max} frames needs {need} positions, the context holds {context}"})
        else:
            given = budget is not None or positions is not None
            source = "given" if given else "init" if (b, p) == (own_budget, own_positions) else "fallback"
            return VisualSetting(b, p, source, need, context, rejected)
    raise ValueError("; ".join(r["why"] for r in rejected) + ": lower --n-max, or pass a smaller --budget")
