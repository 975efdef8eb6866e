"""Pictures of where a decoder looks and routes: attention per layer and head, top-k choices, expert routing.

    patterns = attention_patterns(run, tokens)     # [layer, batch, head, query, key], top-k scattered to dense
    routing = expert_routing(run, tokens)          # per layer (expert indices, gates) [batch, pos, top_k], or None
    plot_attention(patterns[:, 0], labels, "attention.png"); plot_routing(...)
    html = views_html(labels, patterns[:, 0], routing_row, title=...)   # one static interactive page

Dense attention is read from blocks.{i}.attn.hook_pattern; top-k attention from hook_topk_indices and
hook_topk_weights, scattered into a [query, key] matrix (keys a query did not keep get 0). The HTML page needs no
network (toyjax.report_html.html_page): pick a layer and head with the buttons, hover a token to see where it
attends (its row of the pattern colours the tokens), and read the chosen experts and gates per token in a table.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from toyjax.interp.hooked import hook_names, model_and_variables, run_with_cache
from toyjax.report_html import html_table


def scatter_topk(indices, weights, n_keys: int) -> np.ndarray:
    """Returns [..., query, key] attention: each query's kept weights at their key indices (0 elsewhere).

    indices, weights: [..., query, top_k]; a key listed twice (a query with fewer than top_k visible keys) sums.
    """
    indices, weights = np.asarray(indices), np.asarray(weights, np.float64)
    dense = np.zeros(indices.shape[:-1] + (n_keys,))
    flat = dense.reshape(-1, n_keys)
    rows = np.repeat(np.arange(flat.shape[0]), indices.shape[-1])
    np.add.at(flat, (rows, indices.reshape(-1)), weights.reshape(-1))
    return flat.reshape(dense.shape)


def view_names(run, tokens) -> list[str]:
    """Returns the cache names the views read (attention pattern or top-k choices; expert routing if any)."""
    available = set(hook_names(run, tokens))
    names = []
    for i in range(model_and_variables(run)[0].cfg.n_layers):
        attention = [f"blocks.{i}.attn.hook_pattern"]
        if attention[0] not in available:
            attention = [f"blocks.{i}.attn.hook_topk_indices", f"blocks.{i}.attn.hook_topk_weights"]
        names += attention + [n for n in (f"blocks.{i}.mlp.hook_expert_indices", f"blocks.{i}.mlp.hook_expert_gates")
                              if n in available]
    return names


def patterns_from_cache(cache: dict, n_layers: int) -> np.ndarray:
    """Returns [layer, batch, head, query, key] attention weights from a cache holding view_names."""
    out = []
    for i in range(n_layers):
        dense = cache.get(f"blocks.{i}.attn.hook_pattern")
        if dense is None:
            weights = cache[f"blocks.{i}.attn.hook_topk_weights"]  # [batch, head, query, top_k]
            dense = scatter_topk(cache[f"blocks.{i}.attn.hook_topk_indices"], weights, weights.shape[2])
        out.append(np.asarray(dense, np.float64))
    return np.stack(out)


def routing_from_cache(cache: dict, n_layers: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Returns per layer (expert indices, gates) [batch, pos, top_k] from a cache holding view_names, or None."""
    if "blocks.0.mlp.hook_expert_indices" not in cache:
        return None
    return [(np.asarray(cache[f"blocks.{i}.mlp.hook_expert_indices"]),
             np.asarray(cache[f"blocks.{i}.mlp.hook_expert_gates"], np.float64)) for i in range(n_layers)]


def attention_patterns(run, tokens) -> np.ndarray:
    """Returns [layer, batch, head, query, key] attention weights of a run on tokens [batch, pos]."""
    _, cache = run_with_cache(run, tokens, view_names(run, tokens))
    return patterns_from_cache(cache, model_and_variables(run)[0].cfg.n_layers)


