"""The CPU's in-place KV cache for `decoder_fused` (kv_cache="inplace", the CPU default when that graph runs).

GroupQueryAttention (export/fused.py) takes its past and present K/V bound to one preallocated buffer
[1,H_kv,S,hd] per layer and part and writes a call's T new slots in place at [P, P+T) (P = seqlens_k + 1 - T,
seqlens_k = sum(mask) - 1): its past/present share-buffer mode, which ORT GenAI's generator uses too. The
graph's mask is as wide as the buffer, [1,S], 1 for the slots in use (GroupQueryAttention reads its sum; with
query_seqlens the total length S is only an upper bound, so the kernel still reads P + T slots, not S), and
image_bias likewise [1,L_c,S]. So every input and output of a decode step has a fixed shape and address and is
bound once per buffer: a step copies the token's embedding row and its position into their bound arrays, sets
one mask slot, copies the CMAI bias row(s) ([1,L_c,P+1], zeros without inhibit) and runs. No cache copy, no
numpy concatenation, no allocation: logits [1,V] and hidden [1,1,D] land in the buffer's own arrays.

Sequences and buffers: new_cache() leases a buffer (a free one from the pool, or a new one); every cache that
grows from it holds the lease, and the buffer is free again when none of them is alive. A cache is a view
(length, next_position) of its buffer, valid while slots [0, length) hold what it was made from: calls from a
shorter cache of the same sequence (CMAI's probe and re-run, a conversation cut back to a common prefix)
overwrite only the slots after it. Each slot records the write that filled it, so using a cache whose slots
were rewritten since is refused in one line instead of reading another sequence's keys.

The buffer holds S = min(max_context, max_cache or PIPMM_MAX_CACHE or 4096) slots and grows (copying) when a
sequence needs more. Zeros, not uninitialised memory: zeros cost no pages until written.

The logits and hidden arrays a call returns are the sequence's own buffers for T == 1 (logits for any T):
they stay valid until the next decoder call on the same sequence; copy them to keep them longer.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from .decoder_flavour import FUSED_DECODER
from .positions import following

from sdk.errors import BackendError
from sdk.manifest_fused import FusedDecoderEntry


def cpu_cache(bundle, decoder_graph: str, flavour_note: str | None) -> tuple[str, str | None]:
    """-> ("inplace", None) where the in-place cache can run, else ("numpy", why not) for the backend's info(). The
    plain decoder's present is concat(past, new): it has no buffer to share."""
    if decoder_graph != FUSED_DECODER:
        return "numpy", f"the in-place cache needs {FUSED_DECODER}: {flavour_note}"
    entry = FusedDecoderEntry.of(bundle)
    if entry.target != "cpu":  # export/fused.py FUSED_TARGETS: no query_seqlens in the CUDA one
        return "numpy", f"{FUSED_DECODER} is the {entry.target} target (no query_seqlens): the numpy cache, or " \
                        "kv_cache='static' for its device-buffer cache (runtimes/fused_device.py)"
    if not entry.query_seqlens:
        return "numpy", f"{FUSED_DECODER} predates query_seqlens: re-add it (--overwrite) for the in-place cache"
    return "inplace", None


def set_mask_length(mask: np.ndarray, length: int, end: int) -> int:
    """mask [1,S]: slots [0, end) = 1, the rest 0, changing only what differs from `length` (the last call's) -> end."""
    if end > length:
        mask[0, length:end] = 1
    else:
        mask[0, end:length] = 0
    return end


class _Lease:
    """Held by every cache view of one sequence: its buffer is free when no view is alive."""


