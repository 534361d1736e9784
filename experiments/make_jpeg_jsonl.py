"""A JSONL fine-tuning file of real JPEG photographs at 1344x1344 for the trainer benchmark (issue 10, Speed).

Each record: one 1344x1344 JPEG (a random crop of a scikit-image photograph, resized, with a line of random text
drawn on it so no two files are alike) and a conversation whose text fills the sequence to `--seq-len` with the
real MiniCPM-V 4.6 tokenizer (uhd_jax.data.qwen_vocab): 10 views (16x: 640 visual tokens) + ~512 text tokens.

    python3 experiments/make_jpeg_jsonl.py --out /tmp/jpegs --records 64 --seq-len 1152
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uhd_jax.data.processor import Processor
from uhd_jax.data.qwen_vocab import write_reference_model_dir

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly box jackets near the old harbour "
         "light tower chart table value total revenue market share percent growth image shows").split()


def photos():
    import skimage.data as d

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "retina", "page", "camera", "immunohistochemistry"):
        a = np.asarray(getattr(d, name)())
        if a.ndim == 2:
            a = np.stack([a] * 3, -1)
        out.append(a[..., :3].astype(np.uint8))
    return out


def make_image(rng: random.Random, bank, size: int) -> Image.Image:
    a = bank[rng.randrange(len(bank))]
    h, w = a.shape[:2]
    ch, cw = rng.randint(h // 2, h), rng.randint(w // 2, w)
    y, x = rng.randint(0, h - ch), rng.randint(0, w - cw)
    im = Image.fromarray(a[y:y + ch, x:x + cw]).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    text = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(rng.randint(6, 14)))
    draw.text((rng.randint(0, size // 2), rng.randint(0, size - 60)), text, fill=(255, 255, 0),
              font=ImageFont.load_default(size=48))
    return im


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--records", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=1152)
    p.add_argument("--size", type=int, default=1344)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = random.Random(a.seed)
    bank = photos()
    with tempfile.TemporaryDirectory() as model_dir:
        write_reference_model_dir(model_dir)
        proc = Processor.from_pretrained(model_dir)
        rows = []
        for i in range(a.records):
            name = f"{i:05d}.jpg"
            im = make_image(rng, bank, a.size)
            im.save(os.path.join(a.out, name), quality=90)
            words = [rng.choice(WORDS) for _ in range(a.seq_len)]
            lo, hi = 0, len(words)  # the longest answer whose sample fits seq_len
            while lo < hi:
                mid = (lo + hi + 1) // 2
                conv = [{"role": "user", "content": "<image>\nDescribe the image in detail."},
                        {"role": "assistant", "content": " ".join(words[:mid])}]
                n = len(proc.encode_chat([dict(c, content=c["content"].replace("<image>", proc.tokens.image_token))
                                          for c in conv], images=[im]).input_ids)
                lo, hi = (mid, hi) if n <= a.seq_len else (lo, mid - 1)
            conv[1]["content"] = " ".join(words[:lo])
            rows.append({"id": f"jpeg-{i}", "image": name, "conversations": conv})
    with open(os.path.join(a.out, "train.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"{a.records} records in {a.out}/train.jsonl")


if __name__ == "__main__":
    main()
