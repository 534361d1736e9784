"""Whole-model train-step benchmark (not a test): MiniCPM-V 4.6, real config, random weights, one GPU.

    PYTHONUNBUFFERED=1 python experiments/bench_train.py [--variants "name=base;name=x,remat=dots"] [--parts]
                                                        [--tiny] [--iters 10] [--profile NAME]

The step (issue 3): 4 samples, each one 1344x1344 image = 10 views of 448x448 px (32x32 patches, 16x mode:
64 visual tokens per view, 640 per sample) + 512 text tokens = 1152 positions; float32 params, bf16 compute;
loss = next-token cross-entropy (uhd_jax.train.loss, chunked, never the full logits) over the text positions;
value_and_grad over all params. Also, per variant: the same step with the vision frozen (grads of the text
only), and with --parts the vision (fwd+bwd, loss = <tokens, random>) and the text (fwd+bwd on random placed
embeddings) alone, so the breakdown is visible.

Variant keys (comma separated, variants separated by ';'; defaults = the fastest measured: 251 ms, 30.7% MFU):
  name=STR          label
  remat=POLICY      text remat policy (none, full, dots [default], dots_all); vremat=POLICY the vision's (none
                    [default], full, dots). No remat anywhere needs ~91 GiB: OOM on an 80 GB H100.
  cast=0|1          cast the float32 params to bf16 once per step (1) instead of per use inside each layer (0)
  loss=text|all     logits for the text positions only, gathered by a host-built static index (text), or for
                    every position with the non-text ones weighted 0 (all)
  ce_chunk=N        tokens per chunk of the cross-entropy
  unroll=1|N|true   layer-scan unroll of the vision and text stacks (true [default]: straight-line code)
  dn_chunk=N, dn_pass=transition|direct, dn_solver=blocked|triangular_solve   DeltaNet ChunkOptions
FLOPs: vision_flops x3 + text_forward_flops x3 (logits counted for the positions that get them), frozen (first variant only): vision
x1 + text x3. MFU against 989 TFLOP/s (H100 bf16 dense). JSON to $OUT/bench_train.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from uhd_jax.config import reference_config, tiny_config
from uhd_jax.data.batch import ModelBatch
from uhd_jax.data.layout import pack_views
from uhd_jax.model.flops import vision_flops
from uhd_jax.model.gated_deltanet import ChunkOptions
from uhd_jax.model.minicpmv import MiniCPMV
from uhd_jax.model.text_flops import text_forward_flops
from uhd_jax.model.text_model import TextModel, lm_head_table
from uhd_jax.model.vision import VisionEncoder
from uhd_jax.train.loss import chunked_cross_entropy, next_token_targets

PEAK = 989e12
BATCH, VIEWS, TEXT = 4, 10, 512


def make_batch(cfg, seed: int, view_px: int, tokens_per_view: int, text: int, seq: int):
    """ModelBatch: per sample 16 text tokens, then per view 64 image pads + 2 separator tokens, then the rest
    of the text; right-padded to `seq`. Loss mask: every text token (the targets of next-token prediction)."""
    rng = np.random.default_rng(seed)
    levels = 2
    t_out = tokens_per_view >> (2 * levels)
    side = view_px // cfg.vision.patch_size
    per_view = (side * side) >> (2 * levels)
    views = [rng.standard_normal((3, view_px, view_px), dtype=np.float32) for _ in range(BATCH * VIEWS)]
    rows = [pack_views(views[b * VIEWS:(b + 1) * VIEWS], patch_size=cfg.vision.patch_size,
                       positions_per_side=cfg.vision.positions_per_side, mode="16x", tokens_per_view=tokens_per_view,
                       num_views=VIEWS, dtype=np.float32) for b in range(BATCH)]
    vb = jax.tree.map(lambda *a: np.stack(a), *rows)  # each row owns its view slots: [BATCH, VIEWS, ...]
    ids = np.zeros((BATCH, seq), np.int32)
    amask = np.zeros((BATCH, seq), bool)
    vindex = np.zeros((BATCH, seq), np.int32)
    vmask = np.zeros((BATCH, seq), bool)
    for b in range(BATCH):
        lead = 16
        row_ids, row_v, row_vi = [], [], []
        row_ids += list(rng.integers(0, 1000, lead)); row_v += [False] * lead; row_vi += [0] * lead
        for v in range(VIEWS):
            slot = v  # row-local
            row_ids += [cfg.image_token_id] * per_view; row_v += [True] * per_view
            row_vi += [slot * t_out + j for j in range(per_view)]
            row_ids += list(rng.integers(0, 1000, 2)); row_v += [False] * 2; row_vi += [0] * 2
        rest = text - (len(row_ids) - VIEWS * per_view)
        row_ids += list(rng.integers(0, cfg.text.vocab_size, rest)); row_v += [False] * rest; row_vi += [0] * rest
        n = len(row_ids)
        assert n <= seq, (n, seq)
        ids[b, :n], amask[b, :n], vmask[b, :n], vindex[b, :n] = row_ids, True, row_v, row_vi
    loss_mask = amask & ~vmask
    positions = np.where(amask, np.arange(seq)[None], 0).astype(np.int32)
    return ModelBatch(input_ids=ids, attention_mask=amask, positions=positions, visual_index=vindex,
                      visual_mask=vmask, loss_mask=loss_mask, vision=vb)


def loss_inputs(batch: ModelBatch, mode: str, n_static: int):
    """(index or None, targets, weights) on the host. mode "text": the positions with a next-token target,
    gathered into a static [n_static] (padding weight 0); "all": every position, weights 0 off target."""
    ids, lm = np.asarray(batch.input_ids), np.asarray(batch.loss_mask)
    tgt, w = (np.asarray(a) for a in next_token_targets(ids, lm))
    if mode == "all":
        return None, tgt.reshape(-1), w.reshape(-1).astype(np.float32)
    flat = np.flatnonzero(w.reshape(-1))
    assert len(flat) <= n_static, (len(flat), n_static)
    idx = np.zeros(n_static, np.int32)
    idx[:len(flat)] = flat
    weights = np.zeros(n_static, np.float32)
    weights[:len(flat)] = 1
    return idx, tgt.reshape(-1)[idx], weights


def cast_kernels(tree):
    """bf16 copies of the matrices (Dense kernels), once per step; norms, decays, tables stay float32."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.astype(jnp.bfloat16) if getattr(path[-1], "key", None) == "kernel" else x, tree)


