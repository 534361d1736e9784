"""Generation speed (issue 11): time to first token, decode tokens/s at several batch sizes, cache memory per slot.

Full-size MiniCPM-V 4.6 architecture with random bf16 weights and the real vocabulary (`--model reference`), or
the tiny model (`--model tiny`, a CPU smoke test). Each prompt: one `--image`-px photograph (0: text only) +
about `--text` text tokens. Generation runs through `uhd_jax.infer.Generator` (prefill + the whole decode loop in
one jit), greedy, with no stop ids so every row decodes `--new-tokens`.
  - TTFT: `generate(max_new_tokens=1)` at batch 1 (vision encoder + LLM prefill + the first pick), median; from
    host (numpy) inputs, and from inputs already on the device (`ttft_device_inputs_ms`); and the prefill program
    alone into a ready cache (`prefill_program_ms`). `first_call_s`: compilation + the first run.
  - decode: (t(N new tokens) - t(1)) / (N - 1) per step at each `--batches` size; tokens/s = batch / step time.
  - bytes each decode step must read: the LLM's parameters (bf16), the KV cache up to the current length and the
    DeltaNet states (read and written); achieved GB/s = bytes / step time, next to the HBM bandwidth.
  - cache bytes per slot at `--capacity`, and how many slots fit in the device's free memory.
Writes a JSON report to `--out` (and prints it).

    python3 experiments/bench_generate.py --model reference --batches 1,8,32 --out bench_generate.json   # a GPU
    python3 experiments/bench_generate.py --model tiny --image 200 --text 32 --new-tokens 8 --batches 1,2   # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from uhd_jax.config import reference_config, tiny_config  # noqa: E402
from uhd_jax.data.packer import Packer, PackerConfig  # noqa: E402
from uhd_jax.data.processor import Processor  # noqa: E402
from uhd_jax.infer.engine import Generator, serving_params  # noqa: E402
from uhd_jax.model.minicpmv import MiniCPMV  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog near seven old harbour towers".split()


def model_dir(name: str, out: str):
    if name == "reference":
        from uhd_jax.data.qwen_vocab import write_reference_model_dir

        cfg = reference_config()
        write_reference_model_dir(out, cfg)
    else:
        from uhd_jax.data.tiny_tokenizer import write_tiny_model_dir

        cfg = tiny_config()
        write_tiny_model_dir(out, cfg)
    return cfg, Processor.from_pretrained(out)


def prompt_batch(proc: Processor, batch: int, image_px: int, text_tokens: int, tokens_per_view: int):
    import skimage.data

    images = []
    if image_px:
        images = [Image.fromarray(skimage.data.astronaut()).resize((image_px, image_px), Image.BICUBIC)]
    text = " ".join(WORDS[i % len(WORDS)] for i in range(text_tokens))
    content = ("<|image_pad|>\n" if images else "") + text
    sample = proc.encode_chat([{"role": "user", "content": content}], images=images, add_generation_prompt=True)
    views = max(1, sum(p.num_views for p in sample.plans)) if images else 0
    seq = -(-len(sample.input_ids) // 128) * 128
    packer = Packer(proc, PackerConfig(batch_size=batch, seq_buckets=(seq,), views_per_row=views,
                                       tokens_per_view=tokens_per_view))
    return packer.pack([sample] * batch), len(sample.input_ids), views


def timed(fn, repeats: int) -> float:
    """Median wall seconds of fn() (which blocks), after one warm-up call (compilation)."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("reference", "tiny"), default="reference")
    p.add_argument("--image", type=int, default=1344, help="image side in px (0: text-only prompts)")
    p.add_argument("--text", type=int, default=256, help="about this many text tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--capacity", type=int, default=0, help="cache tokens per slot (0: prompt + new tokens)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layout", choices=("served", "stacked"), default="served",
                   help="the weights as generate/evaluate hold them (`serving_params`: every layer stack split per "
                        "layer) or stacked as in training")
    p.add_argument("--hbm-gbps", type=float, default=3350.0, help="the device's memory bandwidth, for the ratio")
    p.add_argument("--out", default="")
    a = p.parse_args()
    try:
        batches = [int(b) for b in a.batches.split(",")]
    except ValueError:
        p.error(f"--batches: comma-separated integers, got {a.batches!r}")
    if a.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode time is t(N) - t(1))")

    tmp = tempfile.mkdtemp()
    cfg, proc = model_dir(a.model, tmp)
    tokens_per_view = 1024 if a.model == "reference" else 256
    model = MiniCPMV(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    example, prompt_len, views = prompt_batch(proc, 1, a.image, a.text, tokens_per_view)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), example))["params"]
    if a.layout == "served":
        params = serving_params(model, params)
    capacity = a.capacity or -(-(example.input_ids.shape[1] + a.new_tokens) // 128) * 128
    gen = Generator(model, stop_ids=())
    report = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "model": a.model,
              "param_layout": a.layout, "prompt_tokens": prompt_len, "views": views, "image_px": a.image, "new_tokens": a.new_tokens,
              "capacity": capacity, "llm_param_bytes": tree_bytes(params["text"]),
              "vision_param_bytes": tree_bytes(params.get("vision", {}))}

    def run(batch, n):
        out = gen.generate(params, batch, max_new_tokens=n, capacity=capacity)
        jax.block_until_ready(out.tokens)
        return out

    t = time.perf_counter()
    run(example, 1)
    report["first_call_s"] = time.perf_counter() - t  # compilation of the 1-token program + one run
    report["ttft_ms"] = 1e3 * timed(lambda: run(example, 1), a.repeats)
    # the same with the prompt's arrays already on the device (a server transfers the next request's pixels
    # while the current step runs): what is left is the device work plus dispatch
    on_device = jax.device_put(example)
    report["ttft_device_inputs_ms"] = 1e3 * timed(lambda: run(on_device, 1), a.repeats)
    # the prefill program alone (vision encoder + LLM prefill + last-token logits) into a ready cache: what the
    # device and the launches take, without the pick, the loop's start and the host work of generate()
    ready = gen.new_cache(1, capacity)
    report["prefill_program_ms"] = 1e3 * timed(
        lambda: jax.block_until_ready(gen._prefill(params, on_device, ready)), a.repeats)
    rows = []
    for b in batches:
        batch = example if b == 1 else prompt_batch(proc, b, a.image, a.text, tokens_per_view)[0]
        t1 = report["ttft_ms"] / 1e3 if b == 1 else timed(lambda: run(batch, 1), a.repeats)
        tn = timed(lambda: run(batch, a.new_tokens), a.repeats)
        step = (tn - t1) / (a.new_tokens - 1)
        cache = gen.new_cache(b, capacity)
        state_bytes = sum(tree_bytes(c["state"]) for c in cache.layers.values() if "state" in c)
        kv_mean = (tree_bytes(cache.layers) - state_bytes) * (prompt_len + a.new_tokens / 2) / capacity
        read = report["llm_param_bytes"] + kv_mean + 2 * state_bytes
        rows.append({"batch": b, "prefill_plus_first_ms": 1e3 * t1, "decode_ms_per_step": 1e3 * step,
                     "tokens_per_s": b / step, "bytes_per_step": read, "achieved_gbps": read / step / 1e9,
                     "hbm_share": read / step / 1e9 / a.hbm_gbps, "cache_bytes_per_slot": tree_bytes(cache) / b})
        print(json.dumps(rows[-1]), flush=True)
    report["decode"] = rows
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        free = stats["bytes_limit"] - tree_bytes(params)
        report["max_slots_at_capacity"] = int(free // rows[0]["cache_bytes_per_slot"])
        report["peak_memory_gib"] = stats.get("peak_bytes_in_use", 0) / 2 ** 30
    print(json.dumps(report, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
