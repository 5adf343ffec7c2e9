"""Our DINOv3 must reproduce the official implementation's outputs for the same weights
(fixtures made with facebookresearch/dinov3; their "about" string says how)."""

import pytest
import torch

from seg.backbones import DinoV3VisionTransformer
from conftest import golden_model


@pytest.mark.parametrize("fixture", ["dinov3_tiny_golden.pt", "dinov3_tiny_swiglu_golden.pt"])
def test_reproduces_reference_outputs(fixture):
    model, gold = golden_model(DinoV3VisionTransformer, fixture)
    x, ref = gold["input"], gold["outputs"]
    depth = gold["config"]["depth"]
    h, w = x.shape[2] // 16, x.shape[3] // 16
    with torch.no_grad():
        ff = model.forward_features(x)
        il_a = model.get_intermediate_layers(x, n=depth, reshape=True, return_class_token=True,
                                             return_extra_tokens=True, norm=True)
        il_b = model.get_intermediate_layers(x, n=[0, depth - 1], reshape=True, norm=False)
        il_c = model.get_intermediate_layers(x, n=[0, depth - 1], reshape=True, return_class_token=True,
                                             return_extra_tokens=True, norm=False)
        il_d = model.get_intermediate_layers(x, n=2, reshape=False, norm=True)
        sin, cos = model.rope_embed(h, w)
    ours = {
        "x_norm_clstoken": ff["x_norm_clstoken"],
        "x_storage_tokens": ff["x_storage_tokens"],
        "x_norm_patchtokens": ff["x_norm_patchtokens"],
        "x_prenorm": ff["x_prenorm"],
        "intermediate_all_normed_patch": torch.stack([t[0] for t in il_a]),
        "intermediate_all_normed_cls": torch.stack([t[1] for t in il_a]),
        "intermediate_all_normed_storage": torch.stack([t[2] for t in il_a]),
        "intermediate_first_last_unnormed": torch.stack(il_b),
        "intermediate_first_last_unnormed_cls": torch.stack([t[1] for t in il_c]),
        "intermediate_first_last_unnormed_storage": torch.stack([t[2] for t in il_c]),
        "intermediate_last2_normed_flat": torch.stack(il_d),
        "rope_sin": sin,
        "rope_cos": cos,
    }
    assert set(ref) == set(ours)
    for key, expected in ref.items():
        got = ours[key]
        assert got.dtype == torch.float32 and got.shape == expected.shape, key
        assert (got - expected).abs().max().item() < 1e-5, key
    assert torch.equal(torch.stack([t[0] for t in il_c]), torch.stack(il_b))


def test_the_key_bias_is_masked():
    model, gold = golden_model(DinoV3VisionTransformer, "dinov3_tiny_golden.pt")
    d = gold["config"]["embed_dim"]
    assert model.blocks[0].attn.qkv.bias[d:2 * d].abs().sum() > 0  # stored, nonzero ...
    assert model.blocks[0].attn.qkv.bias_mask[d:2 * d].sum() == 0  # ... and never used
    with pytest.raises(ValueError, match="multiples of 16"):
        model.forward_features(torch.zeros(1, 3, 56, 100))


def test_dinov3_through_the_pipeline(dataset, tmp_path):
    import json

    import numpy as np
    from click.testing import CliRunner

    from seg.cli import main

    def run(*args):
        return CliRunner().invoke(main, [str(a) for a in args])

    base = ["extract", "--data", dataset, "--backbone", "dinov3_vits16", "--workers", "0", "--batch-size", "2",
            "--splits", "train,val"]
    r = run(*base, "--out", tmp_path / "x", "--size", "224x126", "--random-init")
    assert r.exit_code == 1 and "--size 224x126: both sides must be positive multiples of 16" in r.output
    r = run(*base, "--out", tmp_path / "y", "--size", "224x128")
    assert r.exit_code == 1 and "DINOv3 weights are gated by Meta's license" in r.output and "--weights" in r.output
    r = run(*base, "--out", tmp_path / "c", "--size", "224x128", "--random-init")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert (m["backbone"], m["patch_size"], m["patch_grid"], m["token_shape"], m["compute_dtype"]) == (
        "dinov3_vits16", 16, {"width": 14, "height": 8}, [1, 384, 8, 14], "bfloat16")
    r = run("train-head", "--cache", tmp_path / "c", "--out", tmp_path / "r", "--phase", "3", "--epochs", "1",
            "--allow-mismatch", "--device", "cpu")
    assert r.exit_code == 0, r.output
    for mode in ("cache", "data"):
        src = tmp_path / "c" if mode == "cache" else dataset
        r = run("eval", "--run", tmp_path / "r", f"--{mode}", src, "--split", "val", "--workers", "0",
                "--out", tmp_path / f"e-{mode}")
        assert r.exit_code == 0, r.output
    a, b = (json.loads((tmp_path / f"e-{m_}" / "eval.json").read_text()) for m_ in ("cache", "data"))
    cm_a, cm_b = np.array(a["confusion_matrix"]), np.array(b["confusion_matrix"])
    assert cm_a.sum() == cm_b.sum() and np.abs(cm_a - cm_b).sum() / 2 <= 0.001 * cm_a.sum()
