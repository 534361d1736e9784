"""Checkpoint-conversion benchmark at full size: a random MiniCPM-V 4.6 checkpoint with the real config
(bf16, 779 tensors, 1.30 B parameters, ~2.6 GB), converted HF -> ours -> HF on this machine's CPU.

The checkpoint is generated here, without torch: tensors come in the real names and shapes (from the
mapping table for `reference_config()`, itself checked against transformers in tests/test_convert.py),
with random finite bf16 values, written in shards of at most --shard-gb with `safetensors.numpy.save_file`
so only one shard is ever in memory. Each conversion runs in its own process under `/usr/bin/time -v`
(else `resource.getrusage`) for wall time and peak RSS; the round trip is then checked bit for bit, and all
generated files are deleted.

    python experiments/bench_convert.py [--dir /tmp/bench_convert] [--shard-gb 1] [--repeat 3] [--keep]
Targets: peak RSS <= 1.5x the checkpoint size, >= 200 MB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

TIME = "/usr/bin/time"


def generate(out_dir: str, shard_bytes: int, seed: int = 0) -> tuple[int, int]:
    """Writes the random checkpoint; returns (tensors, bytes)."""
    from safetensors.numpy import save_file

    from uhd_jax.config import REFERENCE_CONFIG_DIR, reference_config
    from uhd_jax.convert import mapping
    from uhd_jax.convert.target import params_shape

    cfg = reference_config()
    plan, problems = mapping.build_plan(cfg, params_shape(cfg))
    assert not problems, problems
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(REFERENCE_CONFIG_DIR):  # config, generation and processor configs, token list
        shutil.copy(os.path.join(REFERENCE_CONFIG_DIR, f), out_dir)
    rng = np.random.default_rng(seed)
    entries = sorted(plan.entries, key=lambda e: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", e.hf)])
    shards, chunk, size = [], {}, 0

    def flush():
        nonlocal chunk, size
        name = f"shard-{len(shards)}"
        save_file(chunk, os.path.join(out_dir, name), metadata={"format": "pt"})
        shards.append((name, list(chunk)))
        chunk, size = {}, 0

    total = 0
    for e in entries:
        n = int(np.prod(e.hf_shape))
        # random sign and mantissa, exponent fixed near 2^-7: finite, not all equal, cheap to make
        bits = (rng.integers(0, 1 << 16, n, dtype=np.uint16) & 0x807F) | 0x3C00
        a = bits.view(ml_dtypes.bfloat16).reshape(e.hf_shape)
        if size and size + a.nbytes > shard_bytes:
            flush()
        chunk[e.hf] = a
        size += a.nbytes
        total += a.nbytes
    flush()
    k = len(shards)
    weight_map = {}
    for i, (name, keys) in enumerate(shards):
        final = "model.safetensors" if k == 1 else f"model-{i + 1:05d}-of-{k:05d}.safetensors"
        os.rename(os.path.join(out_dir, name), os.path.join(out_dir, final))
        weight_map.update({key: final for key in keys})
    if k > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return len(entries), total


def measured(cmd: list[str]) -> dict:
    """Runs cmd in a fresh process; wall seconds and peak RSS bytes."""
    if os.path.exists(TIME):
        t0 = time.perf_counter()
        p = subprocess.run([TIME, "-v"] + cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode:
            raise RuntimeError(f"{cmd} failed:\n{p.stdout}\n{p.stderr}")
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024
        return {"wall_s": wall, "peak_rss": rss, "how": "/usr/bin/time -v"}
    import resource

    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"{cmd} failed:\n{p.stdout}\n{p.stderr}")
    return {"wall_s": wall, "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "how": "getrusage"}


def same_tensors(a_dir: str, b_dir: str) -> int:
    """Bit-exact comparison, one tensor at a time; returns the count."""
    from uhd_jax.convert.safetensors_io import SafetensorsReader

    with SafetensorsReader(a_dir) as a, SafetensorsReader(b_dir) as b:
        assert not a.problems and not b.problems and sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            x, y = a.read(k), b.read(k)
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x.view(np.uint16), y.view(np.uint16)), k
        return len(a.tensors)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/bench_convert")
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--repeat", type=int, default=3, help="runs per step; the median wall time is reported")
    args = ap.parse_args()
    root = os.path.abspath(args.dir)
    if os.path.exists(root):
        shutil.rmtree(root)
    hf, ckpt, back = (os.path.join(root, n) for n in ("hf", "ckpt", "hf_back"))
    try:
        t0 = time.perf_counter()
        n, size = generate(hf, int(args.shard_gb * 1e9))
        print(f"generated {n} tensors, {size / 1e9:.3f} GB bf16 in {time.perf_counter() - t0:.1f} s "
              f"({len([f for f in os.listdir(hf) if f.endswith('.safetensors')])} shards)")
        py = sys.executable
        load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
        load = "from uhd_jax.convert.hf_to_jax import load_hf; load_hf(%r)" % hf
        runs = [
            ("load_hf (HF dir -> numpy tree)", [py, "-c", load]),
            ("hf-to-jax (-> Orbax dir)", [py, "-m", "uhd_jax.convert", "hf-to-jax", "--hf-dir", hf, "--out", ckpt]),
            ("jax-to-hf (-> safetensors)", [py, "-m", "uhd_jax.convert", "jax-to-hf", "--ckpt", ckpt, "--out", back]),
        ]
        rows = []
        for name, cmd in runs:
            walls, rss = [], []
            for i in range(args.repeat):
                if i and "--out" in cmd:
                    shutil.rmtree(cmd[cmd.index("--out") + 1])
                os.sync()  # each run starts with no dirty pages of the previous one still being flushed
                r = measured(cmd)
                walls.append(r["wall_s"])
                rss.append(r["peak_rss"])
            r = {"wall_s": float(np.median(walls)), "walls": walls, "peak_rss": max(rss), "how": r["how"]}
            rows.append((name, r))
            print(f"{name}: {', '.join(f'{w:.1f}' for w in walls)} s, peak RSS {r['peak_rss'] / 1e9:.2f} GB",
                  flush=True)
        checked = same_tensors(hf, back)
        baseline = measured([py, "-c", "import uhd_jax.convert.hf_to_jax, orbax.checkpoint"])
        print(f"\nround trip bit-exact: {checked} tensors; Orbax dir {dir_bytes(ckpt) / 1e9:.3f} GB; "
              f"interpreter + imports alone: {baseline['peak_rss'] / 1e9:.2f} GB RSS ({rows[0][1]['how']})")
        print(f"checkpoint: {size / 1e9:.3f} GB ({n} tensors, bf16); {os.cpu_count()} CPUs; inputs in the page "
              f"cache, outputs written through it (sync between steps); load average before: {load_before}\n")
        print(f"| step | wall s (median of {args.repeat}) | MB/s | peak RSS GB | RSS / checkpoint |")
        print("|---|---|---|---|---|")
        for name, r in rows:
            print(f"| {name} | {r['wall_s']:.1f} | {size / 1e6 / r['wall_s']:.0f} | {r['peak_rss'] / 1e9:.2f} | "
                  f"{r['peak_rss'] / size:.2f}x |")
        out = os.environ.get("OUT")
        if out:
            with open(os.path.join(out, "bench_convert.json"), "w") as f:
                json.dump({"bytes": size, "tensors": n, "rows": rows, "baseline": baseline}, f, indent=2)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
