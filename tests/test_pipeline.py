"""The grain pipeline: bad records, determinism, host sharding, resume from state (also through Orbax), eval
streams, errors that must propagate, worker processes giving the same pixels as in-process packing."""

import json
import re

import numpy as np
import pytest

from tests.data_utils import random_image
from uhd_jax.config import tiny_config
from uhd_jax.data.packer import Packer, PackerConfig
from uhd_jax.data.pipeline import DataPipelineError, make_batches
from uhd_jax.data.processor import Processor, SampleRequest
from uhd_jax.data.sources import JsonlSource, SyntheticOCRSource
from uhd_jax.data.tiny_tokenizer import write_tiny_model_dir
from uhd_jax.model.minicpmv import check_visual_placement

CFG = PackerConfig(seq_buckets=(128, 256, 512), tokens_per_view=320, views_per_row=5)
FIELDS = ("input_ids", "attention_mask", "positions", "visual_index", "visual_mask", "loss_mask")


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    return Processor.from_pretrained(write_tiny_model_dir(tmp_path_factory.mktemp("tiny"), tiny_config()))


class TextSource:
    """Text-only records "question i" / "answer i": cheap, and each row says which record it is."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return SampleRequest(messages=[{"role": "user", "content": f"question {i}"},
                                       {"role": "assistant", "content": f"answer {i}"}], name=f"text:{i}")


def _records(batch, proc):
    """The record numbers of a batch's real rows (decoded answers), in row order."""
    out = []
    for r in range(batch.input_ids.shape[0]):
        if batch.attention_mask[r].any():
            out.append(int(re.search(r"answer (\d+)", proc.decode(batch.input_ids[r][batch.attention_mask[r]]))[1]))
    return out


def _assert_same(a, b):
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    if a.vision is not None:
        for f in ("patches", "pos_ids", "num_tokens", "grid"):
            x, y = getattr(a.vision, f), getattr(b.vision, f)
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f)


def _jsonl_dataset(tmp_path, n_good=6):
    """n_good records with images (relative paths), one corrupt image and one missing, each text unique."""
    (tmp_path / "img").mkdir()
    recs = []
    for i in range(n_good):
        random_image(40 + 13 * i, 90 - 7 * i, i).save(tmp_path / "img" / f"{i}.jpg", quality=92)
        recs.append({"id": f"r{i}", "image": f"img/{i}.jpg",
                     "conversations": [{"role": "user", "content": f"<image>\nquestion {i}"},
                                       {"role": "assistant", "content": f"answer {i}"}]})
    (tmp_path / "img" / "corrupt.png").write_text("not an image")
    for k, name in ((2, "corrupt.png"), (5, "missing.jpg")):
        recs.insert(k, {"id": f"bad-{name}", "image": f"img/{name}",
                        "conversations": [{"role": "user", "content": "<image>\nquestion 99"},
                                          {"role": "assistant", "content": "answer 99"}]})
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_records_skipped_named_and_same_as_direct(proc, tmp_path, workers, caplog):
    path = _jsonl_dataset(tmp_path)
    src = JsonlSource(path)
    it = make_batches(src, proc, CFG, batch_size_per_host=2, shuffle=False, num_epochs=1, num_workers=workers,
                      max_bad_fraction=0.5, shard_index=0, shard_count=1)
    batches = list(it)
    it.close()
    # with workers, worker k packs records k, k+2, ...: each ends with its own part-filled batch
    assert it.stats == {"records_ok": 6, "records_bad": 2, "batches": 3 if workers == 0 else 4}
    names = [n for n, _ in it.bad_examples]
    assert names == [f"{path}:3 (id bad-corrupt.png)", f"{path}:6 (id bad-missing.jpg)"]
    assert "ImageLoadError" in it.bad_examples[0][1] and "corrupt.png" in it.bad_examples[0][1]
    assert "missing.jpg: no such file" in it.bad_examples[1][1]
    assert sum(f"{path}:6" in m for m in caplog.messages) == 1  # logged once, by name
    # every good record once; without workers in source order; pixels and ids as processing each one directly
    rows = {k: (b, r) for b in batches for r, k in enumerate(_records(b, proc))}
    assert sorted(rows) == list(range(6))
    if workers == 0:
        assert [k for b in batches for k in _records(b, proc)] == list(range(6))
    good = [i for i in range(len(src)) if "bad" not in src[i].name]
    for k, i in enumerate(good):
        want = Packer(proc, CFG).pack([proc.build(src[i])])
        b, r = rows[k]
        L = int(want.attention_mask[0].sum())
        np.testing.assert_array_equal(b.input_ids[r, :L], want.input_ids[0, :L])
        np.testing.assert_array_equal(b.visual_index[r], want.visual_index[0])
        np.testing.assert_array_equal(np.asarray(b.vision.patches[r]), want.vision.patches[0])
        np.testing.assert_array_equal(np.asarray(b.vision.pos_ids[r]), want.vision.pos_ids[0])
    for b in batches:
        check_visual_placement(b, proc.image_token_id)
        assert b.input_ids.shape[0] == 2 and b.vision.patches.shape == (2, 5, 320, 588)


