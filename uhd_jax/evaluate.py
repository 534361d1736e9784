"""`python -m uhd_jax.evaluate`: generate answers for a benchmark file and score them.

    python -m uhd_jax.evaluate --checkpoint DIR --data docvqa_val.jsonl --metric anls [--output preds.jsonl]
    python -m uhd_jax.evaluate --checkpoint DIR --tfds my_vqa --split validation --metric vqa_accuracy

Data (--data): the trainer's JSONL conversation format (uhd_jax/infer/cli.py), one question per record. The
reference answer(s) of a record, first found of:
    "answers":  a list of strings: every acceptable answer (DocVQA), or VQA's 10 annotator answers (vqa_accuracy
                needs them all: its score is the leave-one-annotator-out mean of min(#matches / 3, 1));
    "answer":   a string (or a list, as "answers");
    the last turn of "conversations", if it is the assistant's (it is not part of the prompt).
An optional "dataset_name" goes to the ocrbench scorer (HME100k is scored case-sensitively without spaces).
With --tfds NAME (a prepared TFDS dataset in array_record format, read through `tfds.data_source`, never
downloaded; see uhd_jax.data.sources.TfdsSource) each record's --image-key / --question-key / --answer-key
fields are read; a list in the answer field is the list of answers.

Generation is greedy by default (generation_config.json's sampling settings are not used), or beam search with
--num-beams, or sampling with --temperature > 0. The prediction is scored with surrounding whitespace stripped and,
for thinking models, only after the last "</think>". Each record's row is appended to --output as it finishes:
    {"id", "prediction", "answers", "score", "finish_reason", "num_tokens"}  or  {"id", "error", "answers", "score": 0}
The summary (printed as a table and saved to OUTPUT's name with .summary.json) is computed from the rows of
--output: count = rows, score = 100 x the mean over all rows (a failed record scores 0), failures = error rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from uhd_jax.infer import cli
from uhd_jax.infer.metrics import METRICS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m uhd_jax.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, metavar="FILE.jsonl", help="questions with reference answers (JSONL)")
    p.add_argument("--tfds", default=None, metavar="NAME",
                   help="a prepared TFDS dataset (name or builder directory) instead of --data")
    p.add_argument("--split", default="test", help="--tfds split (default test)")
    p.add_argument("--tfds-data-dir", default=None, metavar="DIR", help="--tfds data_dir")
    p.add_argument("--image-key", default="image", help="--tfds image field (default image)")
    p.add_argument("--question-key", default="question", help="--tfds question field (default question)")
    p.add_argument("--answer-key", default="answer", help="--tfds answer field (default answer)")
    p.add_argument("--metric", required=True, choices=sorted(METRICS), help="how predictions are scored")
    p.add_argument("--output", default=None, metavar="FILE.jsonl",
                   help="per-record predictions (default: <data name>.<metric>.predictions.jsonl here)")
    p.add_argument("--limit", type=cli.positive_int, default=None, metavar="N", help="only the first N records")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --output and skip their ids")
    cli.add_model_flags(p)
    return p


def answers_of(record: dict | None, reference: str | None) -> list[str] | None:
    """The reference answers of a record (see the module docstring), or None."""
    if record is not None:
        for key in ("answers", "answer"):
            v = record.get(key)
            if v is None:
                continue
            if isinstance(v, str):
                return [v]
            if isinstance(v, list) and v and all(isinstance(a, str) for a in v):
                return list(v)
            raise ValueError(f"{key!r} must be a string or a non-empty list of strings, got {v!r}")
    return None if reference is None else [reference]


def answer_text(prediction: str) -> str:
    """What is scored: the prediction after the last </think> (thinking models), stripped."""
    return prediction.rsplit("</think>", 1)[-1].strip()


def score(metric: str, prediction: str, answers: list[str], record: dict | None = None) -> float:
    fn = METRICS[metric]
    if metric == "ocrbench":
        return float(fn(answer_text(prediction), answers, (record or {}).get("dataset_name")))
    return float(fn(answer_text(prediction), answers))


def summarize(metric: str, rows: list[dict]) -> dict:
    scores = [float(r.get("score", 0.0)) for r in rows]
    return {"metric": metric, "count": len(rows), "score": 100.0 * sum(scores) / len(scores) if scores else 0.0,
            "failures": sum(1 for r in rows if "error" in r)}


def table(s: dict) -> str:
    head = f"{'metric':<18} {'count':>7} {'score':>8} {'failures':>9}"
    return f"{head}\n{s['metric']:<18} {s['count']:>7} {s['score']:>8.2f} {s['failures']:>9}"


def with_answers(items):
    """Items with their answers attached (item.answers); a record without answers is an error."""
    for item in items:
        try:
            item.answers = answers_of(item.record, item.reference)
        except ValueError as e:
            item.answers = None
            item.error = item.error or str(e)
        if item.answers is None and item.error is None:
            item.error = "no reference answer (give 'answers', 'answer' or a final assistant turn)"
        yield item


def tfds_items(setup: cli.Setup, args, skip):
    from uhd_jax.data.sources import TfdsSource

    src = TfdsSource(args.tfds, args.split, args.tfds_data_dir, image_key=args.image_key,
                     question_key=args.question_key, answer_key=args.answer_key,
                     image_token=setup.processor.tokens.image_token)

    n = len(src) if args.limit is None else min(len(src), args.limit)

    def items():
        for i in range(n):
            if skip(i):
                continue
            item = cli.Item(id=i, seed=args.seed)
            try:
                req = src[i]
                answers = src.answers(i)
                answers = answers if len(answers) > 1 else None  # one answer: the assistant turn holds it
                messages, item.reference = cli.prompt_messages(req.messages)
                item.record = {"answers": answers} if answers else None
                item.sample = cli.build_sample(setup, messages, req.images, name=req.name, thinking=args.thinking)
            except cli.REQUEST_ERRORS as e:  # this record's error row
                item.error = cli.error_text(e)
            yield item

    return n, items()


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if (args.data is None) == (args.tfds is None):
        p.error("give either --data FILE.jsonl or --tfds NAME")
    if args.data is not None:
        cli.check_file_run(p, args, "--data", args.data)
    name = os.path.splitext(os.path.basename(args.data))[0] if args.data else os.path.basename(
        os.path.normpath(args.tfds)) + "_" + args.split
    output = args.output or f"{name}.{args.metric}.predictions.jsonl"
    setup, dec = cli.setup_or_usage_error(p, args, use_generation_config=False)
    print(f"{setup.model_dir}: {dec.describe()}; visual cuts: {setup.model.cuts.describe()}; {args.metric} on "
          f"{args.data or args.tfds}", file=sys.stderr)
    done = cli.read_done_ids(output) if args.resume else set()
    skip = lambda rid: json.dumps(rid) in done  # noqa: E731
    try:
        if args.data:
            total, items = cli.jsonl_items(setup, args.data, image_root=args.image_root, thinking=args.thinking,
                                           seed=args.seed, skip=skip, limit=args.limit)
        else:
            total, items = tfds_items(setup, args, skip)
    except (FileNotFoundError, ValueError, ImportError) as e:
        p.error(str(e))

    def on_result(item, row):
        row["answers"] = item.answers
        row["score"] = 0.0 if "error" in row else score(args.metric, row["prediction"], item.answers, item.record)

    cli.run_to_jsonl(setup, args, dec, with_answers(items), output, append=args.resume,
                     total=max(total - len(done), 0), on_result=on_result)
    summary = summarize(args.metric, cli.read_jsonl(output))
    summary.update(data=args.data or f"tfds:{args.tfds}/{args.split}", checkpoint=args.checkpoint,
                   decoding=dec.describe(), visual_cuts=setup.model.cuts.describe(), predictions=output)
    path = os.path.splitext(output)[0] + ".summary.json"
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    print(table(summary))
    print(f"predictions: {output}\nsummary: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
