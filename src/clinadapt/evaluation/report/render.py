"""The report as a self-contained HTML page and as Markdown."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from clinadapt.evaluation.report.data import Block, Table
from clinadapt.evaluation.report.figures import Figure

STYLE = """body{font-family:system-ui,sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:0.4em 0 0.4em;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
td.num{text-align:right;white-space:nowrap}th{background:#f3f3f3}tr.n td{color:#555;
background:#fafafa;font-size:12px}img{max-width:100%}figure{margin:0.6em 0 1.4em}
figcaption,.note{color:#555;font-size:13px;max-width:1000px}.files a{margin-right:0.8em}
pre{background:#f6f6f6;padding:0.6em;font-size:12px;overflow-x:auto}details{margin:0.3em 0}"""


@dataclass
class Page:
    """The report's content in order: a title, an introduction and sections of blocks."""

    title: str
    intro: list[str]
    sections: list[tuple[str, list[Block]]] = field(default_factory=list)
    configs: list[tuple[str, str, str]] = field(default_factory=list)


def _rel(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


NUM = ' class="num"'


def _numeric(text: str) -> bool:
    """Numbers (and the '-' of a missing one) are right-aligned and never wrapped."""
    return text == "-" or (bool(text) and (text[0].isdigit() or text[0] in "+−"))


def _titled(t: Table, section: str, block: Block) -> bool:
    """Whether a table's title says more than the headings above it."""
    return bool(t.title) and t.title not in (section, block.heading)


def html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = []
    for i, row in enumerate(t.rows):
        cls = ' class="n"' if row and row[0].startswith("n (") and i == 0 else ""
        cells = "".join(f"<td{NUM if _numeric(c) else ''}>{html.escape(c)}</td>" for c in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{note}"


def html_figure(f: Figure, base: Path) -> str:
    links = " ".join(
        f'<a href="{html.escape(_rel(p, base))}">{fmt.upper()}</a>' for fmt, p in f.files.items()
    )
    return (
        f'<figure><img alt="{html.escape(f.title)}" src="data:image/png;base64,{f.png_base64()}">'
        f"<figcaption>{html.escape(f.caption)} "
        f'<span class="files">{links}</span></figcaption></figure>'
    )


def render_html(page: Page, base: Path) -> str:
    body = [f"<h1>{html.escape(page.title)}</h1>"]
    body += [f'<p class="note">{html.escape(p)}</p>' for p in page.intro]
    for heading, blocks in page.sections:
        body.append(f"<h2>{html.escape(heading)}</h2>")
        for b in blocks:
            if b.heading:
                body.append(f"<h3>{html.escape(b.heading)}</h3>")
            body += [f'<p class="note">{html.escape(n)}</p>' for n in b.notes]
            for t in b.tables:
                if _titled(t, heading, b):
                    body.append(f"<h4>{html.escape(t.title)}</h4>")
                body.append(html_table(t))
            body += [html_figure(f, base) for f in b.figures]
        if heading == "provenance":
            for label, runs, text in page.configs:
                body.append(
                    f"<details><summary>{html.escape(label)}</summary>"
                    f"<pre>{html.escape(runs)}</pre><pre>{html.escape(text)}</pre></details>"
                )
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(page.title)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(page: Page, base: Path) -> str:
    out = [f"# {page.title}\n", *[f"{p}\n" for p in page.intro]]
    for heading, blocks in page.sections:
        out.append(f"## {heading}\n")
        for b in blocks:
            if b.heading:
                out.append(f"### {b.heading}\n")
            out += [f"{n}\n" for n in b.notes]
            for t in b.tables:
                if _titled(t, heading, b):
                    out.append(f"**{t.title}**\n")
                out.append(markdown_table(t.header, t.rows) + "\n")
                if t.note:
                    out.append(f"{t.note}\n")
            for f in b.figures:
                png = f.files.get("png")
                if png is not None:
                    out.append(f"![{f.title}]({_rel(png, base)})\n")
                out.append(f"{f.caption}\n")
        if heading == "provenance":
            for label, runs, text in page.configs:
                out.append(f"**{label}**\n\n```\n{runs}\n```\n\n```yaml\n{text}```\n")
    return "\n".join(out)
