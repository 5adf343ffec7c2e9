"""The contract every head keeps, checked once for all of them: a new head gets these checks by being
added to HEADS below. Shapes and dtype through the shared tokens -> logits path under autocast,
gradients reaching every trainable parameter, an exact state_dict round trip, and seeded init."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from seg.backbones import DinoV3VisionTransformer, DinoVisionTransformer
from seg.backbones.tail import BackboneTail
from seg.heads import HEADS as HEAD_NAMES, TunedHead, build_head, head_logits

DATA = Path(__file__).parent / "data"
K = 5
GRID = (4, 6)          # patch grid Hp x Wp
OUT = (22, 31)         # logits are upsampled to this (H, W): not a multiple of the grid on purpose


@dataclass
class HeadCase:
    name: str
    build: Callable[[], torch.nn.Module]
    tokens: Callable[[torch.Generator], torch.Tensor]   # a batch of cached-format tokens
    grid: Optional[tuple[int, int]] = None               # for tap tokens
    scale: int = 1                                       # raw logits lie on the patch grid x scale
    channels: int = K                                    # raw logits' channels (a mask decoder: its queries)


def layer_tokens(layers: int, dim: int):
    return lambda g: torch.randn(2, layers, dim, *GRID, generator=g).half()


def tuned(model_cls, fixture: str, start: int, head: str) -> HeadCase:
    config = torch.load(DATA / fixture, weights_only=True)["config"]
    dim, prefix = config["embed_dim"], 1 + config.get("num_register_tokens", config.get("n_storage_tokens", 0))

    def build():
        tail = BackboneTail(model_cls(**config), start)
        tail.requires_grad_(True)
        return TunedHead(tail, build_head(head, dim, K))

    return HeadCase(f"tuned-{fixture.split('_')[0]}-{head}", build,
                    lambda g: torch.randn(2, prefix + GRID[0] * GRID[1], dim, generator=g).half(), GRID)


def pmt_case() -> HeadCase:
    """PMT's decoder on ViT-S/14-with-registers-shaped levels (6 heads, 5 prefix tokens, masks at 2x)."""
    shape = dict(backbone="vits14_reg", embed_dim=48, grid=GRID, num_q=7, num_blocks=2, masked_attention=True)
    return HeadCase("pmt", lambda: build_head("pmt", 4 * 48, K, layers=4, pmt=shape),
                    lambda g: torch.randn(2, 4, 5 + GRID[0] * GRID[1], 48, generator=g).half(),
                    scale=2, channels=7)


HEADS = [
    HeadCase("convnext", lambda: build_head("convnext", 24, K), layer_tokens(1, 24)),
    HeadCase("upernet", lambda: build_head("upernet", 24, K), layer_tokens(1, 24)),
    HeadCase("linear", lambda: build_head("linear", 48, K, layers=2), layer_tokens(2, 24)),
    HeadCase("upernet-ms", lambda: build_head("upernet-ms", 4 * 16, K, layers=4), layer_tokens(4, 16), scale=4),
    HeadCase("upernet-ms-full", lambda: build_head("upernet-ms", 4 * 16, K, layers=4, ms_fusion="full"),
             layer_tokens(4, 16), scale=4),
    tuned(DinoVisionTransformer, "dinov2_tiny_reg4_golden.pt", 1, "upernet"),
    tuned(DinoV3VisionTransformer, "dinov3_tiny_golden.pt", 2, "convnext"),
    pmt_case(),
]


def test_every_named_head_is_in_the_contract():
    assert set(HEAD_NAMES) <= {c.name for c in HEADS}


def logits_of(head, case, tokens, amp=True):
    return head_logits(head, tokens, OUT, amp, case.grid)


def seeded(case: HeadCase, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return case.build()


@pytest.mark.parametrize("case", HEADS, ids=lambda c: c.name)
def test_output_shape_and_dtype_under_autocast(case):
    """head_logits runs the head under bf16 autocast (its raw output is bf16) and hands back float32
    logits at the requested size."""
    head = seeded(case, 0).train()
    tokens = case.tokens(torch.Generator().manual_seed(1))
    raw = []
    head.register_forward_hook(lambda mod, inp, out: raw.append(out))
    logits = logits_of(head, case, tokens, amp=True)
    out = raw[0][0][-1] if isinstance(raw[0], tuple) else raw[0]  # a mask decoder: its final mask logits
    assert out.dtype == torch.bfloat16 and out.shape == (2, case.channels, GRID[0] * case.scale, GRID[1] * case.scale)
    assert logits.shape == (2, K, *OUT) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert logits_of(head, case, tokens, amp=False).dtype == torch.float32


@pytest.mark.parametrize("case", HEADS, ids=lambda c: c.name)
def test_gradient_reaches_every_trainable_parameter(case):
    head = seeded(case, 0).train()
    tokens = case.tokens(torch.Generator().manual_seed(1))
    target = torch.randint(0, K, (2, *OUT), generator=torch.Generator().manual_seed(2))
    torch.nn.functional.cross_entropy(logits_of(head, case, tokens), target).backward()
    trainable = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    assert trainable
    dead = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead[:5]}"


@pytest.mark.parametrize("case", HEADS, ids=lambda c: c.name)
def test_state_dict_round_trip_gives_identical_logits(case):
    head = seeded(case, 0)
    tokens = case.tokens(torch.Generator().manual_seed(1))
    # a few training steps so BatchNorm statistics and weights are no longer their initial values
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    target = torch.randint(0, K, (2, *OUT), generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        head.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(logits_of(head, case, tokens, amp=False), target).backward()
        opt.step()
    other = seeded(case, 123)
    other.load_state_dict(head.state_dict())
    head.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(logits_of(head, case, tokens), logits_of(other, case, tokens))


@pytest.mark.parametrize("case", HEADS, ids=lambda c: c.name)
def test_deterministic_for_a_seed(case):
    tokens = case.tokens(torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = logits_of(seeded(case, 7).eval(), case, tokens)
        b = logits_of(seeded(case, 7).eval(), case, tokens)
        c = logits_of(seeded(case, 8).eval(), case, tokens)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the seed does reach the initial weights