def test_deterministic_shuffle_epochs_and_seeds(proc):
    def order(seed, epochs=2, **kw):
        it = make_batches(TextSource(10), proc, CFG, batch_size_per_host=3, seed=seed, num_epochs=epochs, **kw)
        return [k for b in it for k in _records(b, proc)]

    a = order(1, shard_index=0, shard_count=1)
    assert a == order(1)  # default shard: jax.process_index() / process_count() = 0 / 1 here
    assert a == order(1, read_threads=3, read_buffer=7)  # records read in threads, order kept
    assert len(a) == 20 and sorted(a[:10]) == sorted(a[10:]) == list(range(10))
    assert a[:10] != a[10:]  # a new permutation each epoch
    assert a != order(2) and a[:10] != list(range(10))
    with pytest.raises(ValueError, match="shard_index < shard_count"):
        make_batches(TextSource(4), proc, CFG, batch_size_per_host=2, seed=0, shard_index=2, shard_count=2)


def test_sharding_two_hosts_disjoint_and_covering(proc):
    seen = []
    for host in (0, 1):
        it = make_batches(TextSource(11), proc, CFG, batch_size_per_host=2, seed=3, num_epochs=1,
                          shard_index=host, shard_count=2)
        seen.append([k for b in it for k in _records(b, proc)])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(11))
    assert sorted(seen[0]) == list(range(0, 11, 2))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_state_bit_for_bit(proc, workers):
    src = SyntheticOCRSource(40, seed=2, max_side=300)
    kw = dict(batch_size_per_host=2, seed=7, num_workers=workers, shard_index=0, shard_count=1)
    it = make_batches(src, proc, CFG, **kw)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint holds
    want = [next(it) for _ in range(3)]
    it.close()
    fresh = make_batches(src, proc, CFG, **kw)
    fresh.set_state(state)
    got = [next(fresh) for _ in range(3)]
    fresh.close()
    for a, b in zip(want, got, strict=True):
        _assert_same(a, b)
    assert fresh.stats["batches"] == 6 and fresh.stats["records_ok"] >= 12
    if workers:  # a state of another pipeline shape is refused, not half-applied
        with pytest.raises(ValueError, match="num_workers"):
            make_batches(src, proc, CFG, **{**kw, "num_workers": 0}).set_state(state)


def test_orbax_checkpoint_of_iterator_state(proc, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    kw = dict(batch_size_per_host=2, seed=0, shard_index=0, shard_count=1)
    it = make_batches(TextSource(9), proc, CFG, **kw)
    next(it)
    state = {"w": np.arange(6.0).reshape(2, 3)}  # stands for the train state
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=grain.checkpoint.CheckpointSave(it)))
        want = _records(next(it), proc)  # the state is taken at save(), not when an async save finishes
        mngr.wait_until_finished()
    fresh = make_batches(TextSource(9), proc, CFG, **kw)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        out = mngr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(state),
                                                      data=grain.checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(out.state["w"], state["w"])
    assert _records(next(fresh), proc) == want
    assert (tmp_path / "ckpt" / "1" / "data" / "process_0-of-1.json").exists()


