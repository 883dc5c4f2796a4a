"""Tables to paste into a paper or a note: LaTeX (booktabs), Markdown and CSV from one list of rows; and the
aligned text tables of the terminal (``text_table``).

Numbers are written with 2 decimals (nats); None is an em dash (LaTeX: --). LaTeX text is escaped
(_ % & # $ { } ~ ^ \\), Markdown cells have their pipes escaped, CSV follows RFC 4180 (the csv module)."""

from __future__ import annotations

import csv
import io
import re
import shlex
import unicodedata
from typing import Any, Sequence

_LATEX = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "−": "$-$", "≥": r"$\geq$",
          "≤": r"$\leq$", "—": "--", "|": r"\textbar{}", "<": r"\textless{}", ">": r"\textgreater{}",
          "×": r"$\times$", "π": r"$\pi$", "√": r"$\surd$"}


def plural(count: int, noun: str) -> str:
    """'1 thread', '2 threads'; '1 test digit', '2 test digits'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def path_word(path: Any) -> str:
    """A path as one argument of a command: a relative one that begins with a dash written ./-run, which no
    command reads as an option, unchanged otherwise."""
    text = str(path)
    return "./" + text if text.startswith("-") else text


def shell_word(path: Any) -> str:
    """A path as one word of a command to paste into a shell: quoted where it holds spaces or shell characters
    ('my run' → "'my run'"), a relative one that begins with a dash written ./-run (`path_word`; until 2026-12-06
    the hint `vaelab evaluate -run` after training into --out=-run failed: "the following arguments are required:
    run_dir"), unchanged otherwise."""
    return shlex.quote(path_word(path))


def display_width(text: str) -> int:
    """The columns a terminal gives ``text``: two for an East Asian wide or full-width character (実, Ｋ), none for a
    combining mark (the accent of e + U+0301) or a zero-width format character, one for every other. Until
    2026-12-06 the tables padded by ``len``, which counts code points: 実験一 counted 3 where a terminal gives it 6, and
    its row's cells stood 3 columns right of the others'."""
    return sum(0 if unicodedata.category(char) in ("Mn", "Me", "Cf") else
               2 if unicodedata.east_asian_width(char) in ("W", "F") else 1 for char in text)


def one_line(text: str) -> str:
    """``text`` as one line a terminal shows as it is: a control character (a line break, a tab) written as Python
    escapes it (\\n, \\t, \\x1b), and a byte of a file name that is not UTF-8, which Python holds as a surrogate,
    as \\xff. vaelab refuses such names for what it writes (``atomic.path_problem``), but a run renamed afterwards
    is still listed: until 2026-12-06 a line break in its name broke its row of `vaelab runs` in two, and a byte that
    is not UTF-8 ended `runs` in a traceback where the terminal's stream is strict UTF-8."""
    return "".join(map(_one_line_char, text))


def _one_line_char(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:            # os.fsdecode's surrogateescape: the byte code − 0xDC00 of the name
        return f"\\x{code - 0xDC00:02x}"
    return repr(char)[1:-1] if code < 32 or code == 127 or 0xD800 <= code <= 0xDFFF else char


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: bool = False,
               rule: bool = False) -> list[str]:
    """The lines of a table for a terminal: each column as wide as its widest cell on screen (``display_width``),
    two spaces between columns, cells left-aligned (``right``: right-aligned), a rule of dashes under the header
    where ``rule``; each cell on its line (``one_line``)."""
    table = [[one_line(cell) for cell in header], *([one_line(cell) for cell in row] for row in rows)]
    widths = [max(display_width(row[i]) for row in table) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        pads = [" " * (width - display_width(cell)) for cell, width in zip(cells, widths)]
        return "  ".join(pad + cell if right else cell + pad for cell, pad in zip(cells, pads))

    lines = [line(row) for row in table]
    return lines[:1] + ["  ".join("-" * width for width in widths)] + lines[1:] if rule else lines


def latex_escape(text: str) -> str:
    """Text as LaTeX typesets it (pdflatex, the inputenc of any LaTeX since 2018): its specials escaped, ± − ≥ ≤ × π √
    in math mode, a letter with a combining circumflex as the accent \\^{} ("log p̂(x)" of the gap warnings: U+0302
    is no character pdflatex knows, and the table did not compile until 2026-12-07), "-" before "-" as "-{}", so
    that a flag stays two hyphens ("--gap-steps" was typeset with an en dash), and the sign of a number ("gap -10.74",
    not "IWAE-1000") as the minus $-$ the table's cells have (it was a hyphen in the caption)."""
    out = []
    for index, char in enumerate(text):
        before, following = text[index - 1:index] if index else "", text[index + 1:index + 2]
        if char == "\u0302":                                   # written with the letter before it
            continue
        if char == "-" and following.isdigit() and before in ("", " ", "(", "["):
            out.append(_LATEX["−"])
            continue
        escaped = _LATEX.get(char, char) + "{}" * (char == "-" and following == "-")
        out.append(rf"\^{{{escaped}}}" if following == "\u0302" else escaped)
    return "".join(out)


def markdown_escape(text: str) -> str:
    """Text in a Markdown table as it reads: the characters that would make emphasis, code, a link or a new cell
    escaped by a backslash, and < written &lt; so that no HTML is made (a run named `*best*`, `a|b`, `<b>`; until
    2026-12-06 only | was escaped, and a run named *best* showed as an italic best)."""
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", text).replace("<", "&lt;")


class Written(str):
    """A number already written out with the digits its caller chose (``"8.3337e-5"``, an mpmath ``nstr``): a number
    column, right-aligned; in LaTeX in math mode, ``$8.3337 \\times 10^{-5}$``, where .2f would read 0.00."""


def latex_number(text: str) -> str:
    """``-1.5e-7`` as ``$-1.5 \\times 10^{-7}$``; a number without an exponent in math mode too (its minus a minus)."""
    mantissa, _, exponent = text.partition("e")
    return f"${mantissa}" + (rf" \times 10^{{{int(exponent)}}}" if exponent else "") + "$"


def _cell(value: Any, kind: str) -> str:
    if isinstance(value, Written):
        return latex_number(value) if kind == "latex" else str(value)
    if value is None:
        return "--" if kind == "latex" else "—" if kind == "markdown" else ""
    if isinstance(value, float):
        text = f"{value:.2f}"
        return text.replace("-", "$-$", 1) if kind == "latex" and value < 0 else text
    return latex_escape(str(value)) if kind == "latex" else markdown_escape(str(value)) if kind == "markdown" \
        else str(value)


def render_table(header: Sequence[str], rows: Sequence[Sequence[Any]], kind: str, caption: str = "") -> str:
    """``kind`` latex | markdown | csv. Text columns are left-aligned, number columns right-aligned (LaTeX). A CSV
    file has no caption: what it says (which digits, K, weights) is a last column, "measured", on every row."""
    if kind == "csv":
        if caption:
            header, rows = [*header, "measured"], [[*row, caption] for row in rows]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([["" if v is None else (f"{v:.6f}" if isinstance(v, float) else v) for v in row]
                          for row in rows])
        return buffer.getvalue().rstrip("\n")
    numeric = [bool(rows) and all(isinstance(r[i], (int, float, Written)) or r[i] is None for r in rows)
               for i in range(len(header))]                   # right-aligned columns
    if kind == "markdown":
        lines = ["| " + " | ".join(markdown_escape(h) for h in header) + " |",
                 "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
        lines += ["| " + " | ".join(_cell(v, kind) for v in row) + " |" for row in rows]
        return "\n".join(lines + ([f"\n{markdown_escape(caption)}"] if caption else []))
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{" + "".join("r" if n else "l" for n in numeric) + "}",
             r"\toprule", " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(_cell(v, kind) for v in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(r"\caption{" + latex_escape(caption) + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines)
