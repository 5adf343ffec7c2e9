"""Our DINOv3 must reproduce the official implementation's outputs for the same weights
(fixtures made with facebookresearch/dinov3; their "about" string says how)."""

import pytest
import torch

from seg.backbone import DinoV3VisionTransformer
from conftest import DATA_DIR


@pytest.mark.parametrize("fixture", ["dinov3_tiny_golden.pt", "dinov3_tiny_swiglu_golden.pt"])
def test_reproduces_reference_outputs(fixture):
    gold = torch.load(DATA_DIR / fixture, weights_only=True)
    model = DinoV3VisionTransformer(**gold["config"])
    model.load_state_dict(gold["state_dict"], strict=True)
    model.eval()
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
    gold = torch.load(DATA_DIR / "dinov3_tiny_golden.pt", weights_only=True)
    model = DinoV3VisionTransformer(**gold["config"])
    model.load_state_dict(gold["state_dict"], strict=True)
    d = gold["config"]["embed_dim"]
    assert model.blocks[0].attn.qkv.bias[d:2 * d].abs().sum() > 0  # stored, nonzero ...
    assert model.blocks[0].attn.qkv.bias_mask[d:2 * d].sum() == 0  # ... and never used
    with pytest.raises(ValueError, match="multiples of 16"):
        model.forward_features(torch.zeros(1, 3, 56, 100))
