"""The evaluation report's figures: matplotlib without a display, each saved as a PNG in ctx.out."""
from __future__ import annotations

import os


def pyplot():
    import matplotlib   # on first use: --help and bad flags answer without loading it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, ctx, name: str) -> str:
    """Write `fig` to <ctx.out>/<name>, close it, and return `name` (the report links to it)."""
    fig.tight_layout()
    fig.savefig(os.path.join(ctx.out, name))
    pyplot().close(fig)
    return name
