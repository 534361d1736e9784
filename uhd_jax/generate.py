"""`python -m uhd_jax.generate`: answers from a checkpoint, one prompt streamed to the terminal or a JSONL file of
requests.

    python -m uhd_jax.generate --checkpoint DIR --image a.jpg [--image b.png] --prompt "What is in the picture?"
    python -m uhd_jax.generate --checkpoint DIR --input requests.jsonl --output answers.jsonl [--resume]

One prompt: the images go before the prompt text in one user turn (or where the prompt writes `<image>`, one tag
per image); the answer is printed as it is generated (the engine's stream hook; with --num-beams > 1 at the end).

A file: records in the trainer's JSONL conversation format (see uhd_jax/infer/cli.py; a final assistant turn is
the reference, not the prompt), run through the SlotEngine (continuous batching over --slots) with a progress line
on stderr; each result is appended to --output as it finishes, in finishing order:
    {"id", "prediction", "finish_reason" ("stop" | "length"), "num_tokens"[, "reference"]}   or   {"id", "error"}
--resume keeps the rows already in --output and skips their ids.

Decoding defaults come from the checkpoint's generation_config.json (do_sample, temperature, top_k, top_p,
repetition_penalty, num_beams, max_new_tokens); flags override them; --temperature 0 is greedy.
"""

from __future__ import annotations

import argparse
import json
import sys

from uhd_jax.infer import cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m uhd_jax.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default=None, help="one prompt, answered on the terminal as it is generated")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image for --prompt (repeatable)")
    p.add_argument("--input", default=None, metavar="FILE.jsonl", help="a JSONL file of requests")
    p.add_argument("--output", default=None, metavar="FILE.jsonl", help="where --input's answers go")
    p.add_argument("--resume", action="store_true", help="skip the ids already in --output (append to it)")
    cli.add_model_flags(p)
    return p


def check_args(p: argparse.ArgumentParser, args):
    if (args.prompt is None) == (args.input is None):
        p.error("give either --prompt (one prompt) or --input FILE.jsonl (a file of requests)")
    if args.input is not None:
        if args.output is None:
            p.error("--input needs --output FILE.jsonl")
        if args.image:
            p.error("--image goes with --prompt; images of --input records are named in the records")
    elif args.output is not None or args.resume:
        p.error("--output and --resume go with --input")
    if args.input is not None:
        cli.check_file_run(p, args, "--input", args.input)
    if args.capacity is not None and args.max_new_tokens is not None and args.capacity <= args.max_new_tokens:
        p.error(f"--capacity {args.capacity} leaves no room for a prompt with --max-new-tokens {args.max_new_tokens}")


def single_prompt_messages(prompt: str, images: list[str], image_token: str) -> list[dict]:
    """One user turn: `<image>` tags in the prompt mark where the images go (one tag per image), else the images
    come first, one per line."""
    n = prompt.count("<image>")
    if n and n != len(images):
        raise ValueError(f"the prompt has {n} <image> tags but {len(images)} --image given")
    if n:
        content = prompt.replace("<image>", image_token)
    else:
        content = "".join(image_token + "\n" for _ in images) + prompt
    return [{"role": "user", "content": content}]


# C0 control characters but tab and newline, and DEL: shown escaped on a terminal (a random or tiny model can emit
# ESC sequences), written as they are elsewhere
_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0, 9), *range(11, 32), 127]}


class TextStream:
    """Prints the decoded text of a growing token list, holding back an incomplete UTF-8 character at the end."""

    def __init__(self, processor, out=None):
        self.processor, self.out = processor, sys.stdout if out is None else out
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.ids: list[int] = []
        self.printed = ""

    def add(self, token: int):
        self.ids.append(int(token))
        text = self.processor.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self._emit(text)

    def _emit(self, text: str):
        if text.startswith(self.printed):
            new = text[len(self.printed):]
            self.out.write(new.translate(_CONTROLS) if self.tty else new)
            self.out.flush()
            self.printed = text

    def close(self) -> str:
        self._emit(self.processor.decode(self.ids))
        self.out.write("\n")
        self.out.flush()
        return self.printed


