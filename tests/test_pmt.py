"""PMT's plain mask decoder and its mask-classification loss, against independent sources:
transformers' DINOv3 layer and RoPE (PMT's blocks are adapted from them), transformers'
Mask2Former matcher and loss (which PMT's loss subclasses), and hand computations of the parts
PMT adds (masked attention, semantic scores, checkpoint loading)."""

import math

import pytest
import torch
import torch.nn.functional as F

from seg.heads.pmt import PMTHead
from seg.heads.pmt.blocks import DecoderBlock
from seg.heads.pmt.decoder import upscale_steps
from seg.heads.pmt.rope import rope_tables
from seg.train.mask_loss import mask_classification_loss, semantic_targets

transformers = pytest.importorskip("transformers")


def tiny_head(patch=14, prefix=5, grid=(3, 4), q=10, blocks=3, masked=True, seed=0) -> PMTHead:
    torch.manual_seed(seed)
    head = PMTHead(64, 6, num_heads=4, num_prefix_tokens=prefix, patch_size=patch, grid=grid, num_q=q,
                   num_blocks=blocks, hidden_dim=96, masked_attention=masked)
    for p in head.parameters():
        p.data.normal_(0, 0.3)
    for bn in head.bn:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    return head.eval()


def levels_for(head: PMTHead, batch=2, seed=1) -> list:
    g = torch.Generator().manual_seed(seed)
    h, w = head.grid
    return [torch.randn(batch, head.num_prefix_tokens + h * w, 64, generator=g) for _ in range(4)]


# -- the decoder's parts against transformers' DINOv3 ------------------------------------------

def dinov3_config(**kw):
    from transformers.models.dinov3_vit.configuration_dinov3_vit import DINOv3ViTConfig

    return DINOv3ViTConfig(hidden_size=64, num_attention_heads=4, intermediate_size=96, key_bias=False,
                           query_bias=True, value_bias=True, proj_bias=True, layerscale_value=1.0,
                           use_gated_mlp=False, hidden_act="gelu", layer_norm_eps=1e-5, patch_size=14,
                           rope_theta=100.0, **kw)


@pytest.mark.parametrize("training", [False, True])
def test_rope_tables_equal_dinov3s(training):
    from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTRopePositionEmbedding

    ref = DINOv3ViTRopePositionEmbedding(dinov3_config()).train(training)
    torch.manual_seed(3)
    cos_ref, sin_ref = ref(torch.zeros(1, 3, 42, 56))
    torch.manual_seed(3)
    cos, sin = rope_tables((3, 4), 16, 100.0, 2.0 if training else None)
    torch.testing.assert_close(cos, cos_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_ref, rtol=0, atol=1e-6)
    head = tiny_head().train(training)                          # the head's own tables: theta 100, rescale 2
    torch.manual_seed(3)
    for mine, theirs in zip(head.rope(), (cos_ref, sin_ref)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)


def test_a_decoder_block_equals_dinov3s_layer_with_a_mask_and_prefix_tokens():
    from transformers.models.dinov3_vit.modeling_dinov3_vit import (DINOv3ViTLayer,
                                                                    DINOv3ViTRopePositionEmbedding)

    cfg = dinov3_config()
    cfg._attn_implementation = "sdpa"
    ref = DINOv3ViTLayer(cfg).eval()
    torch.manual_seed(0)
    for p in ref.parameters():
        p.data.normal_(0, 0.3)
    ours = DecoderBlock(64, 96, 4).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 7 + 12, 64)
    mask = torch.rand(2, 19, 19) > 0.3
    mask[:, :, 0] = True  # every row sees something
    rope = DINOv3ViTRopePositionEmbedding(cfg).eval()(torch.zeros(1, 3, 42, 56))
    expected = ref(x, attention_mask=mask[:, None].expand(-1, 4, -1, -1), position_embeddings=rope)
    expected = expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(ours(x, mask, rope), expected, rtol=1e-5, atol=1e-5)


def test_a_scale_block_is_transposed_conv_gelu_depthwise_conv_and_timms_layernorm2d():
    timm_layers = pytest.importorskip("timm.layers")
    from seg.heads.pmt.blocks import ScaleBlock

    torch.manual_seed(0)
    block = ScaleBlock(8)
    for p in block.parameters():
        p.data.normal_(0, 0.5)
    norm = timm_layers.LayerNorm2d(8)
    norm.load_state_dict(block.norm.state_dict())
    x = torch.randn(2, 8, 3, 4)
    expected = norm(F.conv2d(F.gelu(F.conv_transpose2d(x, block.conv1.weight, block.conv1.bias, stride=2)),
                             block.conv2.weight, padding=1, groups=8))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)


