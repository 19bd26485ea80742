"""`python -m bltkit` (and `torchrun -m bltkit train ...`) run the `blt` command."""

from .cli import main

if __name__ == "__main__":
    main()
