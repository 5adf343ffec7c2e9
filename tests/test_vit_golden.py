"""Our ViT must reproduce the reference DINOv2 implementation's outputs for the same weights."""

import pytest
import torch

from seg.backbones.dinov2 import DinoVisionTransformer
from conftest import DATA_DIR, golden_model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("fixture", ["dinov2_tiny_golden.pt", "dinov2_tiny_reg4_golden.pt"])
def test_reproduces_reference_outputs(fixture):
    model, gold = golden_model(DinoVisionTransformer, fixture)
    x, ref = gold["input"], gold["outputs"]
    depth = gold["config"]["depth"]
    with torch.no_grad():
        ff = model.forward_features(x)
        normed = model.get_intermediate_layers(x, n=depth, reshape=True, return_class_token=True, norm=True)
        first_last = model.get_intermediate_layers(x, n=[0, depth - 1], reshape=True, norm=False)
    ours = {
        "x_norm_patchtokens": ff["x_norm_patchtokens"],
        "x_norm_clstoken": ff["x_norm_clstoken"],
        "x_norm_regtokens": ff["x_norm_regtokens"],
        "x_prenorm": ff["x_prenorm"],
        "intermediate_all_normed_patch": torch.stack([p for p, _ in normed]),
        "intermediate_all_normed_cls": torch.stack([c for _, c in normed]),
        "intermediate_first_last_unnormed": torch.stack(first_last),
    }
    assert set(ref) == set(ours)
    for key, expected in ref.items():
        got = ours[key]
        assert got.dtype == torch.float32 and got.shape == expected.shape, key
        if expected.numel():
            assert rel_err(got, expected) < 1e-5, key
    # the fixture's input is not 518x518, so position embeddings were really interpolated
    assert x.shape[-1] != 518


def test_non_multiple_of_patch_is_rejected():
    gold = torch.load(DATA_DIR / "dinov2_tiny_golden.pt", weights_only=True)
    model = DinoVisionTransformer(**gold["config"]).eval()
    with pytest.raises(ValueError, match="multiples of 14"):
        model.forward_features(torch.zeros(1, 3, 56, 100))
