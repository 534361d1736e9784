"""Does it learn to read? A longer run on the built-in synthetic OCR task, and the slice vs global ablation.

Two arms train the same `small` model (tiny_config 4x wider, 12.2M parameters, the byte tokenizer) with the same
seed, steps and data stream through the real trainer (`uhd_jax.train.loop.train`):
  slice:  the tiny processor's slicing (a thumbnail + up to 4 slices, scale_resolution 224 px);
  global: slicing off, each image resized to ONE view whose scale_resolution is chosen so that the mean number of
          visual tokens per image equals the slice arm's (measured over held-out records; printed).
Then, on held-out synthetic images (a seed never trained on), the exact-match accuracy of greedy answers. Greedy
decoding reproduces the reference answer exactly iff, at every answer position (the closing <|im_end|>
included), the argmax given the reference prefix is the reference token: so exact match is computed from one
teacher-forced forward pass per batch, no decode loop needed. Also the per-token accuracy and the held-out loss.
Writes OUT/<arm>/ (the trainer's workdir and its result.json), and once every arm has a result,
OUT/loss_curves.png (matplotlib), OUT/results.md and OUT/results.json.

The arms can run as separate processes at the same time (one GPU holds both small models): `--arms slice` and
`--arms global` with the same OUT and options, then `--report` writes the combined table. `--train-seconds T` stops
an arm's training after T seconds the way a preemption does (SIGTERM: the trainer saves its checkpoint and returns),
and the arm is scored at the step it reached (recorded in the table).

    python3 experiments/ocr_ablation.py --out /tmp/ocr --steps 3000 --batch 32 --workers 12   # a GPU: minutes
    python3 experiments/ocr_ablation.py --out /tmp/ocr --steps 20 --batch 4 --eval 16       # smoke test, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs.tiny import get_config  # noqa: E402
from uhd_jax.convert import load_checkpoint  # noqa: E402
from uhd_jax.data.packer import PackerConfig  # noqa: E402
from uhd_jax.data.pipeline import make_batches  # noqa: E402
from uhd_jax.data.sources import SyntheticOCRSource  # noqa: E402
from uhd_jax.model.minicpmv import MiniCPMV  # noqa: E402
from uhd_jax.train.loop import TRAIN_MODEL_DIR, make_processor, model_config, train  # noqa: E402
from uhd_jax.train.loss import next_token_targets  # noqa: E402

EVAL_SEED = 987_654  # held-out images: neither the training stream (seed 0) nor the trainer's eval stream


def arm_config(args, arm: str, scale_resolution: int = 0):
    c = get_config("data=synthetic_ocr")
    c.model.name = "small"
    c.model.downsample_mode = args.mode
    if args.mode == "4x":  # 4x the visual tokens of 16x: 5 views x 80 + the text must fit a row
        c.data.seq_len = 512
    c.model.dtype = "bfloat16" if args.bf16 else "float32"
    c.data.ocr_max_words, c.data.ocr_max_word_len, c.data.ocr_chars = args.words, args.word_len, args.chars
    c.data.ocr_font_min, c.data.ocr_font_max = args.font_min, args.font_max
    c.data.ocr_min_side, c.data.ocr_max_side = args.min_side, args.max_side
    c.data.ocr_photo_fraction = args.photo_fraction
    c.data.num_workers = args.workers
    c.train.steps, c.train.batch_size = args.steps, args.batch
    c.train.log_every = max(1, args.steps // 100)
    c.train.eval_every, c.train.eval_batches = max(1, args.steps // 10), 4
    c.train.checkpoint_every = args.steps
    c.optimizer.learning_rate, c.optimizer.warmup_steps = args.lr, max(1, args.steps // 20)
    c.optimizer.schedule, c.optimizer.weight_decay = "cosine", 0.01
    c.seed = args.seed
    if arm == "global":
        c.data.slice_mode = False
        c.data.scale_resolution = scale_resolution
        c.data.views_per_row = 1
        c.data.tokens_per_view = -(-(scale_resolution // 14 + 4) ** 2 // 16) * 16  # the largest view, rounded up
    return c


def ocr_source(c, n: int) -> SyntheticOCRSource:
    """n held-out records with the config's task settings."""
    d = c.data
    return SyntheticOCRSource(n, seed=EVAL_SEED, max_words=d.ocr_max_words, max_word_len=d.ocr_max_word_len,
                              chars=d.ocr_chars, min_side=d.ocr_min_side, max_side=d.ocr_max_side,
                              font_sizes=(d.ocr_font_min, d.ocr_font_max), photo_fraction=d.ocr_photo_fraction)


