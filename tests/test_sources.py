"""Record sources (JSONL, TFDS, synthetic OCR) and the tiny model directory."""

import functools
import hashlib
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from tests.data_utils import random_image
from uhd_jax.config import tiny_config
from uhd_jax.data.processor import Processor, SampleRequest
from uhd_jax.data.sources import DataError, JsonlSource, SyntheticOCRSource, TfdsSource
from uhd_jax.data.tiny_tokenizer import IMAGE_PAD_ID, VIDEO_PAD_ID, tiny_tokenizer, write_tiny_model_dir

IM = "<|image_pad|>"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny"), tiny_config())


@pytest.fixture(scope="module")
def proc(tiny_dir):
    return Processor.from_pretrained(tiny_dir)


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")


# ---------------------------------------------------------------------------------------------------- JSONL


def test_jsonl_single_multi_and_relative_paths(tmp_path, proc):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        random_image(40 + 10 * i, 60, i).save(tmp_path / "imgs" / f"{i}.png")
    abs_path = str(tmp_path / "imgs" / "2.png")
    recs = [
        {"id": "a", "image": "imgs/0.png",
         "conversations": [{"role": "user", "content": "<image>\nWhat is it?"},
                           {"role": "assistant", "content": "A."}]},
        "",  # blank line: skipped, but counted in line numbers
        {"image": "imgs/1.png",  # no tag: the image goes before the first user text (MiniCPM-V's convention)
         "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Stripes."}]},
        {"id": 7, "image": {"<image_01>": "imgs/1.png", "<image_00>": abs_path},
         "conversations": [{"role": "user", "content": "Compare <image_00> and <image_01>."},
                           {"role": "assistant", "content": "Same."}]},
        {"conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"}]},
    ]
    path = tmp_path / "train.jsonl"
    _write_jsonl(path, recs)
    src = JsonlSource(path)
    assert len(src) == 4
    r0, r1, r2, r3 = (src[i] for i in range(4))
    assert isinstance(r0, SampleRequest)
    assert r0.name == f"{path}:1 (id a)" and r1.name == f"{path}:3" and r2.name == f"{path}:4 (id 7)"
    assert r0.images == [str(tmp_path / "imgs" / "0.png")]
    assert r0.messages[0]["content"] == f"{IM}\nWhat is it?"
    assert r1.messages == [{"role": "user", "content": f"{IM}\nDescribe."},
                           {"role": "assistant", "content": "Stripes."}]
    # images in the order their tags appear, whatever the mapping's order
    assert r2.images == [abs_path, str(tmp_path / "imgs" / "1.png")]
    assert r2.messages[0]["content"] == f"Compare {IM} and {IM}."
    assert r3.images == [] and r3.messages[0] == {"role": "system", "content": "Be brief."}
    s = proc.build(r2)
    assert len(s.plans) == 2 and s.name == r2.name
    # picklable: a worker process reopens the file
    again = pickle.loads(pickle.dumps(src))
    assert again[2].messages == r2.messages


