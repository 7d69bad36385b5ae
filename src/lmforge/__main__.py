"""`python -m lmforge` (and `torchrun -m lmforge`) runs the CLI."""

from lmforge.cli import main

main()
