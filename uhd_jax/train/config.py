"""The trainer's configuration: one ml_collections ConfigDict, built by `configs/*.py:get_config(arg)`.

`base_config()` holds every key with its default and type; config files change values, never add keys, and the
command line overrides any field (`--config.optimizer.learning_rate=2e-5`). The dict is locked, so an unknown key
or a value of the wrong type is an error naming the key (ml_collections' own checks). `check_config` adds the
checks that need several fields at once.
"""

from __future__ import annotations

import os

import ml_collections

MODEL_NAMES = ("tiny", "small", "reference", "dir")
DATA_SOURCES = ("random", "synthetic_ocr", "jsonl", "tfds")
DTYPES = ("float32", "bfloat16")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "tiny"  # tiny / small: tiny_config() / small_config() (byte tokenizer); reference: the real
    # architecture and vocabulary, random weights; dir: init.checkpoint
    c.model.text_model = "qwen3_5_text"  # tiny / small only: qwen3_5_text (hybrid) or qwen3 (dense)
    c.model.downsample_mode = "16x"
    c.model.dtype = "bfloat16"  # compute dtype; parameters are float32
    c.model.attention = "auto"
    c.model.remat = "dots"
    c.model.vision_remat = "none"
    c.model.unroll = False
    # the visual-computation savings in the LLM (uhd_jax.model.visual_cuts; all off by default). They need the
    # packer's text_slots (a grain data source, not "random").
    c.model.cuts = ml_collections.ConfigDict()
    c.model.cuts.window = 0  # (1) odd side of each visual query's window on its view's token grid; 0: off
    c.model.cuts.head_mask = ""  # (2) .npz of `python -m uhd_jax.yopo calibrate` (active heads); "": off
    c.model.cuts.drop_fraction = 0.0  # (3) visual tokens leave at layer round(fraction * layers); 0: off
    c.model.cuts.ffn_ratio = 1  # (4) visual tokens use intermediate_size / r FFN neurons; 1: off
    c.model.cuts.text_slot_multiple = 128  # the text_slots bucket (one compiled step per value in use)

    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""  # a converted checkpoint directory (uhd_jax.convert hf-to-jax / from-separate)

    c.data = ml_collections.ConfigDict()
    c.data.source = "random"  # random | synthetic_ocr (built in, no files) | jsonl | tfds
    c.data.path = ""  # jsonl: the training file
    c.data.eval_path = ""  # jsonl: the held-out file ("" = no evaluation data)
    c.data.tfds_name = ""  # tfds: dataset name or a builder directory
    c.data.tfds_data_dir = ""
    c.data.tfds_split = "train"
    c.data.tfds_eval_split = ""
    c.data.synthetic_records = 100_000  # synthetic_ocr: records per epoch
    c.data.ocr_max_words = 4  # synthetic_ocr: words per image (1..n)
    c.data.ocr_max_word_len = 8  # synthetic_ocr: characters per word (1..n)
    c.data.ocr_chars = "alnum"  # synthetic_ocr: the alphabet: alnum (62 symbols), digits, upper or lower
    c.data.ocr_min_side = 64  # synthetic_ocr: image sides in px (each in [min, max], aspect up to 4)
    c.data.ocr_max_side = 800
    c.data.ocr_font_min = 10  # synthetic_ocr: font size range in px
    c.data.ocr_font_max = 24
    c.data.ocr_photo_fraction = 0.3  # synthetic_ocr: share of images drawn on a photograph (else a gradient)
    # image processing (0 / unset: the model directory's preprocessor_config.json)
    c.data.slice_mode = True  # False: every image resized to one view (slice vs global ablation); True: the model's
    c.data.max_slice_nums = 0
    c.data.scale_resolution = 0
    c.data.random_views = -1  # random: views per row (-1: 0-2 at random)
    c.data.random_grid = 0  # random: every view S x S patches (0: small random grids); 32 = a 1344px image's views
    c.data.seq_len = 1024  # one sequence bucket: every batch has this length
    c.data.views_per_row = 10
    c.data.tokens_per_view = 1024
    c.data.overflow = "fewer_slices"  # a sample that does not fit: re-slice it ("fewer_slices") or count it bad
    c.data.pack = False  # several short samples per row (segment_ids; attention, DeltaNet conv and state reset)
    c.data.num_workers = 0  # grain worker processes
    c.data.max_bad_fraction = 0.01

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 0
    c.optimizer.end_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.clip_norm = 1.0
    c.optimizer.schedule = "cosine"  # cosine | linear | constant (after the warm-up)
    c.optimizer.frozen = ()  # regexes over parameter paths ("vision/.*"): no gradients, no optimizer state
    c.optimizer.lr_multipliers = ()  # ((regex, factor), ...): first match wins

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 8  # global rows per step (all hosts)
    c.train.grad_accum = 1  # micro-batches per step (same result as one big batch, less memory)
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.eval_every = 0  # 0: no evaluation
    c.train.eval_batches = 4
    c.train.peak_tflops = 0.0  # per device, for MFU; 0: from the device kind when known
    return c


