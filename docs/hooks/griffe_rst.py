r"""Griffe extension: render natgrad's reST-flavoured docstrings as the Markdown mkdocstrings expects.

The docstrings are Google style with a few reST constructs that read well in ``help()``; for the
site they become Markdown: ``:math:`x``` → ``\(x\)`` and ``.. math::`` blocks → ``\[ … \]``
(pymdownx.arithmatex, MathJax in the browser), cross-reference roles (``:class:`~a.B```) → code,
literal blocks (``text::`` + an indented block) → fenced code, and simple tables → Markdown tables.
Loaded by mkdocs.yml's mkdocstrings options (``extensions``).
"""
from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|meth|func|mod|attr|data|obj|exc|py:\w+):`~?([^`]+)`")
_MATH = re.compile(r":math:`([^`]+)`")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
    """The indented block after ``lines[start - 1]`` (blank lines inside kept), and where it ends."""
    i = start
    while i < len(lines) and not lines[i].strip():
        i += 1
    body_start = i
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
        i += 1
    end = i
    while end > body_start and not lines[end - 1].strip():
        end -= 1
    return lines[body_start:end], end


def _table(lines: list[str]) -> list[str]:
    """A reST simple table (``===  ===`` borders) as a Markdown table."""
    border = lines[0]
    spans = [(m.start(), m.end()) for m in re.finditer(r"=+", border)]
    rows: list[list[str]] = []
    header_rows = 0
    for line in lines[1:]:
        if re.fullmatch(r"[= ]+", line.strip() or "x"):
            header_rows = header_rows or len(rows)
            continue
        cells = []
        for k, (a, _) in enumerate(spans):
            b = spans[k + 1][0] if k + 1 < len(spans) else None
            cells.append(line[a:b].strip())
        if rows and not cells[0] and any(cells[1:]):  # a continuation line
            rows[-1] = [f"{x} {y}".strip() for x, y in zip(rows[-1], cells)]
        else:
            rows.append(cells)
    if header_rows != 1:
        rows.insert(0, [""] * len(spans))
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(spans)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]]
    return out


def to_markdown(text: str) -> str:
    """Converts the reST constructs natgrad's docstrings use to Markdown."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        base = _indent(line)
        if stripped.startswith(".. math::"):
            body, i = _block(lines, i + 1, base)
            pad = " " * base
            out += ["", pad + "\\["] + [pad + ln.strip() for ln in body] + [pad + "\\]", ""]
            continue
        if re.fullmatch(r"=+( +=+)+", stripped):
            j = i + 1
            borders = 1
            while j < len(lines) and borders < 3 and lines[j].strip():
                if re.fullmatch(r"=+( +=+)+", lines[j].strip()):
                    borders += 1
                j += 1
            table = textwrap.dedent("\n".join(lines[i:j])).split("\n")
            out += ["", *[" " * base + t for t in _table(table)], ""]
            i = j
            continue
        if stripped.endswith("::") and not stripped.startswith(".."):
            head = line[: len(line.rstrip()) - 1]  # "text::" -> "text:"
            if stripped in ("Example::", "Examples::", "Usage::"):
                head = " " * base + "*" + stripped[:-2] + ":*"  # not a Google section
            body, i = _block(lines, i + 1, base)
            pad = " " * base
            code = textwrap.dedent("\n".join(body)).split("\n")
            out += [head, "", pad + "```python", *[pad + c if c else "" for c in code], pad + "```", ""]
            continue
        out.append(line)
        i += 1
    text = "\n".join(out)
    text = _MATH.sub(lambda m: "\\(" + m.group(1) + "\\)", text)
    return _ROLE.sub(lambda m: "`" + m.group(1) + "`", text)


class RstToMarkdown(griffe.Extension):
    """Rewrites every docstring with :func:`to_markdown` as griffe loads the package."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
