"""`python -m uhd_jax.evaluate` on a tiny random checkpoint: the summary (count, score, failures) equals the scores
computed by hand from the written predictions with uhd_jax.infer.metrics' definitions; references from "answers",
"answer" or the last assistant turn; TFDS input with beam search; usage errors."""

import json
import os

import pytest

from tests.cli_utils import FLAGS, make_checkpoint, read_jsonl, write_images, write_jsonl
from uhd_jax import evaluate
from uhd_jax.infer.metrics import METRICS


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate_cli")
    return dict(dir=str(d), ckpt=make_checkpoint(str(d / "ckpt"), seed=2), images=write_images(str(d / "img")))


def _questions(im):
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    return [
        {"id": "img", "image": im["a"], "conversations": [user("<image>\nWhat is it?"),
                                                           {"role": "assistant", "content": "ref img"}]},
        {"id": "txt", "conversations": [user("Hello there")], "answer": "ref txt"},
        {"id": "vqa", "conversations": [user("Yes or no?")], "answers": ["ref vqa"] * 10},
        {"id": "bad", "image": im["bad"], "conversations": [user("<image>\nAnd?")], "answers": ["x"]},
        {"id": "none", "conversations": [user("No reference here")]},
    ]


def _run(files, data, metric, out, *extra, capsys=None):
    argv = ["--checkpoint", files["ckpt"], "--data", data, "--metric", metric, "--output", out, "--slots", "2",
            *FLAGS, *extra]
    assert evaluate.main(argv) == 0
    rows = {r["id"]: r for r in read_jsonl(out)}
    summary = json.load(open(os.path.splitext(out)[0] + ".summary.json"))
    return rows, summary


def test_summary_equals_scores_by_hand(files, capsys):
    """First run: the greedy predictions. Second run: references made from them (an exact hit, a near miss for
    ANLS's partial credit, VQA annotators who partly agree), scored with anls; the summary must be what the
    metric functions give on the written predictions, failures counted as 0."""
    qs = _questions(files["images"])
    first, _ = _run(files, write_jsonl(os.path.join(files["dir"], "q1.jsonl"), qs), "exact_match",
                    os.path.join(files["dir"], "p1.jsonl"))
    assert "ImageLoadError" in first["bad"]["error"] and "no reference answer" in first["none"]["error"]
    assert first["img"]["answers"] == ["ref img"] and first["txt"]["answers"] == ["ref txt"]
    pred = {k: first[k]["prediction"].strip() for k in ("img", "txt", "vqa")}
    assert all(pred.values()), pred  # the random model writes something

    qs[0]["answers"] = [pred["img"]]  # "answers" wins over the assistant turn
    qs[1]["answer"] = pred["txt"] + "xy"  # a near miss
    qs[2]["answers"] = [pred["vqa"]] * 2 + ["other"] * 8
    out = os.path.join(files["dir"], "p2.jsonl")
    capsys.readouterr()
    rows, summary = _run(files, write_jsonl(os.path.join(files["dir"], "q2.jsonl"), qs), "anls", out)
    printed = capsys.readouterr().out
    for k in ("img", "txt", "vqa"):
        assert rows[k]["prediction"] == first[k]["prediction"]  # greedy: the same predictions
    by_hand = {k: METRICS["anls"](rows[k]["prediction"].strip(), rows[k]["answers"]) for k in ("img", "txt", "vqa")}
    assert by_hand["img"] == 1.0 and 0.5 <= by_hand["txt"] < 1.0 and by_hand["vqa"] == 1.0
    for k, v in by_hand.items():
        assert rows[k]["score"] == pytest.approx(v)
    assert summary["count"] == 5 and summary["failures"] == 2 and summary["metric"] == "anls"
    assert summary["visual_cuts"] == "none"
    assert summary["score"] == pytest.approx(100 * sum(by_hand.values()) / 5)
    assert f"{summary['score']:.2f}" in printed and "failures" in printed

    # the same predictions scored by the other metrics' definitions, through evaluate.score
    for metric in ("exact_match", "vqa_accuracy", "relaxed_accuracy", "ocrbench"):
        for k in ("img", "txt", "vqa"):
            want = METRICS[metric](rows[k]["prediction"].strip(), rows[k]["answers"])
            assert evaluate.score(metric, rows[k]["prediction"], rows[k]["answers"]) == want
    assert METRICS["vqa_accuracy"](pred["vqa"], rows["vqa"]["answers"]) == pytest.approx(0.6)  # 2 of 10 agree


def test_tfds_with_beam_search(files, tmp_path):
    """--tfds (a prepared array_record dataset, tfds.data_source) with --num-beams 2 and two visual cuts: every
    record answered, the summary records the cuts."""
    from tests.test_sources import _build_tfds

    b = _build_tfds(tmp_path / "tfds")
    out = str(tmp_path / "tfds_preds.jsonl")
    assert evaluate.main(["--checkpoint", files["ckpt"], "--tfds", b.data_dir, "--split", "test", "--metric",
                          "exact_match", "--output", out, "--num-beams", "2", *FLAGS, "--cuts-drop-fraction", "0.5",
                          "--cuts-ffn-ratio", "2"]) == 0
    rows = read_jsonl(out)
    assert sorted(r["id"] for r in rows) == [0, 1] and all("prediction" in r for r in rows)
    assert all(r["answers"][0].startswith("answer ") for r in rows)
    summary = json.load(open(str(tmp_path / "tfds_preds.summary.json")))
    assert summary["count"] == 2 and summary["failures"] == 0 and "beam search (2 beams)" in summary["decoding"]
    assert summary["visual_cuts"] == "visual tokens dropped from layer 4, visual ffn / 2"


@pytest.mark.parametrize("extra, needle", [
    (["--metric", "bleu"], "argument --metric: invalid choice"),
    (["--metric", "anls", "--limit", "0"], "argument --limit: must be >= 1"),
    (["--metric", "anls", "--tfds", "x"], "give either --data"),
])
def test_usage_errors(files, capsys, extra, needle):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", files["ckpt"], "--data", "q.jsonl"] + extra)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_readme_commands_parse_and_their_files_exist():
    """The README's generate / evaluate commands name real flags and files (they were run as written on
    runs/tiny/checkpoints/60 after the tiny training run; running them here would need that run)."""
    import re
    import shlex

    from uhd_jax import generate
    from uhd_jax.data.sources import JsonlSource

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "README.md")).read()
    section = text.split("### Generate and evaluate", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()
    assert len(block) == 3
    for line in block:
        argv = shlex.split(line)
        assert argv[:2] == ["python3", "-m"] and argv[3:5] == ["--checkpoint", "runs/tiny/checkpoints/60"]
        mod = {"uhd_jax.generate": generate, "uhd_jax.evaluate": evaluate}[argv[2]]
        args = mod.parser().parse_args(argv[3:])
        for f in [*getattr(args, "image", []), getattr(args, "input", None), getattr(args, "data", None)]:
            if f:
                assert os.path.isfile(os.path.join(root, f)), f
    src = JsonlSource(os.path.join(root, "configs", "examples", "questions.jsonl"))
    assert len(src) == 3 and all(src[i].images == [] or os.path.isfile(src[i].images[0]) for i in range(3))
