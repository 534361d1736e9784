"""Processor vs transformers' MiniCPMV4_6Processor (same test tokenizer on both sides): prompt text, token ids,
pixels; chat format and loss mask; loading from a model directory."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.data_utils import (make_model_dir, random_image, reference_image_processor, reference_plan,
                              reference_processor, reference_views)
from uhd_jax.data.processor import Processor, check_placeholders

IM = "<|image_pad|>"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def ref(model_dir):
    return reference_processor(model_dir)


@pytest.fixture(scope="module")
def proc(model_dir):
    return Processor.from_pretrained(model_dir)


def _ref_texts(texts, out):
    """The reference's expanded prompts, rebuilt from its replacement offsets."""
    res = []
    for t, offs in zip(texts, out["text_replacement_offsets"]):
        pieces, last = [], 0
        for o in offs:
            a, b = o["span"]
            pieces += [t[last:a], o["replacement"]]
            last = b
        res.append("".join(pieces) + t[last:])
    return res


def _compare(ref, proc, texts, images, **kw):
    """Runs both sides on the same batch, checks texts, ids (padded left like the reference), and pixels."""
    ref_kw = {k: v for k, v in kw.items() if k in ("downsample_mode", "max_slice_nums", "slice_mode")}
    out = ref(images=images if images else None, text=texts, return_tensors="np",
              return_text_replacement_offsets=True, use_image_id=kw.get("use_image_id"), **ref_kw)
    samples = (proc if not ref_kw else proc.__class__(proc.tokenizer, proc.slice_config.replace(**ref_kw),
                                                       proc.tokens))(texts, images, use_image_id=kw.get("use_image_id"))
    assert [s.text for s in samples] == _ref_texts(texts, out)
    ids, att, _ = proc.pad(samples, padding_side="left")
    np.testing.assert_array_equal(ids, out["input_ids"])
    np.testing.assert_array_equal(att, out["attention_mask"].astype(bool))
    views = [v for s in samples for v in s.views]
    if images:
        ref_views = reference_views(out["pixel_values"], out["target_sizes"])
        assert len(views) == len(ref_views)
        for a, b in zip(views, ref_views):
            assert np.array_equal(a, b)
        assert [list(g) for s in samples for g in s.view_grids] == out["target_sizes"].tolist()
    return samples


