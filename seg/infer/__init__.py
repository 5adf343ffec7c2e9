"""Using a trained run: loading it from disk (`runs`), running backbone + head on images with
test-time augmentation (`segmenter`), and sliding-window inference (`sliding_window`)."""
