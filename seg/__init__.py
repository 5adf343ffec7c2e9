"""seg: semantic-segmentation heads trained on cached, frozen DINOv2 features."""

__version__ = "0.1.0"