@pytest.mark.parametrize("size", [(10, 10), (449, 447), (700, 1000), (20, 4000), (1344, 1344), (997, 661)])
@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_single_image_prompt(ref, proc, size, mode):
    text = f"<|im_start|>user\n{IM}\nDescribe this image in detail.<|im_end|>\n<|im_start|>assistant\n"
    (s,) = _compare(ref, proc, [text], [random_image(*size, seed=size[0])], downsample_mode=mode)
    d = 4 if mode == "4x" else 16
    assert s.text.count(IM) == sum(h * w // d for h, w in s.view_grids)
    assert s.text.startswith("<|im_start|>user\n<image_id>0</image_id><image>" + IM)


@pytest.mark.parametrize("kw", [dict(slice_mode=False), dict(max_slice_nums=2), dict(max_slice_nums=16),
                                dict(use_image_id=False), dict(downsample_mode="4x", max_slice_nums=4)])
def test_options(ref, proc, kw):
    text = f"{IM} What is written on the sign? {IM}"
    _compare(ref, proc, [text], [random_image(900, 1600, 1), random_image(1500, 500, 2)], **kw)


def test_batch_several_images_and_none(ref, proc):
    texts = [f"<|im_start|>user\n{IM}{IM}\nHow many slices?<|im_end|>",
             "no image here, just text 🙂",
             f"A cat {IM} sits on a red mat {IM}{IM} next to 3 dogs."]
    ims = [random_image(700, 1000, 1), random_image(30, 40, 2), random_image(2003, 1999, 3), random_image(14, 14, 4),
           random_image(480, 640, 5)]
    samples = _compare(ref, proc, texts, ims)
    assert [len(s.plans) for s in samples] == [2, 0, 3]
    # image ids count within each sample
    assert "<image_id>1</image_id>" in samples[0].text and "<image_id>2</image_id>" in samples[2].text
    assert "<image_id>" not in samples[1].text


def test_text_only_batch(ref, proc):
    _compare(ref, proc, ["hello world", "Describe this image in detail."], None)


def test_slice_rows_layout(proc):
    # 900x1600 at scale_resolution 448, by hand: 1.44M px / 448^2 = 7.2 -> 8 slices -> 2x4 is the grid whose aspect
    # is nearest 16:9; thumbnail 336x616 px = 24x44 patches = 66 tokens; slices 448x448 px = 32x32 = 64 tokens each
    (s,) = proc([IM], [random_image(900, 1600, 1)])
    assert s.plans[0].grid == (2, 4)
    row = ("<slice>" + IM * 64 + "</slice>") * 4
    want = "<image_id>0</image_id><image>" + IM * 66 + "</image>" + "\n".join([row] * 2)
    assert s.text == want


def test_from_pretrained_reads_the_model_dir(tmp_path):
    d = make_model_dir(tmp_path / "m", max_slice_nums=4, slice_mode=True)
    p = Processor.from_pretrained(d)
    assert p.slice_config.max_slice_nums == 4
    assert p.image_token_id == 248056 and p.pad_token_id == 248044
    assert p.eos_token_ids == (248044, 248046) and p.bos_token_id == 248045
    assert p.token_ids["slice_start_token"] == 248088 and p.token_ids["image_id_end_token"] == 248091
    p4 = Processor.from_pretrained(d, downsample_mode="4x")
    assert p4.slice_config.downsample_mode == "4x" and p4.slice_config.max_slice_nums == 4
    with pytest.raises(FileNotFoundError):
        Processor.from_pretrained(tmp_path)


def test_image_count_mismatch_is_an_error(proc):
    with pytest.raises(ValueError, match="image tokens"):
        proc([f"{IM}{IM}"], [random_image(20, 20)])
    with pytest.raises(ValueError, match="image tokens"):
        proc(["no image"], [random_image(20, 20)])


def test_chat_format_and_loss_mask(proc):
    img = random_image(700, 1000, 1)
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat sits on a red mat."},
        {"role": "user", "content": "How many dogs?"},
        {"role": "assistant", "content": "3 dogs."},
    ]
    s = proc.encode_chat(msgs)
    (plain,) = proc(["x" + IM], [img])
    ph = plain.text[1:]
    want = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{ph}\nWhat is it?<|im_end|>\n"
            "<|im_start|>assistant\nA cat sits on a red mat.<|im_end|>\n"
            "<|im_start|>user\nHow many dogs?<|im_end|>\n"
            "<|im_start|>assistant\n3 dogs.<|im_end|>\n")
    assert s.text == want
    ids, _ = proc.encode(want)
    np.testing.assert_array_equal(s.input_ids, ids)
    assert s.loss_mask.dtype == bool and s.loss_mask.shape == s.input_ids.shape
    # the targets are exactly the assistant contents and their <|im_end|>
    assert proc.decode(s.input_ids[s.loss_mask], skip_special_tokens=False) == \
        "A cat sits on a red mat.<|im_end|>3 dogs.<|im_end|>"
    assert not s.loss_mask[s.input_ids == proc.image_token_id].any()
    # each run of True is contiguous per assistant turn
    d = np.diff(np.concatenate([[0], s.loss_mask.astype(int), [0]]))
    assert (d == 1).sum() == 2
    # generation prompt
    g = proc.encode_chat(msgs[:2], add_generation_prompt=True)
    assert g.text.endswith("What is it?<|im_end|>\n<|im_start|>assistant\n") and not g.loss_mask.any()


def test_chat_images_in_string_content(proc):
    a, b = random_image(100, 100, 1), random_image(60, 200, 2)
    s = proc.encode_chat([{"role": "user", "content": f"{IM}\nfirst, then {IM}"},
                          {"role": "assistant", "content": "ok"}], images=[a, b])
    t = proc.encode_chat([{"role": "user", "content": [{"type": "image", "image": a}, "first, then",
                                                          {"type": "image", "image": b}]},
                          {"role": "assistant", "content": "ok"}])
    assert len(s.plans) == 2 and "<image_id>1</image_id>" in s.text
    assert t.text.replace("first, then\n", "first, then ") == s.text
    with pytest.raises(ValueError):
        proc.encode_chat([{"role": "user", "content": IM}], images=[])


