"""Figure helpers shared by the stages (each stage keeps its own plotting module)."""
from __future__ import annotations

from pathlib import Path


def save_figure(fig, path: str | Path | None, dpi: int = 120):
    """Save ``fig`` to ``path`` (parents created) when a path is given; return the figure."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig
