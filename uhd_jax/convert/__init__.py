"""Checkpoint conversion between Hugging Face MiniCPM-V 4.6 directories and our parameter trees.

    load_hf(hf_dir) -> (ModelConfig, params)          HF dir straight into numpy params
    hf_to_jax(hf_dir, out_dir)                        HF dir -> our checkpoint dir (Orbax params + configs)
    load_checkpoint(ckpt_dir) -> (ModelConfig, params)
    jax_to_hf(ckpt_dir, out_dir) / save_hf(cfg, params, out_dir)
    from_separate(vision_dir, llm_dir, out_dir)       SigLIP(2) + Qwen3(.5) -> new LLaVA-UHD v4
Command line: `python -m uhd_jax.convert {hf-to-jax,jax-to-hf,from-separate} ...`. The mapping is one table
(`mapping.RULES`).
"""

from uhd_jax.convert.checkpoint import load_checkpoint
from uhd_jax.convert.errors import ConversionError
from uhd_jax.convert.from_separate import from_separate
from uhd_jax.convert.hf_to_jax import convert_state_dict, hf_to_jax, load_hf
from uhd_jax.convert.jax_to_hf import jax_to_hf, save_hf

__all__ = ["ConversionError", "convert_state_dict", "from_separate", "hf_to_jax", "jax_to_hf", "load_checkpoint",
           "load_hf", "save_hf"]
