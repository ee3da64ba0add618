"""The README's measured figures are the committed benchmark results' (docs/bench/), so they cannot drift.

A passage that quotes a benchmark sits between ``<!-- figures: docs/bench/NAME.json -->`` and
``<!-- /figures -->``. Every decimal figure in it (``25.79``, ``+3.5%``, ``0.81x``) must be a value of
that file at the precision quoted (a number in it, in other units where it is bytes or seconds,
or with ``%`` a hundred times one), and a ratio
(``0.81x``) a value of the file too, or the figure quoted just before it over another figure of
the passage. Code (between backticks) and version strings are not figures.
"""

import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BLOCK = re.compile(r"<!-- figures: (\S+) -->\n(.*?)<!-- /figures -->", re.S)
FIGURE = re.compile(r"(?<![\w.-])[+-]?(\d[\d,]*\.\d+(?:e[-+]?\d+)?)(x|%)?(?![\w.]*\d)")


def _numbers(value) -> list[float]:
    # Every number of a results file.
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            return []
        # A quoted figure is read without its sign (a minus may be a dash), so a negative value also counts by its size.
        return [float(value), -float(value)] if value < 0 else [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


def _quoted(text: str) -> list[tuple[str, str]]:
    prose = re.sub(r"`[^`]*`", "", text)  # commands and options are not figures
    return [(m.group(1), m.group(2) or "") for m in FIGURE.finditer(prose)]


# A file's value may be quoted in other units: bytes as MB, MiB, GB or GiB, seconds as milliseconds.
SCALES = (1, 1e-6, 2**-20, 1e-9, 2**-30, 1e3)


def _close(figure: str, value: float) -> bool:
    mantissa, _, exponent = figure.replace(",", "").partition("e")
    digits = len(mantissa.split(".")[1])
    return abs(value - float(figure.replace(",", ""))) <= 10 ** (int(exponent or 0) - digits) / 2


def _wrong(text: str, numbers: list[float]) -> list[str]:
    # A plain figure is a value of the file (or, with %, a hundred times one). A ratio qualifies the
    # figure quoted just before it: that figure over another figure of the passage, as in
    # "104.4 (0.81x llama.cpp)" with llama.cpp's 128.3 quoted too, so no ratio passes by chance.
    # Ratios are taken of the file's own values, not of their rounded quotes.
    quoted = _quoted(text)
    values = {}  # each plain figure: the file's values it quotes
    scaled = [v * k for v in numbers for k in SCALES]
    for figure, kind in quoted:
        if kind != "x":
            candidates = scaled + ([100 * v for v in numbers] if kind == "%" else [])
            values[figure] = [v for v in candidates if _close(figure, v)]
    others = [v for found in values.values() for v in found]
    wrong, last = [], []
    for figure, kind in quoted:
        if kind == "x":
            stored = any(_close(figure, v) for v in numbers)  # a ratio the benchmark itself recorded
            if not stored and not any(b and _close(figure, a / b) for a in last for b in others):
                wrong.append(figure + kind)
            continue
        if not values[figure]:
            wrong.append(figure + kind)
        last = values[figure]
    return wrong


BLOCKS = BLOCK.findall((ROOT / "README.md").read_text())


def test_the_readme_quotes_committed_results():
    assert BLOCKS, "no figures blocks in README.md"
    for source, _ in BLOCKS:
        assert (ROOT / source).is_file(), f"README.md quotes {source}, which is not committed"


@pytest.mark.parametrize("source,text", BLOCKS, ids=[s for s, _ in BLOCKS])
def test_every_figure_of_a_passage_is_a_value_of_its_results_file(source, text):
    assert _wrong(text, _numbers(json.loads((ROOT / source).read_text()))) == [], f"README.md figures not in {source}"


# Sections whose decimals are definitions, not measurements (option defaults, a format's bits per parameter).
DEFINITIONS = {"Commands", "Methods and what they write"}


def test_measured_figures_appear_only_in_figures_blocks():
    section, stray = None, {}
    for line in BLOCK.sub("", (ROOT / "README.md").read_text()).splitlines():
        if line.startswith("## "):
            section = line[3:]
        elif _quoted(line) and section not in DEFINITIONS:
            stray.setdefault(section, []).append(line.strip())
    assert stray == {}
