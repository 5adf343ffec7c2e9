"""8-bit token caches: the quantisation error bound on real-architecture features, byte-level round
trips against float16 caches of the same extraction, resume after a kill, verify catching damage,
refusals of inconsistent manifests, and training from int8 equal to training from the float16
values it stands for."""

import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from seg.backbones import load_backbone
from seg.backbones.features import backbone_features
from seg.cache import FeatureCache, verify
from seg.cache import format as cf
from seg.cache.quant import QMAX, QuantSpec, relative_rms_error
from seg.cli import main
from seg.data.normalize import normalize
from seg.data.synthetic import make_scene
from seg.runtime.errors import SegError
from seg.train.presets import resolve
from seg.train_head import RunOptions, train
from conftest import SMALL_SIZE
from interrupt import extract_killed_after
from token_cache import learnable_split, write_token_cache

BASE = ["extract", "--backbone", "vits14", "--size", SMALL_SIZE, "--random-init", "--workers", "0",
        "--batch-size", "2", "--shard-size", "2"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def vit_tokens():
    """Normed last-layer tokens [2, 1, 384, 9, 16] and tap tokens [2, 145, 384] of a random-weight
    ViT-S/14 on procedural scenes, as float16 (what a float16 cache would store)."""
    model, _ = load_backbone("vits14", random_init=True, seed=0)
    x = normalize(torch.from_numpy(np.stack([make_scene(i, 224, 126)[0] for i in range(2)])))
    with torch.no_grad():
        layer = backbone_features(model, x, [11], None, torch.device("cpu"), torch.float32).half()
        tap = backbone_features(model, x, [], 6, torch.device("cpu"), torch.float32).half()
    return layer, tap


def test_error_bound_on_real_architecture_features(vit_tokens):
    layer, tap = vit_tokens
    for tokens, is_tap in ((layer, False), (tap, True)):
        spec = QuantSpec.for_tokens(list(tokens.shape[1:]), is_tap)
        q, scale = spec.quantize(tokens)
        back = spec.dequantize(spec.pack(tokens))
        # every value within half a step of its group's scale (+ the float16 rounding of the result)
        step = spec._grouped(torch.zeros_like(tokens, dtype=torch.float32)) + scale.float().unsqueeze(spec.axis + 2)
        err = (back.float() - tokens.float()).abs()
        assert (err <= step.reshape(tokens.shape) / 2 + tokens.float().abs() * 2 ** -11 + 1e-7).all()
        assert int(q.abs().max()) == QMAX  # each group's largest value uses the whole range
        assert relative_rms_error(tokens.float(), back.float()) < 0.01
    # with a few outlier channels (as trained DINOv2 has), group scales keep the error where one
    # scale per token would not
    spiked = layer.float().clone()
    spiked[:, :, [5, 77, 300]] *= 40
    group = QuantSpec.for_tokens(list(layer.shape[1:]), False)
    per_token = QuantSpec(group.token_shape, group.axis, group.token_shape[1])
    e_group = relative_rms_error(spiked, group.dequantize(group.pack(spiked)).float())
    e_token = relative_rms_error(spiked, per_token.dequantize(per_token.pack(spiked)).float())
    assert e_group < 0.02 and e_token > 2 * e_group, (e_group, e_token)


def test_int8_cache_holds_the_float16_extraction_packed(dataset, tmp_path):
    """Same extraction, two dtypes: every int8 row is exactly the packing of the float16 cache's
    tokens, in 0.531x the token bytes; info and the manifest say so."""
    for dtype in ("fp16", "int8"):
        r = run(*BASE, "--data", dataset, "--out", tmp_path / dtype, "--splits", "val", "--token-dtype", dtype)
        assert r.exit_code == 0, r.output
    assert "int8 tokens: relative RMS error" in r.output
    m = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    # a layer cache: version 7 (prefix tokens too), int8 or not; the prefix stays float16 and equal
    assert m["format_version"] == cf.PREFIX_FORMAT_VERSION and m["token_dtype"] == "int8"
    assert m["token_quant"]["group"] == 32 and 0 < m["token_quant_error"]["relative_rms"] < 0.01
    f16, i8 = (FeatureCache(tmp_path / d).split("val") for d in ("fp16", "int8"))
    t16, m16 = f16.read_rows(np.arange(3))
    rows, m8 = i8.read_rows(np.arange(3))
    spec = i8.quant
    assert rows.dtype == np.uint8 and rows.shape == (3, spec.row_bytes)
    np.testing.assert_array_equal(rows, spec.pack(torch.from_numpy(t16)).numpy())
    np.testing.assert_array_equal(m8, m16)
    np.testing.assert_array_equal(i8.read_prefix(np.arange(3)), f16.read_prefix(np.arange(3)))
    assert spec.row_bytes / t16[0].nbytes == pytest.approx(0.531, abs=1e-3)
    # dequantised where the rows are; the preload keeps the bytes
    tokens, _ = i8.load("cpu")
    assert tokens.dtype == torch.uint8 and tokens.shape == (3, spec.row_bytes)
    assert i8.dequantize(tokens).dtype == torch.float16
    recomputed = relative_rms_error(torch.from_numpy(t16).float(), spec.dequantize(torch.from_numpy(rows)).float())
    assert m["token_quant_error"]["relative_rms"] == pytest.approx(recomputed, rel=1e-6)
    info = run("cache", "info", tmp_path / "int8")
    assert "tokens       int8 [1, 384, 9, 16]" in info.output
    assert "= 0.531x float16's 0.111 MB (int8 values, a float16 scale per 32 channels" in info.output


def test_int8_tap_cache_round_trip_and_verify(dataset, tmp_path):
    out = tmp_path / "tap8"
    r = run(*BASE, "--data", dataset, "--out", out, "--splits", "val", "--token-dtype", "int8", "--tap-block", "9")
    assert r.exit_code == 0, r.output
    assert verify(out) == []
    split = FeatureCache(out).split("val")
    assert split.quant.token_shape == (145, 384)
    assert split.dequantize(torch.from_numpy(split.read_rows(np.arange(2))[0])).shape == (2, 145, 384)


def test_verify_and_readers_catch_a_flipped_scale_byte(tmp_path):
    rng = np.random.default_rng(0)
    cache = write_token_cache(tmp_path / "c", {"val": learnable_split(2, rng, channels=64)}, shard_size=2, int8=True)
    assert verify(cache) == []
    shard = cache / "val-00000.h5"
    spec = QuantSpec.of(json.loads((cache / "manifest.json").read_text()))
    with h5py.File(shard, "r") as f:
        row1 = f["tokens"].id.get_chunk_info(1).byte_offset
    data = bytearray(shard.read_bytes())
    data[row1 + spec.value_bytes + 1] = 0x7C  # a scale's high byte: float16 exponent all ones (inf/NaN)
    shard.write_bytes(bytes(data))
    problems = verify(cache)
    assert len(problems) == 1 and problems[0].startswith(f"{shard}: sha256 differs")
    # a read without the sha256 check still refuses the row (HDF5's fletcher32 or the scale check)
    with pytest.raises(SegError, match="val-00000.h5: (corrupt shard|sample 1 .* holds NaN or infinite token scales)"):
        FeatureCache(cache).split("val").read_rows(np.arange(2))


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(token_dtype="float16"), "token_dtype float16 in a format version 6 manifest"),
    (lambda m: m.update(format_version=3), "token_dtype int8 in a format version 3 manifest"),
    (lambda m: m["token_quant"].update(group=7), "token_quant"),
    (lambda m: m["token_quant"].update(row_bytes=12), "does not describe the int8 rows"),
])
def test_inconsistent_int8_manifests_are_refused(tmp_path, edit, message):
    rng = np.random.default_rng(0)
    cache = write_token_cache(tmp_path / "c", {"val": learnable_split(2, rng, channels=64)}, shard_size=2, int8=True)
    m = json.loads((cache / "manifest.json").read_text())
    edit(m)
    (cache / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SegError, match=message):
        FeatureCache(cache)


