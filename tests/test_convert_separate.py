"""A LLaVA-UHD v4 model from a separate SigLIP / SigLIP2 ViT and a Qwen3 / Qwen3.5 LLM (tiny random ones)."""

import json
import os

import jax
import numpy as np
import pytest
import torch

from tests.convert_ref import randomize, rel
from uhd_jax.config import tiny_config
from uhd_jax.convert.checkpoint import load_checkpoint
from uhd_jax.convert.errors import ConversionError
from uhd_jax.convert.from_separate import build_from_separate, from_separate, resize_matrix
from uhd_jax.convert.jax_to_hf import jax_to_hf
from uhd_jax.model.vision import WindowMerger

TEXT = tiny_config().text.replace(vocab_size=520)  # not a multiple of 128: our parameters pad it to 640
VIT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, patch_size=14)


def siglip(path, seed=0, full=False):
    """SigLIP vision tower (transformers 5 saves it without a prefix) or a full SigLIP (vision_model.* + text)."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    if full:
        text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
                    bos_token_id=None, eos_token_id=None, pad_token_id=None)
        model = SiglipModel(SiglipConfig(vision_config=dict(VIT, image_size=224), text_config=text))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**VIT, image_size=224))
    randomize(model, seed).save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, f)
    return model.eval()


def qwen(path, kind="qwen3_5_text", seed=1, tied=True):
    if kind == "qwen3_5_text":
        from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**dict(TEXT.to_hf_dict(), tie_word_embeddings=tied)))
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        t = tiny_config(text_model="qwen3").text.replace(vocab_size=TEXT.vocab_size)
        model = Qwen3ForCausalLM(Qwen3Config(**dict(t.to_hf_dict(), tie_word_embeddings=tied)))
    randomize(model, seed).save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("separate")
    vit, llm = str(root / "siglip"), str(root / "qwen35")
    return siglip(vit), vit, qwen(llm), llm


def _sd(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_combined_model(sources, tmp_path):
    vit_model, vit, llm_model, llm = sources
    out = str(tmp_path / "ckpt")
    report = from_separate(vit, llm, out, insert_layer_id=1)
    assert report.merger_init_layer == 1 and "16x16 table resized to 70x70 (bicubic" in report.positions
    assert len(report.dropped) == 11 and all(d.startswith("vision: head.") for d in report.dropped)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "params", "preprocessor_config.json"]
    _, params = load_checkpoint(out)
    embed = llm_model.model.embed_tokens.weight.detach().numpy()
    assert np.array_equal(params["text"]["embed_tokens"], np.pad(embed, ((0, 120), (0, 0))))  # zero vocab padding

    # our export of it is a MiniCPM-V 4.6 that transformers loads; ViT and LLM tensors are the sources', bit for bit
    from transformers import MiniCPMV4_6ForConditionalGeneration

    hf = str(tmp_path / "hf")
    jax_to_hf(out, hf)
    model = MiniCPMV4_6ForConditionalGeneration.from_pretrained(hf, dtype=torch.float32)
    got = _sd(model)
    for k, v in _sd(vit_model).items():
        if k.startswith(("encoder.", "post_layernorm.", "embeddings.patch_embedding.")):
            assert np.array_equal(got["model.vision_tower." + k], v), k
    for k, v in _sd(llm_model).items():
        name = "model.language_model." + k[len("model."):] if k.startswith("model.") else k
        assert np.array_equal(got[name], v), k

    # the position table: the source's own bicubic resampling (torch.nn.functional.interpolate)
    table = vit_model.embeddings.position_embedding.weight.detach().reshape(1, 16, 16, 64).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(table.double(), size=(70, 70), mode="bicubic", align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(4900, 64).float().numpy()
    assert rel(got["model.vision_tower.embeddings.position_embedding.weight"], want) < 1e-6

    # window merger from layer 1 (see test_merger_init_is_layer_k_on_equal_windows for what that gives)
    w = lambda n: got[f"model.vision_tower.{n}"]
    fc1, fc2 = w("encoder.layers.1.mlp.fc1.weight"), w("encoder.layers.1.mlp.fc2.weight")
    assert np.array_equal(w("vit_merger.linear_1.weight")[96:192, 64:128], fc1)
    assert not w("vit_merger.linear_1.weight")[:96, 64:].any()
    assert np.array_equal(w("vit_merger.linear_2.weight")[:, 288:], fc2 / 4)
    assert np.array_equal(w("vit_merger.pre_norm.bias")[192:], w("encoder.layers.1.layer_norm2.bias"))
    assert np.array_equal(w("vit_merger.self_attn.q_proj.weight"), w("encoder.layers.1.self_attn.q_proj.weight"))


def test_merger_init_is_layer_k_on_equal_windows(sources):
    """What the paper's initialisation preserves, exactly.

    Let layer k be `x' = x + Attn(LN1 x)`, `y = x' + FC2(gelu(FC1(LN2 x')))`. The window merger computes, for a
    2x2 window of tokens x_1..x_4: `x'_i = x_i + Attn_window(LN1 x_i)` (attention among the 4 only), then
    `out = mean_i x'_i + L2(gelu(L1(PreNorm([x'_1; x'_2; x'_3; x'_4]))))`; it has no residual of its own around
    the MLP: the window mean takes that place. Initialised from layer k (Attn, LN1 copied; PreNorm = LN2 tiled
    4x; L1 = blockdiag(FC1 x4); L2 = [FC2 x4] / 4), a window whose 4 tokens all equal x gives:
    Attn_window over 4 identical keys/values = layer k's attention of x to itself, so all x'_i = x'; the mean is
    x'; PreNorm of 4 copies of x' has the mean and variance of x', so it is 4 copies of LN2 x'; L1 then gives 4
    copies of FC1(LN2 x'), and L2 sums 4 copies of FC2(.) / 4 = FC2(.), bias once. Hence out = y: the merged
    token equals layer k's output for x when layer k attends only within the window (the source SigLIP layer
    run on each window as a 4-token sequence). With unequal tokens it is NOT the mean of layer k's outputs:
    the mean replaces each token's own residual and PreNorm pools statistics over the 4 tokens.
    """
    vit_model, vit, _, llm = sources
    loaded, _, _ = build_from_separate(vit, llm, insert_layer_id=1, merger_init_layer=2)
    cfg = loaded.config
    merger = loaded.params["vision"]["vision_tower"]["vit_merger"]
    layer = vit_model.encoder.layers[2]
    rng = np.random.default_rng(0)
    windows = 24
    tokens = rng.standard_normal((windows, 1, 64)).astype(np.float32)
    equal = np.repeat(tokens, 4, axis=1)  # [windows, 4, D], the 4 tokens of each window equal
    apply = jax.jit(lambda x: WindowMerger(cfg.vision).apply({"params": merger}, x))
    with torch.no_grad():
        ref = layer(torch.from_numpy(equal), None)[:, 0].numpy()  # layer k, attention within each window
    got = np.asarray(apply(equal.reshape(1, windows * 4, 64)))[0]
    assert rel(got, ref) < 1e-5, rel(got, ref)

    unequal = rng.standard_normal((windows, 4, 64)).astype(np.float32)
    with torch.no_grad():
        mean_of_outputs = layer(torch.from_numpy(unequal), None).mean(1).numpy()
    assert rel(np.asarray(apply(unequal.reshape(1, windows * 4, 64)))[0], mean_of_outputs) > 1e-3


def test_full_siglip_and_untied_qwen3(tmp_path):
    """A full SigLIP (vision_model.* + text tower, dropped) and an untied dense Qwen3 (lm_head kept)."""
    vit, llm = str(tmp_path / "siglip"), str(tmp_path / "qwen3")
    siglip(vit, full=True)
    llm_model = qwen(llm, kind="qwen3", tied=False)
    loaded, report, hf_config = build_from_separate(vit, llm, insert_layer_id=2, merger_times=1)
    assert hf_config["text_config"]["model_type"] == "qwen3" and hf_config["tie_word_embeddings"] is False
    assert {d.split(".")[0] for d in report.dropped} == {"vision: vision_model", "vision: text_model",
                                                       "vision: logit_scale", "vision: logit_bias"}
    head = loaded.params["text"]["lm_head"]["kernel"]
    assert np.array_equal(head, np.pad(llm_model.lm_head.weight.detach().numpy().T, ((0, 0), (0, 120))))

    # exported, transformers runs it as MiniCPM-V 4.6 over a Qwen3: text-only logits are the LLM's own
    from transformers import MiniCPMV4_6ForConditionalGeneration

    from_separate(vit, llm, str(tmp_path / "ckpt"), insert_layer_id=2)
    jax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    model = MiniCPMV4_6ForConditionalGeneration.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    ids = torch.randint(0, TEXT.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, llm_model(input_ids=ids).logits)


def test_siglip2_naflex(tmp_path):
    """naflex SigLIP2: Linear patch embedding over (row, column, channel) patches and a 4x4 position grid."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    vit, llm = str(tmp_path / "siglip2"), str(tmp_path / "qwen")
    model = randomize(Siglip2VisionModel(Siglip2VisionConfig(**VIT, num_patches=16)), 4).eval()
    model.save_pretrained(vit)
    qwen(llm)
    loaded, report, _ = build_from_separate(vit, llm, insert_layer_id=1)
    assert "4x4 table resized to 70x70 (bilinear with antialias" in report.positions
    tower = loaded.params["vision"]["vision_tower"]
    # same patch embedding on the same pixels, each side flattening the patch its own way
    rng = np.random.default_rng(0)
    patch = rng.standard_normal((5, 3, 14, 14)).astype(np.float32)
    ours = patch.reshape(5, -1) @ tower["patch_embedding"]["kernel"] + tower["patch_embedding"]["bias"]
    with torch.no_grad():
        theirs = model.embeddings.patch_embedding(torch.from_numpy(patch.transpose(0, 2, 3, 1).reshape(5, -1)))
    assert rel(ours, theirs.numpy()) < 1e-6
    table = model.embeddings.position_embedding.weight.detach().reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(table, size=(70, 70), mode="bilinear", align_corners=False,
                                           antialias=True).permute(0, 2, 3, 1).reshape(4900, 64).numpy()
    assert rel(tower["position_embedding"], want) < 1e-6


