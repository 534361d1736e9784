"""Decode weight-read floor variants (issue 11): how the layer weights are held and how wide the matrix products
are decide how close a decode step gets to HBM bandwidth.

The MiniCPM-V 4.6 LLM's projection shapes (24 layers: 18 DeltaNet-shaped, 6 attention-shaped, SwiGLU MLP; the
tied 248094 x 1024 head), bf16, no attention or state math. Variants:
  unstacked: every weight its own array, straight-line code (as `../shared`'s probe);
  scanned:   weights stacked per layer kind and a `lax.scan` over the 6 periods of 4 layers (as the model);
  m1 / m8:   the activations as they are (batch rows) or padded to 8 rows (a GEMM instead of a matrix-vector
             product, which XLA otherwise lowers to a reduction).
Prints ms per step and achieved GB/s for batch 1 and 8.
"""
import json
import sys
import time

import jax
import jax.numpy as jnp

D, F, V = 1024, 3584, 248094
LIN = [(D, 6144), (D, 2048), (2048, D)]
FULL = [(D, 4096), (D, 512), (D, 512), (2048, D)]
MLP = [(D, F), (D, F), (F, D)]


def make(key):
    layers = []
    for layer in range(24):
        shapes = (FULL if layer % 4 == 3 else LIN) + MLP
        ws = []
        for s in shapes:
            key, k = jax.random.split(key)
            ws.append(jax.random.normal(k, s, jnp.bfloat16) * 0.02)
        layers.append(ws)
    key, k = jax.random.split(key)
    return layers, jax.random.normal(k, (V, D), jnp.bfloat16) * 0.02


def layer(h, w, pad):
    mm = (lambda a, b: a @ b) if not pad else (
        lambda a, b: (jnp.pad(a, ((0, 8 - a.shape[0]), (0, 0))) @ b)[:a.shape[0]] if a.shape[0] < 8 else a @ b)
    if len(w) == 6:
        qkv = mm(h, w[0]); z = mm(h, w[1])
        a = mm(qkv[:, :2048] * jax.nn.sigmoid(z), w[2])
    else:
        q = mm(h, w[0]); k = mm(h, w[1]); v = mm(h, w[2])
        a = mm(q[:, :2048] * jax.nn.sigmoid(q[:, 2048:]) + 0 * (k.sum() + v.sum()), w[3])
    h = h + a
    return h + mm(jax.nn.silu(mm(h, w[-3])) * mm(h, w[-2]), w[-1])


def step_unstacked(pad):
    @jax.jit
    def step(layers, emb, x):
        h = x
        for w in layers:
            h = layer(h, w, pad)
        return jnp.argmax(h @ emb.T, -1), h
    return step


def step_scanned(pad):
    @jax.jit
    def step(stacked, emb, x):
        def body(h, ws):
            for w in ws:
                h = layer(h, w, pad)
            return h, None
        h, _ = jax.lax.scan(body, x, stacked)
        return jnp.argmax(h @ emb.T, -1), h
    return step


def main():
    layers, emb = make(jax.random.key(0))
    nbytes = sum(w.size * 2 for ws in layers for w in ws) + emb.size * 2
    stacked = [jax.tree.map(lambda *a: jnp.stack(a), *[layers[4 * g + i] for g in range(6)]) for i in range(4)]
    stacked = tuple(stacked)
    res = {"device": jax.devices()[0].device_kind, "weight_bytes": nbytes}
    for name, fn, ws in (("unstacked_m1", step_unstacked(False), layers), ("unstacked_m8", step_unstacked(True), layers),
                         ("scanned_m1", step_scanned(False), stacked), ("scanned_m8", step_scanned(True), stacked)):
        for b in (1, 8):
            x = jax.random.normal(jax.random.key(b), (b, D), jnp.bfloat16)
            for _ in range(3):
                jax.block_until_ready(fn(ws, emb, x))
            n = 100
            t = time.perf_counter()
            for _ in range(n):
                out = fn(ws, emb, x)
            jax.block_until_ready(out)
            ms = (time.perf_counter() - t) / n * 1e3
            res[f"{name}_b{b}"] = {"ms": round(ms, 4), "GB_per_s": round(nbytes / ms / 1e6, 1)}
            print(name, b, res[f"{name}_b{b}"], flush=True)
    print(json.dumps(res, indent=1))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
