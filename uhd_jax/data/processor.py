"""Images + text -> the prompt text MiniCPM-V 4.6 expects, its token ids, a loss mask, and the pixel views.

`Processor.from_pretrained(model_dir)` reads a Hugging Face model directory: `preprocessor_config.json`
(slicing), `tokenizer.json` (through the `tokenizers` library), `tokenizer_config.json` (special-token names,
pad token), `generation_config.json` (bos / eos ids).

Prompt layout, identical to `transformers`' `MiniCPMV4_6Processor`: every image token (`<|image_pad|>`) in
the text is one image, replaced by

    <image_id>i</image_id><image>{pads}</image>{slice rows}

where `i` counts images within the sample (when `use_image_id`), `{pads}` is the image token repeated once per
visual token of the thumbnail (patch grid h*w / 16 in "16x" mode, / 4 in "4x"), and the slice rows, present
when the image was sliced, are `<slice>{pads}</slice>` for each slice of a row, rows joined by "\n".
A model with `merger_times` > 1 (read from the directory's config.json) folds each view 4x more per extra round:
the slicer makes every patch grid divisible accordingly and the pads count h*w / 4^levels (the reference
processor has no such setting; its model does, and tests/test_merger_times.py checks ours against it).

Chat format (`encode_chat`): ChatML turns `<|im_start|>{role}\n{content}<|im_end|>\n`; a message's content
is a string (image tokens in it refer to `images` in order) or a list of parts `{"type": "text", "text": ..}` /
`{"type": "image", "image": path | bytes | PIL}` joined by "\n". The loss mask is True on the tokens of
assistant contents and their closing `<|im_end|>` (not on the `<|im_start|>assistant\n` header, nor on the
newline after `<|im_end|>`, nor on image placeholders).

Images may be paths, bytes or PIL images; all go through `image_io.load_image` (EXIF orientation applied,
transparency composited on white, see image_io for how this relates to the reference's two input routes), then
`slicer.slice_image`. Pixels and token ids are bit-identical to the reference for RGB images without EXIF
rotation, whichever way they are given (tests/test_processor.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from uhd_jax.data.image_io import LoadOptions, load_image
from uhd_jax.data.layout import view_token_count
from uhd_jax.data.slicer import SliceConfig, SlicePlan, plan_slices, slice_image

# Token strings of MiniCPM-V 4.6 (used when tokenizer_config.json does not name them).
DEFAULT_SPECIAL_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
    "im_start_token": "<|im_start|>",
    "im_end_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
}


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    image_token: str
    image_start_token: str
    image_end_token: str
    slice_start_token: str
    slice_end_token: str
    image_id_start_token: str
    image_id_end_token: str
    im_start_token: str
    im_end_token: str
    pad_token: str
    video_token: str = "<|video_pad|>"

    @classmethod
    def from_tokenizer_config(cls, cfg: dict) -> "SpecialTokens":
        names = dict(DEFAULT_SPECIAL_TOKENS)
        extra = cfg.get("extra_special_tokens") or cfg.get("model_specific_special_tokens")
        if isinstance(extra, dict):
            names.update({k: _token_str(v) for k, v in extra.items() if k in names})
        for k in names:
            if k in cfg and cfg[k] is not None and k.endswith("_token"):
                names[k] = _token_str(cfg[k])
        return cls(**names)


def _token_str(v) -> str:
    return v["content"] if isinstance(v, dict) else str(v)


@dataclasses.dataclass
class SampleRequest:
    """What a sample is made from; kept so that the packer can rebuild a sample with fewer slices."""

    messages: list[dict] | None = None  # chat form
    text: str | None = None  # raw form (no chat formatting)
    images: list[Any] = dataclasses.field(default_factory=list)
    add_generation_prompt: bool = False
    name: str | None = None


@dataclasses.dataclass
class Sample:
    """One processed sample.

    input_ids [L] int32; loss_mask [L] bool; views: [3, H, W] float32 pixel views of all images in order
    (per image: thumbnail, then slices row by row); plans: one SlicePlan per image; text: the expanded prompt."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    views: list[np.ndarray]
    plans: list[SlicePlan]
    text: str
    name: str
    max_slice_nums: int
    downsample_mode: str
    request: SampleRequest | None = None
    merger_times: int = 1

    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def view_grids(self) -> list[tuple[int, int]]:
        return [t for p in self.plans for t in p.target_sizes]

    @property
    def view_tokens(self) -> list[int]:
        return [view_token_count(h, w, self.downsample_mode, self.merger_times) for h, w in self.view_grids]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def image_pad_runs(ids: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of the image token in `ids`."""
    m = np.asarray(ids) == image_token_id
    if not m.any():
        return []
    d = np.diff(np.concatenate([[0], m.astype(np.int8), [0]]))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    return list(zip(starts.tolist(), (ends - starts).tolist()))


def check_placeholders(ids: np.ndarray, view_grids: Sequence[tuple[int, int]], image_token_id: int, mode: str,
                       name: str = "sample", merger_times: int = 1) -> list[tuple[int, int]]:
    """Host check: one run of image tokens per view, of exactly `view_token_count` tokens. Returns the runs."""
    runs = image_pad_runs(ids, image_token_id)
    want = [view_token_count(h, w, mode, merger_times) for h, w in view_grids]
    if len(runs) != len(want):
        raise ValueError(f"{name}: {len(runs)} runs of image tokens in the token ids but {len(want)} views")
    for i, ((_, n), w) in enumerate(zip(runs, want)):
        if n != w:
            raise ValueError(f"{name}: view {i} has {n} image tokens in the token ids but the encoder emits {w} "
                             f"(patch grid {view_grids[i]}, mode {mode}, merger_times {merger_times})")
    return runs


class Processor:
    """MiniCPM-V 4.6 input processor (host side, numpy + PIL + tokenizers)."""

    def __init__(self, tokenizer: Tokenizer, slice_config: SliceConfig, special_tokens: SpecialTokens | None = None,
                 *, bos_token_id: int | None = None, eos_token_ids: Sequence[int] = (),
                 load_options: LoadOptions | None = None, assistant_prefix: str = ""):
        self.tokenizer = tokenizer
        self.slice_config = slice_config
        self.tokens = special_tokens or SpecialTokens(**DEFAULT_SPECIAL_TOKENS)
        self.load_options = load_options or LoadOptions()
        self.assistant_prefix = assistant_prefix  # e.g. "<think>\n\n</think>\n\n" to turn thinking off
        self.bos_token_id = bos_token_id
        ids = {}
        for f in dataclasses.fields(self.tokens):
            tid = tokenizer.token_to_id(getattr(self.tokens, f.name))
            if tid is None and f.name not in ("video_token",):
                raise ValueError(f"tokenizer has no token {getattr(self.tokens, f.name)!r} ({f.name})")
            ids[f.name] = tid
        self.token_ids = ids
        self.image_token_id = ids["image_token"]
        self.pad_token_id = ids["pad_token"]
        self.eos_token_ids = tuple(eos_token_ids) or (ids["im_end_token"],)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, load_options: LoadOptions | None = None,
                        assistant_prefix: str = "", **slice_overrides) -> "Processor":
        """Loads from a HF model directory. `slice_overrides`: SliceConfig fields (e.g. downsample_mode="4x",
        max_slice_nums=4) replacing those of preprocessor_config.json. `merger_times` comes from config.json (the
        model's merge rounds decide the placeholder counts) unless overridden."""
        path = os.fspath(path)
        pre = _read_json(os.path.join(path, "preprocessor_config.json"), {})
        model_cfg = _read_json(os.path.join(path, "config.json"), {})
        if "merger_times" not in slice_overrides and model_cfg.get("merger_times") is not None:
            slice_overrides["merger_times"] = model_cfg["merger_times"]
        slice_config = SliceConfig.from_dict(pre, **slice_overrides)
        tok_path = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tok_path):
            raise FileNotFoundError(f"{tok_path}: no tokenizer.json in the model directory")
        tokenizer = Tokenizer.from_file(tok_path)
        tcfg = _read_json(os.path.join(path, "tokenizer_config.json"), {})
        special = SpecialTokens.from_tokenizer_config(tcfg)
        gen = _read_json(os.path.join(path, "generation_config.json"), {})
        eos = gen.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if not eos and tcfg.get("eos_token"):
            tid = tokenizer.token_to_id(_token_str(tcfg["eos_token"]))
            eos = [] if tid is None else [tid]
        return cls(tokenizer, slice_config, special, bos_token_id=gen.get("bos_token_id"), eos_token_ids=eos,
                   load_options=load_options, assistant_prefix=assistant_prefix)

    # ------------------------------------------------------------------ images
    def load(self, src) -> Image.Image:
        return load_image(src, self.load_options)

    def plan(self, image_size: tuple[int, int], max_slice_nums: int | None = None) -> SlicePlan:
        return plan_slices(image_size, self.slice_config, max_slice_nums)

    def process_image(self, src, max_slice_nums: int | None = None):
        """Path / bytes / PIL -> SlicedImage (plan + normalized views)."""
        opts = self.load_options
        if opts.jpeg_draft_margin and not isinstance(src, Image.Image):
            return self._process_with_draft(src, max_slice_nums)
        return slice_image(self.load(src), self.slice_config, max_slice_nums)

    def _process_with_draft(self, src, max_slice_nums):
        # Peek at the header size, plan on it, and let the JPEG decoder skip what the resizes would drop.
        # Not bit-exact with the reference (off by default).
        from uhd_jax.data.image_io import _exif_orientation, _open, _source_name

        hdr = _open(src, _source_name(src), self.load_options.max_pixels)  # header only
        w, h = hdr.size
        orient = _exif_orientation(hdr) if self.load_options.exif_transpose else 1
        hdr.close()
        if orient in (5, 6, 7, 8):
            h, w = w, h
        plan = self.plan((h, w), max_slice_nums)
        sizes = [plan.thumb_size] + ([plan.refine_size] if plan.refine_size else [])
        need = (max(s[0] for s in sizes), max(s[1] for s in sizes))
        if orient in (5, 6, 7, 8):
            need = (need[1], need[0])
        img = load_image(src, self.load_options, target_size=need)
        return slice_image(img, self.slice_config, max_slice_nums, plan_size=(h, w))

    def image_placeholder(self, plan: SlicePlan, local_index: int | None = None) -> str:
        t = self.tokens
        n = plan.view_tokens
        s = t.image_start_token + t.image_token * n[0] + t.image_end_token
        if plan.grid is not None:
            rows, cols = plan.grid
            sl = n[1:]
            s += "\n".join("".join(t.slice_start_token + t.image_token * sl[r * cols + c] + t.slice_end_token
                                   for c in range(cols)) for r in range(rows))
        if local_index is not None:
            s = f"{t.image_id_start_token}{local_index}{t.image_id_end_token}" + s
        return s

    # ------------------------------------------------------------------ text
    def expand_text(self, text: str, plans: Sequence[SlicePlan], use_image_id: bool | None = None) -> str:
        """Replaces each image token of `text` by its image's placeholder (the reference's prompt text)."""
        use_id = self.slice_config.use_image_id if use_image_id is None else use_image_id
        parts = text.split(self.tokens.image_token)
        if len(parts) - 1 != len(plans):
            raise ValueError(f"text has {len(parts) - 1} image tokens ({self.tokens.image_token}) but "
                             f"{len(plans)} images were given")
        out = [parts[0]]
        for i, (p, rest) in enumerate(zip(plans, parts[1:])):
            out.append(self.image_placeholder(p, i if use_id else None))
            out.append(rest)
        return "".join(out)

    def encode(self, text: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
        enc = self.tokenizer.encode(text, add_special_tokens=True)
        return np.asarray(enc.ids, np.int32), enc.offsets

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ samples
    def __call__(self, text: str | Sequence[str], images: Sequence[Any] | None = None, *,
                 max_slice_nums: int | None = None, use_image_id: bool | None = None) -> list[Sample]:
        """Reference-style call: each image token in the texts takes the next image of the flat `images` list
        (or `images` nested per text). Returns one Sample per text (loss_mask all False)."""
        texts = [text] if isinstance(text, str) else list(text)
        per_text = _split_images(texts, images, self.tokens.image_token)
        out = []
        for t, ims in zip(texts, per_text):
            req = SampleRequest(text=t, images=ims)
            out.append(self.build(req, max_slice_nums=max_slice_nums, use_image_id=use_image_id))
        return out

    def encode_chat(self, messages: Sequence[dict], images: Sequence[Any] | None = None, *,
                    add_generation_prompt: bool = False, name: str | None = None,
                    max_slice_nums: int | None = None) -> Sample:
        """Chat messages (+ images for image tokens in string contents) -> Sample with an assistant loss mask."""
        req = SampleRequest(messages=list(messages), images=list(images or []),
                            add_generation_prompt=add_generation_prompt, name=name)
        return self.build(req, max_slice_nums=max_slice_nums)

    def build(self, req: SampleRequest, *, max_slice_nums: int | None = None,
              use_image_id: bool | None = None) -> Sample:
        """Processes a SampleRequest (images loaded and sliced with `max_slice_nums`)."""
        msn = self.slice_config.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
        use_id = self.slice_config.use_image_id if use_image_id is None else use_image_id
        if req.messages is not None:
            segments, images = self._chat_segments(req)
        else:
            segments, images = [(req.text or "", False)], list(req.images)
        name = req.name or _default_name(images)
        sliced = [self.process_image(src, msn) for src in images]
        plans = [s.plan for s in sliced]
        # expand image tokens segment by segment, keeping track of trainable character spans
        pieces, spans, pos, k = [], [], 0, 0
        for seg, train in segments:
            parts = seg.split(self.tokens.image_token)
            exp = [parts[0]]
            for rest in parts[1:]:
                if k >= len(plans):
                    raise ValueError(f"{name}: more image tokens in the text than images given ({len(plans)})")
                exp.append(self.image_placeholder(plans[k], k if use_id else None))
                exp.append(rest)
                k += 1
            seg = "".join(exp)
            if train and seg:
                spans.append((pos, pos + len(seg)))
            pieces.append(seg)
            pos += len(seg)
        if k != len(plans):
            raise ValueError(f"{name}: {k} image tokens in the text but {len(plans)} images given")
        text = "".join(pieces)
        ids, offsets = self.encode(text)
        loss = np.zeros(ids.shape, bool)
        if spans:
            starts = np.asarray([o[0] for o in offsets], np.int64)
            for a, b in spans:
                loss |= (starts >= a) & (starts < b)
            loss &= ids != self.image_token_id
            for key in ("image_start_token", "image_end_token", "slice_start_token", "slice_end_token",
                        "image_id_start_token", "image_id_end_token"):
                loss &= ids != self.token_ids[key]
        views = [v for s in sliced for v in s.views]
        sample = Sample(input_ids=ids, loss_mask=loss, views=views, plans=plans, text=text, name=name,
                        max_slice_nums=msn, downsample_mode=self.slice_config.downsample_mode, request=req,
                        merger_times=self.slice_config.merger_times)
        check_placeholders(ids, sample.view_grids, self.image_token_id, sample.downsample_mode, name,
                           sample.merger_times)
        return sample

    def _chat_segments(self, req: SampleRequest):
        t = self.tokens
        images = list(req.images)
        n_free = len(images)  # images for image tokens written into string contents
        used = 0
        segs: list[tuple[str, bool]] = []
        part_images: list[Any] = []
        order: list[tuple[str, int]] = []  # ("free", i) / ("part", j) in text order
        for m in req.messages:
            role = m.get("role")
            if role not in ("system", "user", "assistant", "tool"):
                raise ValueError(f"unknown chat role {role!r}")
            content = m.get("content", "")
            if isinstance(content, str):
                body = content
                for _ in range(content.count(t.image_token)):
                    order.append(("free", used))
                    used += 1
            else:
                chunks = []
                for part in content:
                    if isinstance(part, str):
                        part = {"type": "text", "text": part}
                    typ = part.get("type")
                    if typ == "text":
                        txt = part.get("text", "")
                        for _ in range(txt.count(t.image_token)):
                            order.append(("free", used))
                            used += 1
                        chunks.append(txt)
                    elif typ == "image":
                        src = part.get("image", part.get("path", part.get("url")))
                        if src is None:
                            raise ValueError("image part without an 'image' entry")
                        order.append(("part", len(part_images)))
                        part_images.append(src)
                        chunks.append(t.image_token)
                    else:
                        raise ValueError(f"unknown content part type {typ!r}")
                body = "\n".join(chunks)
            segs.append((f"{t.im_start_token}{role}\n", False))
            train = role == "assistant"
            segs.append((body, train))
            segs.append((t.im_end_token, train))
            segs.append(("\n", False))
        if used != n_free:
            raise ValueError(f"{used} image tokens in the message texts but {n_free} images given")
        if req.add_generation_prompt:
            segs.append((f"{t.im_start_token}assistant\n{self.assistant_prefix}", False))
        ordered = [images[i] if kind == "free" else part_images[i] for kind, i in order]
        return segs, ordered

    # ------------------------------------------------------------------ batching
    def pad(self, samples: Sequence[Sample], *, padding_side: str = "right", pad_to: int | None = None):
        """Token ids of several samples padded to one length: (input_ids [B, S] int32, attention_mask [B, S]
        bool, loss_mask [B, S] bool). The reference pads on the left; the packer (and ModelBatch) on the right."""
        n = max((len(s) for s in samples), default=0)
        S = n if pad_to is None else pad_to
        if S < n:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest sample ({n} tokens)")
        ids = np.full((len(samples), S), self.pad_token_id, np.int32)
        att = np.zeros((len(samples), S), bool)
        loss = np.zeros((len(samples), S), bool)
        for i, s in enumerate(samples):
            L = len(s)
            sl = slice(0, L) if padding_side == "right" else slice(S - L, S)
            ids[i, sl], att[i, sl], loss[i, sl] = s.input_ids, True, s.loss_mask
        return ids, att, loss


def _split_images(texts, images, image_token):
    counts = [t.count(image_token) for t in texts]
    if images is None:
        images = []
    images = list(images)
    nested = len(images) == len(texts) and all(isinstance(x, (list, tuple)) for x in images) and images
    if nested:
        per = [list(x) for x in images]
        for i, (c, ims) in enumerate(zip(counts, per)):
            if c != len(ims):
                raise ValueError(f"text {i} has {c} image tokens but {len(ims)} images")
        return per
    if sum(counts) != len(images):
        raise ValueError(f"{sum(counts)} image tokens in the text(s) but {len(images)} images given")
    per, k = [], 0
    for c in counts:
        per.append(images[k:k + c])
        k += c
    return per


def _default_name(images) -> str:
    names = [os.fspath(x) for x in images if isinstance(x, (str, os.PathLike))]
    return ", ".join(names) if names else "sample"


def _read_json(path, default):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)
