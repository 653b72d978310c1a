"""One preallocated KV buffer on the device (kv_cache="static"), for `decoder_fused` (the CUDA default when the
bundle's decoder_fused is the CUDA target, export/fused.py FUSED_TARGETS) and for the plain `decoder_static`.

GroupQueryAttention reads past and writes present in one buffer when both are bound to the same OrtValue
(share-buffer mode, as ORT GenAI's generator binds its KV cache): per layer and part one [1,H_kv,S,hd] OrtValue
on the device, bound as past_key_values.i.* and present.i.*. A call of T tokens writes slots [P, P+T), P =
seqlens_k + 1 - T, seqlens_k = sum(mask) - 1: the mask is [1,S], 1 for the slots in use (slot = order in the
cache, not position id: visual positions may repeat or jump), so total_sequence_length (the mask's width, read
on the host) is S in every call and every decode step has the same shapes and addresses.

    decode (T == 1)  one binding made once: embeds [1,1,D], mask [1,S], position [1,1] and logits [1,V],
                     hidden [1,1,D] are fixed device OrtValues updated in place (update_inplace), and with
                     cuda_graph the step is captured once as a CUDA graph (gpu_graph_id CUDA_GRAPH_ID) and
                     replayed; seqlens_k is computed on the device from the bound mask, so the replay reads it
                     there. decode_token() also binds the embed graph's output straight into the decoder's
                     embeds OrtValue (no host round trip for the embedding row).
    prefill (T > 1)  its own binding, outside the graph (gpu_graph_id -1): host inputs, the same cache.
    token step       where decoder_fused takes token ids (sdk/manifest_fused.py token_input, next_token): a binding
                     of input_ids [1,1] (a fixed device OrtValue) and an empty inputs_embeds [1,0,D], the same mask,
                     position and outputs, and next_token bound to an OrtValue of its own: one session run (one
                     CUDA graph replay, this binding's is the captured one; T == 1 from embeddings then runs outside
                     the graph) does embed + layers + argmax. A greedy step reads the 8 bytes of next_token back (the
                     stop check) and writes the chosen id into input_ids (8 bytes) for the next step; logits stay on
                     the device (sdk/generation.py DeviceChoice); a sampled one copies the logits row. next_token is
                     not bound to the input_ids buffer itself: ONNX Runtime's first run with a gpu_graph_id runs the
                     graph twice on the same bindings (a warm-up, then the capture), and the second would read the
                     first's output as its input. Bundles before it: the embed graph's row, the host's argmax.

decoder_static (export/model/decoder.py: ScatterElements at the position ids) is the same binding with another
slot rule: token p goes to slot p (its position id), the mask marks those slots (holes where patch positions
jump), and its views are StaticKVCache (runtimes/kv_caches.py), which carry their own mask and cannot be cut.

One sequence per backend (batch 1): new_cache() starts a new generation and older
caches are refused; a cache cut to a shorter prefix (a conversation turn, sdk/conversation.py) continues in the
same buffer, and a view whose slots a later call rewrote is refused in one line (per-slot write stamps).
The same code runs on the CPU execution provider with OrtValues in host memory: that is how CI tests it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from .inplace_cache import set_mask_length
from .kv_caches import StaticKVCache
from .positions import following

from sdk.errors import BackendError, one_line
from sdk.generation import DeviceChoice

CUDA_GRAPH_ID = "1"  # RunOptions gpu_graph_id of the captured decode step; "-1" runs outside any graph


@dataclass
class FusedDeviceCache:
    """A view of the backend's one device buffer: slots [0, length) hold this sequence."""
    length: int
    next_position: int  # runtimes/positions.py
    generation: int
    write: int  # the buffer's write count when this view was made

    def cut(self, length: int, next_position: int) -> "FusedDeviceCache":
        if not 0 <= length <= self.length:
            raise BackendError(f"cannot cut a cache of {self.length} tokens to {length}")
        return FusedDeviceCache(length, next_position, self.generation, self.write)


