"""Adapting a trained head to unlabeled images of a new domain from the cache: class-balanced
pseudo-labels (CBST) and rounds of self-training guarded against collapse."""
