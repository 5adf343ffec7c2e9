"""PMT's plain mask decoder (mask classification) on cached encoder levels."""

from seg.heads.pmt.head import PMTHead

__all__ = ["PMTHead"]
