import pytest
import torch

from seg.backbones import named as bb
from seg.runtime.errors import SegError


def test_named_architectures_match_reference_sizes():
    expect = {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16), "vitg14": (1536, 40, 24)}
    for name, (dim, depth, heads) in expect.items():
        kw = bb.backbone_kwargs(name)
        assert (kw["embed_dim"], kw["depth"], kw["num_heads"]) == (dim, depth, heads)
        reg = bb.backbone_kwargs(name + "_reg")
        assert reg["num_register_tokens"] == 4 and reg["interpolate_antialias"] and reg["interpolate_offset"] == 0.0
        assert kw["num_register_tokens"] == 0 and not kw["interpolate_antialias"] and kw["interpolate_offset"] == 0.1
    assert bb.backbone_kwargs("vitg14")["ffn_layer"] == "swiglufused"
    assert bb.weights_url("vitb14_reg") == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"
    assert bb.weights_url("vits14") == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"


def test_vitg_state_dict_uses_swiglu_names():
    with torch.device("meta"):  # 1.1 B parameters: names and shapes only
        model = bb.build_backbone("vitg14")
    keys = model.state_dict().keys()
    assert model.blocks[0].mlp.w12.weight.shape == (2 * 4096, 1536)
    assert "blocks.0.mlp.w12.weight" in keys and "blocks.0.mlp.w3.weight" in keys
    assert not any("fc1" in k for k in keys)


def test_vits_reg_state_dict_keys_are_official():
    keys = set(bb.build_backbone("vits14_reg").state_dict())
    for k in ["cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed.proj.weight",
              "blocks.11.ls2.gamma", "blocks.0.attn.qkv.bias", "norm.bias"]:
        assert k in keys
    assert bb.build_backbone("vits14_reg").pos_embed.shape == (1, 1370, 384)


def test_random_init_is_deterministic_and_seeded():
    _, a = bb.load_backbone("vits14", random_init=True, seed=3)
    _, b = bb.load_backbone("vits14", random_init=True, seed=3)
    _, c = bb.load_backbone("vits14", random_init=True, seed=4)
    assert a.state_fingerprint == b.state_fingerprint != c.state_fingerprint
    assert a.weights_sha256 == "random-init" and a.random_init_seed == 3


def test_local_weights_file_round_trip(tmp_path):
    model, info = bb.load_backbone("vits14", random_init=True, seed=1)
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    loaded, linfo = bb.load_backbone("vits14", weights=str(path))
    assert linfo.state_fingerprint == info.state_fingerprint
    assert linfo.weights_sha256 == bb.file_sha256(path) and len(linfo.weights_sha256) == 64
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_weights_for_another_backbone_are_refused(tmp_path):
    model, _ = bb.load_backbone("vits14", random_init=True)
    path = tmp_path / "small.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(SegError, match=r"small\.pth: not a vitb14 checkpoint"):
        bb.load_backbone("vitb14", weights=str(path))
    with pytest.raises(SegError, match="weights file not found"):
        bb.load_backbone("vits14", weights=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SegError, match="junk.pth: not a readable PyTorch checkpoint"):
        bb.load_backbone("vits14", weights=str(tmp_path / "junk.pth"))


def test_offline_download_failure_says_how_to_supply_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(SegError) as err:
        bb.load_backbone("vits14_reg")
    msg = str(err.value)
    assert "dinov2_vits14_reg4_pretrain.pth" in msg and str(tmp_path) in msg and "--weights" in msg
    assert "\n" not in msg


def test_hub_cache_file_is_used_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model, info = bb.load_backbone("vits14", random_init=True, seed=2)
    target = bb.hub_checkpoint_path("vits14")
    target.parent.mkdir(parents=True)
    torch.save(model.state_dict(), target)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("downloaded"))
    _, linfo = bb.load_backbone("vits14")
    assert linfo.state_fingerprint == info.state_fingerprint
    assert linfo.weights_source == bb.weights_url("vits14")


def test_unknown_backbone_name():
    with pytest.raises(SegError, match="unknown backbone 'vitx14'"):
        bb.load_backbone("vitx14", random_init=True)
