"""Describe the sample scene with the embedded default model, then stream a second answer.

    python samples/describe.py [IMAGE] [PROMPT]
"""

import sys
from pathlib import Path

import sdk

image = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("scene.png")
prompt = sys.argv[2] if len(sys.argv) > 2 else "What color is the large cross?"

pipeline = sdk.load()  # the embedded default bundle, ONNX Runtime on the best device here
result = pipeline.generate(image, prompt)
print(f"Q: {prompt}\nA: {result.text}")
print(f"   {result.visual_tokens} visual tokens, time to first token {result.timings['ttft_ms']:.1f} ms, "
      f"{result.timings['tokens_per_s']:.0f} tokens/s")

print("Q: Describe the image.\nA: ", end="")
for piece in pipeline.stream(image, "Describe the image."):
    print(piece, end="", flush=True)
print()