def library_step(cfg, batches, params, vf, args, peak_gib):
    """The whole step as the trainer runs it: uhd_jax.train.step.make_train_step (loss over every position with
    the loss mask, gradients, clipping, AdamW update; the state donated), remat dots, unrolled scans."""
    from uhd_jax.parallel.mesh import global_batch, make_mesh
    from uhd_jax.train.optimizer import make_optimizer
    from uhd_jax.train.step import init_train_state, make_train_step

    model = MiniCPMV(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat_policy="dots",
                     vision_remat_policy="none", unroll=True)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    opt = make_optimizer(1e-5)
    state, shardings = init_train_state(model, opt, batches[0], mesh, jax.random.PRNGKey(0), params=params)
    step = make_train_step(model, opt, shardings, mesh)
    dbatches = [global_batch(b, mesh) for b in batches]
    seq = batches[0].input_ids.shape[1]
    flops = 3 * vf + 3 * text_forward_flops(cfg.text, BATCH, seq)["total"]
    t = time.perf_counter()
    state, m = step(state, dbatches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    state, m = step(state, dbatches[1])
    jax.block_until_ready(m)
    ts = []
    for i in range(args.iters):
        t = time.perf_counter()
        state, m = step(state, dbatches[i % 2])
        jax.block_until_ready(m)
        ts.append(time.perf_counter() - t)
    ms = statistics.median(ts) * 1e3
    tokens = BATCH * seq
    r = dict(name="library train step (AdamW update included)", ms=ms, ms_min=min(ts) * 1e3, flops=flops,
             tflops_per_s=flops / ms / 1e9, mfu=flops / (ms * 1e-3) / PEAK, tokens_per_s=tokens / (ms * 1e-3),
             compile_s=compile_s, peak_gib_so_far=peak_gib(), loss=float(m["loss"]))
    print(f"{r['name']:44s} {ms:8.1f} ms (min {r['ms_min']:.1f}) {r['tflops_per_s']:6.1f} TFLOP/s  "
          f"MFU {100 * r['mfu']:5.1f}%  {r['tokens_per_s']:.0f} tokens/s  compile+first {compile_s:5.1f} s  "
          f"device peak {r['peak_gib_so_far']:5.1f} GiB", flush=True)
    return r


def parse_variants(spec: str) -> list[dict]:
    out = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        v = dict(name="base", remat="dots", vremat="none", cast="1", loss="text", ce_chunk="1024",
                 dn_chunk="128", dn_pass="transition", dn_solver="blocked", unroll="true")
        for kv in part.split(","):
            k, val = kv.split("=")
            if k not in v:
                raise SystemExit(f"unknown variant key {k!r}")
            v[k] = val
        out.append(v)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="name=base")  # base = remat dots (text), unroll true: 30.7% MFU
    ap.add_argument("--parts", action="store_true", help="also time vision alone and text alone (first variant)")
    ap.add_argument("--no-frozen", action="store_true")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="tiny config: a CPU smoke test of this script")
    ap.add_argument("--profile", default="", help="comma list of variant names (whole step) and/or 'text', 'vision' (parts) to trace to "
                         "$OUT/trace_<name>")
    ap.add_argument("--budget-s", type=float, default=480, help="skip remaining variants past this wall time")
    ap.add_argument("--library-step", action="store_true",
                    help="also time the library's train step (uhd_jax.train.step: loss + grads + AdamW update, "
                         "donated state, one-device mesh) with the base variant's model settings")
    args = ap.parse_args()
    t_start = time.perf_counter()

    cfg = tiny_config() if args.tiny else reference_config()
    view_px = 112 if args.tiny else 448
    tokens_per_view = (view_px // cfg.vision.patch_size) ** 2
    per_view = tokens_per_view >> 4
    text = 40 if args.tiny else TEXT
    seq = VIEWS * per_view + text
    seq = -(-seq // 128) * 128 if args.tiny else seq  # 1152 is a bucket itself
    n_loss_static = BATCH * text
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}; batch {BATCH} x (1 image = {VIEWS} views of "
          f"{tokens_per_view} patches -> {VIEWS * per_view} visual tokens + {text} text) = seq {seq}", flush=True)
    batches = [make_batch(cfg, s, view_px, tokens_per_view, text, seq) for s in range(2)]
    results = {"device": dev.device_kind, "jax": jax.__version__, "seq": seq, "runs": []}

    def peak_gib():
        return (dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2 ** 30

    def compile_and_time(name, fn, arg_sets, flops, trace=False):
        try:
            return _compile_and_time(name, fn, arg_sets, flops, trace)
        except Exception as e:  # e.g. out of memory: report and go on with the next case
            print(f"[{name} failed: {type(e).__name__}: {str(e)[:400]}]", flush=True)
            return {}

    def _compile_and_time(name, fn, arg_sets, flops, trace=False):
        t = time.perf_counter()
        compiled = jax.jit(fn).lower(*arg_sets[0]).compile()
        compile_s = time.perf_counter() - t
        mem = compiled.memory_analysis()
        gib = lambda k: getattr(mem, k, 0) / 2 ** 30 if mem is not None else float("nan")
        temp, argm, outm = gib("temp_size_in_bytes"), gib("argument_size_in_bytes"), gib("output_size_in_bytes")
        for a in arg_sets:
            jax.block_until_ready(compiled(*a))
        ts = []
        for i in range(args.iters):
            a = arg_sets[i % len(arg_sets)]
            t = time.perf_counter()
            jax.block_until_ready(compiled(*a))
            ts.append(time.perf_counter() - t)
        if trace and os.environ.get("OUT"):
            jax.profiler.start_trace(os.path.join(os.environ["OUT"], "trace_" + name.split()[0].strip("[]")))
            for i in range(2):
                jax.block_until_ready(compiled(*arg_sets[i % len(arg_sets)]))
            jax.profiler.stop_trace()
        ms = statistics.median(ts) * 1e3
        r = dict(name=name, ms=ms, ms_min=min(ts) * 1e3, ms_max=max(ts) * 1e3, flops=flops,
                 tflops_per_s=flops / ms / 1e9, mfu=flops / (ms * 1e-3) / PEAK, compile_s=compile_s,
                 temp_gib=temp, args_gib=argm, out_gib=outm, program_gib=temp + argm + outm,
                 peak_gib_so_far=peak_gib())
        print(f"{name:44s} {ms:8.1f} ms (min {r['ms_min']:.1f}) {r['tflops_per_s']:6.1f} TFLOP/s  "
              f"MFU {100 * r['mfu']:5.1f}%  {flops / 1e12:6.2f} TFLOP  compile {compile_s:5.1f} s  "
              f"temp {temp:5.1f} + args {argm:4.1f} + out {outm:4.1f} GiB  device peak {r['peak_gib_so_far']:5.1f} GiB",
              flush=True)
        results["runs"].append(r)
        return r

    init_model = MiniCPMV(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    t = time.perf_counter()
    params = jax.jit(lambda k, b: meta.unbox(init_model.init(k, b)["params"]))(jax.random.PRNGKey(0), batches[0])
    jax.block_until_ready(params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"params: {n_params / 1e9:.3f} B float32 (init {time.perf_counter() - t:.1f} s)", flush=True)

    vf = vision_flops(cfg, [tokens_per_view] * (BATCH * VIEWS), "16x")["total"]

    for vi, v in enumerate(parse_variants(args.variants)):
        if time.perf_counter() - t_start > args.budget_s:
            print(f"[skipping variant {v['name']}: past --budget-s]")
            continue
        chunk = ChunkOptions(int(v["dn_chunk"]), v["dn_pass"], v["dn_solver"])
        model = MiniCPMV(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat_policy=v["remat"],
                         vision_remat_policy=v["vremat"], chunk=chunk,
                         unroll=True if v["unroll"] == "true" else int(v["unroll"]))
        cast = v["cast"] == "1"
        ce_chunk = int(v["ce_chunk"])
        tf = text_forward_flops(cfg.text, BATCH, seq, chunk=chunk,
                                logits_tokens=n_loss_static if v["loss"] == "text" else None)["total"]
        linputs = [tuple(jnp.asarray(a) if a is not None else None for a in loss_inputs(b, v["loss"], n_loss_static))
                   for b in batches]
        dbatches = [jax.device_put(b) for b in batches]

        def loss_fn(p_vision, p_text, batch, lidx, ltgt, lw, model=model, cast=cast, ce_chunk=ce_chunk):
            table = lm_head_table(p_text, cfg.text)  # float32: the loss casts it once and accumulates its grad in f32
            p = {"vision": p_vision, "text": p_text}
            if cast:
                p = cast_kernels(p)
            _, out = model.apply({"params": p}, batch, compute_logits=False)
            h = out["norm"].reshape(-1, cfg.text.hidden_size)
            if lidx is not None:
                h = jnp.take(h, lidx, axis=0)
            return chunked_cross_entropy(h, table, ltgt, lw, valid_vocab=cfg.text.vocab_size, chunk_tokens=ce_chunk)

        step = jax.value_and_grad(lambda p, *a: loss_fn(p["vision"], p["text"], *a))
        sets = [(params, b) + l for b, l in zip(dbatches, linputs)]
        r = compile_and_time(f"[{v['name']}] train step (all params)", step, sets, 3 * vf + 3 * tf,
                             trace=v["name"] in args.profile.split(","))
        if r:
            r["variant"] = v
        if not args.no_frozen and vi == 0:
            frozen = jax.value_and_grad(lambda pt, pv, *a: loss_fn(pv, pt, *a))
            fsets = [(params["text"], params["vision"], b) + l for b, l in zip(dbatches, linputs)]
            r = compile_and_time(f"[{v['name']}] train step (vision frozen)", frozen, fsets, vf + 3 * tf)
            if r:
                r["variant"] = v

        if args.parts and vi == 0:
            enc = VisionEncoder(cfg, jnp.bfloat16, jnp.float32, remat=v["vremat"])
            vbs = [b.vision for b in dbatches]
            out_shape = (BATCH, VIEWS, tokens_per_view >> 4, cfg.text.hidden_size)
            cts = [jax.random.normal(jax.random.PRNGKey(i), out_shape, jnp.bfloat16) for i in range(2)]

            def vloss(pv, vb, ct, cast=cast):
                if cast:
                    pv = cast_kernels(pv)
                tok = enc.apply({"params": pv}, vb)[0]
                return jnp.sum(tok.astype(jnp.float32) * ct.astype(jnp.float32)) * 1e-3

            compile_and_time("vision alone fwd+bwd", jax.value_and_grad(vloss),
                             [(params["vision"], vb, ct) for vb, ct in zip(vbs, cts)], 3 * vf,
                             trace="vision" in args.profile.split(","))
            compile_and_time("vision alone fwd", vloss, [(params["vision"], vb, ct) for vb, ct in zip(vbs, cts)], vf)
            placed = [jax.random.normal(jax.random.PRNGKey(10 + i), (BATCH, seq, cfg.text.hidden_size),
                                        jnp.bfloat16) * 0.02 for i in range(2)]
            tmodel = TextModel(cfg.text, jnp.bfloat16, jnp.float32, remat_policy=v["remat"], chunk=chunk)

            def tloss(pt, b, emb, lidx, ltgt, lw, cast=cast, ce_chunk=ce_chunk):
                table = lm_head_table(pt, cfg.text)
                if cast:
                    pt = cast_kernels(pt)
                _, out = tmodel.apply({"params": pt}, b.input_ids, attention_mask=b.attention_mask,
                                      positions=b.positions, placed_embeds=emb, placed_mask=b.visual_mask,
                                      compute_logits=False)
                h = out["norm"].reshape(-1, cfg.text.hidden_size)
                if lidx is not None:
                    h = jnp.take(h, lidx, axis=0)
                return chunked_cross_entropy(h, table, ltgt, lw, valid_vocab=cfg.text.vocab_size,
                                             chunk_tokens=ce_chunk)

            compile_and_time("text alone fwd+bwd (placed random embeds)", jax.value_and_grad(tloss),
                             [(params["text"], b, e) + l for b, e, l in zip(dbatches, placed, linputs)], 3 * tf,
                             trace="text" in args.profile.split(","))

    if args.library_step:
        results["library_step"] = library_step(cfg, batches, params, vf, args, peak_gib)

    results["peak_gib"] = peak_gib()
    print("\nsummary (target: whole step >= 30% MFU; transformers reference 2.64 s, ~3% MFU, 62 GiB)")
    for r in results["runs"]:
        print(f"  {r['name']:44s} {r['ms']:8.1f} ms  {r['tflops_per_s']:6.1f} TFLOP/s  MFU {100 * r['mfu']:5.1f}%  "
              f"program {r['program_gib']:5.1f} GiB  compile {r['compile_s']:.0f} s")
    print(f"  device peak memory over the run: {results['peak_gib']:.1f} GiB")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_train.json"), "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
