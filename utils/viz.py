"""Pictures and tables for the notebooks: the closing results table of every chapter and the attention
explorer of chapter 02. bertviz views arrive in chapter 06."""

from __future__ import annotations

from typing import Sequence


def results_table(rows: Sequence[tuple[str, object]], header: tuple[str, str] = ("measured", "value")):
    """A chapter's closing table of what it measured, as a Markdown display object.

    ``rows`` holds (label, value) pairs; floats are printed with 4 significant digits.
    """
    from IPython.display import Markdown

    def show(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.4g}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {label} | {show(value)} |" for label, value in rows]
    return Markdown("\n".join(lines))


def attention_explorer(tokens, q, k, *, causal: bool = False, temperature: float = 1.0, view: str = "bars",
                       query: int | None = None, max_tokens: int = 64):
    """Interactive attention weights of one head over a sentence (chapter 02).

    ``tokens`` are the T token strings, ``q`` and ``k`` their ``(T, d)`` queries and keys. The weights
    are ``softmax(q kᵀ / (sqrt(d) · temperature))``, computed by :mod:`utils.attention`, with the
    causal mask when ``causal`` is set. A temperature below 1 sharpens them, above 1 flattens them.
    Inputs longer than ``max_tokens`` are cut to their first ``max_tokens`` tokens, and a line says so:
    a bar chart or heatmap of more tokens is unreadable.

    Returns an ``ipywidgets.VBox`` with a query menu, a temperature slider, a causal-mask box and a
    bar-chart/heatmap toggle above the plot. It also works without a browser:
    ``explorer.update(query=3, temperature=0.5, view="heatmap", causal=True)`` sets any of the
    controls, redraws once and returns the matplotlib figure, and ``explorer.weights`` holds the
    ``(T, T)`` weights last drawn.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    import torch
    from IPython.display import clear_output, display

    from .attention import causal_mask, scaled_dot_product_attention

    tokens = [str(token) for token in tokens]
    if q.dim() != 2 or k.dim() != 2 or q.shape != k.shape or q.shape[0] != len(tokens):
        raise ValueError(f"attention_explorer needs q and k of shape (T, d) for T={len(tokens)} tokens; "
                         f"got q {tuple(q.shape)} and k {tuple(k.shape)}.")
    total = len(tokens)
    shown = min(total, max_tokens)
    tokens = tokens[:shown]
    q = q[:shown].detach().float().cpu()
    k = k[:shown].detach().float().cpu()
    labels = [token.replace("\n", "↵") for token in tokens]

    query_menu = widgets.Dropdown(options=[(f"{i}: {label!r}", i) for i, label in enumerate(labels)],
                                  value=shown - 1 if query is None else query, description="query")
    temperature_slider = widgets.FloatLogSlider(value=temperature, base=10, min=-1, max=1, step=0.05,
                                                description="temperature", readout_format=".2f")
    causal_box = widgets.Checkbox(value=causal, description="causal mask")
    view_buttons = widgets.ToggleButtons(options=[("bar chart", "bars"), ("heatmap", "heatmap")], value=view)
    plot = widgets.Output()
    notice = widgets.Label(f"Showing the first {shown} of {total} tokens." if total > shown else "")
    held = False  # set while update() changes several controls, so that they redraw once

    def weights_now() -> torch.Tensor:
        mask = causal_mask(shown) if causal_box.value else None
        # Dividing the queries by the temperature divides every score by it.
        _, weights = scaled_dot_product_attention(q / temperature_slider.value, k, k, mask, return_weights=True)
        return weights

    def draw_bars(weights: torch.Tensor, row: int):
        fig, ax = plt.subplots(figsize=(min(12, max(6, 0.3 * shown)), 3.2))
        colors = ["tab:orange" if key == row else "tab:blue" for key in range(shown)]
        ax.bar(range(shown), weights[row].numpy(), color=colors)
        ax.set_xticks(range(shown), labels, rotation=90, fontsize=9 if shown <= 32 else 6)
        for key, tick in enumerate(ax.get_xticklabels()):
            if causal_box.value and key > row:
                tick.set_color("lightgray")  # a future token, hidden by the causal mask
        ax.set_ylim(0, 1)
        ax.set_ylabel("attention weight")
        ax.set_title(f"query {row} {labels[row]!r} · temperature {temperature_slider.value:.2f}"
                     f"{' · causal' if causal_box.value else ''}: its weights over the keys sum to 1")
        return fig

    def draw_heatmap(weights: torch.Tensor, row: int):
        side = min(9, max(4, 0.22 * shown))
        fig, ax = plt.subplots(figsize=(side + 1, side))
        image = ax.imshow(weights.numpy(), cmap="viridis", vmin=0, vmax=1)
        fontsize = 9 if shown <= 32 else 6
        ax.set_xticks(range(shown), labels, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(shown), labels, fontsize=fontsize)
        ax.add_patch(plt.Rectangle((-0.5, row - 0.5), shown, 1, fill=False, edgecolor="tab:orange", linewidth=2))
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        ax.set_title(f"every query's weights · temperature {temperature_slider.value:.2f}"
                     f"{' · causal' if causal_box.value else ''}")
        fig.colorbar(image, ax=ax, fraction=0.046)
        return fig

    def redraw(_change=None):
        if held:
            return None
        weights = weights_now()
        box.weights = weights
        draw = draw_bars if view_buttons.value == "bars" else draw_heatmap
        fig = draw(weights, query_menu.value)
        fig.tight_layout()
        with plot:
            clear_output(wait=True)
            display(fig)
        plt.close(fig)  # shown once, in the widget, not again below the cell
        return fig

    def update(query: int | None = None, temperature: float | None = None, view: str | None = None,
               causal: bool | None = None):
        nonlocal held
        held = True
        try:
            for control, value in ((query_menu, query), (temperature_slider, temperature),
                                   (view_buttons, view), (causal_box, causal)):
                if value is not None:
                    control.value = value
        finally:
            held = False
        return redraw()

    for control in (query_menu, temperature_slider, causal_box, view_buttons):
        control.observe(redraw, names="value")
    controls = widgets.HBox([query_menu, temperature_slider, causal_box])
    box = widgets.VBox([notice, controls, view_buttons, plot] if notice.value else [controls, view_buttons, plot])
    box.update = update
    redraw()
    return box
