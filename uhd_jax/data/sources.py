"""Random-access record sources for the grain pipeline (`len(source)`, `source[i] -> SampleRequest`).

Each record becomes a `processor.SampleRequest` whose `name` says where it came from ("file.jsonl:12",
"tfds:name/split[i]", "synthetic:i"), so an error anywhere downstream names the record. A record that cannot be
used (bad JSON, missing fields, image tags that do not match the images) raises `DataError`; the pipeline skips
and counts it (see pipeline.py). Sources are picklable and open their files lazily in each process, so grain
worker processes read them directly.

* `JsonlSource(path)`: the MiniCPM-V fine-tuning format, one JSON object per line:
  `{"id": ..., "image": path | {"<image_00>": path, ...} (optional), "conversations": [{"role": "user",
  "content": "<image>\\n..."}, {"role": "assistant", "content": "..."}]}` ("from"/"value" with
  "human"/"gpt"/"system" also accepted). Image paths are relative to the JSONL file's directory (or
  `image_root`). Single image: the tag `<image>` marks its place; without a tag it goes before the first user
  message's text, as MiniCPM-V's fine-tuning code does. Several images: each key of the `image` mapping is a tag
  in the text; images are taken in the order their tags appear. Every tag becomes the processor's image token.
* `TfdsSource(name_or_builder_dir, split)`: a prepared TFDS dataset in array_record format, read through
  `tfds.data_source` (never downloads): an image field (encoded bytes or a uint8 array) and question / answer text.
* `SyntheticOCRSource(num_records, seed)`: the built-in OCR task (synthetic_ocr.py).
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any

import numpy as np

from uhd_jax.data.processor import DEFAULT_SPECIAL_TOKENS, SampleRequest
from uhd_jax.data.synthetic_ocr import SyntheticOCRSource  # noqa: F401  (re-exported: one place for sources)

__all__ = ["DataError", "JsonlSource", "TfdsSource", "SyntheticOCRSource", "jsonl_request"]

IMAGE_TOKEN = DEFAULT_SPECIAL_TOKENS["image_token"]
_OPEN_LOCK = threading.Lock()  # grain reads records from several threads; each source opens its file once
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


class DataError(ValueError):
    """A record that cannot be used. `record` names it (e.g. "data.jsonl:12"), `reason` says why."""

    def __init__(self, record: str, reason: str):
        self.record = record
        self.reason = reason
        super().__init__(f"{record}: {reason}")

    def __reduce__(self):  # picklable with both fields (grain worker processes send exceptions back)
        return type(self), (self.record, self.reason)


# ---------------------------------------------------------------------------------------------------- JSONL


def _index_lines(path: str, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, line number) of every non-empty line of a file, by one pass over its bytes (numpy, chunked:
    memory stays O(lines), not O(file)). Lines holding only "\\r" count as empty."""
    size = os.path.getsize(path)
    if size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    mm = np.memmap(path, np.uint8, mode="r")
    newlines = [np.flatnonzero(mm[o:o + chunk] == 10) + o for o in range(0, size, chunk)]
    nl = np.concatenate(newlines).astype(np.int64)
    starts = np.concatenate([[0], nl + 1])
    ends = np.concatenate([nl, [size]])
    lines = np.arange(1, len(starts) + 1, dtype=np.int64)
    length = ends - starts
    one = np.flatnonzero(length == 1)
    empty = length == 0
    empty[one] = mm[starts[one]] == 13
    keep = ~empty
    del mm
    return starts[keep], ends[keep], lines[keep]


class JsonlSource:
    """Random access to the records of a JSONL file (MiniCPM-V fine-tuning format, see the module notes).

    The file is indexed once (byte offsets of its lines); `source[i]` reads line i alone (`os.pread`, safe from
    several threads) and returns a SampleRequest named "path:line" (plus " (id ...)" when the record has one).
    Empty lines are skipped. A malformed line raises DataError naming path:line."""

    def __init__(self, path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                 image_token: str = IMAGE_TOKEN):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such JSONL file")
        self.image_root = os.path.abspath(os.fspath(image_root)) if image_root else os.path.dirname(self.path)
        self.image_token = image_token
        self._starts, self._ends, self._lines = _index_lines(self.path)
        if len(self._starts) == 0:
            raise ValueError(f"{self.path}: no records (empty file)")
        self._fd = None

    def __len__(self) -> int:
        return int(len(self._starts))

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, {len(self)} records)"

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fd"] = None  # file descriptors do not cross processes; reopened on first read
        return d

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def line_name(self, i: int) -> str:
        return f"{self.path}:{int(self._lines[i])}"

    def read_line(self, i: int) -> bytes:
        if self._fd is None:
            with _OPEN_LOCK:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        a, b = int(self._starts[i]), int(self._ends[i])
        return os.pread(self._fd, b - a, a)

    def __getitem__(self, i: int) -> SampleRequest:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range for {self!r}")
        name = self.line_name(i)
        raw = self.read_line(i)
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(name, f"not valid JSON: {e}") from None
        return jsonl_request(obj, name, self.image_root, self.image_token)


