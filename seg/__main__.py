"""`python -m seg ...` (and `torchrun -m seg ...`) run the same CLI as the `seg` command."""

from seg.cli import main

main(prog_name="seg")
