"""What the widgets share: a figure as PNG bytes for an ``ipywidgets.Image``, error text, the tokens axis and
the sliders of schedule parameters."""

from __future__ import annotations

import html
import io
from typing import Any

import ipywidgets as W
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from cptlab.viz import format_tokens


def png(fig: Figure) -> bytes:
    """``fig`` as PNG bytes at 80 dpi (what a widget's ``Image`` shows)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def error_html(text: str) -> str:
    """``text`` as red HTML, line breaks kept."""
    return f"<span style='color:#b00'>{html.escape(text).replace(chr(10), '<br>')}</span>"


def tokens_axis(ax: Any) -> None:
    """Label the x axis "tokens" with ``format_tokens`` ticks, and grid the axes."""
    ax.set_xlabel("tokens")
    ax.xaxis.set_major_formatter(FuncFormatter(format_tokens))
    ax.grid(alpha=0.3)


def column(title: str, *children: W.Widget) -> W.VBox:
    """Controls under a bold title."""
    return W.VBox([W.HTML(f"<b>{title}</b>"), *children])


def log_slider(description: str, value: float, lo: int, hi: int, fmt: str = ".2e") -> W.FloatLogSlider:
    """A slider over 10**lo .. 10**hi."""
    # continuous_update=False: the front end would otherwise send back, when it draws the slider, the value
    # snapped to its grid of exponents (3e-4 -> 10**-3.52 = 3.02e-4); now only a user's move sets a value
    return W.FloatLogSlider(value=value, base=10, min=lo, max=hi, step=0.01, description=description,
                            readout_format=fmt, style={"description_width": "8em"}, continuous_update=False)


def percent_slider(description: str, value: float, hi: float = 100.0, step: float = 0.5) -> W.FloatSlider:
    """A slider over 0 .. ``hi`` percent."""
    return W.FloatSlider(value=value, min=0.0, max=hi, step=step, description=description,
                         readout_format=".1f", style={"description_width": "8em"})