def cuts_enabled(c: ml_collections.ConfigDict) -> bool:
    """Some visual cut is switched on in `model.cuts` (the model then needs the packer's text slots)."""
    k = c.model.cuts
    return bool(k.window or k.head_mask or k.drop_fraction or k.ffn_ratio > 1)


def minicpmv46_finetune_config(freeze: str, mode: str) -> ml_collections.ConfigDict:
    """What fine-tuning a converted MiniCPM-V 4.6 checkpoint on a JSONL conversation dataset needs whatever the
    recipe (configs/minicpmv46_sft.py, configs/yopo_finetune.py): the architecture from init.checkpoint, bf16 with
    remat "dots", 2048-token rows of up to 10 views, 8 grain workers, batch 32 over an fsdp mesh, and the freezing
    preset `freeze` (vision: ViT and mergers frozen, as ms-swift does; llm: the LLM frozen, as the official MiniCPM-V
    fine-tuning code does; none). The recipes set the optimizer and the step counts."""
    from uhd_jax.train.optimizer import FREEZE_LLM, FREEZE_VISION

    presets = {"vision": FREEZE_VISION, "llm": FREEZE_LLM, "none": ()}
    if freeze not in presets:
        raise ValueError(f"freeze must be one of {sorted(presets)}, got {freeze!r}")
    c = base_config()
    c.model.name = "dir"  # the architecture comes from init.checkpoint's config.json
    c.model.downsample_mode = mode
    c.model.dtype = "bfloat16"
    c.model.remat = "dots"

    c.data.source = "jsonl"
    c.data.seq_len = 2048
    c.data.views_per_row = 10  # thumbnail + up to 9 slices (max_slice_nums 9)
    c.data.tokens_per_view = 1152 if mode == "16x" else 1160  # every view of an image with aspect < 9:1
    c.data.num_workers = 8

    c.optimizer.frozen = presets[freeze]
    c.train.batch_size = 32
    c.mesh.fsdp = -1
    return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """`"k=v,k2=v2"` (the part after ':' in --config FILE:ARG) -> ConfigDict over `defaults`; values take the
    defaults' types; an unknown key is an error naming it."""
    out = ml_collections.ConfigDict(defaults)
    for part in filter(None, (arg or "").split(",")):
        if "=" not in part:
            raise ValueError(f"config argument {part!r} is not key=value (known keys: {sorted(defaults)})")
        k, v = part.split("=", 1)
        if k not in defaults:
            raise ValueError(f"unknown config argument {k!r} (known: {sorted(defaults)})")
        kind = type(defaults[k])
        out[k] = (v.lower() in ("1", "true", "yes")) if kind is bool else kind(v)
    return out


