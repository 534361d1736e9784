"""Command line: checkpoint conversion.

    python -m uhd_jax.convert hf-to-jax --hf-dir HF_DIR --out CKPT_DIR [--skip-unused] [--dtype bfloat16]
    python -m uhd_jax.convert jax-to-hf --ckpt CKPT_DIR --out HF_DIR [--dtype bfloat16] [--max-shard-size 5GB]
    python -m uhd_jax.convert from-separate --vision-dir SIGLIP_DIR --llm-dir QWEN_DIR --out CKPT_DIR \
        [--insert-layer-id 6] [--merger-init-layer K] [--downsample-mode 16x] [--seed 0]

Exit status 2 with every problem listed when the input cannot be converted; nothing is written then. The output
directory may not be an input directory, lie inside one, or contain one (symlinks resolved).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from uhd_jax.convert.errors import ConversionError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m uhd_jax.convert", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("hf-to-jax", help="Hugging Face MiniCPM-V 4.6 directory -> uhd_jax checkpoint directory")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--skip-unused", action="store_true", help="drop tensors the model has no parameter for "
                   "(e.g. mtp.*) instead of failing; they are listed")
    a.add_argument("--dtype", default="keep", help="keep (default), bfloat16, float32 or float16")
    a.add_argument("--overwrite", action="store_true")

    b = sub.add_parser("jax-to-hf", help="uhd_jax checkpoint directory -> Hugging Face directory")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--dtype", default="keep")
    b.add_argument("--max-shard-size", default="5GB", help="shard the safetensors above this size (0: never)")
    b.add_argument("--overwrite", action="store_true")

    c = sub.add_parser("from-separate", help="SigLIP/SigLIP2 vision dir + Qwen3/Qwen3.5 LLM dir -> new LLaVA-UHD v4 "
                       "checkpoint directory (window merger initialised from a ViT layer)")
    c.add_argument("--vision-dir", required=True)
    c.add_argument("--llm-dir", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--insert-layer-id", type=int, default=6)
    c.add_argument("--merger-init-layer", type=int, default=None, help="ViT layer the window merger is copied "
                   "from (default: insert-layer-id)")
    c.add_argument("--downsample-mode", default="16x", choices=("16x", "4x"))
    c.add_argument("--merger-times", type=int, default=1)
    c.add_argument("--positions-per-side", type=int, default=70)
    c.add_argument("--image-token-id", type=int, default=None)
    c.add_argument("--seed", type=int, default=0, help="for the freshly initialised post-ViT merger")
    c.add_argument("--dtype", default="keep")
    c.add_argument("--skip-unused", action="store_true", help="drop unexpected leftover tensors instead of failing")
    c.add_argument("--overwrite", action="store_true")

    args = p.parse_args(argv)
    log = logging.getLogger("uhd_jax")  # ours only: Orbax and absl stay quiet
    log.addHandler(logging.StreamHandler())
    log.setLevel(logging.INFO)
    t0 = time.perf_counter()
    inputs = {"hf-to-jax": ("hf_dir",), "jax-to-hf": ("ckpt",), "from-separate": ("vision_dir", "llm_dir")}
    inputs = [getattr(args, name) for name in inputs[args.cmd]]
    try:
        from uhd_jax.convert.checkpoint import check_not_overlapping

        check_not_overlapping(args.out, inputs)  # before anything is read, written or deleted
        if args.cmd == "hf-to-jax":
            from uhd_jax.convert.hf_to_jax import hf_to_jax, tree_summary

            loaded = hf_to_jax(args.hf_dir, args.out, skip_unused=args.skip_unused, dtype=args.dtype,
                               overwrite=args.overwrite)
            n, nbytes, dtypes = tree_summary(loaded.params)
            if loaded.unused:
                print(f"skipped {len(loaded.unused)} unused tensors: {', '.join(loaded.unused)}")
            print(f"wrote {args.out}: {n:,} parameters, {nbytes / 1e9:.2f} GB {dtypes}")
        elif args.cmd == "jax-to-hf":
            from uhd_jax.convert.jax_to_hf import jax_to_hf

            jax_to_hf(args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                      overwrite=args.overwrite)
            print(f"wrote {args.out}")
        else:
            from uhd_jax.convert.from_separate import from_separate

            report = from_separate(args.vision_dir, args.llm_dir, args.out, insert_layer_id=args.insert_layer_id,
                                   merger_init_layer=args.merger_init_layer, downsample_mode=args.downsample_mode,
                                   merger_times=args.merger_times, positions_per_side=args.positions_per_side,
                                   image_token_id=args.image_token_id, seed=args.seed, dtype=args.dtype,
                                   skip_unused=args.skip_unused, overwrite=args.overwrite)
            print("\n".join(report.lines()))
            print(f"wrote {args.out}")
    except (ConversionError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
