"""The feature cache: manifest fields, byte layout of shards, round trip against the backbone."""

import json
import os
import shutil
from pathlib import Path

import h5py
import pytest
import numpy as np
import torch

from seg.data.augment import Augmenter
from seg.backbones import file_sha256, load_backbone
from seg.cache import FeatureCache, verify
from seg.data.classes import default_class_table
from seg.data.layouts import list_split
from seg.data.decode import MaskDecoder, read_split_pair
from seg.runtime.device import autocast
from seg.runtime.errors import SegError
from seg.data.normalize import normalize


def test_manifest_has_every_agreed_field(small_cache):
    m = json.loads((small_cache / "manifest.json").read_text())
    # every layer cache is version 7: it stores each layer's prefix tokens (cls; vits14 has no registers)
    assert m["format_version"] == 7 and m["complete"] is True and m["prefix_tokens"] == 1
    assert m["backbone"] == "vits14" and m["weights_sha256"] == "random-init" and m["random_init_seed"] == 0
    assert m["size"] == {"width": 224, "height": 126} and m["patch_grid"] == {"width": 16, "height": 9}
    assert m["embed_dim"] == 384 and m["depth"] == 12 and m["layers"] == [11] and m["token_dtype"] == "float16"
    # settings that change the bytes, compared on resume
    assert (m["compute_dtype"], m["device"], m["batch_size"]) == ("bfloat16", "cpu", 4)
    assert m["token_shape"] == [1, 384, 9, 16] and m["mask_shape"] == [126, 224]
    assert [c["name"] for c in m["class_table"]["classes"]][9] == "Sky"
    assert m["class_table"]["classes"][0]["values"] == [0, 600]
    assert m["augmentation"]["policy"] == "phase3" and m["augmentation"]["albumentations"] == "2.0.8"
    train = m["splits"]["train"]
    # with a policy every cached train sample is an augmented draw: seeds 1..K, no plain seed 0
    assert train["seeds"] == [1, 2] and train["num_samples"] == 12 and len(train["images"]) == 6
    assert Path(train["data_dir"]).is_absolute()
    assert len(train["sources"]) == 6 and all(len(s) == 2 and len(s[0]) == 2 for s in train["sources"])
    assert [(s["file"], s["start"], s["samples"]) for s in train["shards"]] == [
        ("train-00000.h5", 0, 4), ("train-00001.h5", 4, 4), ("train-00002.h5", 8, 4)]
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in train["shards"])
    assert m["splits"]["val"]["seeds"] == [0] and m["splits"]["test"]["num_samples"] == 2


def test_shard_bytes_follow_the_format(small_cache):
    with h5py.File(small_cache / "train-00001.h5", "r") as f:
        t, mk = f["tokens"], f["masks"]
        assert t.dtype == np.float16 and t.shape == (4, 1, 384, 9, 16) and t.chunks == (1, 1, 384, 9, 16)
        assert t.fletcher32 and t.compression is None
        assert mk.dtype == np.uint8 and mk.shape == (4, 126, 224) and mk.chunks == (1, 126, 224)
        assert mk.fletcher32 and mk.compression is None  # plain rows: one pread each after the sha256 check
        assert f["image_index"].dtype == np.int32 and f["aug_seed"].dtype == np.int32
        p = f["prefix"]  # [n, layers, cls + registers, C]
        assert p.dtype == np.float16 and p.shape == (4, 1, 1, 384) and p.chunks == (1, 1, 1, 384) and p.fletcher32
        # seed-major order: samples 4..7 of 6 images x seeds [0, 1]
        assert f["image_index"][()].tolist() == [4, 5, 0, 1]
        assert f["aug_seed"][()].tolist() == [1, 1, 2, 2]
        masks = mk[()]
        assert set(np.unique(masks)) <= set(range(10)) | {255}
    # uncompressed fp16 tokens, uint8 masks and fp16 prefix tokens: the file is their raw bytes plus
    # small overhead
    raw = 4 * 384 * 9 * 16 * 2 + 4 * 126 * 224 + 4 * 1 * 1 * 384 * 2
    assert raw < (small_cache / "train-00001.h5").stat().st_size < raw * 1.05