def reference_decode(head: PMTHead, levels: list) -> tuple[list, list]:
    """PMT's decoder forward (pmd.py, pmt.py) restated step by step, with transformers' DINOv3 layer
    for every block and functional ops elsewhere; masks on at probability 1 (no random drops)."""
    from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTLayer, DINOv3ViTRopePositionEmbedding

    d, q, p = head.decoder, head.decoder.num_q, head.num_prefix_tokens
    cfg = dinov3_config()
    cfg._attn_implementation = "sdpa"
    h, w = head.grid
    rope = DINOv3ViTRopePositionEmbedding(cfg).eval()(torch.zeros(1, 3, 14 * h, 14 * w))
    feats = []
    for f, bn, lin, scale in zip(levels, head.bn, d.lateral_projections, d.scalers):
        f = F.batch_norm(f.transpose(1, 2), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                         eps=bn.eps).transpose(1, 2)
        f = f + F.linear(F.gelu(F.linear(f, lin[0].weight, lin[0].bias)), lin[2].weight, lin[2].bias)
        feats.append(f * scale)
    x = torch.cat([d.q.weight.expand(levels[0].shape[0], -1, -1), sum(feats)], dim=1)

    def predict(y):
        y = F.layer_norm(y, (64,), d.decoder_norm.weight, d.decoder_norm.bias)
        grid = y[:, q + p:].transpose(1, 2).reshape(y.shape[0], 64, h, w)
        mlp = d.mask_head
        e = F.linear(F.gelu(F.linear(F.gelu(F.linear(y[:, :q], mlp[0].weight, mlp[0].bias)), mlp[2].weight,
                                     mlp[2].bias)), mlp[4].weight, mlp[4].bias)
        return torch.einsum("bqc,bchw->bqhw", e, d.upscale(grid)), F.linear(y[:, :q], d.class_head.weight,
                                                                            d.class_head.bias)

    masks_out, classes_out = [], []
    for block in d.blocks:
        m, c = predict(x)
        masks_out.append(m)
        classes_out.append(c)
        allowed = torch.ones(x.shape[0], x.shape[1], x.shape[1], dtype=torch.bool)
        allowed[:, :q, q + p:] = F.interpolate(m, (h, w), mode="bilinear").flatten(2) > 0
        layer = DINOv3ViTLayer(cfg).eval()
        layer.load_state_dict(block.state_dict())
        out = layer(x, attention_mask=allowed[:, None].expand(-1, 4, -1, -1), position_embeddings=rope)
        x = out[0] if isinstance(out, tuple) else out
    m, c = predict(x)
    return masks_out + [m], classes_out + [c]


def test_the_decoder_follows_pmts_forward_step_by_step():
    head = tiny_head()
    levels = levels_for(head)
    with torch.no_grad():
        masks, classes = head.decode(levels)
        ref_masks, ref_classes = reference_decode(head, levels)
    for a, b in zip(masks + classes, ref_masks + ref_classes):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# -- what PMT adds: masked attention, mask features, semantic scores --------------------------

def test_mask_features_are_a_quarter_of_the_image_for_dinov3_and_twice_the_grid_for_dinov2():
    assert (upscale_steps(14), upscale_steps(16), upscale_steps(8)) == (1, 2, 1)
    for patch, scale in ((14, 2), (16, 4)):
        head = tiny_head(patch=patch)
        masks, classes = head.decode(levels_for(head))
        assert masks[-1].shape == (2, 10, 3 * scale, 4 * scale) and classes[-1].shape == (2, 10, 7)
        assert len(masks) == len(classes) == 4  # 3 masked blocks + the final prediction


def test_masked_attention_lets_a_query_see_only_where_its_mask_was_positive():
    head = tiny_head()
    seen = []
    hook = head.decoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    masks, _ = head.decode(levels_for(head))
    hook.remove()
    allowed = seen[0]
    on_grid = F.interpolate(masks[0], head.grid, mode="bilinear").flatten(2) > 0
    q, p = 10, 5
    assert torch.equal(allowed[:, :q, q + p:], on_grid)       # probability 1: every query masked
    assert allowed[:, :q, : q + p].all() and allowed[:, q:].all()  # prefix and patch rows see everything


def test_annealed_masks_drop_per_query_and_vanish_at_zero():
    head = tiny_head()
    levels = levels_for(head)
    plain_masks, plain_classes = head.decode(levels, masked=False)
    assert len(plain_masks) == 1
    head.decoder.attn_mask_probs.zero_()                        # end of annealing: every mask dropped
    masks, classes = head.decode(levels)
    torch.testing.assert_close(masks[-1], plain_masks[-1])
    torch.testing.assert_close(classes[-1], plain_classes[-1])
    head.decoder.attn_mask_probs.fill_(0.5)
    seen = []
    hook = head.decoder.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    torch.manual_seed(0)
    masks, _ = head.decode(levels)
    hook.remove()
    on_grid = F.interpolate(masks[1], head.grid, mode="bilinear").flatten(2) > 0
    rows = seen[0][:, :10, 15:]
    kept = (rows == on_grid).all(-1)
    dropped = rows.all(-1)
    assert (kept | dropped).all() and kept.any() and (dropped & ~on_grid.all(-1)).any()