@pytest.mark.parametrize("n_in,n_out", [(16, 70), (27, 70), (70, 70), (5, 3)])
@pytest.mark.parametrize("mode", ["bicubic", "bilinear_aa"])
def test_resize_matrix_matches_torch(n_in, n_out, mode):
    x = torch.randn(1, 1, 1, n_in, dtype=torch.float64)
    kw = dict(mode="bicubic") if mode == "bicubic" else dict(mode="bilinear", antialias=True)
    if mode == "bicubic" and n_in > n_out:
        kw = dict(mode="bicubic")  # plain bicubic (no antialias) for SigLIP whatever the direction
    want = torch.nn.functional.interpolate(x, size=(1, n_out), align_corners=False, **kw)[0, 0, 0].numpy()
    assert np.allclose(resize_matrix(n_in, n_out, mode) @ x[0, 0, 0].numpy(), want, atol=1e-12)


def test_bad_sources(sources, tmp_path):
    _, vit, _, llm = sources
    import shutil

    from tests.convert_ref import rewrite

    odd = rewrite(llm, str(tmp_path / "odd"), lambda t: {**t, "model.extra_adapter.weight": np.ones(3, np.float32)})
    with pytest.raises(ConversionError, match=r"unused tensor `model.language_model.extra_adapter.weight` \(from "
                                              r"`llm: model.extra_adapter.weight`\)"):
        build_from_separate(vit, odd, insert_layer_id=1)
    loaded, _, _ = build_from_separate(vit, odd, insert_layer_id=1, skip_unused=True)
    assert loaded.unused == ["model.language_model.extra_adapter.weight"]

    not_vit = str(tmp_path / "notvit")
    shutil.copytree(llm, not_vit)
    with pytest.raises(ConversionError) as e:
        build_from_separate(not_vit, llm, insert_layer_id=1, merger_init_layer=9)
    assert "is not a SigLIP or SigLIP2 vision model" in str(e.value)
    with pytest.raises(ConversionError, match="merger_init_layer 9 is not a layer of the 4-layer ViT"):
        build_from_separate(vit, llm, insert_layer_id=1, merger_init_layer=9)
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError):
        from_separate(vit, odd, out, insert_layer_id=1)
    assert not os.path.exists(out)