def run_prompt(setup: cli.Setup, args, dec: cli.Decoding, out=None) -> str:
    """Generates the answer to --prompt, streamed to `out` (stdout); returns the decoded answer."""
    import jax
    import numpy as np

    from uhd_jax.data.layout import patches_per_token
    from uhd_jax.data.packer import Packer, PackerConfig
    from uhd_jax.infer.engine import Generator, greedy, text_slot_multiple
    from uhd_jax.infer.sampler import make_pick_fn, stack_params

    proc = setup.processor
    messages = single_prompt_messages(args.prompt, args.image, proc.tokens.image_token)
    sample = cli.build_sample(setup, messages, args.image, name="prompt", thinking=args.thinking)
    sc = proc.slice_config
    unit = patches_per_token(sc.downsample_mode, sc.merger_times)
    most = max((h * w for h, w in sample.view_grids), default=unit)
    batch = Packer(proc, PackerConfig(batch_size=1, seq_buckets=(len(sample),), views_per_row=sample.num_views,
                                      tokens_per_view=-(-most // unit) * unit,
                                      text_slot_multiple=text_slot_multiple(setup.model))).pack([sample])
    capacity = args.capacity or len(sample) + dec.max_new_tokens
    out = sys.stdout if out is None else out
    if dec.num_beams > 1:
        from uhd_jax.infer.beam_generate import BeamGenerator

        gen = BeamGenerator(setup.model, num_beams=dec.num_beams, eos_token_ids=proc.eos_token_ids,
                            pad_token_id=proc.pad_token_id, repetition_penalty=dec.repetition_penalty)
        res = gen.generate(setup.params, batch, max_new_tokens=dec.max_new_tokens, capacity=capacity)
        text = proc.decode(res.tokens[0])
        out.write((text.translate(_CONTROLS) if out.isatty() else text) + "\n")
        out.flush()
        return text
    stream = TextStream(proc, out)

    def on_tokens(tokens, took):
        if bool(np.asarray(took)[0]):
            stream.add(int(np.asarray(tokens)[0]))

    plain = dec.plain_greedy
    gen = Generator(setup.model, stop_ids=proc.eos_token_ids, pick_fn=greedy if plain else make_pick_fn(setup.cfg.text),
                    stream=on_tokens)
    res = gen.generate(setup.params, batch, max_new_tokens=dec.max_new_tokens, capacity=capacity,
                       key=[dec.seed], sampling_params=None if plain else stack_params([dec.sampling]))
    jax.effects_barrier()
    stream.close()
    return proc.decode(res.tokens[0])


def run_file(setup: cli.Setup, args, dec: cli.Decoding, progress_stream=None) -> dict:
    """--input -> --output; returns counts {"done", "errors", "skipped"}."""
    done = cli.read_done_ids(args.output) if args.resume else set()
    total, items = cli.jsonl_items(setup, args.input, image_root=args.image_root, thinking=args.thinking,
                                   seed=args.seed, skip=lambda rid: json.dumps(rid) in done)
    counts = {"done": 0, "errors": 0, "skipped": len(done)}

    def on_result(item, row):
        if item.reference is not None and "error" not in row:
            row["reference"] = item.reference
        counts["errors" if "error" in row else "done"] += 1

    cli.run_to_jsonl(setup, args, dec, items, args.output, append=args.resume, total=total - len(done),
                     on_result=on_result, progress_stream=progress_stream)
    return counts


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    check_args(p, args)
    setup, dec = cli.setup_or_usage_error(p, args, use_generation_config=True)
    print(f"{setup.model_dir}: {dec.describe()}; visual cuts: {setup.model.cuts.describe()}", file=sys.stderr)
    if args.prompt is not None:
        try:
            run_prompt(setup, args, dec)
        except (ValueError, OSError) as e:  # a bad image, a prompt that does not fit
            print(f"error: {cli.error_text(e)}", file=sys.stderr)
            return 1
        return 0
    counts = run_file(setup, args, dec)
    print(f"{counts['done']} answered, {counts['errors']} errors, {counts['skipped']} skipped (already in "
          f"{args.output})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