def test_tokens_equal_backbone_output_for_seed0(small_cache, dataset):
    """Round trip: what the cache returns is the backbone's output on the resized image."""
    model, _ = load_backbone("vits14", random_init=True)
    files = list_split(dataset, "val")
    aug, lut = Augmenter("none", (224, 126)), MaskDecoder.of(default_class_table())
    pairs = [aug(*read_split_pair(files, i, lut), files.names[i], 0) for i in range(3)]
    x = normalize(torch.from_numpy(np.stack([p[0] for p in pairs])))
    with torch.inference_mode(), autocast(torch.device("cpu")):
        half = model.get_intermediate_layers(x, n=1, reshape=True)[0].to(torch.float16)
    with torch.inference_mode():
        full = model.get_intermediate_layers(x, n=1, reshape=True)[0]
    split = FeatureCache(small_cache).split("val")
    for i in range(3):
        tokens, mask, name, seed = split[i]
        assert (name, seed) == (files.names[i], 0)
        assert torch.equal(tokens[0], half[i])  # same batch as extraction: bit-identical
        assert ((tokens[0].float() - full[i]).abs().max() / full[i].abs().max()) < 0.05  # half vs fp32
        np.testing.assert_array_equal(mask.numpy(), pairs[i][1])
    # the prefix tokens: the normed cls token of the same layer, as float16
    with torch.inference_mode(), autocast(torch.device("cpu")):
        cls = model.get_intermediate_layers(x, n=1, return_class_token=True)[0][1].to(torch.float16)
    prefix = split.read_prefix(np.arange(3))
    assert prefix.shape == (3, 1, 1, 384) and prefix.dtype == np.float16
    assert torch.equal(torch.from_numpy(prefix[:, 0, 0]), cls)


def test_load_whole_split_and_read_rows(small_cache):
    split = FeatureCache(small_cache).split("train")
    tokens, masks = split.load("cpu")
    assert tokens.shape == (12, 1, 384, 9, 16) and tokens.dtype == torch.float16
    assert masks.shape == (12, 126, 224) and masks.dtype == torch.uint8
    for k in (0, 5, 11):
        t, m, _, _ = split[k]
        assert torch.equal(tokens[k], t) and torch.equal(masks[k], m)
    rows = np.array([11, 2, 7, 2])
    t, m = split.read_rows(rows)
    assert np.array_equal(t, tokens[rows].numpy()) and np.array_equal(m, masks[rows].numpy())
    assert split.sample_info(7) == ("train_00001.png", 2)
    # two augmented draws of the same image differ
    assert not torch.equal(tokens[7], tokens[1])


def test_verify_passes_then_catches_corruption(small_cache, tmp_path):
    import shutil

    assert verify(small_cache) == []
    copy = tmp_path / "copy"
    shutil.copytree(small_cache, copy)
    shard = copy / "train-00001.h5"
    data = bytearray(shard.read_bytes())
    with h5py.File(shard, "r") as f:
        offset = f["tokens"].id.get_chunk_info(2).byte_offset
    data[offset + 100] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify(copy)
    # one line per damaged shard: the whole-file checksum first, then the count of further findings
    assert problems == [f"{shard}: sha256 differs from the manifest (file changed or corrupt) (and 1 more problem(s))"]
    (copy / "val-00000.h5").unlink()
    assert any(p.endswith("val-00000.h5: missing") for p in verify(copy))


