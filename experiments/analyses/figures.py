"""Saving matplotlib figures atomically, with one look for every figure of the report."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402

from dictionary_learning_ext.io import write_bytes  # noqa: E402

plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 9,
                     "axes.titlesize": 10, "legend.fontsize": 8})


def save_figure(fig, path: str | Path, tight_layout: bool = True) -> Path:
    """PNG written atomically (a crash never leaves a truncated image), figure closed.

    ``tight_layout=False`` keeps a layout the caller already made (e.g. ``fig.tight_layout(rect=...)``
    leaving room for a suptitle).
    """
    buf = io.BytesIO()
    if tight_layout:
        fig.tight_layout()  # panels' labels must not overlap their neighbours
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return write_bytes(path, buf.getvalue())