def test_training_from_int8_equals_training_from_the_float16_it_stands_for(tmp_path):
    rng = np.random.default_rng(3)
    splits = {"train": learnable_split(6, rng, channels=64), "val": learnable_split(2, rng, channels=64)}
    spec = QuantSpec.for_tokens(list(splits["train"][0].shape[1:]), False)
    standing = {k: (spec.dequantize(spec.pack(torch.from_numpy(t))).numpy(), m) for k, (t, m) in splits.items()}
    c8 = write_token_cache(tmp_path / "c8", splits, int8=True)
    c16 = write_token_cache(tmp_path / "c16", standing)
    heads = []
    for cache, preload in ((c8, "always"), (c16, "always"), (c8, "never")):
        out = tmp_path / f"run-{cache.name}-{preload}"
        train(resolve(1, {"epochs": 2}), str(cache), str(out),
              RunOptions(device="cpu", progress=False, allow_mismatch=True, preload=preload), log=lambda s: None)
        heads.append(torch.load(out / "best.pt", weights_only=True)["head"])
    for other in heads[1:]:
        assert heads[0].keys() == other.keys()
        for k in heads[0]:
            assert torch.equal(heads[0][k], other[k]), k


def test_int8_extraction_resumes_after_a_kill_to_identical_bytes(dataset, tmp_path):
    args = ["--data", str(dataset), "--backbone", "vits14", "--size", "476x266", "--random-init",
            "--splits", "train,val", "--batch-size", "1", "--shard-size", "1", "--workers", "0",
            "--token-dtype", "int8", "--no-progress"]
    ref = tmp_path / "ref"
    assert run("extract", *args, "--out", ref).exit_code == 0
    out = tmp_path / "killed"
    done = extract_killed_after(args, out)
    assert 2 <= done < 9, "the kill must land mid-run"
    r = run("extract", *args, "--out", out)
    assert r.exit_code == 0, r.output
    assert f"{9 - done} shards" in r.output
    for shard in sorted(ref.glob("*.h5")):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name
    assert json.loads((out / "manifest.json").read_text()) == json.loads((ref / "manifest.json").read_text())


