"""The CPU's in-place KV cache for `decoder_fused` (kv_cache="inplace", the CPU default when that graph runs).

GroupQueryAttention (export/fused.py) takes its past and present K/V bound to one preallocated buffer
[1,H_kv,S,hd] per layer and part, and writes a call's T new slots in place at [P, P+T) (P = sum(mask) - T,
the cached length): its "past_present_share_buffer" mode, which ORT GenAI's generator uses too. So a decode
step copies no cache: no numpy concatenation, no grown present handed back. Per step the host binds the
token's embedding row, a view of a preallocated all-ones mask [1,P+1], its position and (CMAI bundles) a zero
view of image_bias; logits [1,V] and hidden [1,1,D] land in buffers bound once per sequence.

Sequences and buffers: new_cache() leases a buffer (a free one from the pool, or a new one); every cache that
grows from it holds the lease, and the buffer is free again when none of them is alive. A cache is a view
(length, next_position) of its buffer, valid while slots [0, length) hold what it was made from: calls from a
shorter cache of the same sequence (CMAI's probe and re-run, a conversation cut back to a common prefix)
overwrite only the slots after it. Each slot records the write that filled it, so using a cache whose slots
were rewritten since is refused in one line instead of reading another sequence's keys.

The buffer holds S = min(max_context, max_cache or PIPMM_MAX_CACHE or 4096) slots and grows (copying) when a
sequence needs more. Zeros, not uninitialised memory: the kernel reads only slots below the call's total
length, and zeros cost no pages until written.

The logits and hidden arrays a call returns are the sequence's own buffers for T == 1 (logits for any T):
they stay valid until the next decoder call on the same sequence; copy them to keep them longer.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from .positions import following

from sdk.errors import BackendError


class _Lease:
    """Held by every cache view of one sequence: its buffer is free when no view is alive."""


class KVBuffer:
    """One sequence's K/V slots (2 per layer, [1,H_kv,S,hd]), bound as both past and present of the graph, and
    its logits [1,V] and hidden [1,1,D] outputs."""

    def __init__(self, ort, layers: int, shape: tuple[int, int, int, int], dtype, outputs: dict[str, tuple]):
        self.ort, self.dtype = ort, dtype
        self.arrays = [np.zeros(shape, dtype) for _ in range(2 * layers)]
        self.stamps = np.zeros(shape[2], np.int64)  # the write that last filled each slot
        self.writes = 0
        self.outputs = {name: np.zeros(out_shape, out_dtype) for name, (out_shape, out_dtype) in outputs.items()}
        self.output_values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in self.outputs.items()}
        self._wrap()
        self.lease = lambda: None  # weakref to the current sequence's _Lease; dead = free
        self.decode_binding = None  # the T == 1 step's IO binding, made on first use (InPlaceCaches)

    def _wrap(self) -> None:
        self.values = [self.ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]  # no copy: the same memory

    @property
    def slots(self) -> int:
        return self.arrays[0].shape[2]

    def grow(self, slots: int, used: int) -> None:
        """Reallocate with `slots` slots, keeping [0, used)."""
        shape = (*self.arrays[0].shape[:2], slots, self.arrays[0].shape[3])
        grown = [np.zeros(shape, self.dtype) for _ in self.arrays]
        for new, old in zip(grown, self.arrays):
            new[:, :, :used] = old[:, :, :used]
        stamps = np.zeros(slots, np.int64)
        stamps[:used] = self.stamps[:used]
        self.arrays, self.stamps, self.decode_binding = grown, stamps, None
        self._wrap()


@dataclass
class InPlaceKVCache:
    buffer: KVBuffer
    lease: _Lease
    length: int  # slots [0, length) hold this sequence
    next_position: int  # runtimes/positions.py
    write: int  # buffer.writes when this view was made: valid while its slots' stamps are <= write

    def cut(self, length: int, next_position: int) -> "InPlaceKVCache":
        """The first `length` tokens of this cache (a conversation's common prefix, sdk/conversation.py)."""
        if not 0 <= length <= self.length:
            raise BackendError(f"cannot cut a cache of {self.length} tokens to {length}")
        return InPlaceKVCache(self.buffer, self.lease, length, next_position, self.write)


class InPlaceCaches:
    """new_cache() and the decoder call of kv_cache='inplace' for one decoder session (batch 1)."""

    def __init__(self, ort, session, backend):
        """backend: the OnnxRuntimeBackend whose model sizes, dtypes and cache_slots (the first S) this reads."""
        self.ort, self.session = ort, session
        self.layers, self.kv_dtype, self.embed_dtype = backend.num_layers, backend.kv_dtype, backend.embed_dtype
        self.shape = (1, backend.num_kv_heads, backend.cache_slots, backend.head_dim)
        self.max_context = backend.max_context
        self.outputs = {"logits": ((1, backend.vocab_size), backend.logits_dtype),
                        "hidden": ((1, 1, backend.hidden_size), backend.hidden_dtype)}
        self.past_names = [f"past_key_values.{i}.{p}" for i in range(self.layers) for p in ("key", "value")]
        self.present_names = [f"present.{i}.{p}" for i in range(self.layers) for p in ("key", "value")]
        self.ones = np.ones((1, self.max_context), np.int64)  # attention_mask views [1,P+T]: GQA reads lengths only
        self.has_attention = backend.has_attention
        self.pool: list[KVBuffer] = []

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for buf in self.pool for a in buf.arrays)

    def new_cache(self, batch: int) -> InPlaceKVCache:
        if batch != 1:
            raise BackendError(f"the in-place KV cache serves batch 1, not {batch}: load the backend with "
                               "kv_cache='numpy' for batches")
        free = [buf for buf in self.pool if buf.lease() is None]
        for extra in free[1:]:  # keep one free buffer for the next request, give the rest back
            self.pool.remove(extra)
        if free:
            buffer = free[0]
        else:
            buffer = KVBuffer(self.ort, self.layers, self.shape, self.kv_dtype, self.outputs)
            self.pool.append(buffer)
        lease = _Lease()
        buffer.lease = weakref.ref(lease)
        return InPlaceKVCache(buffer, lease, 0, 0, buffer.writes)

    def _bind_cache(self, binding, buffer: KVBuffer) -> None:
        for past, present, value in zip(self.past_names, self.present_names, buffer.values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)  # the same buffer: the graph writes its new slots in place
        binding.bind_ortvalue_output("logits", buffer.output_values["logits"])

    def _decode_binding(self, buffer: KVBuffer):
        """The T == 1 step's binding: cache, logits and hidden bound once; the inputs are rebound per step."""
        if buffer.decode_binding is None:
            binding = self.session.io_binding()
            self._bind_cache(binding, buffer)
            binding.bind_ortvalue_output("hidden", buffer.output_values["hidden"])
            buffer.decode_binding = binding
        return buffer.decode_binding

    def _call_binding(self, buffer: KVBuffer, attention: bool):
        """A prefill's or CMAI probe's binding: hidden [1,T,D] (and attention) allocated by onnxruntime."""
        binding = self.session.io_binding()
        self._bind_cache(binding, buffer)
        binding.bind_output("hidden", "cpu")
        if attention:
            binding.bind_output("attention", "cpu")
        return binding

    def _check(self, cache: InPlaceKVCache, end: int) -> None:
        buffer = cache.buffer
        if cache.write != buffer.writes and cache.length and int(buffer.stamps[:cache.length].max()) > cache.write:
            raise BackendError("this KV cache's slots were overwritten by a later call from a shorter cache of the "
                               "same sequence (in-place CPU cache): continue from the newest cache, or start a new "
                               "one with new_cache()")
        if end > buffer.slots:
            if end > self.max_context:
                raise BackendError(f"the sequence needs {end} cache slots and the context holds {self.max_context}: "
                                   "shorten the prompt or generate fewer tokens")
            buffer.grow(min(self.max_context, max(end, 2 * buffer.slots)), cache.length)

    def step(self, inputs_embeds: np.ndarray, cache: InPlaceKVCache, positions: np.ndarray,
             bias: np.ndarray | None, attention: bool):
        """inputs_embeds [1,T,D], positions [1,T], bias [1,L_c,P+T] or None -> (logits [1,V], hidden [1,T,D],
        the grown cache, attention [1,L_c,T,P+T] or None)."""
        inputs_embeds = np.ascontiguousarray(inputs_embeds, self.embed_dtype)
        t = inputs_embeds.shape[1]
        end = cache.length + t
        self._check(cache, end)
        buffer = cache.buffer
        attention = attention and self.has_attention
        step = t == 1 and not attention
        binding = self._decode_binding(buffer) if step else self._call_binding(buffer, attention)
        binding.bind_cpu_input("inputs_embeds", inputs_embeds)
        binding.bind_cpu_input("attention_mask", self.ones[:, :end])
        binding.bind_cpu_input("position_ids", positions)
        if bias is not None:
            binding.bind_cpu_input("image_bias", bias)
        self.session.run_with_iobinding(binding)
        hidden, probs = buffer.outputs["hidden"], None
        if not step:  # outputs in the order bound: the cache, logits, hidden[, attention]
            got = binding.get_outputs()[len(self.present_names) + 1:]
            hidden = got[0].numpy()
            probs = got[1].numpy() if attention else None
        buffer.writes += 1
        buffer.stamps[cache.length:end] = buffer.writes
        grown = InPlaceKVCache(buffer, cache.lease, end, following(positions), buffer.writes)
        return buffer.outputs["logits"], hidden, grown, probs
