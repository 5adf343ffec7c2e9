"""Datasets before the backbone: where samples are (layouts), decoding images and masks, class
tables, augmentation and copy-paste, ImageNet normalisation, class pixel counts, synthetic data."""
