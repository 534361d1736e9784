"""Host preprocessing throughput: JPEG file -> Sample (decode, slice, normalize, prompt, token ids) -> packed
static arrays, for 1344x1344 and 4000x3000 JPEGs (generated here), on this machine's cores.

    python experiments/bench_preprocess.py                # exact path; grain pipeline with 1 and <cores> workers
    python experiments/bench_preprocess.py --n 40 --workers 1,2,4 --draft

Columns: ms per image on one core, images/s per core, and the host cores ~50 images/s per GPU needs
(50 / images-per-second-per-core). `--draft` also measures JPEG draft decoding (DCT-domain downscale before
the bicubic resizes; not bit-exact with the reference, its pixel error is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uhd_jax.data.image_io import LoadOptions, load_image  # noqa: E402
from uhd_jax.data.packer import Packer, PackerConfig  # noqa: E402
from uhd_jax.data.pipeline import make_batches  # noqa: E402
from uhd_jax.data.processor import Processor  # noqa: E402
from uhd_jax.data.slicer import slice_image  # noqa: E402
from uhd_jax.data.sources import JsonlSource  # noqa: E402

REF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "reference",
                   "minicpm-v-4.6")
TARGET_PER_GPU = 50.0


def make_model_dir(path: str) -> str:
    """Word-level tokenizer carrying the real special tokens at their real ids + the reference configs."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    with open(os.path.join(REF, "added_tokens.json")) as f:
        added = json.load(f)["added_tokens"]
    words = "what is in this image describe it in detail please user assistant system".split()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d = json.loads(tok.to_str())
    for t in added:
        d["model"]["vocab"][t["content"]] = t["id"]
    d["added_tokens"] = [dict(id=t["id"], content=t["content"], single_word=False, lstrip=False, rstrip=False,
                              normalized=False, special=t["special"]) for t in added]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(d, f)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"}, f)
    for name in ("preprocessor_config.json", "generation_config.json"):
        shutil.copy(os.path.join(REF, name), os.path.join(path, name))
    return path