def test_an_infinite_scale_with_valid_checksums_is_refused_by_readers_and_verify(tmp_path):
    """A row rewritten through HDF5 (fletcher32 recomputed) and re-hashed into the manifest: only the
    scale check itself can catch it."""
    from seg.backbones import file_sha256

    rng = np.random.default_rng(0)
    cache = write_token_cache(tmp_path / "c", {"val": learnable_split(2, rng, channels=64)}, shard_size=2, int8=True)
    shard = cache / "val-00000.h5"
    m = json.loads((cache / "manifest.json").read_text())
    spec = QuantSpec.of(m)
    with h5py.File(shard, "r+") as f:
        row = f["tokens"][1]
        row[spec.value_bytes:spec.value_bytes + 2] = np.array([np.inf], np.float16).view(np.uint8)
        f["tokens"][1] = row
    m["splits"]["val"]["shards"][0].update(sha256=file_sha256(shard), bytes=shard.stat().st_size)
    (cache / "manifest.json").write_text(json.dumps(m))
    fc = FeatureCache(cache)
    fc.check_shards(["val"])
    with pytest.raises(SegError, match="sample 1 .* holds NaN or infinite token scales"):
        fc.split("val").read_rows(np.arange(2))
    problems = verify(cache)
    assert len(problems) == 1 and "sample 1 holds NaN or infinite token scales" in problems[0]


def test_dequantized_values_are_the_float32_product_rounded_once_to_float16():
    """The meaning of an int8 row, written out with numpy from its bytes: values int8, then float16
    scales, one per 8 channels here; value x scale in float32, rounded to float16 once."""
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.normal(0, 3, (2, 1, 16, 2, 3)).astype(np.float16))
    spec = QuantSpec((1, 16, 2, 3), 1, 8)
    rows = spec.pack(x).numpy()
    n_values = 16 * 2 * 3
    q = rows[:, :n_values].view(np.int8).reshape(2, 1, 2, 8, 2, 3)
    s = rows[:, n_values:].copy().view(np.float16).reshape(2, 1, 2, 1, 2, 3)
    expect = (q.astype(np.float32) * s.astype(np.float32)).astype(np.float16).reshape(2, 1, 16, 2, 3)
    np.testing.assert_array_equal(spec.dequantize(torch.from_numpy(rows)).numpy(), expect)
    # and the scales are each group's absmax / 127 in float16
    groups = x.float().numpy().reshape(2, 1, 2, 8, 2, 3)
    np.testing.assert_array_equal(s, (np.abs(groups).max(3, keepdims=True) / 127).astype(np.float16))