def test_verified_reads_skip_hdf5_and_return_the_same_bytes(small_cache, tmp_path):
    """After the sha256 check, rows are read with one pread each at their chunk's offset; the bytes
    are HDF5's own, in any order, for tokens and masks, and for old caches with lzf masks too."""
    plain = FeatureCache(small_cache).split("train")
    cache = FeatureCache(small_cache)
    cache.check_shards(["train"])
    fast = cache.split("train")
    rows = np.array([5, 0, 11, 3, 7, 7])
    t1, m1 = plain.read_rows(rows)
    t2, m2 = fast.read_rows(rows)
    assert fast._raw_rows(0) is not None and plain._raw_rows(0) is None
    assert np.array_equal(t1, t2) and np.array_equal(m1, m2)
    for k, row in enumerate(rows):
        tokens, mask, _, _ = plain[int(row)]
        assert np.array_equal(t2[k], tokens.numpy()) and np.array_equal(m2[k], mask.numpy())
    # an older shard with lzf-compressed masks: raw tokens, masks through HDF5
    old = tmp_path / "old"
    shutil.copytree(small_cache, old)
    with h5py.File(small_cache / "train-00000.h5", "r") as f, h5py.File(old / "train-00000.h5", "w") as g:
        for key in f:
            kw = {"compression": "lzf"} if key == "masks" else {}
            g.create_dataset(key, data=f[key][()], chunks=f[key].chunks, fletcher32=True, **kw)
    m = json.loads((old / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["sha256"] = file_sha256(old / "train-00000.h5")
    (old / "manifest.json").write_text(json.dumps(m))
    c = FeatureCache(old)
    c.check_shards(["train"])
    split = c.split("train")
    assert split._raw_rows(0)[2] is None and split._raw_rows(1)[2] is not None
    t3, m3 = split.read_rows(rows)
    assert np.array_equal(t1, t3) and np.array_equal(m1, m3)


def test_a_shard_changed_after_its_check_is_refused(small_cache, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(small_cache, copy)
    cache = FeatureCache(copy)
    cache.check_shards(["train"])
    split = cache.split("train")
    split.read_rows(np.array([0]))  # shard 0 opened and trusted
    path = copy / "train-00001.h5"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SegError, match="train-00001.h5: changed after its sha256 was checked"):
        split.read_rows(np.array([5]))


def test_read_ahead_advice_names_exactly_the_rows_chunks(small_cache, monkeypatch):
    cache = FeatureCache(small_cache)
    cache.check_shards(["train"])
    split = cache.split("train")
    calls = []
    monkeypatch.setattr("os.posix_fadvise", lambda fd, off, n, advice: calls.append((off, n, advice)))
    split.advise(np.array([5]))
    j, row = split.locate(5)
    with h5py.File(small_cache / split.shards[j].file, "r") as f:
        tok = f["tokens"].id.get_chunk_info_by_coord((row, 0, 0, 0, 0))
        mask = f["masks"].id.get_chunk_info_by_coord((row, 0, 0))
    assert calls == [(tok.byte_offset, tok.size - 4, os.POSIX_FADV_WILLNEED),  # the data, not its checksum
                     (mask.byte_offset, mask.size - 4, os.POSIX_FADV_WILLNEED)]
    calls.clear()
    FeatureCache(small_cache).split("train").advise(np.array([5]))  # unchecked shards: read through HDF5
    assert calls == []


# -- version 7: prefix tokens ------------------------------------------------------------------

@pytest.mark.parametrize("backbone,size,prefix", [("vits14_reg", "56x28", 5), ("dinov3_vits16", "64x32", 5)])
def test_prefix_tokens_are_cls_and_registers_of_every_stored_layer(dataset, tmp_path, backbone, size, prefix):
    """Registers (DINOv2 reg4) and storage tokens (DINOv3) are stored beside the cls token, per layer,
    normed like the patches."""
    from seg.extract_features import ExtractConfig, extract

    out = tmp_path / "c"
    extract(ExtractConfig(data=str(dataset), out=str(out), backbone=backbone, size=size, random_init=True,
                          splits=("val",), layers="2", batch_size=3, workers=0, progress=False), log=lambda s: None)
    m = json.loads((out / "manifest.json").read_text())
    assert m["format_version"] == 7 and m["prefix_tokens"] == prefix
    split = FeatureCache(out).split("val")
    model, _ = load_backbone(backbone, random_init=True)
    files = list_split(dataset, "val")
    w, h = (int(v) for v in size.split("x"))
    aug, lut = Augmenter("none", (w, h)), MaskDecoder.of(default_class_table())
    x = normalize(torch.from_numpy(np.stack([aug(*read_split_pair(files, i, lut), files.names[i], 0)[0]
                                             for i in range(3)])))
    with torch.inference_mode(), autocast(torch.device("cpu")):
        blocks = model.resolve_layers(2)
        tokens = model.prepare_tokens(x) if backbone.startswith("vit") else None
        expected = []
        if tokens is not None:  # DINOv2: run the blocks by hand, norm the chosen ones, keep cls + registers
            for i, blk in enumerate(model.blocks[: max(blocks) + 1]):
                tokens = blk(tokens)
                if i in blocks:
                    expected.append(model.norm(tokens)[:, :prefix])
        else:  # DINOv3: its own class + storage tokens
            for layer in model.get_intermediate_layers(x, n=2, return_class_token=True, return_extra_tokens=True):
                expected.append(torch.cat([layer[1][:, None], layer[2]], dim=1))
        expected = torch.stack(expected, dim=1).to(torch.float16)
    stored = torch.from_numpy(split.read_prefix(np.arange(3)))
    assert stored.shape == (3, 2, prefix, m["embed_dim"])
    assert torch.equal(stored, expected)
    assert verify(out) == []
    from seg.cache import describe

    assert any(line.startswith(f"prefix       {prefix} token(s) per layer (cls + {prefix - 1} registers), normed, "
                               "float16") for line in describe(out))


def test_prefix_tokens_of_an_older_cache_are_refused_in_one_line_and_damage_is_found(small_cache, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from token_cache import learnable_split, write_token_cache

    old = write_token_cache(tmp_path / "old", {"val": learnable_split(2, np.random.default_rng(0))})
    assert json.loads((old / "manifest.json").read_text())["format_version"] == 3
    with pytest.raises(SegError, match="a format version 3 cache holds no prefix tokens .* re-extract it"):
        FeatureCache(old).split("val").read_prefix(np.arange(2))
    # NaN prefix tokens: verify names them, read_prefix refuses them
    copy = tmp_path / "copy"
    shutil.copytree(small_cache, copy)
    with h5py.File(copy / "val-00000.h5", "r+") as f:
        f["prefix"][1, 0, 0, 5] = np.float16("nan")
    m = json.loads((copy / "manifest.json").read_text())  # the checksum made to match: only the values are wrong
    m["splits"]["val"]["shards"][0].update(sha256=file_sha256(copy / "val-00000.h5"),
                                           bytes=(copy / "val-00000.h5").stat().st_size)
    (copy / "manifest.json").write_text(json.dumps(m))
    assert verify(copy) == [f"{copy / 'val-00000.h5'}: prefix tokens hold NaN or infinite values"]
    with pytest.raises(SegError, match="sample 1 holds NaN or infinite prefix tokens"):
        FeatureCache(copy).split("val").read_prefix(np.arange(3))


@pytest.mark.parametrize("edit,says", [(lambda m: m.pop("prefix_tokens"), "format version 7 with prefix_tokens None"),
                                       (lambda m: m.update(format_version=3), "format version 3 with prefix_tokens 1")])
def test_a_manifest_whose_version_and_prefix_tokens_disagree_is_refused(small_cache, tmp_path, edit, says):
    from seg.cache.format import read_manifest

    copy = tmp_path / "copy"
    shutil.copytree(small_cache, copy)
    m = json.loads((copy / "manifest.json").read_text())
    edit(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SegError, match=says):
        read_manifest(copy)
