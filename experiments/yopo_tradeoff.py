"""The visual-savings trade-off on our own task (issue 12's recipe): accuracy before cutting, after cutting without
fine-tuning, and after a short fine-tuning with the cuts active, next to the LLM FLOPs the cuts save.

All through the real commands and modules, on the built-in synthetic OCR task (`configs/tiny.py:data=synthetic_ocr`):
  1. base:      train the tiny model (the trainer, `uhd_jax.train.loop.train`) on `--records` synthetic images;
  2. calibrate: `python -m uhd_jax.yopo calibrate` (in-process `main`) on `--calib` of those images written as a
                JSONL, `--target-heads` heads kept per full-attention layer -> OUT/heads.npz (+ heatmap PNG);
  3. cut:       score the base model with the cuts (window, calibrated heads, drop at `--drop`, FFN ratio `--ffn`);
  4. fine-tune: continue training from the base checkpoint with the cuts active (`model.cuts`, as
                configs/yopo_finetune.py does) for `--finetune-steps`, and score again.
The score: exact match of greedy answers, computed by teacher forcing (greedy reproduces the answer iff every
answer position's argmax is the reference token; see experiments/ocr_ablation.py), and the per-token accuracy,
on the training images (the tiny model memorises them on a CPU; it does not read unseen ones: see
experiments/NOTES_train.md), so this measures how much of what the model learned survives the cuts.
FLOPs: `uhd_jax.yopo.flops` for the LLM's visual part on the mean layout of the scored records.
Writes OUT/results.json and OUT/results.md.

    python3 experiments/yopo_tradeoff.py --out /tmp/yopo --steps 300 --finetune-steps 100     # CPU, minutes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs.tiny import get_config  # noqa: E402
from uhd_jax.convert import load_checkpoint  # noqa: E402
from uhd_jax.data.packer import PackerConfig  # noqa: E402
from uhd_jax.data.pipeline import make_batches  # noqa: E402
from uhd_jax.data.synthetic_ocr import SyntheticOCRSource  # noqa: E402
from uhd_jax.model.minicpmv import MiniCPMV  # noqa: E402
from uhd_jax.model.visual_cuts import Cuts  # noqa: E402
from uhd_jax.train.loop import TRAIN_MODEL_DIR, make_processor, model_config, model_cuts, train  # noqa: E402
from uhd_jax.train.loss import next_token_targets  # noqa: E402
from uhd_jax.yopo import calibrate  # noqa: E402
from uhd_jax.yopo.flops import llm_visual_flops  # noqa: E402


def base_config(args):
    c = get_config("data=synthetic_ocr")
    c.data.synthetic_records = args.records
    c.data.ocr_max_words, c.data.ocr_max_word_len = 1, 4
    c.train.steps, c.train.batch_size = args.steps, args.batch
    c.train.log_every, c.train.checkpoint_every = max(1, args.steps // 20), args.steps
    c.train.eval_every = 0
    c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.schedule = args.lr, args.steps // 20, "cosine"
    return c


def with_cuts(c, args, head_mask: str):
    c = c.copy_and_resolve_references()
    c.model.cuts.window, c.model.cuts.head_mask = args.window, head_mask
    c.model.cuts.drop_fraction, c.model.cuts.ffn_ratio = args.drop, args.ffn
    c.model.cuts.text_slot_multiple = 16
    return c


def source(c) -> SyntheticOCRSource:
    """The training stream's records (seed c.seed, as the trainer builds them)."""
    d = c.data
    return SyntheticOCRSource(d.synthetic_records, seed=c.seed, max_words=d.ocr_max_words,
                              max_word_len=d.ocr_max_word_len, font_sizes=(d.ocr_font_min, d.ocr_font_max),
                              photo_fraction=d.ocr_photo_fraction)


def latest(workdir: str) -> str:
    ck = os.path.join(workdir, "checkpoints")
    return os.path.join(ck, str(max(int(d) for d in os.listdir(ck) if d.isdigit())))


def score(c, ckpt: str, model_dir: str, cuts: Cuts) -> dict:
    """Exact match (teacher-forced greedy) and token accuracy over every record of the training source, with
    `cuts`; also the mean visual / text token counts per record (for the FLOPs)."""
    cfg, params = load_checkpoint(ckpt)
    proc = make_processor(c, model_dir, cfg)
    packer = PackerConfig(batch_size=c.train.batch_size, seq_buckets=(c.data.seq_len,),
                          tokens_per_view=c.data.tokens_per_view, views_per_row=c.data.views_per_row,
                          overflow=c.data.overflow, text_slot_multiple=16 if cuts.any else None)
    batches = make_batches(source(c), proc, packer, batch_size_per_host=c.train.batch_size, shuffle=False,
                           num_epochs=1, num_workers=0, max_bad_fraction=0.0)
    model = MiniCPMV(cfg, cuts=cuts)

    @jax.jit
    def run(params, batch):
        logits, _ = model.apply({"params": params}, batch)
        targets, weights = next_token_targets(batch.input_ids, batch.loss_mask)
        pred = jnp.argmax(logits.astype(jnp.float32), -1)
        return ((pred == targets) | (weights == 0)).all(-1), ((pred == targets) & (weights > 0)).sum(-1), \
            weights.sum(-1)

    exact = correct = total = rows = 0
    vis, txt = [], []
    for b in batches:
        real = np.asarray(b.attention_mask).any(-1)
        e, k, t = jax.device_get(run(params, b))
        exact, rows = exact + int(e[real].sum()), rows + int(real.sum())
        correct, total = correct + int(k[real].sum()), total + int(t[real].sum())
        v = np.asarray(b.visual_mask).sum(-1)[real]
        vis += v.tolist()
        txt += (np.asarray(b.attention_mask).sum(-1)[real] - v).tolist()
    return {"records": rows, "exact_match": exact / rows, "token_accuracy": correct / total,
            "mean_visual_tokens": float(np.mean(vis)), "mean_text_tokens": float(np.mean(txt))}


