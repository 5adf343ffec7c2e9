"""Starting a pmt head from a published PMT checkpoint (`--init-from-pmt FILE`): the decoder and the
level BatchNorms, as PMT's `_load_ckpt` reads them (a Lightning checkpoint's `state_dict` or the bare
dict of `pytorch_model.bin`, keys with `network.` and `._orig_mod` as saved, the encoder's and the
criterion's keys left out). The class head is dropped when the class count differs, as PMT's
`load_ckpt_class_head False` does; the annealing buffer is not taken (this run anneals from 1)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from seg.backbones.named import file_sha256
from seg.heads.pmt.head import official_head_weights
from seg.runtime.checkpoint import check_finite_head, load_torch_file
from seg.runtime.errors import SegError

CLASS_HEAD = ("decoder.class_head.weight", "decoder.class_head.bias")
ANNEALING = "decoder.attn_mask_probs"


def init_head_from_pmt(head: nn.Module, path: str | Path) -> dict:
    """Load a PMT checkpoint's decoder into a pmt `head`; one line naming the file when it does not fit.
    Returns what the run records of its origin."""
    path = Path(path)
    if not path.is_file():
        raise SegError(f"{path}: no such file (--init-from-pmt takes a PMT checkpoint: pytorch_model.bin or a .ckpt)")
    state = load_torch_file(path, what="unreadable checkpoint; cannot initialise from it")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    weights = official_head_weights(state) if isinstance(state, dict) else {}
    weights.pop(ANNEALING, None)  # a finished run's probabilities: this run anneals from 1
    if "decoder.q.weight" not in weights:
        raise SegError(f"{path}: not a PMT checkpoint (no decoder.q.weight under network. or at the top)")
    check_finite_head(weights, path)
    own = head.state_dict()
    dropped = []
    if all(k in weights for k in CLASS_HEAD) and weights[CLASS_HEAD[0]].shape != own[CLASS_HEAD[0]].shape:
        dropped = list(CLASS_HEAD)
        for k in CLASS_HEAD:
            del weights[k]
    missing = sorted(set(own) - set(weights) - set(dropped) - {ANNEALING})
    extra = sorted(set(weights) - set(own))
    wrong = sorted(k for k in set(weights) & set(own) if weights[k].shape != own[k].shape)
    if missing or extra or wrong:
        what = (f"shape of {wrong[0]}: {tuple(weights[wrong[0]].shape)} vs this head's {tuple(own[wrong[0]].shape)}"
                if wrong else f"missing {missing[0]}" if missing else f"unexpected {extra[0]}")
        raise SegError(f"{path}: its decoder does not fit this run's pmt head ({what}; {len(missing) + len(extra) + len(wrong)} "
                       "key(s) in all); match --queries, --decoder-blocks and the cache's backbone to the checkpoint's")
    head.load_state_dict(weights, strict=False)
    return {"pmt_checkpoint": str(path.resolve()), "sha256": file_sha256(path),
            "class_head": "dropped (other class count)" if dropped else "loaded"}
