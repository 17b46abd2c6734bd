"""``python -m qbert_edge.cli``: the same as the ``qbert-edge`` console script."""

from qbert_edge.cli import main

main()
