"""`seg train-head --head pmt`: PMT's recipe as published (schedule, annealing, clipping), checked
against the official code restated from tue-mps/pmt; the cache -> levels -> decoder path equal from
cache and from images; refusals; resume; starting from a published checkpoint."""

import json
import math

import pytest
import torch

from seg.heads import PMTHead, build_head
from seg.heads.pmt.annealing import mask_probabilities
from seg.runtime.errors import SegError
from seg.train.cache_checks import check_pmt_cache
from seg.train.init_from_pmt import init_head_from_pmt
from seg.train.presets import resolve

# -- the official pieces, restated from tue-mps/pmt (image/training/) ---------------------------


def official_mask_annealing(start_iter, current_iter, final_iter, poly_power=0.9):
    """lightning_module.py, LightningModule.mask_annealing."""
    if current_iter < start_iter:
        return torch.ones(1)
    elif current_iter >= final_iter:
        return torch.zeros(1)
    progress = torch.tensor((current_iter - start_iter) / (final_iter - start_iter))
    return (1.0 - progress).pow(poly_power)


def official_lr(base_lr, step, warmup_steps, total_steps, min_lr=1e-9):
    """warmup_cosine_schedule.py, WarmupCosineSchedule.get_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step / warmup_steps)
    adjusted = max(0, step - warmup_steps)
    max_steps = max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * adjusted / max_steps))


STARTS = [0, 5384, 7403, 9422, 11442, 13461]   # pmt_l_512.yaml
ENDS = [3000, 8749, 10769, 12788, 14807, 16826]


def test_the_recipe_is_pmts_published_one():
    cfg = resolve(3, {"head": "pmt"})
    assert (cfg.loss, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.schedule, cfg.eta_min) == \
        ("mask_classification", "adamw", 2e-4, 0.05, "step_warmup_cosine", 1e-9)
    assert round(cfg.warmup_fraction * 20224) == 6000 and (cfg.batch_size, cfg.accum, cfg.epochs) == (16, 1, 16)
    assert (cfg.grad_clip, cfg.queries, cfg.decoder_blocks, cfg.masked_attention, cfg.mask_points) == \
        (0.01, 100, 6, True, 12544)
    assert (cfg.patience, cfg.select, cfg.amp) == (None, "final", True)
    # every field overrides; another schedule drops the per-step warmup share
    assert resolve(3, {"head": "pmt", "lr": 1e-4, "queries": 50}).queries == 50
    assert resolve(3, {"head": "pmt", "schedule": "cosine"}).warmup_fraction is None


def test_annealing_is_pmts_at_the_published_length_and_scaled():
    for step in list(range(0, 20224, 37)) + [2999, 3000, 5384, 8748, 8749, 16826]:
        ours = mask_probabilities(6, step, 20224)
        theirs = [official_mask_annealing(s, step, e).item() for s, e in zip(STARTS, ENDS)]
        assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-7), step
    assert mask_probabilities(6, 1500, 20224)[:2] == pytest.approx([0.5 ** 0.9, 1.0])
    # a run of a tenth of the steps anneals over the same shares: block 0 ends at step 300
    assert mask_probabilities(6, 150, 2022.4)[0] == pytest.approx(0.5 ** 0.9)
    assert mask_probabilities(6, 300, 2022.4) == pytest.approx([0, 1, 1, 1, 1, 1])
    # two blocks take the first and last published windows
    assert mask_probabilities(2, 13461 + (16826 - 13461) // 2, 20224)[1] == pytest.approx(
        official_mask_annealing(13461, 13461 + (16826 - 13461) // 2, 16826).item(), rel=1e-6)


def test_step_schedule_is_pmts_warmup_cosine():
    cfg = resolve(3, {"head": "pmt"})
    for step in list(range(0, 20224, 53)) + [5999, 6000, 6001, 20223, 20224]:
        assert cfg.lr * cfg.step_lr_factor(step, 20224) == pytest.approx(official_lr(2e-4, step, 6000, 20224),
                                                                          rel=1e-9, abs=1e-15), step


def test_pmt_settings_are_refused_elsewhere_in_one_line():
    with pytest.raises(SegError, match="--queries applies to the pmt head, not upernet"):
        resolve(3, {"queries": 10})
    with pytest.raises(SegError, match="the pmt head trains with --loss mask_classification"):
        resolve(3, {"head": "pmt", "loss": "focal_dice"})
    with pytest.raises(SegError, match="only it does"):
        resolve(3, {"loss": "mask_classification"})
    with pytest.raises(SegError, match="--warmup-fraction goes with --schedule step_warmup_cosine"):
        resolve(3, {"warmup_fraction": 0.1})
    with pytest.raises(SegError, match="--decoder-blocks must be at least 1"):
        resolve(3, {"head": "pmt", "decoder_blocks": 0})
    with pytest.raises(SegError, match="--grad-clip must be a finite number > 0"):
        resolve(3, {"grad_clip": -1.0})
    # the optional round-four settings share the presets' range check when they are on
    with pytest.raises(SegError, match=r"--warmup-fraction must be a finite number >= 0 and < 1, got 1\.0"):
        resolve(3, {"head": "pmt", "warmup_fraction": 1.0})
    with pytest.raises(SegError, match=r"--target-ratio must be a finite number > 0 and < 1, got 1\.0"):
        resolve(3, {"target_ratio": 1.0})
    with pytest.raises(SegError, match=r"--target-weight must be a finite number >= 0, got -1\.0"):
        resolve(3, {"target_weight": -1.0})
    with pytest.raises(SegError, match=r"--backbone-lr must be a finite number > 0, got nan"):
        resolve(3, {"backbone_lr": float("nan"), "tune_blocks": 1})
    assert resolve(3, {"head": "pmt", "warmup_fraction": 0.0, "target_ratio": 0.5, "target_weight": 0.0})


def manifest(**kw):
    m = {"backbone": "vits14_reg", "depth": 12, "layers": [2, 5, 8, 11], "format_version": 7, "prefix_tokens": 5,
         "token_shape": [4, 384, 9, 16]}
    m.update(kw)
    return m


def test_a_cache_pmt_cannot_read_is_told_what_to_extract(tmp_path):
    check_pmt_cache(manifest(), tmp_path)
    with pytest.raises(SegError, match=r"reads blocks 2,5,8,11 of vits14_reg .* stores \[11\]; extract with --layers 2,5,8,11"):
        check_pmt_cache(manifest(layers=[11]), tmp_path)
    with pytest.raises(SegError, match=r"stores \[4, 5, 6, 7\]; extract with --layers 5,11,17,23"):
        check_pmt_cache(manifest(depth=24, layers=[4, 5, 6, 7]), tmp_path)
    with pytest.raises(SegError, match="a format version 6 cache holds no prefix tokens .* re-extract"):
        check_pmt_cache(manifest(format_version=6, prefix_tokens=0), tmp_path)
    with pytest.raises(SegError, match="not a tap cache's stream"):
        check_pmt_cache(manifest(tap_block=8, layers=[]), tmp_path)


# -- --init-from-pmt ---------------------------------------------------------------------------

def tiny(num_classes=4, blocks=2, q=6) -> PMTHead:
    return build_head("pmt", 4 * 48, num_classes, layers=4, pmt=dict(
        backbone="vits14_reg", embed_dim=48, grid=(3, 4), num_q=q, num_blocks=blocks, masked_attention=True))


def official_checkpoint(head: PMTHead, path, lightning=True):
    """What PMT saves: the network's keys under `network.` (compiled: `._orig_mod`), the encoder's
    stripped or not, the criterion's empty_weight beside them."""
    state = {f"network.{k}": v.clone() for k, v in head.state_dict().items()}
    state["network.encoder.backbone.blocks.0.norm1.weight"] = torch.ones(3)
    state["criterion.empty_weight"] = torch.ones(5)
    torch.save({"state_dict": state, "epoch": 15} if lightning else state, path)


