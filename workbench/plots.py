"""Saving figures, one way for every stage (each stage keeps its own plotting module)."""
from __future__ import annotations

from pathlib import Path


def save_figure(fig, path: str | Path | None, dpi: int = 120, tight: bool = False):
    """Save ``fig`` to ``path`` (parents created) when a path is given; return the figure.
    ``tight``: crop the canvas to what is drawn (``bbox_inches="tight"``)."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight" if tight else None)
    return fig