def calib_jsonl(c, out: str, n: int) -> str:
    """n of the training images as PNG files + a conversation JSONL (the calibration command's input)."""
    src = source(c)
    d = os.path.join(out, "calib")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "calib.jsonl"), "w") as f:
        for i in range(n):
            image, _ = src.render(i)
            image.save(os.path.join(d, f"{i}.png"))
            f.write(json.dumps({"id": str(i), "image": f"{i}.png", "conversations": [
                {"role": "user", "content": f"<image>\n{src.question}"}]}) + "\n")
    return os.path.join(d, "calib.jsonl")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--records", type=int, default=64, help="synthetic training images")
    p.add_argument("--steps", type=int, default=300, help="base training steps")
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--calib", type=int, default=16, help="calibration records")
    p.add_argument("--target-heads", type=float, default=2.0, help="heads kept per full-attention layer")
    p.add_argument("--window", type=int, default=3)
    p.add_argument("--drop", type=float, default=0.5, help="visual tokens leave at this fraction of the depth")
    p.add_argument("--ffn", type=int, default=2)
    a = p.parse_args()
    if os.path.exists(os.path.join(a.out, "base")):
        p.error(f"--out {a.out} already holds a run; use a new directory")
    os.makedirs(a.out)
    t0 = time.perf_counter()
    res = {"args": vars(a)}

    c = base_config(a)
    base_dir = os.path.join(a.out, "base")
    s = train(c, base_dir)
    res["base_training"] = {"first_loss": s["first_loss"], "last_loss": s["last_loss"]}
    base_ckpt, model_dir = latest(base_dir), os.path.join(base_dir, TRAIN_MODEL_DIR)
    cfg = model_config(c)
    res["before_cuts"] = score(c, base_ckpt, model_dir, Cuts())
    print("before cuts:", res["before_cuts"], flush=True)

    mask = os.path.join(a.out, "heads.npz")
    rc = calibrate.main(["--checkpoint", base_ckpt, "--data", calib_jsonl(c, a.out, a.calib),
                         "--target-heads", str(a.target_heads), "--first-layer", "0", "--out", mask,
                         "--views-per-row", str(c.data.views_per_row), "--tokens-per-view", str(c.data.tokens_per_view),
                         "--plot", os.path.join(a.out, "heads.png")])
    if rc:
        raise SystemExit(f"calibration failed (exit {rc})")
    cc = with_cuts(c, a, mask)
    cuts = model_cuts(cc, cfg)
    res["cuts"] = {"window": cuts.window, "heads": cuts.heads, "drop_layer": cuts.drop_layer,
                   "ffn_ratio": cuts.ffn_ratio}
    res["after_cuts"] = score(cc, base_ckpt, model_dir, cuts)
    print("after cuts, no fine-tuning:", res["after_cuts"], flush=True)

    ft = cc.copy_and_resolve_references()
    ft.model.name, ft.init.checkpoint = "dir", base_ckpt
    ft.train.steps, ft.train.checkpoint_every = a.finetune_steps, a.finetune_steps
    ft.optimizer.learning_rate, ft.optimizer.warmup_steps = a.finetune_lr, a.finetune_steps // 20
    ft_dir = os.path.join(a.out, "finetune")
    s = train(ft, ft_dir)
    res["finetune_training"] = {"first_loss": s["first_loss"], "last_loss": s["last_loss"]}
    res["after_finetune"] = score(ft, latest(ft_dir), model_dir, cuts)
    print("after fine-tuning with the cuts:", res["after_finetune"], flush=True)

    # LLM visual FLOPs for a mean record: text, then one view grid of the mean visual token count (square-ish)
    n_vis = round(res["before_cuts"]["mean_visual_tokens"])
    side = max(1, int(round(n_vis ** 0.5)))
    layout = [round(res["before_cuts"]["mean_text_tokens"] / 2), (side, max(1, n_vis // side)),
              round(res["before_cuts"]["mean_text_tokens"] / 2)]
    dense = llm_visual_flops(cfg.text, layout)["total"]
    cut = llm_visual_flops(cfg.text, layout, cuts)["total"]
    res["llm_visual_flops"] = {"layout": str(layout), "dense": dense, "with_cuts": cut, "ratio": cut / dense}
    res["seconds"] = time.perf_counter() - t0
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    rows = [("before cutting", res["before_cuts"]), ("cuts, no fine-tuning", res["after_cuts"]),
            (f"cuts + {a.finetune_steps} fine-tuning steps", res["after_finetune"])]
    lines = ["| model | exact match | token accuracy | LLM visual FLOPs |", "|---|---|---|---|"]
    for i, (name, r) in enumerate(rows):
        fl = "100%" if i == 0 else f"{100 * cut / dense:.0f}%"
        lines.append(f"| {name} | {100 * r['exact_match']:.1f}% of {r['records']} | "
                     f"{100 * r['token_accuracy']:.1f}% | {fl} |")
    table = "\n".join(lines)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