def test_init_from_a_published_checkpoint_loads_the_decoder(tmp_path):
    torch.manual_seed(0)
    published = tiny()
    with torch.no_grad():
        for p in published.parameters():
            p.add_(torch.randn_like(p))
        published.decoder.attn_mask_probs.zero_()  # a finished run's buffer: not taken
    official_checkpoint(published, tmp_path / "pmt.ckpt")
    head = tiny()
    origin = init_head_from_pmt(head, tmp_path / "pmt.ckpt")
    assert origin["class_head"] == "loaded"
    for k, v in published.state_dict().items():
        if k != "decoder.attn_mask_probs":
            assert torch.equal(head.state_dict()[k], v), k
    assert torch.equal(head.decoder.attn_mask_probs, torch.ones(2))

    # other classes: the class head is dropped, as PMT's load_ckpt_class_head False; the rest loads
    official_checkpoint(published, tmp_path / "pytorch_model.bin", lightning=False)
    other = tiny(num_classes=7)
    before = other.decoder.class_head.weight.clone()
    assert init_head_from_pmt(other, tmp_path / "pytorch_model.bin")["class_head"].startswith("dropped")
    assert torch.equal(other.decoder.class_head.weight, before)
    assert torch.equal(other.decoder.q.weight, published.decoder.q.weight)