def test_eval_stream_padding_rows_and_end(proc):
    kw = dict(batch_size_per_host=2, shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
    runs = [list(make_batches(TextSource(5), proc, CFG, **kw)) for _ in range(2)]
    assert [_records(b, proc) for b in runs[0]] == [[0, 1], [2, 3], [4]]
    for a, b in zip(*runs, strict=True):
        _assert_same(a, b)
    last = runs[0][-1]
    for f in ("attention_mask", "visual_mask", "loss_mask"):
        assert not getattr(last, f)[1].any()
    assert (last.input_ids[1] == proc.pad_token_id).all() and not last.vision.num_tokens[1].any()


def _bad_after(rec):
    if rec.name == "text:3":
        raise TypeError("a bug in a record transform")
    return rec


@pytest.mark.parametrize("workers", [0, 2])
def test_type_error_propagates_not_counted(proc, workers):
    it = make_batches(TextSource(8), proc, CFG, batch_size_per_host=2, shuffle=False, num_epochs=1,
                      num_workers=workers, to_request=_bad_after, max_bad_fraction=1.0, shard_index=0, shard_count=1)
    with pytest.raises(TypeError, match="a bug in a record transform"):
        list(it)
    it.close()
    assert it.stats["records_bad"] == 0


class _MissingImages:
    """Records whose images are missing except every `good_every`-th."""

    def __init__(self, n, good_every, image):
        self.n, self.good_every, self.image = n, good_every, image

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img = self.image if i % self.good_every == 0 else f"/nonexistent/{i}.png"
        return SampleRequest(messages=[{"role": "user", "content": "<|image_pad|>\nq"},
                                       {"role": "assistant", "content": "a"}], images=[img], name=f"rec:{i}")


def test_max_bad_fraction_stops_the_run(proc, tmp_path):
    img = tmp_path / "ok.png"
    random_image(30, 40, 0).save(img)
    it = make_batches(_MissingImages(60, 2, str(img)), proc, CFG, batch_size_per_host=2, shuffle=False,
                      num_epochs=1, max_bad_fraction=0.2, shard_index=0, shard_count=1)
    with pytest.raises(DataPipelineError) as e:
        list(it)
    msg = str(e.value)
    assert re.search(r"\b(\d+) of (\d+) records are bad", msg) and "max_bad_fraction=20.0%" in msg
    assert "rec:1: ImageLoadError: /nonexistent/1.png: no such file" in msg
    assert 20 <= it.stats["records_ok"] + it.stats["records_bad"] <= 24  # at the first check (>= 20 records)
    # 1 bad in 50 at the default 1%: the fraction is judged only after 1/max_bad_fraction = 100 records
    it = make_batches(_MissingImages(50, 1, str(img)), proc, CFG, batch_size_per_host=5, shuffle=False,
                      num_epochs=1, shard_index=0, shard_count=1)
    assert len(list(it)) == 10


def test_no_batches_is_an_error(proc):
    it = make_batches(_MissingImages(4, 10**9, "x"), proc, CFG, batch_size_per_host=2, shuffle=False,
                      num_epochs=1, max_bad_fraction=1.0, shard_index=0, shard_count=1)
    with pytest.raises(DataPipelineError, match="no batches.*0 good and 4 bad"):
        next(it)


def test_tag_mismatch_and_oversized_are_bad_records(proc):
    class Src(TextSource):
        def __getitem__(self, i):
            if i == 1:  # two image tokens, one image
                return SampleRequest(text="<|image_pad|><|image_pad|>", images=[random_image(20, 20)], name="two")
            if i == 2:  # more text than the largest bucket
                return SampleRequest(text="x" * 600, name="long")
            return super().__getitem__(i)

    it = make_batches(Src(4), proc, CFG, batch_size_per_host=2, shuffle=False, num_epochs=1, max_bad_fraction=1.0,
                      shard_index=0, shard_count=1)
    assert [k for b in it for k in _records(b, proc)] == [0, 3]
    reasons = dict(it.bad_examples)
    assert reasons["two"] == "DataError: 2 image tokens in the text but 1 images"
    assert reasons["long"].startswith("SampleDoesNotFit")
    assert "600 tokens > the largest sequence bucket" in reasons["long"]


def test_bfloat16_patches_through_workers(proc):
    src = SyntheticOCRSource(4, seed=0, max_side=200)
    kw = dict(batch_size_per_host=2, shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
    f32 = list(make_batches(src, proc, CFG, **kw))
    it = make_batches(src, proc, PackerConfig(**{**CFG.__dict__, "patches_dtype": "bfloat16"}), num_workers=2, **kw)
    bf16 = list(it)
    it.close()
    got = {tuple(b.input_ids[r]): np.asarray(b.vision.patches[r]) for b in bf16 for r in range(2)}
    for b in f32:
        for r in range(2):
            p = got[tuple(b.input_ids[r])]
            assert p.dtype.name == "bfloat16"
            np.testing.assert_allclose(p.astype(np.float32), b.vision.patches[r], atol=4e-3)


def test_argument_errors(proc):
    with pytest.raises(ValueError, match="needs a seed"):
        make_batches(TextSource(3), proc, CFG, batch_size_per_host=2, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="batch_size=4 but batch_size_per_host=2"):
        make_batches(TextSource(3), proc, PackerConfig(**{**CFG.__dict__, "batch_size": 4}), batch_size_per_host=2,
                     seed=0, shard_index=0, shard_count=1)
    with pytest.raises(TypeError, match="random access"):
        make_batches(iter([]), proc, CFG, batch_size_per_host=2, seed=0, shard_index=0, shard_count=1)


def test_malformed_jsonl_line_is_a_bad_record_named_by_line(proc, tmp_path):
    ok = json.dumps({"conversations": [{"role": "user", "content": "question 0"},
                                       {"role": "assistant", "content": "answer 0"}]})
    path = tmp_path / "d.jsonl"
    path.write_text(ok + "\n{oops\n" + ok + "\n")
    it = make_batches(JsonlSource(path), proc, CFG, batch_size_per_host=2, shuffle=False, num_epochs=1,
                      max_bad_fraction=1.0, shard_index=0, shard_count=1)
    assert len(list(it)) == 1 and it.stats["records_ok"] == 2
    assert it.bad_examples[0][0] == f"{path}:2" and it.bad_examples[0][1].startswith("DataError: not valid JSON")
