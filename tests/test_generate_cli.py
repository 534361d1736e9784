"""`python -m uhd_jax.generate` on a tiny random checkpoint: the streamed answer is the generated one (and the
file mode's for the same request and seed), a file run writes one row per record with error rows for a corrupt
image, bad JSON and a prompt that does not fit, --resume skips finished ids after an interrupted run, bad flags
are usage errors naming the flag."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.cli_utils import FLAGS, make_checkpoint, read_jsonl, write_images, write_jsonl
from uhd_jax import generate
from uhd_jax.infer import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("generate_cli")
    return dict(dir=str(d), ckpt=make_checkpoint(str(d / "ckpt"), seed=1, do_sample=True, temperature=0.9, top_k=40),
                images=write_images(str(d / "img")))


def test_streamed_answer_equals_generated_and_file_mode(files):
    """One prompt with two images, sampled with the checkpoint's generation_config.json (do_sample, temperature,
    top_k) and --seed: what is streamed to stdout is the decoded result, and the same request in a file run (the
    SlotEngine, another slot count) gets the same answer."""
    im = files["images"]
    argv = ["--checkpoint", files["ckpt"], "--image", im["a"], "--image", im["b"], "--prompt", "Same or not?",
            "--seed", "5", "--max-new-tokens", "12"]
    p = generate.parser()
    args = p.parse_args(argv)
    setup = cli.load_setup(args)
    dec = cli.decoding(args, setup.generation_config, use_generation_config=True)
    assert bool(dec.sampling["do_sample"]) and float(dec.sampling["temperature"]) == pytest.approx(0.9)
    out = io.StringIO()
    text = generate.run_prompt(setup, args, dec, out=out)
    assert out.getvalue() == text + "\n" and len(text) > 0

    src = write_jsonl(os.path.join(files["dir"], "one.jsonl"), [
        {"id": "x", "image": {"<image_00>": im["a"], "<image_01>": im["b"]},
         "conversations": [{"role": "user", "content": "<image_00>\n<image_01>\nSame or not?"}]}])
    dst = os.path.join(files["dir"], "one_out.jsonl")
    assert generate.main(["--checkpoint", files["ckpt"], "--input", src, "--output", dst, "--seed", "5",
                          "--max-new-tokens", "12", "--slots", "3", "--prompt-buckets", "96,192",
                          "--views-per-row", "6", "--tokens-per-view", "80"]) == 0
    (row,) = read_jsonl(dst)
    assert row["id"] == "x" and row["prediction"] == text and row["num_tokens"] == 12


def _records(im):
    return [
        {"id": "a", "image": im["a"], "conversations": [{"role": "user", "content": "<image>\nWhat is it?"},
                                                         {"role": "assistant", "content": "a cat"}]},
        {"id": "bad-image", "image": im["bad"], "conversations": [{"role": "user", "content": "<image>\nAnd?"}]},
        '{"id": "broken", ',
        {"id": "long", "conversations": [{"from": "human", "value": "word " * 60}]},
        {"id": 5, "conversations": [{"role": "user", "content": "Hello there"}]},
        {"id": "b", "image": im["b"], "conversations": [{"role": "user", "content": "Describe <image> please"}]},
        {"conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]},
    ]


def test_file_run_error_rows_and_resume(files, capsys):
    src = write_jsonl(os.path.join(files["dir"], "req.jsonl"), _records(files["images"]))
    dst = os.path.join(files["dir"], "answers.jsonl")
    base = ["--checkpoint", files["ckpt"], "--input", src, "--output", dst, "--temperature", "0", "--slots", "2",
            *FLAGS]
    assert generate.main(base) == 0
    err = capsys.readouterr().err
    assert "greedy" in err and "7/7 requests" in err and "requests/s" in err and "tokens/s" in err
    rows = {json.dumps(r["id"]): r for r in read_jsonl(dst)}
    assert sorted(rows) == sorted(json.dumps(i) for i in ["a", "bad-image", 2, "long", 5, "b", 6])
    assert "ImageLoadError" in rows['"bad-image"']["error"] and "bad.jpg" in rows['"bad-image"']["error"]
    assert "not valid JSON" in rows["2"]["error"]
    assert "does not fit" in rows['"long"']["error"] and "largest sequence bucket 96" in rows['"long"']["error"]
    good = ['"a"', "5", '"b"', "6"]
    for k in good:
        assert set(rows[k]) >= {"prediction", "finish_reason", "num_tokens"}, rows[k]
    assert rows['"a"']["reference"] == "a cat"

    # an interrupted run: two rows written, the third cut mid-line
    lines = open(dst).read().splitlines()
    with open(dst, "w") as f:
        f.write("\n".join(lines[:2]) + "\n" + lines[2][:15])
    kept = {json.dumps(json.loads(x)["id"]) for x in lines[:2]}
    assert generate.main(base + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "dropped 1 unreadable line" in err and f"{7 - len(kept)}/{7 - len(kept)} requests" in err
    again = read_jsonl(dst)
    assert len(again) == 7 and [json.dumps(r["id"]) for r in again[:2]] == [json.dumps(json.loads(x)["id"])
                                                                            for x in lines[:2]]
    for r in again:  # greedy: the resumed rows are the first run's
        assert r == rows[json.dumps(r["id"])]
    # nothing left to do
    assert generate.main(base + ["--resume"]) == 0
    assert "0/0 requests" in capsys.readouterr().err and len(read_jsonl(dst)) == 7


@pytest.mark.parametrize("extra, needle", [
    (["--temperature", "-1"], "argument --temperature: must be a finite number >= 0"),
    (["--top-p", "1.5"], "argument --top-p: must be in [0, 1]"),
    (["--repetition-penalty", "0"], "argument --repetition-penalty: must be a finite number > 0"),
    (["--slots", "0"], "argument --slots: must be >= 1"),
    (["--num-beams", "x"], "argument --num-beams: invalid positive_int value"),
    (["--prompt-buckets", "512,128"], "argument --prompt-buckets: must be increasing"),
    (["--thinking", "maybe"], "argument --thinking: must be on or off"),
    (["--downsample-mode", "8x"], "argument --downsample-mode: invalid choice"),
    (["--dtype", "int8"], "argument --dtype: invalid choice"),
    (["--input", "x.jsonl"], "give either --prompt"),
    (["--output", "y.jsonl"], "--output and --resume go with --input"),
])
def test_bad_flags_are_usage_errors(files, capsys, extra, needle):
    argv = ["--checkpoint", files["ckpt"], "--prompt", "hi"] + extra
    with pytest.raises(SystemExit) as e:
        generate.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "usage: python -m uhd_jax.generate" in err and "Traceback" not in err


def test_usage_errors_from_the_command_line(files, tmp_path, monkeypatch, capsys):
    """A missing checkpoint names --checkpoint (as a subprocess: exit code 2, no traceback); --input without
    --output, an empty or missing --input file, a --capacity below the largest prompt bucket: usage errors
    (SystemExit 2 from main, run in-process: the same argv and the same checks, without another jax start)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one = tmp_path / "one.jsonl"
    one.write_text('{"conversations": [{"role": "user", "content": "hi"}]}\n')
    r = subprocess.run([sys.executable, "-m", "uhd_jax.generate", "--checkpoint", str(tmp_path / "nope"), "--prompt",
                        "hi"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--checkpoint" in r.stderr and "Traceback" not in r.stderr, r.stderr
    monkeypatch.chdir(tmp_path)  # the relative o.jsonl below (the subprocess ran in ROOT; none is written)
    for argv, needle in [(["--checkpoint", files["ckpt"], "--input", "x.jsonl"], "--input needs --output"),
                         (["--checkpoint", files["ckpt"], "--input", str(empty), "--output", "o.jsonl"],
                          "--input: " + str(empty) + ": no records"),
                         (["--checkpoint", files["ckpt"], "--input", str(tmp_path / "missing.jsonl"), "--output",
                           "o.jsonl"], "--input: " + str(tmp_path / "missing.jsonl") + ": no such JSONL file"),
                         (["--checkpoint", files["ckpt"], "--input", str(one), "--output", "o.jsonl", "--capacity",
                           "100", "--prompt-buckets", "64,128"], "--capacity 100 is smaller than the largest "
                                                                 "--prompt-buckets entry 128")]:
        with pytest.raises(SystemExit) as e:
            generate.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and "Traceback" not in err, err
        assert not os.path.exists(tmp_path / "o.jsonl")


def test_our_bugs_stop_the_run_and_a_bad_seed_is_an_error_row(files, monkeypatch):
    """Only request errors (bad data, unreadable files, a refused conversation) become error rows: an exception
    of another kind in our own code propagates instead of being written as a failed record."""
    src = write_jsonl(os.path.join(files["dir"], "seed.jsonl"), [
        {"id": "s", "seed": "7", "conversations": [{"role": "user", "content": "Hi"}]},
        {"id": "t", "conversations": [{"role": "user", "content": "Hi"}]}])
    dst = os.path.join(files["dir"], "seed_out.jsonl")
    base = ["--checkpoint", files["ckpt"], "--input", src, "--output", dst, "--temperature", "0", *FLAGS]
    assert generate.main(base) == 0
    rows = {r["id"]: r for r in read_jsonl(dst)}
    assert "'seed' must be an integer" in rows["s"]["error"] and "prediction" in rows["t"]

    def broken(*a, **k):
        raise TypeError("a bug in our code")

    monkeypatch.setattr(cli, "build_sample", broken)
    with pytest.raises(TypeError, match="a bug in our code"):
        generate.main(base)


def _head_mask(path):
    """Half the heads of the tiny model's full-attention layers inactive for visual tokens."""
    from uhd_jax.config import tiny_config
    from uhd_jax.model.visual_cuts import save_head_mask

    text = tiny_config().text
    mask = np.ones((text.num_hidden_layers, text.num_attention_heads), bool)
    for i, t in enumerate(text.layer_types):
        if t == "full_attention":
            mask[i, 1::2] = False
    save_head_mask(path, mask)
    return path


CUT_FLAGS = ["--cuts-window", "3", "--cuts-drop-fraction", "0.5", "--cuts-ffn-ratio", "2"]


def test_visual_cuts_from_the_command_line(files, capsys):
    """The four cuts from the flags reach the model (the same Cuts as the trainer builds from the same settings),
    and the prompt path (Generator), a file run (SlotEngine) and beam search with one beam give the same greedy
    answer under them; the summary line names the cuts."""
    from uhd_jax.model.visual_cuts import Cuts

    im, d = files["images"], files["dir"]
    mask = _head_mask(os.path.join(d, "heads.npz"))
    flags = CUT_FLAGS + ["--cuts-head-mask", mask, "--temperature", "0", "--max-new-tokens", "6"]
    args = generate.parser().parse_args(["--checkpoint", files["ckpt"], "--image", im["a"], "--prompt", "What?"]
                                        + flags)
    setup = cli.load_setup(args)
    want = Cuts.from_settings(setup.cfg.text, window=3, head_mask=mask, drop_fraction=0.5, ffn_ratio=2)
    assert setup.model.cuts == want and want.window == 3 and want.drop_layer == 4 and want.ffn_ratio == 2
    assert [h for h in want.heads if h is not None] == [(0, 2), (0, 2)]
    dec = cli.decoding(args, setup.generation_config, use_generation_config=True)
    text = generate.run_prompt(setup, args, dec, out=io.StringIO())

    src = write_jsonl(os.path.join(d, "cut.jsonl"), [
        {"id": "c", "image": im["a"], "conversations": [{"role": "user", "content": "<image>\nWhat?"}]}])
    for extra, name in (([], "cut_out.jsonl"), (["--num-beams", "1"], "cut_beam.jsonl")):
        dst = os.path.join(d, name)
        assert generate.main(["--checkpoint", files["ckpt"], "--input", src, "--output", dst] + flags + extra) == 0
        (row,) = read_jsonl(dst)
        assert row["prediction"] == text, (name, row)
    assert "visual cuts: window 3, heads cut on 2 layers, visual tokens dropped from layer 4, visual ffn / 2" in \
        capsys.readouterr().err


@pytest.mark.parametrize("extra, needle", [
    (["--cuts-window", "4"], "--cuts-*): window must be 0 (off) or an odd int"),
    (["--cuts-drop-fraction", "1.5"], "drop_fraction must be in [0, 1] (0: off), got 1.5"),
    (["--cuts-ffn-ratio", "0"], "argument --cuts-ffn-ratio: must be >= 1"),
    (["--cuts-head-mask", "/nonexistent/heads.npz"], "head mask /nonexistent/heads.npz: no such file"),
    (["--cuts-head-mask", "CORRUPT"], "not a head-mask .npz"),
    (["--cuts-head-mask", "WRONG_SHAPE"], "expected [layers, heads] = [8, 4]"),
])
def test_bad_cut_flags_are_usage_errors(files, capsys, extra, needle):
    d = files["dir"]
    if "CORRUPT" in extra:
        with open(os.path.join(d, "corrupt.npz"), "wb") as f:
            f.write(b"not a zip file")
        extra = ["--cuts-head-mask", os.path.join(d, "corrupt.npz")]
    if "WRONG_SHAPE" in extra:
        np.savez(os.path.join(d, "wrong.npz"), mask=np.ones((3, 4), bool))
        extra = ["--cuts-head-mask", os.path.join(d, "wrong.npz")]
    with pytest.raises(SystemExit) as e:
        generate.main(["--checkpoint", files["ckpt"], "--prompt", "hi"] + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
