"""Reading and writing manifest sections (sdk/manifest.py): field checks, the one-line error of the first
bad field, and to_dict for every section dataclass."""

from __future__ import annotations

import math
import numbers
from dataclasses import field, fields

from .errors import BundleError

REQUIRED = object()
REEXPORT = "the manifest is damaged: copy the bundle again or re-export it"


def show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value, low: int | None = None) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and (low is None or value >= low)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def list_of(check):
    return lambda value: isinstance(value, list) and all(check(v) for v in value)


def map_of(check):
    return lambda value: isinstance(value, dict) and all(isinstance(k, str) and check(v) for k, v in value.items())


def optional(check):
    return lambda value: value is None or check(value)


def is_str(value) -> bool:
    return isinstance(value, str)


def is_name(value) -> bool:
    return isinstance(value, str) and bool(value)


def is_dict(value) -> bool:
    return isinstance(value, dict)


class Fields:
    """One section's dict, read key by key; the first missing or bad key raises a one-line BundleError."""

    def __init__(self, data, where: str, source: str):
        if not isinstance(data, dict):
            raise BundleError(f"{source}: '{where}' must be an object, not {show(data)}; {REEXPORT}")
        self.data, self.where, self.source = data, where, source

    def fail(self, key: str, problem: str) -> BundleError:
        return BundleError(f"{self.source}: {self.where} '{key}' {problem}; {REEXPORT}")

    def get(self, key: str, check, wants: str, default=REQUIRED):
        if key not in self.data:
            if default is REQUIRED:
                raise BundleError(f"{self.source}: {self.where} lacks '{key}': the bundle is incomplete; re-export it")
            return default
        value = self.data[key]
        if not check(value):
            raise self.fail(key, f"must be {wants}, not {show(value)}")
        return value

    def extra(self, cls) -> dict:
        known = {f.metadata.get("key", f.name) for f in fields(cls)}
        return {k: v for k, v in self.data.items() if k not in known}


def plain(value):
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


class Section:
    """to_dict for every section: fields in order (optional ones left out while None), then `extra`."""

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.metadata.get("omit_none")):
                continue
            out[f.metadata.get("key", f.name)] = plain(value)
        return {**out, **plain(self.extra)}


def omit_none():
    return field(default=None, metadata={"omit_none": True})


def extra_field():
    return field(default_factory=dict, compare=False)