def test_init_from_a_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    official_checkpoint(tiny(blocks=3), tmp_path / "deep.ckpt")
    with pytest.raises(SegError, match=r"deep\.ckpt: its decoder does not fit this run's pmt head \(unexpected "
                                       r"decoder\.blocks\.2\..*match --queries, --decoder-blocks"):
        init_head_from_pmt(tiny(blocks=2), tmp_path / "deep.ckpt")
    official_checkpoint(tiny(q=9), tmp_path / "q.ckpt")
    with pytest.raises(SegError, match=r"shape of decoder\.q\.weight: \(9, 48\) vs this head's \(6, 48\)"):
        init_head_from_pmt(tiny(), tmp_path / "q.ckpt")
    torch.save({"state_dict": {"model.w": torch.ones(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(SegError, match=r"other\.ckpt: not a PMT checkpoint"):
        init_head_from_pmt(tiny(), tmp_path / "other.ckpt")
    bad = tiny()
    official_checkpoint(bad, tmp_path / "nan.ckpt")
    state = torch.load(tmp_path / "nan.ckpt", weights_only=True)
    state["state_dict"]["network.decoder.q.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.ckpt")
    with pytest.raises(SegError, match=r"nan\.ckpt: head weight decoder\.q\.weight holds NaN"):
        init_head_from_pmt(tiny(), tmp_path / "nan.ckpt")


def test_config_records_of_older_runs_read_as_no_pmt():
    from seg.train.presets import with_legacy_fields

    old = {"head": "upernet", "ms_fusion": None}
    new = with_legacy_fields(old)
    assert all(new[k] is None for k in ("grad_clip", "warmup_fraction", "queries", "decoder_blocks",
                                        "masked_attention", "mask_points"))
    assert json.dumps(new)


@pytest.mark.parametrize("fixture", ["dinov2_tiny_reg4_golden.pt", "dinov3_tiny_golden.pt"])
def test_levels_are_the_whole_normed_sequence_prefix_first(fixture):
    """What the decoder reads of the last layer is the backbone's own normed output, cls and
    registers first, then the patches row-major (forward_features, as PMT's encoder hands it on)."""
    from conftest import golden_model
    from seg.backbones import DinoV3VisionTransformer, DinoVisionTransformer
    from seg.backbones.features import backbone_features

    model, _ = golden_model(DinoV3VisionTransformer if "v3" in fixture else DinoVisionTransformer, fixture)
    patch = model.patch_size
    x = torch.randn(2, 3, 3 * patch, 5 * patch, generator=torch.Generator().manual_seed(0))
    depth = len(model.blocks)
    with torch.no_grad():
        levels = backbone_features(model, x, [0, depth - 1], None, torch.device("cpu"), torch.float32, levels=True)
        ff = model.forward_features(x)
    registers = ff.get("x_norm_regtokens", ff.get("x_storage_tokens"))  # DINOv2's name, DINOv3's
    whole = torch.cat([ff["x_norm_clstoken"][:, None], registers, ff["x_norm_patchtokens"]], dim=1)
    assert levels.shape == (2, 2, whole.shape[1], whole.shape[2])
    torch.testing.assert_close(levels[:, 1], whole, rtol=1e-5, atol=1e-5)