def test_chat_matches_reference_ids(ref, proc):
    """A chat prompt through our chat formatting gives the ids the reference gives for the same text."""
    img = random_image(1080, 1920, 7)
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Describe."}]},
            {"role": "assistant", "content": "A gradient."}]
    s = proc.encode_chat(msgs)
    raw = f"<|im_start|>user\n{IM}\nDescribe.<|im_end|>\n<|im_start|>assistant\nA gradient.<|im_end|>\n"
    out = ref(images=[img], text=[raw], return_tensors="np")
    np.testing.assert_array_equal(s.input_ids, out["input_ids"][0])


def test_check_placeholders(proc):
    (s,) = proc([IM], [random_image(900, 1600, 1)])
    runs = check_placeholders(s.input_ids, s.view_grids, proc.image_token_id, "16x")
    assert [n for _, n in runs] == [66] + [64] * 8  # the hand count of test_slice_rows_layout
    assert runs == [(int(a), int(n)) for a, n in _runs(s.input_ids == proc.image_token_id)]
    bad = s.input_ids.copy()
    bad[runs[1][0]] = 0  # one pad token lost
    with pytest.raises(ValueError, match="image tokens"):
        check_placeholders(bad, s.view_grids, proc.image_token_id, "16x")
    with pytest.raises(ValueError, match="runs of image tokens"):
        check_placeholders(s.input_ids, s.view_grids[:-1], proc.image_token_id, "16x")


def _runs(mask):
    """(start, length) of the runs of True, by a plain loop."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i - start))
            start = None
    return out


@pytest.fixture(scope="module")
def ref_image_processor():
    return reference_image_processor()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(h=st.integers(1, 10000), w=st.integers(1, 10000), mode=st.sampled_from(["16x", "4x"]),
       msn=st.integers(1, 12))
def test_placeholder_count_property(proc, ref_image_processor, h, w, mode, msn):
    """For any size: the tokenized prompt holds one run of image tokens per view of the reference's plan, each
    of h*w/16 (16x) or h*w/4 (4x) tokens for the reference's patch grid h x w."""
    p = proc.__class__(proc.tokenizer, proc.slice_config.replace(downsample_mode=mode, max_slice_nums=msn),
                       proc.tokens)
    plan = p.plan((h, w))
    assert plan.num_views <= 1 + msn
    ids, _ = p.encode(p.expand_text("look: " + IM + " ok", [plan]))
    _, ref_sizes = reference_plan(ref_image_processor, h, w, mode, True, msn)
    d = {"16x": 16, "4x": 4}[mode]
    assert [n for _, n in _runs(ids == p.image_token_id)] == [a * b // d for a, b in ref_sizes]


def test_file_paths_match_reference_loader(ref, proc, tmp_path):
    """Given file paths, both sides load the files themselves (the reference through its load_image)."""
    paths = []
    for i, size in enumerate([(600, 800), (1201, 333)]):
        p = tmp_path / f"f{i}.jpg"
        random_image(*size, seed=i).save(p, quality=90)
        paths.append(str(p))
    _compare(ref, proc, [f"{IM} and {IM}: same?"], paths)


def test_jpeg_draft_option(model_dir, proc, tmp_path):
    from uhd_jax.data.image_io import LoadOptions

    p = tmp_path / "big.jpg"
    random_image(2400, 3200, 1).save(p, quality=90)
    fast = Processor.from_pretrained(model_dir, load_options=LoadOptions(jpeg_draft_margin=1.0))
    a, b = proc.process_image(str(p)), fast.process_image(str(p))
    assert a.plan == b.plan  # same sizes and token counts; pixels approximate
    err = max(float(np.abs(x - y).mean()) for x, y in zip(a.views, b.views))
    assert 0 < err < 0.05