def image_sizes(c, n: int) -> list[tuple[int, int]]:
    """(height, width) of n held-out records' images (rendered once; the budgets only need their sizes)."""
    src = ocr_source(c, n)
    return [src.render(i)[0].size[::-1] for i in range(n)]


def visual_tokens(c, model_dir, sizes) -> tuple[float, int]:
    """(mean visual tokens per image, largest view in patches) of images of these sizes under config c."""
    proc = make_processor(c, model_dir, model_config(c))
    toks, largest = [], 0
    for size in sizes:
        plan = proc.plan(size)
        toks.append(sum(plan.view_tokens))
        largest = max(largest, max(h * w for h, w in plan.target_sizes))
    return float(np.mean(toks)), largest


def match_global_budget(args, model_dir, sizes, slice_mean: float) -> tuple[int, float]:
    """The scale_resolution (multiple of 28 px) whose single-view token mean is closest to the slice arm's."""
    best = None
    for res in range(168, 841, 28):
        mean, _ = visual_tokens(arm_config(args, "global", res), model_dir, sizes)
        if best is None or abs(mean - slice_mean) < abs(best[1] - slice_mean):
            best = (res, mean)
    return best


def evaluate(c, workdir: str, n: int) -> dict:
    """Exact match of greedy answers (teacher-forced argmax over the answer + <|im_end|>), token accuracy, loss."""
    step = max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    cfg, params = load_checkpoint(os.path.join(workdir, "checkpoints", str(step)))
    proc = make_processor(c, os.path.join(workdir, TRAIN_MODEL_DIR), cfg)
    src = ocr_source(c, n)
    packer = PackerConfig(batch_size=c.train.batch_size, seq_buckets=(c.data.seq_len,),
                          tokens_per_view=c.data.tokens_per_view, views_per_row=c.data.views_per_row,
                          overflow=c.data.overflow)
    batches = make_batches(src, proc, packer, batch_size_per_host=c.train.batch_size, shuffle=False, num_epochs=1,
                           num_workers=0, max_bad_fraction=0.0)
    model = MiniCPMV(cfg, dtype=jnp.bfloat16 if c.model.dtype == "bfloat16" else jnp.float32)

    @jax.jit
    def score(params, batch):
        logits, _ = model.apply({"params": params}, batch)
        logits = logits.astype(jnp.float32)
        targets, weights = next_token_targets(batch.input_ids, batch.loss_mask)
        pred = jnp.argmax(logits, -1)
        hit = (pred == targets) | (weights == 0)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return hit.all(-1), ((pred == targets) & (weights > 0)).sum(-1), weights.sum(-1), (nll * weights).sum(-1)

    exact = correct = total = nll = rows = 0
    for b in batches:
        real = np.asarray(b.attention_mask).any(-1)  # the last batch's padding rows
        e, k, t, l = jax.device_get(score(params, jax.tree.map(jnp.asarray, b)))
        exact += int(e[real].sum())
        correct, total, nll = correct + int(k[real].sum()), total + int(t[real].sum()), nll + float(l[real].sum())
        rows += int(real.sum())
    return {"records": rows, "exact_match": exact / rows, "token_accuracy": correct / total,
            "heldout_loss": nll / total, "step": step}