def jsonl_request(obj: Any, name: str, image_root: str, image_token: str = IMAGE_TOKEN) -> SampleRequest:
    """One MiniCPM-V fine-tuning record (parsed JSON) -> SampleRequest. Raises DataError naming `name`."""
    if not isinstance(obj, dict):
        raise DataError(name, f"a record must be a JSON object, got {type(obj).__name__}")
    if obj.get("id") is not None:
        name = f"{name} (id {obj['id']})"
    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError(name, "'conversations' must be a non-empty list of messages")
    messages = []
    for k, m in enumerate(conv):
        if not isinstance(m, dict):
            raise DataError(name, f"conversations[{k}] is not an object")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in _ROLES:
            raise DataError(name, f"conversations[{k}]: unknown role {role!r} (expected one of {sorted(_ROLES)})")
        if not isinstance(content, str):
            raise DataError(name, f"conversations[{k}]: 'content' must be a string, got {type(content).__name__}")
        if image_token in content:
            raise DataError(name, f"conversations[{k}]: the text contains the processor's own image token "
                                  f"{image_token!r}; mark images with <image> or the 'image' mapping's tags")
        messages.append({"role": _ROLES[role], "content": content})
    image = obj.get("image")
    images: list[str] = []
    if image is None:
        if any("<image>" in m["content"] for m in messages):
            raise DataError(name, "the text has an <image> tag but the record has no 'image'")
    elif isinstance(image, str):
        images = [_image_path(image, image_root)]
        n = sum(m["content"].count("<image>") for m in messages)
        if n == 0:
            first = next((m for m in messages if m["role"] == "user"), None)
            if first is None:
                raise DataError(name, "an image without an <image> tag needs a user message to go in")
            first["content"] = "<image>\n" + first["content"]
        elif n > 1:
            raise DataError(name, f"one image but {n} <image> tags in the text")
        for m in messages:
            m["content"] = m["content"].replace("<image>", image_token)
    elif isinstance(image, dict):
        if not image or not all(isinstance(k, str) and k and isinstance(v, str) for k, v in image.items()):
            raise DataError(name, "'image' must map non-empty tag strings to path strings")
        # longest tags first, so that a tag that is a prefix of another cannot match inside it
        pattern = re.compile("|".join(re.escape(t) for t in sorted(image, key=len, reverse=True)))
        used = set()
        for m in messages:
            tags = pattern.findall(m["content"])
            images += [_image_path(image[t], image_root) for t in tags]
            used.update(tags)
            rest = pattern.sub("", m["content"])
            stray = re.findall(r"<image(?:_\d+)?>", rest)
            if stray:
                raise DataError(name, f"tag(s) {sorted(set(stray))} in the text are not keys of 'image' "
                                      f"({sorted(image)})")
            m["content"] = pattern.sub(lambda _: image_token, m["content"])
        missing = sorted(set(image) - used)
        if missing:
            raise DataError(name, f"image tag(s) {missing} do not appear in the text")
    else:
        raise DataError(name, f"'image' must be a path or a {{tag: path}} mapping, got {type(image).__name__}")
    return SampleRequest(messages=messages, images=images, name=name)


def _image_path(p: str, root: str) -> str:
    return p if os.path.isabs(p) else os.path.join(root, p)


# ----------------------------------------------------------------------------------------------------- TFDS