def check_config(c: ml_collections.ConfigDict) -> None:
    """Checks across fields; raises ValueError naming the key."""
    def need(cond, key, msg):
        if not cond:
            raise ValueError(f"config {key}: {msg}")

    need(c.model.name in MODEL_NAMES, "model.name", f"must be one of {MODEL_NAMES}, got {c.model.name!r}")
    need(c.model.name != "dir" or c.init.checkpoint, "init.checkpoint", "model.name='dir' needs a checkpoint directory")
    need(c.model.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {c.model.dtype!r}")
    need(c.data.source in DATA_SOURCES, "data.source", f"must be one of {DATA_SOURCES}, got {c.data.source!r}")
    need(c.data.source != "jsonl" or c.data.path, "data.path", "data.source='jsonl' needs a file")
    need(c.data.source != "tfds" or c.data.tfds_name, "data.tfds_name", "data.source='tfds' needs a dataset")
    need(c.data.max_slice_nums >= 0, "data.max_slice_nums", f"must be >= 0, got {c.data.max_slice_nums}")
    need(c.data.scale_resolution == 0 or c.data.scale_resolution >= 14, "data.scale_resolution",
         f"must be 0 (the model's) or >= 14 px, got {c.data.scale_resolution}")
    need(c.data.ocr_max_words >= 1 and c.data.ocr_max_word_len >= 1, "data.ocr_max_words",
         "ocr_max_words and ocr_max_word_len must be >= 1")
    from uhd_jax.data.synthetic_ocr import CHARSETS

    need(c.data.ocr_chars in CHARSETS, "data.ocr_chars", f"must be one of {sorted(CHARSETS)}, got {c.data.ocr_chars!r}")
    need(16 <= c.data.ocr_min_side <= c.data.ocr_max_side, "data.ocr_min_side",
         f"need 16 <= ocr_min_side <= ocr_max_side, got {c.data.ocr_min_side}, {c.data.ocr_max_side}")
    need(8 <= c.data.ocr_font_min <= c.data.ocr_font_max, "data.ocr_font_min",
         f"need 8 <= ocr_font_min <= ocr_font_max, got {c.data.ocr_font_min}, {c.data.ocr_font_max}")
    need(0.0 <= c.data.ocr_photo_fraction <= 1.0, "data.ocr_photo_fraction", "must be in [0, 1]")
    need(c.data.overflow in ("error", "fewer_slices"), "data.overflow", "must be 'error' or 'fewer_slices'")
    need(isinstance(c.data.pack, bool), "data.pack", f"must be True or False, got {c.data.pack!r}")
    need(not c.data.pack or c.data.source != "random", "data.pack",
         "packs processed samples (data.source synthetic_ocr, jsonl or tfds); the random source builds one "
         "sample per row")
    k = c.model.cuts
    need(k.window == 0 or (k.window > 0 and k.window % 2 == 1), "model.cuts.window",
         f"must be 0 (off) or an odd window side, got {k.window}")
    need(0.0 <= k.drop_fraction <= 1.0, "model.cuts.drop_fraction", f"must be in [0, 1], got {k.drop_fraction}")
    need(k.ffn_ratio >= 1, "model.cuts.ffn_ratio", f"must be >= 1 (1: off), got {k.ffn_ratio}")
    need(k.text_slot_multiple >= 1, "model.cuts.text_slot_multiple", f"must be >= 1, got {k.text_slot_multiple}")
    need(not cuts_enabled(c) or c.data.source != "random", "model.cuts",
         "the visual cuts need the packer's text slots: data.source synthetic_ocr, jsonl or tfds, not random")
    need(not k.head_mask or os.path.isfile(k.head_mask), "model.cuts.head_mask",
         f"no such file {k.head_mask!r} (write it with python -m uhd_jax.yopo calibrate)")
    need(c.train.steps >= 1, "train.steps", f"must be >= 1, got {c.train.steps}")
    need(c.train.batch_size >= 1, "train.batch_size", f"must be >= 1, got {c.train.batch_size}")
    for k in ("log_every", "checkpoint_every"):
        need(c.train[k] >= 1, f"train.{k}", f"must be >= 1, got {c.train[k]}")
    need(0.0 <= c.data.max_bad_fraction <= 1.0, "data.max_bad_fraction", "must be in [0, 1]")
