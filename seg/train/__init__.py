"""Stage two's parts: presets, losses, epoch sampling, token sources, checks of the cache, building the
model and optimizer, the epoch loop and validation, run state (checkpoints, resume, best), reports.
`seg.train_head.Trainer` puts them together."""
