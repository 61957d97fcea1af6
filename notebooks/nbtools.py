"""Display helpers shared by the notebooks (presentation only: no package logic lives here).

- `show(fig, alt)`: a matplotlib figure as a PNG with alternative text. Jupyter's PNG output
  has no field for alt text and nbconvert warns "Alternative text is missing" for every such
  image, so the figure is also offered as an HTML `<img alt=...>` (which JupyterLab and
  nbconvert prefer) and the alt text is the `text/plain` form (which nbval compares).
- `md(text)`: a markdown output, for prose whose numbers are computed (f-strings).
"""
import base64
import html
import io

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

__all__ = ["show", "md"]


def show(fig, alt: str, dpi: int = 100) -> None:
    """Display `fig` (then close it) with `alt`, a sentence saying what the figure shows."""
    if not alt or not alt.strip():
        raise ValueError("alt: expected a non-empty description of the figure, got an empty string")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    png = base64.b64encode(buf.getvalue()).decode("ascii")
    display({"image/png": png,
             "text/html": f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}"/>',
             "text/plain": f"[figure] {alt}"}, raw=True)


def md(text: str) -> None:
    """Display `text` as markdown (numbers in it come from the cell's f-strings)."""
    display(Markdown(text))
