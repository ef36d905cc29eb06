"""``python -m spade_edge``: the ``spade-edge`` command line."""

from .cli import main

main()