def make_jpeg(path: str, h: int, w: int, seed: int):
    """A photo-like test image (smooth gradients, shapes, grain) so the JPEG has realistic entropy."""
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(xx / (37 + 11 * c) + yy / (53 + 7 * c) + c) for c in range(3)], -1)
    for _ in range(12):
        cy, cx, r = rs.randint(0, h), rs.randint(0, w), rs.randint(20, max(21, min(h, w) // 4))
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rs.randint(0, 255, 3)
    img += rs.normal(0, 8, (h, w, 1)).astype(np.float32)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


# worker side: one processor per process, made on first use
_WORKER: dict = {}


def _sample_for(path: str, model_dir: str, draft: float | None):
    key = (model_dir, draft)
    if key not in _WORKER:
        _WORKER[key] = Processor.from_pretrained(model_dir, load_options=LoadOptions(jpeg_draft_margin=draft))
    proc = _WORKER[key]
    return proc.encode_chat([{"role": "user", "content": [{"type": "image", "image": path},
                                                          {"type": "text", "text": "describe it in detail"}]},
                             {"role": "assistant", "content": "it is an image"}], name=path)


def timeit(fn, n, repeats=3):
    """Best of `repeats` means over `n` calls (this machine is shared and noisy; the best run is the most
    repeatable figure)."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def write_jsonl(path: str, images: list[str]) -> str:
    """A MiniCPM-V fine-tuning JSONL file with one record per image (the pipeline's source)."""
    with open(path, "w") as f:
        for p in images:
            f.write(json.dumps({"image": p, "conversations": [
                {"role": "user", "content": "<image>\ndescribe it in detail"},
                {"role": "assistant", "content": "it is an image"}]}) + "\n")
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=12, help="images per single-core measurement")
    ap.add_argument("--pool-n", type=int, default=24, help="images per pipeline measurement")
    ap.add_argument("--workers", default=None,
                    help="grain worker counts, comma list (0 = in-process; default 1,<cores>)")
    ap.add_argument("--draft", action="store_true", help="also measure JPEG draft decoding (approximate)")
    ap.add_argument("--sizes", default="1344x1344,4000x3000", help="WxH list")
    ap.add_argument("--patches-dtype", default="float32,bfloat16", help="pipeline batches' patch dtypes (comma list)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    workers = [int(x) for x in args.workers.split(",")] if args.workers else sorted({1, cores})

    load0 = os.getloadavg()[0]
    tmp = tempfile.mkdtemp(prefix="bench_pre_")
    model_dir = make_model_dir(os.path.join(tmp, "model"))
    proc = Processor.from_pretrained(model_dir)
    packer = Packer(proc, PackerConfig(batch_size=1, seq_buckets=(1024, 2048), tokens_per_view=1152, views_per_row=10))

    rows, pool_rows, notes = [], [], []
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.lower().split("x"))
        paths = []
        for i in range(4):
            p = os.path.join(tmp, f"img{w}x{h}_{i}.jpg")
            make_jpeg(p, h, w, i)
            paths.append(p)
        mb = os.path.getsize(paths[0]) / 1e6
        it = iter(range(1 << 30))

        def nxt():
            return paths[next(it) % len(paths)]

        img = load_image(paths[0])
        t_dec = timeit(lambda: load_image(nxt()), args.n)
        t_slice = timeit(lambda: slice_image(img, proc.slice_config), args.n)
        t_sample = timeit(lambda: _sample_for(nxt(), model_dir, None), args.n)
        s = _sample_for(paths[0], model_dir, None)
        t_pack = timeit(lambda: packer.pack([s]), args.n)
        label = f"{w}x{h} ({mb:.1f} MB, {s.num_views} views, {len(s)} tok)"
        rows.append((label, "decode JPEG -> RGB", t_dec))
        rows.append((label, "slice + normalize", t_slice))
        rows.append((label, "file -> Sample (exact)", t_sample))
        rows.append((label, "Sample -> ModelBatch (pack)", t_pack))
        rows.append((label, "file -> ModelBatch (exact)", t_sample + t_pack))
        if args.draft:
            dproc = Processor.from_pretrained(model_dir, load_options=LoadOptions(jpeg_draft_margin=1.0))
            t_draft = timeit(lambda: _sample_for(nxt(), model_dir, 1.0), args.n)
            rows.append((label, "file -> Sample (JPEG draft)", t_draft))
            rows.append((label, "file -> ModelBatch (JPEG draft)", t_draft + t_pack))
            a = proc.process_image(paths[0])
            b = dproc.process_image(paths[0])
            err = max(float(np.abs(x - y).max()) for x, y in zip(a.views, b.views))
            mean = float(np.mean([np.abs(x - y).mean() for x, y in zip(a.views, b.views)]))
            notes.append(f"{w}x{h} JPEG draft vs exact: max |diff| {err:.3f}, mean {mean:.4f} "
                         f"(normalized units, range [-1, 1]; 1/255 px = {2 / 255:.4f})")
        recs = [paths[i % len(paths)] for i in range(args.pool_n)]
        for dt in args.patches_dtype.split(","):
            cfg = PackerConfig(batch_size=4, seq_buckets=(4096,), tokens_per_view=1152, views_per_row=10,
                               patches_dtype=dt)
            src = JsonlSource(write_jsonl(os.path.join(tmp, f"pool_{w}x{h}.jsonl"), recs))
            for k in workers:
                # an endless stream timed over a fixed number of batches (the end of a finite one costs grain ~1 s
                # of polling); start-up (process start, imports) not counted: each worker's first batch is a warm-up
                pipe = make_batches(src, proc, cfg, batch_size_per_host=4, shuffle=False, num_workers=k,
                                    max_bad_fraction=0.0, shard_index=0, shard_count=1)
                for _ in range(max(k, 1)):
                    next(pipe)
                t = time.perf_counter()
                n = sum(int(next(pipe).attention_mask.any(1).sum()) for _ in range(max(1, args.pool_n // 4)))
                dt_s = time.perf_counter() - t
                pipe.close()
                del pipe
                pool_rows.append((f"{w}x{h}", dt, k, n / dt_s))

    print(f"\nHost preprocessing, {cores} cores ({os.uname().machine}), Pillow {Image.__version__}, "
          f"load average before/after {load0:.1f}/{os.getloadavg()[0]:.1f}; single process (one core):\n")
    print(f"| image | stage | ms / image | images/s per core | cores for {TARGET_PER_GPU:.0f} img/s per GPU |")
    print("|---|---|---:|---:|---:|")
    for label, stage, t in rows:
        print(f"| {label} | {stage} | {t * 1e3:.1f} | {1 / t:.1f} | {TARGET_PER_GPU * t:.1f} |")
    print("\nGrain pipeline (pipeline.make_batches over a JSONL source: file -> ModelBatch [4 x 4096, 40 views x "
          "1152 patches], exact pixels for float32; each worker packs whole batches into shared memory that grain "
          "hands to this process; 0 workers = in this process; worker start-up excluded; this process also runs "
          "on the same cores):\n")
    print("| image | patches | workers | images/s | images/s per worker | cores for 50 img/s per GPU |")
    print("|---|---|---:|---:|---:|---:|")
    for label, dt, k, r in pool_rows:
        print(f"| {label} | {dt} | {k} | {r:.1f} | {r / max(k, 1):.1f} | {TARGET_PER_GPU * max(k, 1) / r:.1f} |")
    for n in notes:
        print("\n" + n)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
