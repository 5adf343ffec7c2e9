"""A head behind the tuned last blocks of the backbone: tap tokens -> logits."""

from __future__ import annotations

from torch import Tensor, nn

from seg.backbones.tail import BackboneTail


class TunedHead(nn.Module):
    """Tap tokens [B, T, C] (the stream entering block `tail.start`) -> tail blocks -> head logits.
    Its state dict holds the tuned blocks (`tail.*`) and the head (`head.*`)."""

    def __init__(self, tail: BackboneTail, head: nn.Module) -> None:
        super().__init__()
        self.tail, self.head = tail, head

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        return self.head(self.tail(tokens, grid))
