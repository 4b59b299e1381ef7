"""Writing a matplotlib figure: the one ending every report plot shares."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_png(plt: Any, fig: Any, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (PNG, 110 dpi), close it; return ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
