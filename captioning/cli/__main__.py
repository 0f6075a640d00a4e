"""`python -m captioning.cli` (used by `torchrun -m captioning.cli train`)."""

from captioning.cli import main

main()