def test_semantic_scores_are_the_query_sum_of_mask_and_class_probabilities():
    g = torch.Generator().manual_seed(0)
    masks = torch.randn(2, 40, 5, 6, generator=g)               # more queries than one chunk
    classes = torch.randn(2, 40, 4, generator=g)
    scores = PMTHead.semantic_scores([torch.zeros(1), masks], [torch.zeros(1), classes], (10, 12))
    up = F.interpolate(masks, (10, 12), mode="bilinear").sigmoid()
    probs = classes.softmax(-1)
    expected = torch.zeros(2, 3, 10, 12)
    for b in range(2):
        for c in range(3):                                       # no-object (the last) left out
            for q in range(40):
                expected[b, c] += up[b, q] * probs[b, q, c]
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_from_official_reads_every_size_and_loads_strictly():
    head = tiny_head(prefix=1, patch=16, blocks=2, q=7)
    state = {f"network.{k}": v for k, v in head.state_dict().items()}
    state["network.encoder.backbone.blocks.0.attn.qkv.weight"] = torch.zeros(3)
    state["criterion.empty_weight"] = torch.ones(7)
    loaded = PMTHead.from_official(state, num_heads=4, num_prefix_tokens=1, patch_size=16, grid=(3, 4),
                                   masked_attention=True).eval()
    assert loaded.decoder.num_q == 7 and loaded.decoder.num_blocks == 2 and len(loaded.bn) == 4
    assert loaded.decoder.blocks[0].mlp.up_proj.out_features == 96 and loaded.decoder.class_head.out_features == 7
    levels = levels_for(head)
    torch.manual_seed(0)
    a = head.decode(levels)
    torch.manual_seed(0)
    b = loaded.decode(levels)
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x, y)
    state["network.decoder.unexpected.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="unexpected"):
        PMTHead.from_official(state, num_heads=4, num_prefix_tokens=1, patch_size=16, grid=(3, 4),
                              masked_attention=True)


# -- the loss against transformers' Mask2Former ------------------------------------------------

def test_semantic_targets_are_one_mask_per_class_present_without_ignored_pixels():
    m = torch.tensor([[[0, 0, 2], [255, 2, 2]], [[255, 255, 255], [255, 255, 255]]])
    t = semantic_targets(m, 3)
    assert t[0]["labels"].tolist() == [0, 2]
    assert t[0]["masks"].tolist() == [[[True, True, False], [False, False, False]],
                                      [[False, False, True], [False, True, True]]]
    assert t[1]["labels"].numel() == 0 and t[1]["masks"].shape == (0, 2, 3)


def transformers_loss(masks, classes, targets, k, points, coef):
    """PMT's composition of transformers' Mask2Former matcher and losses (mask_classification_loss.py
    in tue-mps/pmt): per block, matched losses over num_masks, then coefficients, summed."""
    from transformers.models.mask2former.configuration_mask2former import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    cfg = Mask2FormerConfig(num_labels=k, no_object_weight=0.1, train_num_points=points, oversample_ratio=3.0,
                            importance_sample_ratio=0.75, class_weight=coef[2], mask_weight=coef[0],
                            dice_weight=coef[1])
    loss = Mask2FormerLoss(cfg, weight_dict={})
    total = None
    for m, c in zip(masks, classes):
        mask_labels = [t["masks"].to(m.dtype) for t in targets]
        class_labels = [t["labels"].long() for t in targets]
        indices = loss.matcher(masks_queries_logits=m, class_queries_logits=c, mask_labels=mask_labels,
                               class_labels=class_labels)
        masks_part = loss.loss_masks(m, mask_labels, indices, 1)
        num = max(sum(len(j) for _, j in indices), 1)
        terms = [masks_part["loss_mask"] / num * coef[0], masks_part["loss_dice"] / num * coef[1],
                 loss.loss_labels(c, class_labels, indices)["loss_cross_entropy"] * coef[2]]
        for term in terms:
            total = term if total is None else total + term
    return total


def test_the_loss_equals_transformers_mask2former_loss_after_the_same_seed():
    torch.manual_seed(0)
    k, q, b = 6, 12, 3
    masks = [torch.randn(b, q, 16, 20, requires_grad=True) for _ in range(3)]
    classes = [torch.randn(b, q, k + 1, requires_grad=True) for _ in range(3)]
    sem = torch.randint(0, k, (b, 40, 50))
    sem[0, :10] = 255
    sem[2] = 255
    sem[2, :5, :5] = 3                                          # one small target in a mostly ignored image
    targets = semantic_targets(sem, k)
    coef = (5.0, 5.0, 2.0)
    torch.manual_seed(7)
    ref = transformers_loss(masks, classes, targets, k, 500, coef)
    ref_grads = torch.autograd.grad(ref, masks + classes)
    torch.manual_seed(7)
    ours = mask_classification_loss(masks, classes, targets, num_classes=k, num_points=500, oversample_ratio=3.0,
                                    importance_sample_ratio=0.75, mask_coef=5.0, dice_coef=5.0, class_coef=2.0,
                                    no_object_coef=0.1)
    grads = torch.autograd.grad(ours, masks + classes)
    assert math.isclose(ours.item(), ref.item(), rel_tol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
