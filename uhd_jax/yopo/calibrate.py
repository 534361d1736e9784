"""`python -m uhd_jax.yopo calibrate`: which attention heads are active on visual tokens (the paper's cut (2)).

    python -m uhd_jax.yopo calibrate --checkpoint DIR --data calib.jsonl --alpha A [--majority 0.4]
        [--first-layer 2] --out mask.npz [--plot heatmap.png]
    python -m uhd_jax.yopo calibrate ... --target-heads K ...     (alpha chosen to keep K heads per layer on average)

For each calibration record (the trainer's JSONL conversation format, read as `python -m uhd_jax.generate` reads
it: the prompt is the conversation up to the generation prompt, a final assistant turn is dropped) the model runs
once (prefill-style forward, no generation) and for every full-attention layer l and head h

    r(l, h) = sum over real queries of the attention mass on visual keys / the same on text keys

with the causal softmax the model computes (GQA: a query head scores its KV group's keys; scale 1/sqrt(head_dim)).
Text keys are every real non-visual token (the prompt before the image, the image's marker tokens, the text after
it). The probabilities are computed chunk-wise over queries (--query-chunk), never [heads, S, S] at once.

A head is active on a sample if r > alpha; the mask keeps a head if it is active on more than --majority of the
samples. Layers before --first-layer keep all heads (the paper: layers 0 and 1); DeltaNet layers are all True
(the cut acts on full attention only). --target-heads K picks alpha among the observed r values (and 0) so that
the kept heads per full-attention layer at/after --first-layer are on average as close to K as the data allow.

--out (.npz): mask [num_layers, num_heads] bool, ratios [num_layers, num_heads] float64 (mean r over samples; NaN
on DeltaNet layers), alpha, majority, first_layer. The kept heads per layer are printed as a table; --plot writes
a PNG heatmap of log10 r (layers x heads, kept heads outlined). Records that cannot be used (an unreadable image,
no image, a prompt longer than the largest bucket, more views than --views-per-row) are skipped and listed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import numpy as np

from uhd_jax.infer import cli

PROG = "python -m uhd_jax.yopo calibrate"


# ------------------------------------------------------------------------------------------------ the measurement
def visual_text_mass(q, k, real, visual, chunk: int):
    """Attention mass of the real queries on visual keys and on text keys, per query head.

    q [B, S, N, H], k [B, S, K, H] (N % K == 0, query head n uses KV head n // (N / K), as the model's attention);
    real [B, S] bool (right-padded: a row's real tokens first), visual [B, S] bool. Causal softmax in float32 over
    the real keys at or before each query, scale 1/sqrt(H), `chunk` queries at a time
    (`uhd_jax.model.visual_attention.attention_mass`). Returns (visual mass, text mass), each [B, N] float32,
    summed over real queries."""
    import jax.numpy as jnp

    from uhd_jax.model.visual_attention import attention_mass

    lengths = jnp.asarray(real, bool).sum(-1).astype(jnp.int32)
    return attention_mass(q.astype(jnp.float32), k.astype(jnp.float32), visual_mask=visual, lengths=lengths,
                          chunk=min(chunk, q.shape[1]))


def masses(model, chunk: int, params, batch):
    """(visual mass, text mass) [num_full_layers, B, N] of a ModelBatch: one forward of `model` (MiniCPMV, no
    logits), then each full-attention layer's q/k from its input hidden state (`attention_qk`) and
    `visual_text_mass`. `mass_fn` is this jitted (model and chunk static): one compile per batch shape (the
    packer's sequence bucket), kept across calls in one process."""
    import jax.numpy as jnp

    from uhd_jax.yopo.attention_qk import full_attention_layers, full_attention_qk, layer_params

    tcfg = model.config.text
    _, out = model.apply({"params": params}, batch, compute_logits=False)
    real = jnp.asarray(batch.attention_mask, bool)
    visual = jnp.asarray(batch.visual_mask, bool) & real
    positions = jnp.asarray(batch.positions)
    lengths = real.sum(-1).astype(jnp.int32)
    vis, txt = [], []
    for layer in full_attention_layers(tcfg):
        hidden = out["embeds"] if layer == 0 else out[f"layer_{layer - 1:02d}"]
        q, k = full_attention_qk(tcfg, layer_params(params["text"], tcfg, layer), hidden, positions, lengths,
                                 dtype=model.dtype)
        v, t = visual_text_mass(q, k, real, visual, chunk)
        vis.append(v)
        txt.append(t)
    return jnp.stack(vis), jnp.stack(txt)


def mass_fn(model, chunk: int):
    """`masses` jitted, as a function of (params, batch)."""
    import functools

    import jax

    global _MASSES_JIT
    if _MASSES_JIT is None:
        _MASSES_JIT = jax.jit(masses, static_argnums=(0, 1))
    return functools.partial(_MASSES_JIT, model, chunk)


_MASSES_JIT = None


# ------------------------------------------------------------------------------------------------ the mask
def head_mask(r, majority: float, alpha: float):
    """r [samples, layers, heads] -> bool [layers, heads]: active (r > alpha) on more than `majority` of samples."""
    r = np.asarray(r)
    return (r > alpha).sum(0) > majority * r.shape[0]


def alpha_for_target(r, majority: float, target: float) -> float:
    """The alpha, among 0 and the observed values of r [samples, layers, heads], whose mask keeps a total closest
    to target * layers heads (ties: the smaller alpha, keeping more). The kept count does not grow with alpha, so
    a binary search over the sorted candidates finds it."""
    r = np.asarray(r, np.float64)
    cand = np.unique(np.concatenate([[0.0], r[np.isfinite(r)].ravel()]))
    want = target * r.shape[1]
    kept = lambda i: int(head_mask(r, majority, cand[i]).sum())
    lo, hi = 0, len(cand) - 1  # first index with kept <= want (the last one keeps nothing above the max r)
    if kept(hi) > want:
        return float(cand[hi])
    while lo < hi:
        mid = (lo + hi) // 2
        if kept(mid) <= want:
            hi = mid
        else:
            lo = mid + 1
    if lo > 0 and abs(kept(lo - 1) - want) <= abs(kept(lo) - want):
        lo -= 1
    return float(cand[lo])


@dataclasses.dataclass
class Result:
    mask: np.ndarray  # [num_layers, heads] bool
    ratios: np.ndarray  # [num_layers, heads] float64, NaN on DeltaNet layers
    alpha: float
    majority: float
    first_layer: int
    samples: int


def build_result(r, layer_types, full_layers, *, alpha: float | None, target_heads: float | None, majority: float,
                 first_layer: int) -> Result:
    """r [samples, full layers, heads] per-sample ratios -> the full mask and mean ratios of every layer."""
    r = np.asarray(r, np.float64)
    num_layers, heads = len(layer_types), r.shape[2]
    judged = [j for j, layer in enumerate(full_layers) if layer >= first_layer]
    if alpha is None:
        if not judged:
            raise ValueError(f"--target-heads: no full-attention layer at or after --first-layer {first_layer}")
        alpha = alpha_for_target(r[:, judged], majority, target_heads)
    mask = np.ones((num_layers, heads), bool)
    ratios = np.full((num_layers, heads), np.nan)
    sub = head_mask(r, majority, alpha)
    for j, layer in enumerate(full_layers):
        ratios[layer] = r[:, j].mean(0)
        if layer >= first_layer:
            mask[layer] = sub[j]
    return Result(mask, ratios, float(alpha), float(majority), int(first_layer), r.shape[0])


def save_result(path: str, res: Result):
    np.savez(path, mask=res.mask, ratios=res.ratios, alpha=np.float64(res.alpha), majority=np.float64(res.majority),
             first_layer=np.int64(res.first_layer))


def table(res: Result, layer_types) -> str:
    """Kept heads per layer, one line each."""
    heads = res.mask.shape[1]
    lines = [f"{'layer':>5}  {'type':<16} {'kept':>9}  {'mean r (min / max)':<24} heads kept"]
    for layer, t in enumerate(layer_types):
        kept = np.flatnonzero(res.mask[layer])
        if t == "linear_attention":
            lines.append(f"{layer:>5}  {'deltanet':<16} {'-':>9}  {'-':<24} (all: not cut)")
            continue
        rr = res.ratios[layer]
        note = "all (before --first-layer)" if layer < res.first_layer else " ".join(map(str, kept)) or "none"
        lines.append(f"{layer:>5}  {'full attention':<16} {len(kept):>4}/{heads:<4}  "
                     f"{f'{np.nanmin(rr):.3g} / {np.nanmax(rr):.3g}':<24} {note}")
    judged = [layer for layer, t in enumerate(layer_types) if t != "linear_attention" and layer >= res.first_layer]
    if judged:
        lines.append(f"kept {int(res.mask[judged].sum())} of {len(judged) * heads} heads in the {len(judged)} "
                     f"full-attention layers from layer {res.first_layer} on "
                     f"({res.mask[judged].sum() / len(judged):.2f} per layer); alpha {res.alpha:.6g}, "
                     f"majority {res.majority:g}, {res.samples} samples")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the heatmap
_COLORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)


def _color(t: float) -> tuple[int, int, int]:
    """t in [0, 1] -> an RGB colour on a dark-purple -> yellow ramp."""
    x = float(np.clip(t, 0, 1)) * (len(_COLORS) - 1)
    i = min(int(x), len(_COLORS) - 2)
    c = _COLORS[i] + (x - i) * (_COLORS[i + 1] - _COLORS[i])
    return tuple(int(round(v)) for v in c)


def write_heatmap(path: str, res: Result, layer_types, cell: int = 22):
    """PNG: one row per layer, one column per head, colour = log10 of the mean r (grey: DeltaNet layers, not
    measured); kept heads outlined in red; the colour scale's ends written below."""
    from PIL import Image, ImageDraw

    layers, heads = res.mask.shape
    with np.errstate(divide="ignore"):
        logr = np.log10(res.ratios)
    finite = logr[np.isfinite(logr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    left, top = 40, 40
    img = Image.new("RGB", (max(left + heads * cell + 10, 380), top + layers * cell + 44), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 4), "log10 r (visual / text attention mass); red: kept", fill="black")
    d.text((4, top - 14), "layer", fill="black")
    for h in range(0, heads, max(1, heads // 16)):
        d.text((left + h * cell + 2, top - 14), str(h), fill="black")
    for layer in range(layers):
        y = top + layer * cell
        d.text((4, y + cell // 3), f"{layer:>3}", fill="black")
        for h in range(heads):
            x = left + h * cell
            v = logr[layer, h]
            fill = (200, 200, 200) if layer_types[layer] == "linear_attention" else \
                _color((v - lo) / span) if np.isfinite(v) else _color(0.0 if v < 0 else 1.0)
            d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fill)
            if layer_types[layer] != "linear_attention" and res.mask[layer, h]:
                d.rectangle([x + 1, y + 1, x + cell - 2, y + cell - 2], outline=(230, 0, 0), width=2)
    y = top + layers * cell + 6
    for i in range(heads * cell):
        d.line([left + i, y, left + i, y + 10], fill=_color(i / max(heads * cell - 1, 1)))
    d.text((left, y + 14), f"{lo:.2f}", fill="black")
    d.text((left + heads * cell - 30, y + 14), f"{hi:.2f}", fill="black")
    img.save(path, format="PNG")


# ------------------------------------------------------------------------------------------------ the command
def majority_float(text: str) -> float:
    v = float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a converted checkpoint directory or a "
                   "trainer step WORKDIR/checkpoints/STEP")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="calibration records (conversation JSONL)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--alpha", type=cli.non_negative_float, default=None, metavar="A",
                     help="a head is active on a sample if r > A")
    how.add_argument("--target-heads", type=cli.positive_float, default=None, metavar="K",
                     help="choose alpha so that K heads per full-attention layer are kept on average")
    p.add_argument("--majority", type=majority_float, default=0.4, metavar="F",
                   help="keep a head active on more than this fraction of the samples (default 0.4)")
    p.add_argument("--first-layer", type=cli.non_negative_int, default=2, metavar="L",
                   help="layers before L (a layer index, DeltaNet layers counted) keep all heads (default 2)")
    p.add_argument("--out", required=True, metavar="MASK.npz", help="where the mask goes")
    p.add_argument("--plot", default=None, metavar="HEATMAP.png", help="also write a heatmap of log r")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --plot")
    p.add_argument("--query-chunk", type=cli.positive_int, default=256, metavar="N",
                   help="queries per step of the attention-mass computation (default 256)")
    p.add_argument("--dtype", choices=cli.DTYPES, default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on accelerators)")
    p.add_argument("--downsample-mode", choices=("16x", "4x"), default=None,
                   help="visual token compression (default: preprocessor_config.json's)")
    p.add_argument("--max-slice-nums", type=cli.positive_int, default=None, metavar="N",
                   help="at most N slices per image (default: preprocessor_config.json's)")
    p.add_argument("--thinking", type=cli.on_off, default=None, metavar="on|off",
                   help="the chat template's enable_thinking (default: the template's default)")
    p.add_argument("--prompt-buckets", type=cli.int_list, default=(256, 1024, 4096), metavar="N,N,..",
                   help="prompt-length buckets (one compiled forward each; default 256,1024,4096)")
    p.add_argument("--views-per-row", type=cli.positive_int, default=None, metavar="N",
                   help="image views per sample (default: max slice nums + 1, one image)")
    p.add_argument("--tokens-per-view", type=cli.positive_int, default=None, metavar="N",
                   help="patch slots per view (default: 9/8 of scale_resolution^2 / patch^2, rounded up)")
    p.add_argument("--image-root", default=None, metavar="DIR",
                   help="relative image paths are relative to this (default: the file's folder)")
    return p


def check_args(p: argparse.ArgumentParser, args):
    from uhd_jax.data.sources import JsonlSource

    if not args.out.endswith(".npz"):
        p.error(f"--out {args.out}: must end in .npz")
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        p.error(f"--plot {args.plot}: must end in .png")
    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        if path is not None and os.path.exists(path) and not args.overwrite:
            p.error(f"{flag} {path} exists (pass --overwrite to replace it)")
    try:
        JsonlSource(args.data, image_root=args.image_root)
    except (FileNotFoundError, ValueError) as e:
        p.error(f"--data: {e}")


def check_model(p: argparse.ArgumentParser, args, cfg):
    text = cfg.text
    if args.first_layer > text.num_hidden_layers:
        p.error(f"--first-layer {args.first_layer} is past the model's {text.num_hidden_layers} layers")
    if args.target_heads is not None:
        if args.target_heads > text.num_attention_heads:
            p.error(f"--target-heads {args.target_heads:g} is more than the {text.num_attention_heads} heads a "
                    "layer has")
        if not any(t != "linear_attention" and i >= args.first_layer for i, t in enumerate(text.layer_types)):
            p.error(f"--target-heads: no full-attention layer at or after --first-layer {args.first_layer}")


@dataclasses.dataclass
class Measured:
    r: np.ndarray  # [samples, full layers, heads]
    ids: list
    skipped: list  # (id, reason)
    total: int


def measure(setup: cli.Setup, args, progress_stream=None) -> Measured:
    """r of every usable record of --data; skips the others with their reason."""
    import jax

    from uhd_jax.data.packer import Packer, PackerConfig
    from uhd_jax.yopo.attention_qk import full_attention_layers

    views, tokens = cli.view_budget(setup, args)
    packer = Packer(setup.processor, PackerConfig(batch_size=1, seq_buckets=tuple(args.prompt_buckets),
                                                  views_per_row=views, tokens_per_view=tokens))
    fn = mass_fn(setup.model, args.query_chunk)
    total, items = cli.jsonl_items(setup, args.data, image_root=args.image_root, thinking=args.thinking, seed=0)
    progress = cli.Progress(total, progress_stream)
    rs, ids, skipped = [], [], []
    n_full = len(full_attention_layers(setup.cfg.text))
    try:
        for item in items:
            reason = item.error
            if reason is None and item.sample.num_views == 0:
                reason = "the prompt has no image"
            if reason is None:
                try:
                    sample = packer.fit(item.sample)
                    packer.bucket(len(sample))
                    batch = packer.pack([sample])
                except cli.REQUEST_ERRORS as e:
                    reason = cli.error_text(e)
            if reason is not None:
                skipped.append((item.id, reason))
                progress.update(error=True)
                continue
            vis, txt = jax.device_get(fn(setup.params, batch))
            with np.errstate(divide="ignore", invalid="ignore"):
                r = np.asarray(vis, np.float64)[:, 0] / np.asarray(txt, np.float64)[:, 0]  # [full layers, heads]
            assert r.shape[0] == n_full
            rs.append(r)
            ids.append(item.id)
            progress.update(tokens=len(sample))
    finally:
        progress.close()
    heads = setup.cfg.text.num_attention_heads
    return Measured(np.stack(rs) if rs else np.zeros((0, n_full, heads)), ids, skipped, total)


def main(argv=None, progress_stream=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    check_args(p, args)
    try:
        setup = cli.load_setup(args)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    check_model(p, args, setup.cfg)
    text = setup.cfg.text
    from uhd_jax.yopo.attention_qk import full_attention_layers

    print(f"{setup.model_dir}: {len(full_attention_layers(text))} full-attention layers x "
          f"{text.num_attention_heads} heads; calibrating on {args.data}", file=sys.stderr)
    m = measure(setup, args, progress_stream)
    if m.skipped:
        print(f"skipped {len(m.skipped)} of {m.total} records:", file=sys.stderr)
        for rid, why in m.skipped:
            print(f"  {rid!r}: {why}", file=sys.stderr)
    if not len(m.ids):
        print(f"error: no usable calibration sample in {args.data} ({m.total} records, {len(m.skipped)} skipped)",
              file=sys.stderr)
        return 1
    res = build_result(m.r, text.layer_types, full_attention_layers(text), alpha=args.alpha,
                       target_heads=args.target_heads, majority=args.majority, first_layer=args.first_layer)
    if args.target_heads is not None:
        print(f"--target-heads {args.target_heads:g}: alpha {res.alpha:.9g}", file=sys.stderr)
    print(table(res, text.layer_types))
    save_result(args.out, res)
    print(f"wrote {args.out} ({len(m.ids)} samples, {len(m.skipped)} skipped)", file=sys.stderr)
    if args.plot is not None:
        write_heatmap(args.plot, res, text.layer_types)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0

