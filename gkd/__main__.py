"""`python -m gkd ...`: the same as the `gkd` command (what `torchrun -m gkd run ...` starts)."""

from gkd.cli import entry

if __name__ == "__main__":
    entry()
