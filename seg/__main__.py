"""`python -m seg ...` (and `torchrun -m seg ...`) run the same CLI as the `seg` command."""

from seg.cli import main

if __name__ == "__main__":  # not on re-import by spawned worker processes
    main(prog_name="seg")
