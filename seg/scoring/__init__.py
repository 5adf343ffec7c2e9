"""Scoring predictions: one confusion matrix per split and its summary (IoU, Dice, accuracy),
terminal tables and JSON, and the plots people look at."""