class DeviceBufferCaches:
    """new_cache(), the decoder step and the token step over one device KV buffer. by_position: decoder_static's
    slot rule (slot = position id, StaticKVCache views), else decoder_fused's (slot = order, FusedDeviceCache)."""

    def __init__(self, ort, session, backend, cuda_graph: bool, by_position: bool = False, token_ids: bool = False,
                 device_argmax: bool = False):
        self.ort, self.session, self.cuda_graph, self.by_position = ort, session, cuda_graph, by_position
        self.device, self.device_id = backend.ort_device, backend.device_id
        self.slots, self.max_context = backend.cache_slots, backend.max_context
        self.embed_dtype, self.kv_dtype = backend.embed_dtype, backend.kv_dtype
        self.cuda_graph_note: str | None = None
        layers = backend.num_layers
        self.past_names = [f"past_key_values.{i}.{p}" for i in range(layers) for p in ("key", "value")]
        self.present_names = [f"present.{i}.{p}" for i in range(layers) for p in ("key", "value")]
        shape = (1, backend.num_kv_heads, self.slots, backend.head_dim)
        # zeros, not uninitialised memory: masked slots are never read (or multiplied by 0), but 0 * NaN is NaN
        self.kv = [self.value(np.zeros(shape, self.kv_dtype)) for _ in self.past_names]
        self.mask = np.zeros((1, self.slots), np.int64)  # host copy of the bound mask (decoder_fused's)
        self.mask_length = 0
        self.stamps = np.zeros(self.slots, np.int64)
        self.writes = self.generation = 0
        self.step_in = {"inputs_embeds": self.value(np.zeros((1, 1, backend.hidden_size), self.embed_dtype)),
                        "attention_mask": self.value(self.mask),
                        "position_ids": self.value(np.zeros((1, 1), np.int64))}
        self.step_out = {"logits": self.value(np.zeros((1, backend.vocab_size), backend.logits_dtype)),
                         "hidden": self.value(np.zeros((1, 1, backend.hidden_size), backend.hidden_dtype))}
        self.token = self.value(np.zeros((1, 1), np.int64))
        self.next_token = self.value(np.zeros((1, 1), np.int64))  # the token step's ArgMax, read back when greedy
        self.device_argmax = token_ids and device_argmax
        self.token_ran = False  # a token step has run (refuse_token_step: only the first may fail)
        self.host_token, self.host_position = np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64)  # per step
        self.eager_options, self.graph_options = ort.RunOptions(), ort.RunOptions()
        if cuda_graph:
            self.eager_options.add_run_config_entry("gpu_graph_id", "-1")
            self.graph_options.add_run_config_entry("gpu_graph_id", CUDA_GRAPH_ID)
        # binding name -> its maker; the captured one is replayed as the CUDA graph, the others run eagerly
        self.makers = {"embeds": self._binding}
        if token_ids:
            self.no_embeds = self.value(np.zeros((1, 0, backend.hidden_size), self.embed_dtype))
            self.makers["ids"] = partial(self._binding, ids=True)
        self.bindings = {name: make() for name, make in self.makers.items()}
        self.embed_binding = None

    def value(self, array: np.ndarray):
        """An OrtValue on this backend's device holding a copy of `array` (its address fixed from now on)."""
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(v.shape())) for v in self.kv) * np.dtype(self.kv_dtype).itemsize

    def _bind_cache(self, binding) -> None:
        for past, present, value in zip(self.past_names, self.present_names, self.kv):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)  # the same buffer: the graph writes its new slots in place

    def _binding(self, ids: bool = False):
        """A decode step's binding: from the embeds row (step_in), or with ids from input_ids (and an empty
        inputs_embeds [1,0,D]), next_token out where the device takes the argmax."""
        binding = self.session.io_binding()
        inputs = {**self.step_in, "inputs_embeds": self.no_embeds, "input_ids": self.token} if ids else self.step_in
        outputs = {**self.step_out, "next_token": self.next_token} if ids and self.device_argmax else self.step_out
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in outputs.items():
            binding.bind_ortvalue_output(name, value)
        self._bind_cache(binding)
        return binding

    def new_cache(self, batch: int):
        if batch != 1:
            raise BackendError(f"the device KV cache serves batch 1, not {batch}: load the backend with "
                               "kv_cache='device' (and decoder_flavour='plain') for batches")
        self.generation += 1
        if self.by_position:
            return StaticKVCache(length=0, mask=np.zeros((1, self.slots), np.int64), generation=self.generation)
        return FusedDeviceCache(0, 0, self.generation, self.writes)

    def _advance(self, cache, positions: np.ndarray) -> tuple[int, np.ndarray]:
        """Checks the call of `positions` [1,T] from `cache` -> (the grown cache's length, the mask it feeds)."""
        if cache.generation != self.generation:
            raise BackendError("this KV cache was replaced by a newer new_cache() of the same backend (one device "
                               "cache per backend): use the newest one, or one backend per concurrent sequence")
        if self.by_position:  # decoder_static writes each token to the slot of its position
            end, mask = following(positions), cache.mask.copy()
            if end <= self.slots and int(positions.min()) < cache.length:
                raise BackendError(f"decoder_static writes token p to slot p: positions from {int(positions.min())} "
                                   f"would overwrite a cache of {cache.length}; use kv_cache='device'")
        else:
            end, mask = cache.length + positions.shape[1], self.mask
            if cache.write != self.writes and cache.length and int(self.stamps[:cache.length].max()) > cache.write:
                raise BackendError("this KV cache's slots were overwritten by a later call from a shorter cache of "
                                   "the same sequence: continue from the newest cache, or start one with new_cache()")
        if end > self.slots:
            raise BackendError(f"the device KV cache holds {self.slots} tokens and this sequence needs {end}: load "
                               f"the backend with a larger max_cache (up to {self.max_context})")
        if self.by_position:
            mask[0, positions[0]] = 1
        else:
            self.mask_length = set_mask_length(mask, self.mask_length, end)
        return end, mask

    def _grown(self, cache, end: int, mask: np.ndarray, next_position: int):
        if self.by_position:
            return StaticKVCache(length=end, mask=mask, generation=cache.generation)
        self.writes += 1
        self.stamps[cache.length:end] = self.writes
        return FusedDeviceCache(end, next_position, cache.generation, self.writes)

    @property
    def captured(self) -> str:
        """The binding replayed as the CUDA graph: the token step's while it has one."""
        return "ids" if "ids" in self.bindings else "embeds"

    def _run_step(self, name: str) -> None:
        """A bound decode step: the captured binding replayed as a CUDA graph where it can be, else run eagerly."""
        if self.cuda_graph and name == self.captured:
            try:
                self.session.run_with_iobinding(self.bindings[name], self.graph_options)
                return
            except Exception as err:  # refused at run time: the capture, or the binding itself (eager tells)
                self.bindings[name] = self.makers[name]()
                self.session.run_with_iobinding(self.bindings[name], self.eager_options)  # raises: the binding's
                self.cuda_graph = False
                self.cuda_graph_note = f"CUDA graph capture failed at run time: {one_line(err, 300)}"
                return
        self.session.run_with_iobinding(self.bindings[name], self.eager_options)

    def step(self, inputs_embeds: np.ndarray, cache, positions: np.ndarray, bias: np.ndarray | None,
             attention: bool):
        """inputs_embeds [1,T,D], positions [1,T] -> (logits [1,V], hidden [1,T,D], grown cache, None). bias and
        attention never come (neither graph has them; the backend refuses them first)."""
        end, mask = self._advance(cache, positions)
        embeds = np.ascontiguousarray(inputs_embeds, self.embed_dtype)
        if inputs_embeds.shape[1] == 1:
            self.step_in["inputs_embeds"].update_inplace(embeds)
            self.step_in["attention_mask"].update_inplace(mask)
            self.step_in["position_ids"].update_inplace(positions)
            self._run_step("embeds")
            logits, hidden = self.step_out["logits"].numpy(), self.step_out["hidden"].numpy()
        else:  # a prefill: outside the graph, host inputs, outputs to the host
            binding = self.session.io_binding()
            binding.bind_cpu_input("inputs_embeds", embeds)
            binding.bind_cpu_input("attention_mask", mask)
            binding.bind_cpu_input("position_ids", positions)
            binding.bind_output("logits", "cpu")
            binding.bind_output("hidden", "cpu")
            self._bind_cache(binding)
            self.session.run_with_iobinding(binding, self.eager_options)
            logits, hidden = (v.numpy() for v in binding.get_outputs()[:2])
        return logits, hidden, self._grown(cache, end, mask, following(positions)), None

    def refuse_token_step(self) -> bool:
        """After the token step's first run failed (onnxruntime refused it): drop it -> whether there was one to
        drop. Later failures are not refusals (False). The slots that run wrote are written again by the retry."""
        if "ids" not in self.bindings or self.token_ran:
            return False
        del self.bindings["ids"], self.makers["ids"]
        self.device_argmax = False
        return True

    def token_step(self, embed_session, token_id: int, cache, greedy: bool = False):
        """A decode step from a token id -> (logits [1,V] or, greedy with the device's argmax, a DeviceChoice;
        grown cache): the token step's one run where the graph takes ids, else the embed graph writes its row into
        the bound embeds OrtValue and the decode step runs."""
        self.host_position[0, 0], self.host_token[0, 0] = cache.next_position, token_id
        positions = self.host_position
        end, mask = self._advance(cache, positions)
        self.token.update_inplace(self.host_token)
        if "ids" not in self.bindings:
            if self.embed_binding is None:
                self.embed_binding = embed_session.io_binding()
                self.embed_binding.bind_ortvalue_input("input_ids", self.token)
                self.embed_binding.bind_ortvalue_output("inputs_embeds", self.step_in["inputs_embeds"])
            embed_session.run_with_iobinding(self.embed_binding)
        self.step_in["attention_mask"].update_inplace(mask)
        self.step_in["position_ids"].update_inplace(positions)
        self._run_step(self.captured)
        self.token_ran = True
        grown = self._grown(cache, end, mask, cache.next_position + 1)
        if greedy and self.device_argmax:
            return DeviceChoice(int(self.next_token.numpy()[0, 0]), self.step_out["logits"].numpy), grown
        return self.step_out["logits"].numpy(), grown
