"""ONNX export: every backbone family and head exports to one pixels-to-classes graph whose
onnxruntime answers equal the eager model's within the stated bound; a graph outside it is refused
and never published; a file seg did not write is never replaced."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from seg.backbones.dinov2 import DinoVisionTransformer
from seg.backbones.dinov3 import DinoV3VisionTransformer
from seg.backbones.tail import BackboneTail
from seg.cli import main
from seg.deploy.graph import PixelsToClasses
from seg.deploy.onnx_file import open_session, write_onnx
from seg.deploy.parity import LOGIT_BOUND, compare
from seg.heads import TunedHead, build_head

pytestmark = pytest.mark.slow  # not in the quick lane (README: Development)

pytest.importorskip("onnxruntime")


def tiny_v2(registers: int = 0) -> DinoVisionTransformer:
    # img_size 70: a 5x5 position grid, so every export size interpolates (the bicubic path)
    torch.manual_seed(0)
    m = DinoVisionTransformer(img_size=70, patch_size=14, embed_dim=48, depth=4, num_heads=3,
                              num_register_tokens=registers, interpolate_antialias=registers > 0)
    with torch.no_grad():
        for p in (m.pos_embed, m.cls_token):
            p.normal_(0, 0.5)
        if m.register_tokens is not None:
            m.register_tokens.normal_(0, 0.5)
    return m.eval()


def tiny_v3() -> DinoV3VisionTransformer:
    torch.manual_seed(0)
    m = DinoV3VisionTransformer(patch_size=16, embed_dim=48, depth=4, num_heads=3, layerscale_init=1.0)
    with torch.no_grad():
        m.cls_token.normal_(0, 0.5)
    return m.eval()


def images(n, h, w, seed=0):
    """Smooth images with edges and noise: not constant, not white noise."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, h // 7 + 1, w // 7 + 1, 3)).repeat(7, 1).repeat(7, 2)[:, :h, :w]
    return torch.from_numpy(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


CASES = {  # family x head: every family and every head appears at least once
    "dinov2-convnext": (tiny_v2, "convnext", None),
    "dinov2_reg-upernet": (lambda: tiny_v2(4), "upernet", None),
    "dinov3-upernet_ms": (tiny_v3, "upernet-ms", None),
    "dinov2-linear": (tiny_v2, "linear", None),
    "dinov3-tuned_convnext": (tiny_v3, "convnext", 2),
    "dinov2_reg-tuned_linear": (lambda: tiny_v2(4), "linear", 1),
}


def case_graph(case):
    make, head_name, tap = CASES[case]
    bb = make()
    torch.manual_seed(1)
    if tap is None:
        layers = [0, 1, 2, 3] if head_name == "upernet-ms" else [3]
        head = build_head(head_name, 48 * len(layers), 5, layers=len(layers))
    else:
        layers = [3]
        head = TunedHead(BackboneTail(make(), tap), build_head(head_name, 48, 5))
    size = (64, 96) if isinstance(bb, DinoV3VisionTransformer) else (56, 98)
    return PixelsToClasses(bb, head.eval(), layers, tap, size, bb.patch_size), size


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_family_and_head_exports_within_the_bound(case, tmp_path):
    graph, (h, w) = case_graph(case)
    x = images(3, h, w)
    with torch.no_grad():
        labels, logits = graph(x)
    write_onnx(graph, x[:2], tmp_path / "m.onnx")
    session = open_session(tmp_path / "m.onnx")
    assert [(i.name, i.shape[1:], i.type) for i in session.get_inputs()] == [("image", [h, w, 3], "tensor(uint8)")]
    onnx_labels, onnx_logits = session.run(None, {"image": x.numpy()})  # 3 images: the batch is dynamic
    assert onnx_labels.dtype == np.uint8 and onnx_labels.shape == (3, h, w)
    assert onnx_logits.dtype == np.float32 and onnx_logits.shape == (3, 5, h, w)
    parity = compare("eager", onnx_labels, onnx_logits, logits.numpy(), labels.numpy())
    assert parity.within_bound, parity
    # measured rounding is far inside the bound: the bound is not what lets these pass
    assert parity.max_abs_logit_diff < LOGIT_BOUND / 10 * max(1.0, parity.logit_scale)
    assert parity.decided_pixels > 0.9 * labels.numel()


@pytest.mark.parametrize("case", ["dinov2_reg-upernet", "dinov3-tuned_convnext"])
def test_fixed_positions_give_the_backbones_own_numbers_and_refuse_other_sizes(case):
    graph, (h, w) = case_graph(case)
    make, _, tap = CASES[case]
    x = images(2, h, w, seed=3)
    reference, _ = case_graph(case)
    # the reference: the same modules with positions computed live (bicubic / RoPE at run time)
    from seg.backbones.features import backbone_features
    from seg.data.normalize import normalize
    from seg.heads import head_logits

    live_bb, live_head = make(), reference.head
    if tap is not None:
        live_head = TunedHead(BackboneTail(make(), tap), reference.head.head)
        live_head.tail.load_state_dict(reference.head.tail.state_dict(), strict=False)
    with torch.no_grad():
        tokens = backbone_features(live_bb, normalize(x), reference.layers, tap, torch.device("cpu"), torch.float32)
        live = head_logits(live_head, tokens.to(torch.float16), (h, w), False, reference.grid)
        _, fixed = graph(x)
    torch.testing.assert_close(fixed, live, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="fixed for"):
        graph(images(1, h + graph.backbone.patch_size, w))


def test_compare_bounds_by_hand():
    eager = np.zeros((1, 3, 1, 4), np.float32)
    eager[0, :, 0, 0] = [5.0, 0.0, 0.0]        # sure: class 0 by 5
    eager[0, :, 0, 1] = [1.0, 1.0005, 0.0]     # a near-tie: class 1 by 5e-4 (< 2 x tolerance 0.01)
    eager[0, :, 0, 2] = [0.0, 0.0, 2.0]
    eager[0, :, 0, 3] = [0.0, 3.0, 0.0]
    tol = LOGIT_BOUND * 5.0                    # the largest |logit| is 5
    labels = np.array([[[0, 0, 2, 1]]], np.uint8)  # the near-tie flipped: allowed
    ok = compare("x", labels, eager + tol * 0.9, eager)
    assert ok.within_bound and ok.tolerance == pytest.approx(tol) and ok.decided_pixels == 3
    assert ok.label_agreement == pytest.approx(0.75)
    too_far = compare("x", eager.argmax(1).astype(np.uint8), eager + tol * 1.1, eager)
    assert not too_far.within_bound
    sure_flip = compare("x", np.array([[[0, 1, 2, 2]]], np.uint8), eager, eager)
    assert not sure_flip.within_bound and sure_flip.decided_disagreements == 1


# -- seg export on a trained run ------------------------------------------------------------------

@pytest.fixture
def run_dir(phase3_run):
    return phase3_run  # shared, read-only: nothing here writes into it


def export(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


@pytest.fixture(scope="module")
def exported(phase3_run, tmp_path_factory):
    """One export of the phase-3 run at its own size (an export costs 10-14 s), copied by the tests
    that read it or start from it: (folder holding m.onnx and m.parity.json, the command's output)."""
    folder = tmp_path_factory.mktemp("exported")
    r = export("--run", phase3_run, "--out", folder / "m.onnx")
    assert r.exit_code == 0, r.output
    return folder, r.output


def copy_export(exported, to):
    for name in ("m.onnx", "m.parity.json"):
        shutil.copy2(exported[0] / name, to / name)
    return to / "m.onnx"


def test_seg_export_writes_a_checked_graph_with_its_report(run_dir, exported, tmp_path):
    import onnx

    out = copy_export(exported, tmp_path)
    r = SimpleNamespace(output=exported[1])
    assert "eager float32 graph at 224x126" in r.output and "seg predict (bfloat16 backbone" in r.output
    # the reported (unbounded) row shows no tolerance to read it against, and "sure flips" is explained
    predict_row = next(ln for ln in r.output.splitlines() if ln.startswith("seg predict (bfloat16"))
    assert "(report)" in predict_row and "sure flips: pixels whose label changed" in r.output
    report = json.loads((tmp_path / "m.parity.json").read_text())
    assert report["accepted"] and report["parity"][0]["within_bound"]
    # seg predict --precision fp32 computes what the float32 graph computes: every label of the parity
    # images equal (the run's own bf16 path differs by design and is only reported)
    fp32 = next(p for p in report["parity"] if p["reference"].startswith("seg predict --precision fp32"))
    assert fp32["label_agreement"] == 1.0
    assert "cv2.resize(image, (W, H), interpolation=cv2.INTER_LINEAR)" in report["inputs"]["image"]["resize"]
    assert report["size"] == {"width": 224, "height": 126}
    assert report["outputs"]["logits"]["shape"] == ["N", 10, 126, 224]
    from seg.backbones.named import file_sha256
    assert report["onnx_sha256"] == file_sha256(out)
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert [c["name"] for c in json.loads(meta["seg.classes"])["classes"]] == \
        [c["name"] for c in report["class_table"]["classes"]]
    # The deployed file agrees with the API's labels (the run's bf16 path) on nearly every pixel.
    import seg
    from seg.data.synthetic import make_scene

    rgb = make_scene(7)[0]
    model = seg.load(run_dir, device="cpu")
    small = model.resize(rgb, None, "", 0)[0]
    onnx_labels, _ = open_session(out).run(None, {"image": small[None]})
    api_small = seg.load(run_dir, device="cpu").segmenter.label_maps(torch.from_numpy(small)[None], [(126, 224)])[0]
    assert (onnx_labels[0] == api_small.numpy()).mean() > 0.98

    # an earlier export is replaced only with --overwrite
    r = export("--run", run_dir, "--out", out)
    assert r.exit_code == 1 and "already exists; pass --overwrite" in r.output
    r = export("--run", run_dir, "--out", out, "--overwrite", "--size", "112x56")
    assert r.exit_code == 0, r.output
    assert open_session(out).get_inputs()[0].shape[1:] == [56, 112, 3]


def test_a_dynamic_size_graph_labels_any_image_as_the_api_does_in_float32(run_dir, tmp_path):
    """--dynamic-size: the graph resizes inside exactly as `seg predict` does (OpenCV's uint8 bilinear),
    so a 960x540 image is labelled, at 960x540, as seg.load(run, precision="fp32") labels it (up to
    ties that float32 rounding decides)."""
    import cv2

    import seg
    from seg.data.synthetic import make_scene

    samples = []
    for i, (w, h) in enumerate([(320, 180), (400, 240)]):
        path = tmp_path / f"s{i}.png"
        cv2.imwrite(str(path), cv2.resize(make_scene(20 + i)[0], (w, h))[:, :, ::-1])
        samples += ["--samples", path]
    out = tmp_path / "any.onnx"
    r = export("--run", run_dir, "--out", out, "--dynamic-size", *samples)
    assert r.exit_code == 0, r.output
    assert "eager float32 graph at 320x180" in r.output and "eager float32 graph at 400x240" in r.output
    report = json.loads((tmp_path / "any.parity.json").read_text())
    assert report["inputs"]["image"]["shape"] == ["N", "H", "W", 3]
    session = open_session(out)
    assert session.get_inputs()[0].shape[1:3] == ["height", "width"]
    model = seg.load(run_dir, device="cpu", precision="fp32")
    for seed, (w, h) in ((7, (960, 540)), (8, (1280, 720))):
        rgb = cv2.resize(make_scene(seed)[0], (w, h))
        labels, logits = session.run(None, {"image": rgb[None]})
        assert labels.shape == (1, h, w) and logits.shape == (1, 10, h, w)
        # Equal labels, except where float32 rounding of two kernel libraries decides a tie: a pixel may
        # differ only where the API's top two logits are within the parity tolerance (a random-weight
        # head has many near-ties; measured: 2 of 518,400 pixels, margins below 6e-6)
        api_logits = model.predict_logits(rgb)
        top2 = np.sort(api_logits, 0)[-2:]
        differ = labels[0] != model.predict(rgb)
        assert differ.mean() < 1e-4, (w, h)
        assert (top2[1] - top2[0])[differ].max(initial=0) <= 2 * LOGIT_BOUND * max(1.0, np.abs(api_logits).max())
        assert np.abs(logits[0] - api_logits).max() <= LOGIT_BOUND * max(1.0, np.abs(api_logits).max())
    # the run's own (bf16) precision is another computation: close, not equal
    assert (labels[0] == seg.load(run_dir, device="cpu").predict(rgb)).mean() > 0.98


def test_the_graph_resize_is_opencvs_bilinear_uint8_resize():
    import cv2

    from seg.deploy.pixel_resize import resize_uint8

    rng = np.random.default_rng(0)
    for (H, W), (h, w) in [((540, 960), (364, 644)), ((720, 1280), (126, 224)), ((728, 1288), (364, 644)),
                           ((365, 645), (364, 644)), ((126, 224), (126, 224)), ((1080, 1920), (182, 322))]:
        im = rng.integers(0, 256, (2, H, W, 3), dtype=np.uint8)
        ref = np.stack([cv2.resize(i, (w, h), interpolation=cv2.INTER_LINEAR) for i in im])
        assert np.array_equal(resize_uint8(torch.from_numpy(im), (h, w)).numpy(), ref), (H, W, h, w)
    # upscaling: a few values differ from OpenCV's (its upscaling path rounds otherwise); within 1 everywhere
    im = rng.integers(0, 256, (1, 126, 224, 3), dtype=np.uint8)
    ref = cv2.resize(im[0], (644, 364), interpolation=cv2.INTER_LINEAR)
    ours = resize_uint8(torch.from_numpy(im), (364, 644)).numpy()[0]
    assert np.abs(ours.astype(int) - ref).max() <= 1 and (ours != ref).mean() < 0.005


def test_seg_export_never_replaces_a_file_it_did_not_write(run_dir, tmp_path):
    out = tmp_path / "mine.onnx"
    out.write_bytes(b"the user's own model")
    r = export("--run", run_dir, "--out", out, "--overwrite")
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "not written by seg export" in r.output and out.read_bytes() == b"the user's own model"


def test_a_graph_outside_the_bound_is_refused_and_not_published(run_dir, exported, tmp_path, monkeypatch):
    import seg.export_model as em

    real = em.open_session

    class Drifting:  # onnxruntime answers with the logits pushed off by 1% of their scale
        def __init__(self, path):
            self.session = real(path)

        def run(self, names, feeds):
            labels, logits = self.session.run(names, feeds)
            return labels, logits + 0.01 * max(1.0, float(np.abs(logits).max()))

    out = copy_export(exported, tmp_path)  # an earlier good model, with its report
    small = ("--size", "112x56")  # what is under test is the refusal and which files it touches
    good = {p.name: p.read_bytes() for p in (out, tmp_path / "m.parity.json")}
    monkeypatch.setattr(em, "open_session", Drifting)
    r = export("--run", run_dir, "--out", out, "--overwrite", *small)
    assert r.exit_code == 1 and r.output.count("Error:") == 1 and r.output.splitlines()[-1].startswith("Error:")
    assert f"{out}: not written: onnxruntime differs from the eager graph by" in r.output
    assert "the earlier model there is unchanged" in r.output
    # the good model and its report stay as they were; the refusal's report lies beside them
    assert {p.name: p.read_bytes() for p in (out, tmp_path / "m.parity.json")} == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.onnx.seg-export.lock", "m.onnx", "m.parity-rejected.json",
                                                           "m.parity.json"]
    assert json.loads((tmp_path / "m.parity-rejected.json").read_text())["accepted"] is False


def test_missing_export_extra_is_one_line(run_dir, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnxscript(name, *a, **k):
        if name == "onnxscript":
            raise ImportError("No module named 'onnxscript'", name="onnxscript")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_onnxscript)
    r = export("--run", run_dir, "--out", tmp_path / "m.onnx")
    assert r.exit_code == 1 and "pip install 'seg[export]'" in r.output and "missing: onnxscript" in r.output


def test_a_run_without_best_pt_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    r = export("--run", tmp_path / "empty", "--out", tmp_path / "m.onnx")
    assert r.exit_code == 1 and "no best.pt" in r.output and r.output.count("\n") == 1