class TfdsSource:
    """A prepared TFDS dataset (array_record files) through `tfds.data_source`, never downloading.

    `name_or_builder_dir`: a registered/prepared dataset name (looked up under `data_dir`, e.g. "my_vqa" or
    "my_vqa/1.0.0"), or a directory holding dataset_info.json (a builder's versioned output directory).
    Each record needs `image_key` (encoded image bytes, or a uint8 array [H, W] / [H, W, C]) and the text fields
    `question_key` / `answer_key` (str or UTF-8 bytes; a list of answers takes the first). Image features are
    read undecoded (tfds SkipDecoding) so that image_io decodes them: the same loader and errors as files.
    `source[i]` is a SampleRequest named "tfds:<name>/<split>[i]": user = image + "\\n" + question,
    assistant = answer."""

    def __init__(self, name_or_builder_dir: str | os.PathLike, split: str, data_dir: str | os.PathLike | None = None,
                 *, image_key: str = "image", question_key: str = "question", answer_key: str = "answer",
                 image_token: str = IMAGE_TOKEN):
        self.name = os.fspath(name_or_builder_dir)
        self.split = split
        self.data_dir = None if data_dir is None else os.fspath(data_dir)
        self.image_key, self.question_key, self.answer_key = image_key, question_key, answer_key
        self.image_token = image_token
        self._ds = None
        self._len = len(self._source())  # opens once here so that a missing dataset fails at construction

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {self._len} records)"

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_ds"] = None  # reopened lazily in each process
        return d

    def _source(self):
        if self._ds is not None:
            return self._ds
        with _OPEN_LOCK:
            return self._ds if self._ds is not None else self._open()

    def _open(self):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ImportError(f"TfdsSource needs tensorflow-datasets (and importlib_resources): {e}") from e
        where = f"{self.name!r} (split {self.split!r}, data_dir {self.data_dir!r})"
        try:
            if os.path.isdir(self.name):
                builder = tfds.builder_from_directory(self.name)
            else:
                builder = tfds.builder(self.name, data_dir=self.data_dir)
            features = builder.info.features
        except Exception as e:  # noqa: BLE001 - tfds raises many types; re-raised with what was asked for
            raise FileNotFoundError(f"TFDS dataset {where} cannot be opened offline ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:300] if str(e) else ''})") from e
        for k in (self.image_key, self.question_key, self.answer_key):
            if k not in features:
                raise ValueError(f"TFDS dataset {where} has no feature {k!r} (features: {sorted(features)})")
        # images undecoded: image_io decodes them, with the same checks and errors as image files
        decoders = {self.image_key: tfds.decode.SkipDecoding()} \
            if isinstance(features[self.image_key], tfds.features.Image) else None
        try:
            if os.path.isdir(self.name):
                self._ds = builder.as_data_source(split=self.split, decoders=decoders)
            else:
                self._ds = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False,
                                            decoders=decoders)
        except Exception as e:  # noqa: BLE001
            raise FileNotFoundError(f"TFDS dataset {where} cannot be read as an array_record data source offline "
                                    f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})") from e
        return self._ds

    def __getitem__(self, i: int) -> SampleRequest:
        i = int(i)
        if not 0 <= i < self._len:
            raise IndexError(f"record {i} out of range for {self!r}")
        name = f"tfds:{self.name}/{self.split}[{i}]"
        rec = self._source()[i]
        image = _tfds_image(rec.get(self.image_key), name, self.image_key)
        q = _text(rec.get(self.question_key), name, self.question_key)
        a = _text(rec.get(self.answer_key), name, self.answer_key)
        return SampleRequest(messages=[{"role": "user", "content": f"{self.image_token}\n{q}"},
                                       {"role": "assistant", "content": a}], images=[image], name=name)

    def answers(self, i: int) -> list[str]:
        """All reference answers of record i (the answer field may hold a list, e.g. VQA's 10 annotators; the
        SampleRequest's assistant turn is the first)."""
        return _texts(self._source()[int(i)].get(self.answer_key), f"tfds:{self.name}/{self.split}[{i}]",
                      self.answer_key)


def _texts(v, name: str, key: str) -> list[str]:
    """Every answer of a field: a list field gives all its entries, a single value one."""
    many = isinstance(v, (list, tuple)) or getattr(v, "ndim", 0) == 1
    return [_text([a], name, key) for a in v] if many else [_text(v, name, key)]


def _text(v, name: str, key: str) -> str:
    if isinstance(v, (list, tuple, np.ndarray)) and not isinstance(v, (bytes, str)):
        if len(v) == 0:
            raise DataError(name, f"field {key!r} is an empty list")
        v = v[0]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(name, f"field {key!r} is not UTF-8: {e}") from None
    if isinstance(v, str):
        return v
    raise DataError(name, f"field {key!r} must be text, got {type(v).__name__}")


def _tfds_image(v, name: str, key: str):
    from PIL import Image

    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)  # decoded by image_io (errors name the bytes; the pipeline names the record)
    if isinstance(v, np.ndarray) and v.dtype == np.uint8 and (v.ndim == 2 or (v.ndim == 3 and v.shape[2] in (1, 3, 4))):
        return Image.fromarray(v[..., 0] if v.ndim == 3 and v.shape[2] == 1 else v)
    what = f"array {v.dtype} {v.shape}" if isinstance(v, np.ndarray) else type(v).__name__
    raise DataError(name, f"field {key!r} must be encoded image bytes or a uint8 [H, W(, 1|3|4)] array, got {what}")
