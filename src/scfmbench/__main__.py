"""``python -m scfmbench``: the command line (see :mod:`scfmbench.cli`)."""

from scfmbench.cli import main

main()