def expert_routing(run, tokens) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Returns per layer (chosen experts, gates) [batch, pos, top_k] of an MoE run, or None for a dense one."""
    _, cache = run_with_cache(run, tokens, view_names(run, tokens))
    return routing_from_cache(cache, model_and_variables(run)[0].cfg.n_layers)


def pyplot():
    """Returns matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> Path:
    """Writes fig as a PNG at path (making its folder), closes it and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


def plot_attention(patterns, labels: list[str], path, *, title: str = "", heads=None) -> Path:
    """Writes a grid of [query, key] attention heatmaps (a row per layer, a column per head) and returns its path.

    patterns: [layer, head, query, key] of one sequence; heads: optional [(layer, head), ...] to draw only those.
    """
    plt = pyplot()
    patterns = np.asarray(patterns, np.float64)
    chosen = heads or [(layer, head) for layer in range(patterns.shape[0]) for head in range(patterns.shape[1])]
    columns = patterns.shape[1] if heads is None else len(chosen)
    rows = (len(chosen) + columns - 1) // columns
    size = max(2.4, 0.16 * len(labels))
    fig, axes = plt.subplots(rows, columns, figsize=(0.6 + size * columns, 0.4 + size * rows), squeeze=False)
    for ax, (layer, head) in zip(axes.flat, chosen):
        ax.imshow(patterns[layer, head], cmap="Blues", vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {layer} head {head}", fontsize=8)
        ticks = range(len(labels))
        ax.set_xticks(ticks, labels, rotation=90, fontsize=6)
        ax.set_yticks(ticks, labels, fontsize=6)
    fig.supxlabel("key")
    fig.supylabel("query")
    fig.suptitle(title)
    return save_figure(fig, path)


def routing_matrix(indices, gates, n_experts: int) -> np.ndarray:
    """Returns [pos, expert] gate of each chosen expert (0 where the expert was not chosen), one layer, one row."""
    return scatter_topk(np.asarray(indices)[None], gates[None], n_experts)[0]


def plot_routing(routing, labels: list[str], n_experts: int, path, *, title: str = "") -> Path:
    """Writes one [token, expert] heatmap of the gates per layer and returns its path.

    routing: per layer (chosen experts, gates) [pos, top_k] of one sequence.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, len(routing), figsize=(0.8 + (1 + 0.3 * n_experts) * len(routing),
                                                        1 + 0.18 * len(labels)), squeeze=False)
    for layer, (ax, (indices, gates)) in enumerate(zip(axes[0], routing)):
        image = ax.imshow(routing_matrix(indices, gates, n_experts), cmap="Greens", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.set_xlabel("expert")
        ax.set_xticks(range(n_experts))
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
    fig.colorbar(image, ax=axes[0].tolist(), label="gate")
    fig.suptitle(title)
    return save_figure(fig, path)


def routing_rows(labels: list[str], routing) -> tuple[list[str], list[list]]:
    """Returns the header and rows of the routing table: per token, per layer 'e3 0.71, e1 0.29'."""
    header = ["position", "token"] + [f"layer {i}" for i in range(len(routing))]
    rows = [[p, label] + [", ".join(f"e{int(e)} {g:.2f}" for e, g in zip(indices[p], gates[p]))
                          for indices, gates in routing] for p, label in enumerate(labels)]
    return header, rows


_VIEW_JS = """
(function () {
  var data = JSON.parse(document.getElementById('view-data').textContent);
  var tokens = document.querySelectorAll('#view-tokens .token');
  var status = document.getElementById('view-status');
  var current = {layer: 0, head: 0};
  function show(query) {
    var row = query === null ? null : data.patterns[current.layer][current.head][query];
    tokens.forEach(function (span, key) {
      var weight = row === null ? 0 : row[key];
      span.dataset.weight = weight.toFixed(4);
      span.style.background = 'rgba(30, 90, 200, ' + weight.toFixed(3) + ')';
      span.classList.toggle('query', key === query);
    });
    status.textContent = 'layer ' + current.layer + ', head ' + current.head +
      (query === null ? ': hover a token' : ': token ' + query + ' (' + data.labels[query] + ') attends');
  }
  document.querySelectorAll('#view-heads button').forEach(function (button) {
    button.addEventListener('click', function () {
      current = {layer: Number(button.dataset.layer), head: Number(button.dataset.head)};
      document.querySelectorAll('#view-heads button').forEach(function (b) { b.classList.remove('active'); });
      button.classList.add('active');
      show(null);
    });
  });
  tokens.forEach(function (span, query) {
    span.addEventListener('mouseenter', function () { show(query); });
  });
  show(null);
})();
"""

_VIEW_CSS = """<style>
#view-heads button { margin: 2px; } #view-heads button.active { background: #1e5ac8; color: white; }
#view-tokens .token { padding: 1px 3px; margin: 1px; border: 1px solid #ddd; border-radius: 2px; cursor: default;
  display: inline-block; } #view-tokens .token.query { outline: 2px solid #c82; }
</style>"""


def views_html(labels: list[str], patterns, routing=None, *, kind: str = "attention") -> list[str]:
    """Returns the parts (for toyjax.report_html.html_page) of the interactive attention view of one sequence.

    patterns: [layer, head, query, key]; routing: per layer (experts, gates) [pos, top_k] of the same sequence.
    """
    patterns = np.asarray(patterns, np.float64)
    buttons = "".join(f'<button data-layer="{layer}" data-head="{head}"{" class=active" if layer == head == 0 else ""}>'
                      f"L{layer} H{head}</button>"
                      for layer in range(patterns.shape[0]) for head in range(patterns.shape[1]))
    spans = "".join(f'<span class="token" data-position="{p}">{html.escape(label)}</span>'
                    for p, label in enumerate(labels))
    data = json.dumps({"labels": labels, "patterns": np.round(patterns, 4).tolist()}).replace("</", "<\\/")
    parts = [_VIEW_CSS, f"<h2>Attention ({html.escape(kind)})</h2>",
             "<p>Pick a layer and head, then hover a token: the tokens it attends to turn blue (darker = more "
             "weight; top-k attention shows only the kept keys).</p>",
             f'<div id="view-heads">{buttons}</div><p id="view-status"></p><div id="view-tokens">{spans}</div>',
             f'<script type="application/json" id="view-data">{data}</script>', f"<script>{_VIEW_JS}</script>"]
    if routing is not None:
        parts += ["<h2>Expert routing</h2><p>Per token and layer: the chosen experts and their gates "
                  "(after capacity: a dropped token has gate 0).</p>",
                  html_table("routing", *routing_rows(labels, routing))]
    return parts