@pytest.mark.parametrize("line,reason", [
    ('{"conversations": [', "not valid JSON"),
    ('[1, 2]', "must be a JSON object"),
    ('{"conversations": []}', "non-empty list"),
    ('{"conversations": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
    ('{"conversations": [{"role": "user", "content": 3}]}', "'content' must be a string"),
    ('{"image": "a.png", "conversations": [{"role": "user", "content": "<image><image>"}]}', "2 <image> tags"),
    ('{"conversations": [{"role": "user", "content": "<image> hi"}]}', "has no 'image'"),
    ('{"image": {"<image_00>": "a.png", "<image_01>": "b.png"}, "conversations": [{"role": "user", '
     '"content": "<image_00>"}]}', "['<image_01>'] do not appear"),
    ('{"image": {"<image_00>": "a.png"}, "conversations": [{"role": "user", "content": "<image_00> <image_02>"}]}',
     "['<image_02>'] in the text are not keys"),
    ('{"image": 5, "conversations": [{"role": "user", "content": "x"}]}', "'image' must be a path"),
])
def test_jsonl_malformed_records_name_file_and_line(tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    _write_jsonl(path, [{"conversations": [{"role": "user", "content": "ok"}]}, line])
    src = JsonlSource(path)
    src[0]
    with pytest.raises(DataError) as e:
        src[1]
    assert e.value.record.startswith(f"{path}:2") and reason in str(e.value)
    assert pickle.loads(pickle.dumps(e.value)).record == e.value.record  # crosses process boundaries intact


def test_jsonl_empty_and_missing_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\r\n")
    with pytest.raises(ValueError, match="no records"):
        JsonlSource(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        JsonlSource(tmp_path / "nope.jsonl")


def test_jsonl_index_many_lines(tmp_path):
    """The byte-offset index across chunk boundaries and CRLF endings."""
    from uhd_jax.data.sources import _index_lines

    lines = [json.dumps({"conversations": [{"role": "user", "content": "x" * (i % 37)}]}) for i in range(500)]
    data = "\r\n".join(lines[:250]) + "\r\n\n" + "\n".join(lines[250:])
    p = tmp_path / "many.jsonl"
    p.write_text(data, newline="")
    starts, ends, nos = _index_lines(str(p), chunk=1000)
    assert len(starts) == 500 and nos[250] == 252
    src = JsonlSource(p)
    for i in (0, 249, 250, 499):
        assert src[i].messages[0]["content"] == "x" * (i % 37)


# ----------------------------------------------------------------------------------------------------- TFDS


def _png(a):
    import io

    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return b.getvalue()


@functools.lru_cache(maxsize=None)
def _tiny_vqa_builder():
    """The builder class, defined once per process: tfds registers builders by name and refuses a second class
    of the same name (test_evaluate_cli builds this dataset too)."""
    import tensorflow_datasets as tfds

    class UhdTinyVqa(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(), "question": tfds.features.Text(),
                "answer": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(5), "test": self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                a = np.asarray(random_image(30 + 7 * i, 50, i))
                # encoded PNG bytes: tfds encodes arrays with TensorFlow, which is not installed
                yield i, {"image": _png(a), "question": f"question {i}?", "answer": f"answer {i}"}

    return UhdTinyVqa


def _build_tfds(data_dir):
    import tensorflow_datasets as tfds

    b = _tiny_vqa_builder()(data_dir=str(data_dir), file_format="array_record")
    b.download_and_prepare(download_config=tfds.download.DownloadConfig())
    return b


def test_answer_lists():
    """A list answer field (VQA's annotators) gives every entry; a single value gives one; bytes are UTF-8."""
    from uhd_jax.data.sources import _texts

    assert _texts([b"two", "2", np.bytes_(b"deux")], "r", "answer") == ["two", "2", "deux"]
    assert _texts(np.array([b"a", b"b"]), "r", "answer") == ["a", "b"]
    assert _texts(b"one", "r", "answer") == ["one"]


def test_tfds_source(tmp_path, proc):
    b = _build_tfds(tmp_path / "tfds")
    by_dir = TfdsSource(b.data_dir, "train")
    by_name = TfdsSource("uhd_tiny_vqa", "test", data_dir=tmp_path / "tfds")
    assert len(by_dir) == 5 and len(by_name) == 2
    seen = set()
    for i in range(5):
        r = by_dir[i]
        assert r.name == f"tfds:{b.data_dir}/train[{i}]"
        q = r.messages[0]["content"]
        k = int(q.split()[-1].rstrip("?"))
        seen.add(k)
        assert q == f"{IM}\nquestion {k}?" and r.messages[1] == {"role": "assistant", "content": f"answer {k}"}
        assert isinstance(r.images[0], bytes)  # undecoded: image_io decodes it
        assert by_dir.answers(i) == [f"answer {k}"]
        s = proc.build(r)
        assert s.plans[0].image_size == (30 + 7 * k, 50)
    assert seen == set(range(5))
    assert pickle.loads(pickle.dumps(by_name))[1].messages[1]["content"].startswith("answer")
    with pytest.raises(FileNotFoundError, match="no_such_dataset_xyz"):
        TfdsSource("no_such_dataset_xyz", "train", data_dir=tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="split 'validation'"):
        TfdsSource(b.data_dir, "validation")
    with pytest.raises(ValueError, match="no feature 'caption'"):
        TfdsSource(b.data_dir, "train", answer_key="caption")


# ---------------------------------------------------------------------------------------------- synthetic OCR


def _digest(src, idx):
    out = []
    for i in idx:
        img, text = src.render(i)
        out.append((hashlib.sha256(np.asarray(img).tobytes()).hexdigest(), img.size, text))
    return out


def test_synthetic_ocr_deterministic_across_processes():
    src = SyntheticOCRSource(1000, seed=5)
    idx = [0, 1, 17, 999]
    here = _digest(src, idx)
    assert here == _digest(SyntheticOCRSource(1000, seed=5), idx[::-1])[::-1]  # order does not matter
    code = ("from uhd_jax.data.sources import SyntheticOCRSource; from tests.test_sources import _digest; "
            f"print(repr(_digest(SyntheticOCRSource(1000, seed=5), {idx})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert eval(out.stdout.strip().splitlines()[-1]) == here
    assert _digest(SyntheticOCRSource(1000, seed=6), idx) != here


def test_synthetic_ocr_variety_and_requests(proc):
    src = SyntheticOCRSource(60, seed=0, min_side=64, max_side=800)
    sizes, texts = [], []
    for i in range(60):
        img, text = src.render(i)
        assert img.mode == "RGB" and all(64 <= s <= 800 for s in img.size)
        assert text and set(text) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ")
        sizes.append(img.size)
        texts.append(text)
    w, h = np.array(sizes).T
    aspect = w / h
    assert len(set(sizes)) > 50 and len(set(texts)) == 60
    assert aspect.min() < 0.6 and aspect.max() > 1.6  # portrait and landscape
    assert np.max(np.maximum(w, h)) > 500 and np.min(np.minimum(w, h)) < 120
    r = src[3]
    assert r.name == "synthetic:3" and r.messages[1]["content"] == texts[3]
    assert r.messages[0]["content"] == f"{IM}\nWhat is the text in the image?"
    s = proc.build(r)
    assert int((s.input_ids == IMAGE_PAD_ID).sum()) == sum(s.view_tokens)
    with pytest.raises(IndexError):
        src[60]
    # photographs (scikit-image, offline) vs plain gradients: a gradient row has few distinct colours
    photo = SyntheticOCRSource(4, seed=1, photo_fraction=1.0, min_side=200).render(0)[0]
    plain = SyntheticOCRSource(4, seed=1, photo_fraction=0.0, min_side=200).render(0)[0]
    assert len(np.unique(np.asarray(photo).reshape(-1, 3), axis=0)) > 5 * len(
        np.unique(np.asarray(plain).reshape(-1, 3), axis=0))


def test_synthetic_ocr_alphabets():
    texts = {name: "".join(SyntheticOCRSource(40, seed=2, chars=name).render(i)[1] for i in range(40))
             for name in ("digits", "upper", "lower", "alnum")}
    assert set(texts["digits"]) == set("0123456789 ")  # 40 records: every digit occurs
    assert set(texts["upper"]) - {" "} <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ") and len(set(texts["upper"])) > 15
    assert set(texts["lower"]) - {" "} <= set("abcdefghijklmnopqrstuvwxyz") and len(set(texts["lower"])) > 15
    assert any(ch.isupper() for ch in texts["alnum"]) and any(ch.isdigit() for ch in texts["alnum"])
    with pytest.raises(ValueError, match="chars must be one of"):
        SyntheticOCRSource(4, chars="greek")


# --------------------------------------------------------------------------------------------- tiny model dir


def test_tiny_model_dir_round_trip(tiny_dir, proc):
    from uhd_jax.data.packer import Packer, PackerConfig
    from uhd_jax.model.minicpmv import check_visual_placement

    cfg = tiny_config()
    assert sorted(os.listdir(tiny_dir)) == ["config.json", "generation_config.json", "preprocessor_config.json",
                                            "tokenizer.json", "tokenizer_config.json"]
    assert proc.image_token_id == cfg.image_token_id == IMAGE_PAD_ID
    assert proc.tokenizer.token_to_id("<|video_pad|>") == cfg.video_token_id == VIDEO_PAD_ID
    assert proc.slice_config.scale_resolution == 224 and proc.slice_config.max_slice_nums == 4
    assert max(proc.token_ids.values()) < 512 and tiny_tokenizer().get_vocab_size() == 512
    s = proc.encode_chat([{"role": "user", "content": [{"type": "image", "image": random_image(300, 500, 1)},
                                                       "Wie heißt das? 🙂"]},
                          {"role": "assistant", "content": "Ein Bild."}], name="chat")
    assert s.input_ids.max() < cfg.text.vocab_size and s.input_ids.min() >= 0
    assert s.num_views == 3 and s.loss_mask.any()
    assert proc.decode(s.input_ids[s.loss_mask]) == "Ein Bild."
    batch = Packer(proc, PackerConfig(batch_size=2, seq_buckets=(256, 512), tokens_per_view=320,
                                      views_per_row=5)).pack([s])
    check_visual_placement(batch, cfg.image_token_id)
    assert batch.vision.patches.shape == (2, 5, 320, 3 * 14 * 14)
    with pytest.raises(ValueError, match="image_token_id"):
        write_tiny_model_dir(tiny_dir + "_x", cfg.replace(image_token_id=7))
