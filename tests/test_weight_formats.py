"""Issue 15: weights in transformers' layouts load into our ViT, checked against transformers' own
models (an oracle independent of our conversion): tiny random Dinov2Model / Dinov2WithRegistersModel
of the vits14 shape, saved by transformers, loaded through load_backbone, same tokens at 518x518."""

import pytest
import torch
import transformers  # a test dependency (setup.cfg [test]): the oracle must run, never be skipped

from seg.backbones import load_backbone
from seg.runtime.errors import SegError


def hf_model(registers: bool, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                  image_size=518, patch_size=14, layerscale_value=1.0)
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **common)
        model = transformers.Dinov2WithRegistersModel(cfg)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    with torch.no_grad():  # LayerScale and tokens away from their trivial inits, so a wrong mapping shows
        for name, p in model.named_parameters():
            if "lambda1" in name or "token" in name or "position" in name or "layernorm" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.mark.parametrize("registers,how", [(False, "folder"), (False, "bin"), (True, "safetensors"),
                                           (True, "prefixed")])
def test_transformers_weights_give_transformers_tokens(tmp_path, registers, how):
    model = hf_model(registers)
    name = "vits14_reg" if registers else "vits14"
    if how in ("folder", "safetensors"):
        model.save_pretrained(tmp_path / "snap")
        weights = tmp_path / "snap" if how == "folder" else tmp_path / "snap" / "model.safetensors"
    elif how == "bin":
        weights = tmp_path / "pytorch_model.bin"
        torch.save(model.state_dict(), weights)
    else:  # as a checkpoint of a larger model that holds the backbone under "dinov2_with_registers."
        weights = tmp_path / "prefixed.bin"
        torch.save({f"dinov2_with_registers.{k}": v for k, v in model.state_dict().items()}, weights)
    ours, info = load_backbone(name, weights=str(weights))
    assert info.weights_format == "transformers"
    x = torch.randn(2, 3, 518, 518, generator=torch.Generator().manual_seed(1))  # the native 37x37 grid
    with torch.no_grad():
        theirs = model(pixel_values=x).last_hidden_state
        mine = ours.forward_features(x)
    r = 4 if registers else 0
    assert (mine["x_norm_patchtokens"] - theirs[:, 1 + r:]).abs().max().item() < 1e-5
    assert (mine["x_norm_clstoken"] - theirs[:, 0]).abs().max().item() < 1e-5


def test_a_mismatched_architecture_is_one_line(tmp_path):
    model = hf_model(False)
    torch.save(model.state_dict(), tmp_path / "w.bin")
    with pytest.raises(SegError, match=r"w\.bin: not a vitb14_reg checkpoint \(transformers layout, embed dim 384, "
                                       r"depth 12, 0 registers; vitb14_reg has embed dim 768, depth 12, 4 registers\)"):
        load_backbone("vitb14_reg", weights=str(tmp_path / "w.bin"))


def test_official_and_timm_layouts(tmp_path):
    ref, _ = load_backbone("vits14_reg", random_init=True, seed=3)
    with torch.no_grad():
        ref.cls_token.normal_()
        ref.pos_embed.normal_()
        ref.register_tokens.normal_()
    official = {k: v.clone() for k, v in ref.state_dict().items()}
    torch.save(official, tmp_path / "official.pth")
    # timm's reg4 layout: class token + its position, position embedding without the class slot, reg_token
    timm_state = {k: v for k, v in official.items() if k not in ("mask_token", "register_tokens", "pos_embed",
                                                                 "cls_token")}
    timm_state["cls_token"] = official["cls_token"] + official["pos_embed"][:, :1]
    timm_state["pos_embed"] = official["pos_embed"][:, 1:]
    timm_state["reg_token"] = official["register_tokens"]
    from safetensors.torch import save_file

    save_file(timm_state, str(tmp_path / "timm.safetensors"))
    x = torch.randn(1, 3, 224, 154)  # interpolated position embeddings: the class slot must not matter
    outs = {}
    for f in ("official.pth", "timm.safetensors"):
        model, info = load_backbone("vits14_reg", weights=str(tmp_path / f))
        assert info.weights_format == f.split(".")[0]
        with torch.no_grad():
            outs[f] = model.forward_features(x)["x_norm_patchtokens"]
    assert (outs["official.pth"] - outs["timm.safetensors"]).abs().max().item() < 1e-5
    ref_out = ref.forward_features(x)["x_norm_patchtokens"]
    assert torch.equal(outs["official.pth"], ref_out)


@pytest.mark.parametrize("arch,name,save", [("vit_small_patch14_dinov2", "vits14", "pth"),
                                            ("vit_small_patch14_reg4_dinov2", "vits14_reg", "safetensors")])
def test_timm_weights_give_timm_tokens(tmp_path, arch, name, save):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, img_size=518).eval()
    with torch.no_grad():  # tokens and LayerScale away from their trivial inits
        for pname, p in model.named_parameters():
            if "token" in pname or "pos_embed" in pname or "gamma" in pname:
                p.add_(torch.randn_like(p) * 0.2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    weights = tmp_path / f"timm.{save}"
    save_file(state, str(weights)) if save == "safetensors" else torch.save(state, weights)
    ours, info = load_backbone(name, weights=str(weights))
    assert info.weights_format == "timm"
    x = torch.randn(2, 3, 518, 518, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = model.forward_features(x)
        mine = ours.forward_features(x)
    r = 4 if "reg" in name else 0
    assert (mine["x_norm_patchtokens"] - theirs[:, 1 + r:]).abs().max().item() < 1e-5
    assert (mine["x_norm_clstoken"] - theirs[:, 0]).abs().max().item() < 1e-5