def plot(out: str, arms: list[str]):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in arms:
        rows = [json.loads(line) for line in open(os.path.join(out, arm, "metrics.jsonl"))]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=f"{arm}: train")
        ev = [r for r in rows if "eval_loss" in r]
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o--", label=f"{arm}: held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / answer token)")
    ax.set_yscale("log")
    ax.set_title("synthetic OCR, small model: slice vs global encoding")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curves.png"), dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--words", type=int, default=2, help="words per image (1..n)")
    p.add_argument("--word-len", type=int, default=6, help="characters per word (1..n)")
    p.add_argument("--font-min", type=int, default=10, help="font size range in px")
    p.add_argument("--font-max", type=int, default=24)
    p.add_argument("--min-side", type=int, default=64, help="image side range in px")
    p.add_argument("--max-side", type=int, default=800)
    p.add_argument("--photo-fraction", type=float, default=0.3, help="share of images drawn on a photograph")
    p.add_argument("--workers", type=int, default=0, help="grain worker processes")
    p.add_argument("--eval", type=int, default=512, help="held-out records scored")
    p.add_argument("--budget-records", type=int, default=200, help="records used to match the token budgets")
    p.add_argument("--arms", default="slice,global")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute (float32 by default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chars", default="digits", help="the alphabet: alnum, digits, upper or lower")
    p.add_argument("--mode", default="4x", choices=("4x", "16x"), help="the merger's downsampling")
    p.add_argument("--train-seconds", type=float, default=0, help="stop training after this long (0: no limit)")
    p.add_argument("--report", action="store_true", help="only combine the arms' results under OUT")
    args = p.parse_args()
    if args.report:
        report(args.out, {"args": vars(args)})
        return
    arms = args.arms.split(",")
    if any(a not in ("slice", "global") for a in arms):
        p.error(f"--arms: each arm must be 'slice' or 'global', got {args.arms!r}")
    from uhd_jax.data.synthetic_ocr import CHARSETS

    if args.chars not in CHARSETS:
        p.error(f"--chars must be one of {sorted(CHARSETS)}, got {args.chars!r}")
    for arm in arms:  # a run left in OUT would be resumed by the trainer and its losses mixed into this table
        if os.path.exists(os.path.join(args.out, arm, "checkpoints")):
            p.error(f"--out {args.out}: {arm}/ already holds a run; use a new directory")
    os.makedirs(args.out, exist_ok=True)
    results = {"args": vars(args), "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind)}

    from uhd_jax.data.tiny_tokenizer import write_tiny_model_dir  # only the processor files, for the budgets

    budget_dir = tempfile.mkdtemp(prefix="ocr_budget_")  # per process: arms may run side by side on one OUT
    c_slice = arm_config(args, "slice")
    write_tiny_model_dir(budget_dir, model_config(c_slice))
    sizes = image_sizes(c_slice, args.budget_records)
    slice_mean, slice_largest = visual_tokens(c_slice, budget_dir, sizes)
    res, global_mean = match_global_budget(args, budget_dir, sizes, slice_mean)
    print(f"visual tokens per image: slice {slice_mean:.1f} (largest view {slice_largest} patches); "
          f"global at scale_resolution {res}: {global_mean:.1f}")
    results["budget"] = {"slice_mean_tokens": slice_mean, "global_mean_tokens": global_mean,
                         "global_scale_resolution": res}
    for arm in arms:
        c = arm_config(args, arm, res)
        t = time.perf_counter()
        timer = None
        if args.train_seconds:  # a preemption at the deadline: the trainer saves and returns
            timer = threading.Timer(args.train_seconds, os.kill, (os.getpid(), signal.SIGTERM))
            timer.start()
        summary = train(c, os.path.join(args.out, arm))
        if timer is not None:
            timer.cancel()  # scoring must not be killed by a late timer
        r = evaluate(c, os.path.join(args.out, arm), args.eval)
        losses = [json.loads(line)["loss"] for line in open(os.path.join(args.out, arm, "metrics.jsonl"))]
        r.update(train_seconds=time.perf_counter() - t, planned_steps=args.steps,
                 preempted=bool(summary.get("preempted")), first_loss=losses[0], last_loss=losses[-1],
                 views_per_row=c.data.views_per_row, tokens_per_view=c.data.tokens_per_view,
                 visual_tokens=slice_mean if arm == "slice" else global_mean)
        with open(os.path.join(args.out, arm, "result.json"), "w") as f:
            json.dump(r, f, indent=1)
        print(f"{arm}: {json.dumps(r)}")
    report(args.out, results)


def report(out: str, results: dict):
    """The combined table, JSON and plot, once every arm under OUT has its result.json."""
    arms = [a for a in ("slice", "global") if os.path.exists(os.path.join(out, a, "result.json"))]
    if not arms:
        print(f"no arm under {out} has a result.json yet")
        return
    for arm in arms:
        results[arm] = json.load(open(os.path.join(out, arm, "result.json")))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["| arm | visual tokens / image | steps | train loss first -> last | held-out loss | token accuracy | "
             "exact match (greedy) |", "|---|---|---|---|---|---|---|"]
    for arm in arms:
        r = results[arm]
        lines.append(f"| {arm} | {r['visual_tokens']:.1f} | {r['step']} of {r['planned_steps']} | "
                     f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} | {r['heldout_loss']:.3f} "
                     f"| {100 * r['token_accuracy']:.1f}% | {100 * r['exact_match']:.1f}% of {r['records']} |")
    table = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    plot(out, arms)


if __name__ == "__main__":
    main()
