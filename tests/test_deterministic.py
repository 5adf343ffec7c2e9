"""`train-head --deterministic`: no operation of a training step is one that PyTorch documents as
having no deterministic CUDA kernel (traced on the CPU, op by op), the deterministic forms give the
same numbers as the usual ones, and the switch is recorded and undone after the run."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from seg.heads import build_head, head_logits
from seg.heads.resize import adaptive_pool, upsample
from seg.runtime.device import deterministic_mode
from seg.train.losses import LOSSES, SegLoss
from seg.train.presets import resolve
from seg.train_head import RunOptions, train
from token_cache import learnable_split, write_token_cache

# aten ops behind the entries of torch.use_deterministic_algorithms' list of "normally-nondeterministic
# operations [that] will throw a RuntimeError when mode=True" on CUDA (its docstring, torch 2.x)
NO_DETERMINISTIC_CUDA_KERNEL = {
    "avg_pool3d_backward", "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward",
    "adaptive_max_pool2d_backward", "fractional_max_pool2d_backward", "fractional_max_pool3d_backward",
    "max_unpool1d", "max_unpool2d", "max_unpool3d", "upsample_linear1d_backward", "upsample_bilinear2d_backward",
    "upsample_bicubic2d_backward", "upsample_trilinear3d_backward", "reflection_pad1d_backward",
    "reflection_pad2d_backward", "reflection_pad3d_backward", "_ctc_loss_backward", "_embedding_bag_backward",
    "put_", "histc", "bincount", "median", "grid_sampler_2d_backward",
}
NLL = {"nll_loss_forward", "nll_loss2d_forward"}  # NLLLoss: its mean and sum reductions add with atomics


class OpTrace(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in NLL and args[3] == 0:  # reduction "none": one value per pixel, no accumulation
            name += "(none)"
        self.ops.add(name)
        return func(*args, **(kwargs or {}))


def _head_and_batch(head_name: str, seed: int):
    """A 5-class head of the real architecture on 32-channel tokens (4 layers for upernet-ms), a batch
    of 2 and its target with some ignored pixels."""
    torch.manual_seed(seed)
    layers = 4 if head_name == "upernet-ms" else 1
    head = build_head(head_name, 32 * layers, 5, layers=layers)
    tokens = torch.randn(2, layers, 32, 6, 10).half()
    target = torch.randint(0, 5, (2, 84, 140))
    target[0, :4] = 255
    return head, tokens, target


def _step_ops(head_name: str, loss: str) -> set[str]:
    head, tokens, target = _head_and_batch(head_name, 0)
    crit = SegLoss(loss, torch.linspace(0.5, 2.0, 5))
    with OpTrace() as trace:
        crit(head_logits(head, tokens, (84, 140), None), target).backward()
    return trace.ops


@pytest.mark.parametrize("head_name,loss", [("upernet", "focal_dice"), ("upernet-ms", "ce"), ("convnext", "weighted_ce"),
                                            ("linear", "lin_focal_dice")])
def test_no_step_op_lacks_a_deterministic_cuda_kernel(head_name, loss):
    with deterministic_mode(True):
        ops = _step_ops(head_name, loss)
    assert not ops & (NO_DETERMINISTIC_CUDA_KERNEL | NLL), ops & (NO_DETERMINISTIC_CUDA_KERNEL | NLL)


def test_the_trace_sees_the_kernels_the_usual_mode_uses():
    """Without the switch the same steps do use such kernels: the trace above could have found them."""
    assert {"_adaptive_avg_pool2d_backward", "upsample_bilinear2d_backward", "bincount"} <= _step_ops("upernet", "focal_dice")
    assert "upsample_bilinear2d_backward" in _step_ops("upernet-ms", "focal_dice")
    assert "nll_loss2d_forward" in _step_ops("convnext", "weighted_ce")


@pytest.mark.parametrize("head_name", ["upernet", "upernet-ms"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_the_deterministic_forms_give_the_same_numbers(head_name, loss):
    head, tokens, target = _head_and_batch(head_name, 1)
    crit = SegLoss(loss, torch.linspace(0.5, 2.0, 5))

    def step():
        head.zero_grad(set_to_none=True)
        value = crit(head_logits(head, tokens, (84, 140), None), target)
        value.backward()
        return value.detach(), {n: p.grad.clone() for n, p in head.named_parameters()}

    usual, usual_grads = step()
    with deterministic_mode(True):
        det, det_grads = step()
    assert torch.allclose(usual, det, rtol=1e-5), (usual, det)
    for n, g in usual_grads.items():
        assert torch.allclose(g, det_grads[n], rtol=1e-3, atol=1e-6), (n, (g - det_grads[n]).abs().max())


@pytest.mark.parametrize("h,w", [(26, 46), (6, 10), (7, 5), (1, 3)])
def test_matrix_pooling_and_upsampling_match_torch(h, w):
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    with deterministic_mode(True):
        for s in (1, 2, 3, 6):
            assert torch.allclose(adaptive_pool(x, s), F.adaptive_avg_pool2d(x, s), atol=1e-12), s
        y = torch.randn(2, 3, 3, 4, dtype=torch.float64)
        assert torch.allclose(upsample(y, (h, w)), F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False),
                              atol=1e-12)


def test_the_switch_is_recorded_and_undone(tmp_path):
    rng = np.random.default_rng(0)
    cache = write_token_cache(tmp_path / "c", {"train": learnable_split(4, rng), "val": learnable_split(2, rng)})
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    seen = []
    opts = RunOptions(device="cpu", progress=False, deterministic=True,
                      on_epoch=lambda e, row: seen.append((torch.are_deterministic_algorithms_enabled(),
                                                           torch.backends.cudnn.deterministic)))
    train(resolve(3, {"epochs": 2}), str(cache), str(tmp_path / "r"), opts, log=lambda s: None)
    assert seen == [(True, True), (True, True)]  # on during the run
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark) == before  # and undone after it
    assert json.loads((tmp_path / "r" / "config.json").read_text())["deterministic"] is True
    from seg.cli.experiments import train_head_flags

    assert train_head_flags(["--deterministic"], 3)[1]["deterministic"] is True  # sweeps pass it to every trial


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tuned_blocks_attend_through_the_math_kernel(checkpointing):
    """--tune-blocks trains attention: the fused attention kernels' CUDA backward is not deterministic,
    so under the switch attention runs as matmuls and a softmax, in the recomputation of
    --checkpointing too."""
    from seg.backbones import load_backbone
    from seg.backbones.tail import BackboneTail
    from seg.heads import TunedHead

    model, _ = load_backbone("vits14", random_init=True)
    tail = BackboneTail(model, 11)
    tail.requires_grad_(True)
    tail.checkpointing = checkpointing
    head = TunedHead(tail, build_head("convnext", 384, 5)).train()
    tokens = torch.randn(2, 1 + 6 * 10, 384)
    target = torch.randint(0, 5, (2, 84, 140))

    def ops():
        with OpTrace() as trace:
            F.cross_entropy(head_logits(head, tokens, (84, 140), None, (6, 10)), target, reduction="none").sum().backward()
        return trace.ops

    usual = ops()
    with deterministic_mode(True):
        det = ops()
    assert any("flash" in op for op in usual), usual  # the CPU's fused kernel, when not asked otherwise
    assert not any("attention" in op for op in det), det  # no fused kernel: the math one is matmuls
    assert "_softmax_backward_data" in det and "_softmax_backward_data" not in usual  # and its softmax
