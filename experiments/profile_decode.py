"""Where a decode step's time goes (issue 11): the generation loop of the full-size model, profiled on the GPU.

For each variant (`--variants scan+served,unroll+big`: the layer stacks scanned as in training, or unrolled into
straight-line code; `+served`: the weights in the serving layout, `infer.engine.serving_params`; `+big` adds the
`--batches` above 1) it times greedy decoding like `bench_generate.py` (t(N new tokens) - t(1), per step), then
records a `jax.profiler` trace of one N-token generation at batch 1 and sums the GPU kernels of the decode part:
kernel time per step, kernels launched per step, the idle share of the step (launch gaps), and the kernels that
take the most time (name, count per step, us per step). Writes one JSON report to `--out`.

    python3 experiments/profile_decode.py --out decode_profile.json            # a GPU, full-size model
    python3 experiments/profile_decode.py --model tiny --image 200 --text 32 --new-tokens 8 --batches 1  # smoke
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_generate import model_dir, prompt_batch, timed  # noqa: E402
from uhd_jax.infer.engine import Generator, serving_params  # noqa: E402
from uhd_jax.model.minicpmv import MiniCPMV  # noqa: E402


def device_kernels(trace_dir: str):
    """(name, start us, duration us) of every event on a GPU stream in the perfetto trace under trace_dir."""
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(files[0], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, n in names.items() if "gpu" in n.lower() or "device" in n.lower()}
    out = [(e["name"], float(e["ts"]), float(e.get("dur", 0))) for e in events
           if e.get("ph") == "X" and e.get("pid") in gpu]
    return sorted(out, key=lambda k: k[1]), sorted(set(names.values()))


def summarize(kernels, steps: int, top: int = 25):
    total = sum(d for _, _, d in kernels)
    span = kernels[-1][1] + kernels[-1][2] - kernels[0][1] if kernels else 0.0
    by = collections.defaultdict(lambda: [0, 0.0])
    for name, _, d in kernels:
        by[name][0] += 1
        by[name][1] += d
    rows = sorted(by.items(), key=lambda kv: -kv[1][1])[:top]
    # idle gaps of the device timeline (events of all streams merged): where the GPU waits for the host
    gaps, end, prev = [], None, None
    for name, t0, d in kernels:
        if end is not None and t0 > end:
            gaps.append((t0 - end, prev, name))
        if end is None or t0 + d > end:
            end, prev = t0 + d, name
    big = [g for g in gaps if g[0] > 50]
    return {"gaps_over_50us": len(big), "gaps_over_50us_us": sum(g for g, _, _ in big) / steps,
            "gaps_top": [{"us": g, "after": a[:80], "before": b[:80]} for g, a, b in sorted(gaps, reverse=True)[:12]],
            "kernels": len(kernels), "kernels_per_step": len(kernels) / steps, "busy_us_per_step": total / steps,
            "span_us_per_step": span / steps, "idle_share": 1 - total / span if span else 0.0,
            "top": [{"name": n[:160], "per_step": c / steps, "us_per_step": d / steps} for n, (c, d) in rows]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("reference", "tiny"), default="reference")
    p.add_argument("--image", type=int, default=1344)
    p.add_argument("--text", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--variants", default="scan+served,scan")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="")
    p.add_argument("--keep-traces", default="", help="copy the traces of the 1-token runs (perfetto json) here")
    a = p.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    tmp = tempfile.mkdtemp()
    cfg, proc = model_dir(a.model, tmp)
    tpv = 1024 if a.model == "reference" else 256
    example, _, _ = prompt_batch(proc, 1, a.image, a.text, tpv)
    big = {b: example if b == 1 else prompt_batch(proc, b, a.image, a.text, tpv)[0] for b in batches}
    capacity = -(-(example.input_ids.shape[1] + a.new_tokens) // 128) * 128
    report = {"device": jax.devices()[0].device_kind, "new_tokens": a.new_tokens, "variants": {}}
    params = None
    for variant in a.variants.split(","):
        # "scan" / "unroll"; "+served": the weights in the serving layout (`serving_params`); "+big": also time and
        # profile the batches > 1
        parts = variant.split("+")
        model = MiniCPMV(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                         unroll=True if "unroll" in parts else 1)
        if params is None:
            params = nn.unbox(jax.jit(model.init)(jax.random.key(0), example))["params"]
        gen = Generator(model, stop_ids=())
        weights = serving_params(model, params) if "served" in parts else params

        def run(batch, n):
            jax.block_until_ready(gen.generate(weights, batch, max_new_tokens=n, capacity=capacity).tokens)

        res = {}
        vb = [b for b in batches if b == 1 or "big" in parts]
        for b in vb:
            t1 = timed(lambda: run(big[b], 1), a.repeats)
            tn = timed(lambda: run(big[b], a.new_tokens), a.repeats)
            res[f"b{b}"] = {"ttft_ms": 1e3 * t1, "decode_ms_per_step": 1e3 * (tn - t1) / (a.new_tokens - 1),
                            "tokens_per_s": b * (a.new_tokens - 1) / (tn - t1)}
            print(variant, b, json.dumps(res[f"b{b}"]), flush=True)
        for b in vb:
            for tag, n in (("first", 1), ("all", a.new_tokens)):
                d = os.path.join(tmp, f"trace_{variant}_{b}_{tag}")
                with jax.profiler.trace(d, create_perfetto_trace=True):
                    run(big[b], n)
                kernels, procs = device_kernels(d)
                if a.keep_traces and tag == "first":
                    import shutil

                    for f in glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True):
                        os.makedirs(a.keep_traces, exist_ok=True)
                        shutil.copy(f, os.path.join(a.keep_traces, f"{variant}_b{b}_first.json.gz"))
                res[f"b{b}_{tag}"] = kernels
            # the decode part: the kernels of the N-token run beyond those of the 1-token run (same program start)
            first, every = res.pop(f"b{b}_first"), res.pop(f"b{b}_all")
            decode = every[len(first):]
            res[f"b{b}"]["profile"] = summarize(decode, a.new_tokens - 1)
            res[f"b{b}"]["prefill_profile"] = summarize(first, 1, top=15)
            res[f"b{b}"]["trace_processes"] = procs
            print(variant, b, json.dumps({k: v for k, v in res[f"b{b}"]["profile"].items() if k != "top"}),
                  flush=True)
        report["variants"][variant] = res
        if a.out:  # after every variant: a run cut short keeps what it measured
            with open(a.out, "w") as f:
                json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
