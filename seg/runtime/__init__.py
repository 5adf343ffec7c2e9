"""Process-level helpers every stage uses: device and precision, torchrun ranks, atomic writes,
directory locks, checkpoint files, which run directories seg may write, and the user-error type."""
