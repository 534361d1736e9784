"""`python3 -m uhd_jax.train --config configs/tiny.py[:arg] [--config.key=value ...] [--workdir DIR]`.

Trains (or resumes, when WORKDIR has checkpoints) the run the config describes; see uhd_jax/train/loop.py.
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file, optionally FILE:ARG", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: runs/<config name>)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/tiny.py")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    for noisy in ("absl", "jax", "orbax", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/uhd_jax/jax_compilation"))
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    from uhd_jax.train.loop import train

    config = _CONFIG.value
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = _WORKDIR.value or os.path.join("runs", name)
    print(config, flush=True)
    try:
        summary = train(config, workdir)
    except ValueError as e:
        if str(e).startswith("config "):
            raise app.UsageError(str(e)) from None
        raise
    if summary["first_loss"] is not None and summary["last_loss"] is not None:
        fell = summary["last_loss"] < summary["first_loss"]
        print(f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} ({'fell' if fell else 'did not fall'})")
    print(f"checkpoint: {summary['checkpoint']}\nmetrics: {os.path.join(workdir, 'metrics.jsonl')} "
          f"(TensorBoard: {os.path.join(workdir, 'tb')})")


def parse_flags(argv):
    """absl's parsing, with a config override that names an unknown key (ml_collections raises AttributeError or
    KeyError from inside the flag) turned into a usage error instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"usage error: {e}\nPass --helpshort to see the flags.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        msg = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\\'", "").strip("'\"")
        sys.exit(f"usage error in the config overrides: {msg}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