class KVBuffer:
    """One sequence's K/V slots (2 per layer, [1,H_kv,S,hd]), bound as both past and present of the graph, and
    the decode step's other inputs and outputs, each a fixed array bound once."""

    def __init__(self, ort, caches: "InPlaceCaches", slots: int):
        self.ort, self.caches = ort, caches
        self.lease = lambda: None  # weakref to the current sequence's _Lease; dead = free
        self.writes = 0
        c = caches
        self.embeds = np.zeros((1, 1, c.hidden_size), c.embed_dtype)
        self.position, self.token = np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64)
        self.embed_binding = None  # the embed graph's, writing into self.embeds (InPlaceCaches.token_step)
        self.outputs = {"logits": np.zeros((1, c.vocab_size), c.logits_dtype),
                        "hidden": np.zeros((1, 1, c.hidden_size), c.hidden_dtype)}
        self.arrays = self.mask = self.bias = self.stamps = None
        self.bias_written = False  # a CMAI bias was written since token_step last zeroed the prefix
        self._allocate(slots, 0)

    def _allocate(self, slots: int, used: int) -> None:
        """(Re)allocate the slot-sized arrays with `slots` slots, keeping slots [0, used)."""
        c, old = self.caches, self.arrays
        self.arrays = [np.zeros((1, c.kv_heads, slots, c.head_dim), c.kv_dtype) for _ in range(2 * c.layers)]
        mask, bias, stamps = np.zeros((1, slots), np.int64), None, np.zeros(slots, np.int64)
        if c.bias_layers:
            bias = np.zeros((1, c.bias_layers, slots), c.bias_dtype)
        if old is not None:
            for new, kept in zip(self.arrays, old):
                new[:, :, :used] = kept[:, :, :used]
            stamps[:used] = self.stamps[:used]
        self.mask, self.bias, self.stamps, self.mask_length = mask, bias, stamps, 0
        self.decode_binding = None  # bound to the old arrays: made again on first use

    @property
    def slots(self) -> int:
        return self.arrays[0].shape[2]

    def set_length(self, end: int) -> None:
        self.mask_length = set_mask_length(self.mask, self.mask_length, end)

    def bind_fixed(self, binding) -> None:
        """The inputs and outputs every call shares: the cache (past and present alike), mask, bias, logits."""
        caches, ort = self.caches, self.ort
        for past, present, array in zip(caches.past_names, caches.present_names, self.arrays):
            value = ort.OrtValue.ortvalue_from_numpy(array)  # the same memory, no copy
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)  # the same buffer: the graph writes its new slots in place
        binding.bind_cpu_input("attention_mask", self.mask)
        if self.bias is not None:
            binding.bind_cpu_input("image_bias", self.bias)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.outputs["logits"]))


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
        """backend: the OnnxRuntimeBackend whose model sizes, dtypes, cache_slots (the first S) and prefill_session
        (the session of calls with T > 1: `session` itself, or the same graph on more threads) this reads."""
        self.ort, self.session = ort, session
        for name in ("kv_dtype", "embed_dtype", "logits_dtype", "hidden_dtype", "bias_dtype", "bias_layers",
                     "hidden_size", "vocab_size", "head_dim", "max_context", "has_attention", "cache_slots",
                     "prefill_session", "embed_table"):
            setattr(self, name, getattr(backend, name))
        self.layers, self.kv_heads = backend.num_layers, backend.num_kv_heads
        self.past_names = [f"past_key_values.{i}.{p}" for i in range(self.layers) for p in ("key", "value")]
        self.present_names = [f"present.{i}.{p}" for i in range(self.layers) for p in ("key", "value")]
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
        buffer = free[0] if free else KVBuffer(self.ort, self, self.cache_slots)
        if not free:
            self.pool.append(buffer)
        lease = _Lease()
        buffer.lease = weakref.ref(lease)
        return InPlaceKVCache(buffer, lease, 0, 0, buffer.writes)

    def _decode_binding(self, buffer: KVBuffer):
        """The T == 1 step's binding: everything bound once, to arrays the step writes in place."""
        if buffer.decode_binding is None:
            binding = self.session.io_binding()
            buffer.bind_fixed(binding)
            binding.bind_cpu_input("inputs_embeds", buffer.embeds)
            binding.bind_cpu_input("position_ids", buffer.position)
            binding.bind_ortvalue_output("hidden", self.ort.OrtValue.ortvalue_from_numpy(buffer.outputs["hidden"]))
            buffer.decode_binding = binding
        return buffer.decode_binding

    def token_step(self, embed_session, token_id: int, cache: InPlaceKVCache, greedy: bool = False):
        """A decode step from a token id, no CMAI bias: the embed graph (or the backend's host table of its rows)
        writes the row into the decoder's bound input, then the decoder runs -> (logits [1,V], the grown cache). greedy: asks nothing here (the logits are
        host memory already; the device-buffer cache's token step takes its argmax on the device)."""
        end = cache.length + 1
        self._check(cache, end)
        buffer = cache.buffer
        buffer.set_length(end)
        if buffer.bias is not None:  # a token step has no bias: zero the prefix after a biased call, else the new slot
            if buffer.bias_written:
                buffer.bias[:, :, :end], buffer.bias_written = 0, False
            else:
                buffer.bias[:, :, cache.length] = 0
        buffer.position[0, 0] = cache.next_position
        if self.embed_table is not None:  # the backend's host rows (a small vocabulary): a copy, no session run
            if not 0 <= token_id < len(self.embed_table):  # numpy would wrap a negative id
                raise BackendError(f"token id {token_id} is outside the vocabulary (0..{len(self.embed_table) - 1})")
            buffer.embeds[0, 0] = self.embed_table[token_id]
        else:
            if buffer.embed_binding is None:
                buffer.embed_binding = embed_session.io_binding()
                buffer.embed_binding.bind_cpu_input("input_ids", buffer.token)
                buffer.embed_binding.bind_ortvalue_output("inputs_embeds", self.ort.OrtValue.ortvalue_from_numpy(
                    buffer.embeds))
            buffer.token[0, 0] = token_id
            embed_session.run_with_iobinding(buffer.embed_binding)
        self.session.run_with_iobinding(self._decode_binding(buffer))
        buffer.writes += 1
        buffer.stamps[cache.length] = buffer.writes
        return buffer.outputs["logits"], InPlaceKVCache(buffer, cache.lease, end, cache.next_position + 1, buffer.writes)

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
            buffer._allocate(min(self.max_context, max(end, 2 * buffer.slots)), cache.length)

    def step(self, inputs_embeds: np.ndarray, cache: InPlaceKVCache, positions: np.ndarray,
             bias: np.ndarray | None, attention: bool):
        """inputs_embeds [1,T,D], positions [1,T], bias [1,L_c,P+T] or None -> (logits [1,V], hidden [1,T,D],
        the grown cache, attention [1,L_c,T,P+T] or None)."""
        t = inputs_embeds.shape[1]
        end = cache.length + t
        self._check(cache, end)
        buffer = cache.buffer
        buffer.set_length(end)
        if bias is not None:  # slots from `end` on are masked: what they hold is never read
            buffer.bias[:, :, :end], buffer.bias_written = bias, True
        attention = attention and self.has_attention
        if t == 1 and not attention:
            binding = self._decode_binding(buffer)
            buffer.embeds[...] = inputs_embeds
            buffer.position[...] = positions
        else:  # a prefill or a CMAI probe: its own binding, hidden [1,T,D] (and attention) from onnxruntime
            binding = self.prefill_session.io_binding()
            buffer.bind_fixed(binding)
            binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, self.embed_dtype))
            binding.bind_cpu_input("position_ids", positions)
            binding.bind_output("hidden", "cpu")
            if attention:
                binding.bind_output("attention", "cpu")
        (self.session if binding is buffer.decode_binding else self.prefill_session).run_with_iobinding(binding)
        hidden, probs = buffer.outputs["hidden"], None
        if binding is not buffer.decode_binding:  # outputs in the order bound: the cache, logits, hidden[, attention]
            got = binding.get_outputs()[len(self.present_names) + 1:]
            hidden = got[0].numpy()
            probs = np.ascontiguousarray(got[1].numpy()[..., :end]) if attention else None  # [1,L_c,T,S] -> P+T
        buffer.writes += 1
        buffer.stamps[cache.length:end] = buffer.writes
        grown = InPlaceKVCache(buffer, cache.lease, end, following(positions), buffer.writes)
        return buffer.outputs["logits"], hidden, grown, probs
