"""The `seg` command. Thin: each command parses flags, calls the stage, prints; user mistakes exit 1
with one line (`common.user_errors`)."""

from seg.cli import adapt, deploy, experiments, pipeline, tools  # noqa: F401  (they register the commands on the group)
from seg.cli.group import main

__all__ = ["main"]
