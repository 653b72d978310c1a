"""transformers' own LlavaForConditionalGeneration.generate, timed like `pipmm bench` times a bundle.

Used by `pipmm bench --compare-hf CHECKPOINT_DIR`: sdk/cli.py PEERS imports this module only then (it needs torch)
and passes run_hf to sdk.bench.bench as its `peer`; sdk/ never imports export/. The same pixel values (our CLIP
preprocessing equals transformers' processor, tests/test_preprocess.py) and the same chat turn with the
checkpoint's full visual-token count (sdk.bench.full_budget_tokens); greedy, exactly N new tokens (min_new_tokens).
Time to first token is measured from the call of generate() to the first new token the streamer receives
(so it excludes image preprocessing, which the bundle's figure includes); decode rate = (N - 1) tokens over the
time from the first to the last new token, the definition of the Pipeline's tokens/s (sdk/pipeline.py Result).
The streamer synchronises the device at each token.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from sdk.bench import summary

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class TokenClock:
    """A transformers streamer that only records when each new token arrives."""

    def __init__(self, device: str):
        self.device, self.times, self.prompt_seen = device, [], False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt ids
            self.prompt_seen = True
            return
        _sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_hf(checkpoint_dir, pixel_values: np.ndarray, input_ids: np.ndarray, new_tokens: int, runs: int, warmup: int,
           dtype: str = "fp16", device: str = "cuda", attn: str = "eager", eos_ids=()) -> dict:
    from transformers import LlavaForConditionalGeneration
    import transformers

    torch_dtype = TORCH_DTYPES.get(dtype, torch.float32)
    load_start = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint_dir, dtype=torch_dtype, use_safetensors=True,
                                                          attn_implementation=attn).to(device).eval()
    load_s = time.perf_counter() - load_start
    ids = torch.from_numpy(np.asarray(input_ids, np.int64))[None].to(device)
    pixels = torch.from_numpy(np.ascontiguousarray(pixel_values)).to(device, torch_dtype)
    mask = torch.ones_like(ids)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    stages = {"ttft_ms": [], "decode_ms_per_token": [], "decode_tokens_per_s": [], "total_ms": []}
    tokens = None
    pad = next(iter(eos_ids), None)
    for index in range(warmup + runs):
        clock = TokenClock(device)
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, num_beams=1, streamer=clock,
                                 pad_token_id=pad)
        _sync(device)
        end = time.perf_counter()
        if index < warmup:
            continue
        steps = len(clock.times) - 1
        decode_s = clock.times[-1] - clock.times[0] if steps > 0 else 0.0
        stages["ttft_ms"].append((clock.times[0] - start) * 1000.0)
        stages["decode_ms_per_token"].append(decode_s * 1000.0 / steps if steps else None)
        stages["decode_tokens_per_s"].append(steps / decode_s if steps and decode_s > 0 else None)
        stages["total_ms"].append((end - start) * 1000.0)
        tokens = tokens or out[0, ids.shape[1]:].tolist()
    memory = {}
    if device.startswith("cuda"):
        memory["torch_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        memory["torch_peak_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    result = {"transformers": transformers.__version__, "torch": torch.__version__, "dtype": dtype, "attn": attn,
              "device": device, "visual_tokens": int((ids == model.config.image_token_index).sum()),
              "prompt_tokens": int(ids.shape[1]), "load_s": round(load_s, 2),
              "stages": {name: summary(values) for name, values in stages.items()}, "memory": memory, "tokens": tokens}
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result
