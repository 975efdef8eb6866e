"""Renders a comparison (toyjax.compare's results dict) as one static HTML file and as Markdown.

The HTML needs no network: inline CSS, and a few lines of inline JavaScript that sort any table whose header
is clicked (numbers numerically, by each cell's data-value). Words are coloured by surprisal on one scale for
every model (white = 0 bits, full red = the 99th percentile of all word surprisals), so colours compare.
"""

from __future__ import annotations

import html

import numpy as np

MAX_COLOURED_EXAMPLES = 30

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
th.asc::after { content: " \\25B2"; } th.desc::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.words span { padding: 0 1px; border-radius: 2px; }
.words .simplified { text-decoration: underline dotted; } .words .unk { text-decoration: underline wavy; }
.model { font-weight: bold; font-size: 0.8em; color: #555; }
.example { margin: 0.8em 0; padding: 0.4em; border-left: 3px solid #ddd; }
"""

_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, column) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var descending = !th.classList.contains('desc');
      table.querySelectorAll('th').forEach(function (h) { h.classList.remove('asc', 'desc'); });
      th.classList.add(descending ? 'desc' : 'asc');
      function key(row) {
        var cell = row.cells[column];
        var value = cell.getAttribute('data-value');
        if (value !== null && value !== '' && !isNaN(Number(value))) { return Number(value); }
        return cell.textContent.trim().toLowerCase();
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (typeof x !== typeof y) { x = String(x); y = String(y); }
        var order = x < y ? -1 : (x > y ? 1 : 0);
        return descending ? -order : order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cell(value, digits: int = 3) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="num" data-value="{value}">{_fmt(value, digits)}</td>'
    return f"<td>{html.escape(_fmt(value, digits))}</td>"


def html_table(table_id: str, header: list[str], rows: list[list]) -> str:
    """Returns a sortable <table> (numbers sort by their data-value; see `html_page`)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def run_rows(results: dict) -> tuple[list[str], list[list]]:
    """Returns the header and rows of the per-model summary (shared by HTML and Markdown)."""
    header = ["model", "tokenizer", "vocab", "params", "step", "bits/word", "simplified", "unk", "examples/s"]
    header += [f"{f} acc" for f in ("owner", "location", "pronoun")]
    rows = []
    for r in results["runs"]:
        rows.append([r["name"], r["tokenizer"], r["vocab_size"], r["params"], r["step"], r["bits_per_word"],
                     r["simplified_share"], r["unk_share"], r["examples_per_s"]]
                    + [r["probes"][f]["accuracy"] for f in ("owner", "location", "pronoun")])
    return header, rows


def probe_rows(results: dict) -> tuple[list[str], list[list]]:
    header = ["model", "family", "accuracy", "chance", "mean margin (bits)", "scored", "not expressible"]
    rows = [[r["name"], family, s["accuracy"], s["chance"], s["mean_margin_bits"], s["expressible"], s["not_expressible"]]
            for r in results["runs"] for family, s in r["probes"].items()]
    return header, rows


def _words_text(words: list[dict]) -> str:
    return ", ".join(f"{w['word']} ({w['bits']:.1f})" for w in words)


def _coloured(example: dict, names: list[str], cap: float) -> str:
    lines = []
    for name in names:
        spans = []
        for word, bits, status in zip(example["words"], example["word_bits"][name], example["word_status"][name]):
            alpha = min(max(bits / cap, 0.0), 1.0)
            title = f"{word}: {bits:.2f} bits" + ("" if status == "word" else f" ({status})")
            spans.append(f'<span class="{status}" style="background: rgba(220, 40, 40, {alpha:.2f})" '
                         f'title="{html.escape(title)}">{html.escape(word)}</span>')
        lines.append(f'<div class="model">{html.escape(name)}: {example["bits_per_word"][name]:.3f} bits/word</div>'
                     f'<div class="words">{" ".join(spans)}</div>')
    return f'<div class="example" id="example-{example["id"]}"><b>example {example["id"]}</b>{"".join(lines)}</div>'


def render_html(results: dict) -> str:
    """Returns the comparison as one self-contained HTML page."""
    names = [r["name"] for r in results["runs"]]
    examples = results["examples"]
    all_bits = np.concatenate([np.asarray(e["word_bits"][n], float) for e in examples for n in names] or [np.ones(1)])
    cap = float(max(np.percentile(all_bits, 99), 1e-6))
    parts = [f"<h1>Comparison of {len(names)} runs</h1>",
             f"<p>Text: {html.escape(results.get('text_source', ''))}; {len(examples)} examples. "
             f"Bits per word are over the same original words for every tokenizer.</p>",
             "<h2>Models</h2>", html_table("runs", *run_rows(results)),
             "<h2>Probes</h2>", html_table("probes", *probe_rows(results)),
             f"<p>Hard: {html.escape(results['hardness']['definition'])}.</p>"]
    shown: list[int] = []
    for index, pair in enumerate(results["pairs"]):
        parts.append(f"<h2>Hard for {html.escape(pair['hard_for'])}, easy for {html.escape(pair['easy_for'])}</h2>")
        rows = [[e["id"], e["gap"], e["z_hard"], e["z_easy"], _words_text(e["words"])] for e in pair["examples"]]
        parts.append(html_table(f"pair-{index}", ["example", "z gap", f"z {pair['hard_for']}", f"z {pair['easy_for']}",
                                              "words responsible (bits difference)"], rows))
        shown += [e["id"] for e in pair["examples"]]
    parts.append("<h2>Hard for all</h2>")
    parts.append(html_table("hard-all", ["example", "min z", "words responsible (min bits)"],
                        [[e["id"], e["min_z"], _words_text(e["words"])] for e in results["hard_for_all"]]))
    shown += [e["id"] for e in results["hard_for_all"]]
    parts.append("<h2>Examples</h2>")
    header = ["example"] + [f"bits/word {n}" for n in names] + [f"z {n}" for n in names] + ["text"]
    rows = [[e["id"]] + [e["bits_per_word"][n] for n in names] + [e["z"][n] for n in names] + [e["text"][:120]]
            for e in examples]
    parts.append(html_table("examples", header, rows))
    ordered = list(dict.fromkeys(shown + [e["id"] for e in examples]))[:MAX_COLOURED_EXAMPLES]
    parts.append(f"<h2>Words coloured by surprisal</h2><p>White = 0 bits, full red = {cap:.1f} bits or more (one "
                 f"scale for all models); dotted underline = simplified word, wavy = unknown word; hover for bits.</p>")
    parts += [_coloured(examples[i], names, cap) for i in ordered]
    parts.append("<h2>Probe details</h2>")
    header = ["family", "prompt (end)", "answer", "wrong"] + [f"margin {n}" for n in names]
    rows = [[p["family"], p["prompt_tail"], p["answer"], " ".join(p["wrong"])]
            + [p["results"][n]["margin_bits"] if p["results"][n]["expressible"] else "not expressible" for n in names]
            for p in results["probes"]]
    parts.append(html_table("probe-details", header, rows))
    return html_page("compare: " + ", ".join(names), parts)


def html_page(title: str, parts: list[str]) -> str:
    """Returns one self-contained HTML page (inline CSS and the table-sorting script) around the parts."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(parts)}<script>{_JS}</script></body></html>\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(results: dict) -> str:
    """Returns the comparison as Markdown (the per-word surprisals are in results.json)."""
    names = [r["name"] for r in results["runs"]]
    out = [f"# Comparison of {len(names)} runs", "", f"Text: {results.get('text_source', '')}; "
           f"{len(results['examples'])} examples; bits per word over the same original words.", "",
           "## Models", "", markdown_table(*run_rows(results)), "", "## Probes", "", markdown_table(*probe_rows(results)), "",
           f"Hard: {results['hardness']['definition']}.", ""]
    texts = {e["id"]: e["text"] for e in results["examples"]}
    for pair in results["pairs"]:
        out += [f"## Hard for {pair['hard_for']}, easy for {pair['easy_for']}", ""]
        out += [f"- example {e['id']} (z gap {e['gap']:.2f}): {_words_text(e['words'])} — {texts[e['id']][:100]}..."
                for e in pair["examples"]] or ["(none)"]
        out.append("")
    out += ["## Hard for all", ""]
    out += [f"- example {e['id']} (min z {e['min_z']:.2f}): {_words_text(e['words'])} — {texts[e['id']][:100]}..."
            for e in results["hard_for_all"]] or ["(none)"]
    header = ["example"] + [f"bits/word {n}" for n in names] + [f"z {n}" for n in names]
    rows = [[e["id"]] + [e["bits_per_word"][n] for n in names] + [e["z"][n] for n in names] for e in results["examples"]]
    out += ["", "## Examples", "", markdown_table(header, rows), ""]
    return "\n".join(out)

