"""caa.report.html: the page's shell and the escaped pieces every section is made of."""

from __future__ import annotations

import base64
import hashlib
import re

from caa.report.html import esc, figure, new_figure, num, number, page, table, wrap
from caa.store.schemas import REPORT_GENERATOR


def test_esc_escapes_markup_and_quotes() -> None:
    assert (
        esc("<a href=\"x\" title='y'>&</a>")
        == "&lt;a href=&quot;x&quot; title=&#x27;y&#x27;&gt;&amp;&lt;/a&gt;"
    )
    assert esc(3.5) == "3.5"
    assert esc(None) == "None"


def test_esc_shows_control_characters_but_keeps_line_breaks_and_tabs() -> None:
    assert esc("a\nb\tc") == "a\nb\tc"
    assert esc("\x1b[2J\r\u202e<") == "\\x1b[2J\\r\\u202e&lt;"


def test_num_and_number() -> None:
    assert num(0.12345) == "0.123"
    assert num(2, "{:d}") == "2"
    assert num(None) == "–" and num(float("nan")) == "–"
    assert number(100.0) == "100" and number(0.5) == "0.5" and number(3) == "3"
    assert number(True) == "True"  # a boolean is no number
    assert number("<b>") == "&lt;b&gt;"


def test_table_marks_numeric_cells_and_row_classes() -> None:
    html = table(["layer", "<i>gain</i>"], [["a", "=0.5"], ["b", "=1"]], row_classes=["picked", ""])
    assert html == (
        '<div class="scroll"><table><thead><tr><th>layer</th><th><i>gain</i></th></tr></thead><tbody>'
        '<tr class="picked"><td>a</td><td class="n">0.5</td></tr>'
        '<tr><td>b</td><td class="n">1</td></tr>'
        "</tbody></table></div>"
    )
    assert table(["x"], []) == wrap("<th>x</th>", "")


def test_page_has_the_generator_the_policy_and_the_script_it_allows() -> None:
    html = page("a <title>", "<p>body</p>")
    assert html.startswith("<!DOCTYPE html>\n")
    assert "<title>a &lt;title&gt;</title>" in html
    assert f'<meta name="generator" content="{REPORT_GENERATOR} ' in html
    assert "<p>body</p>\n</body></html>\n" in html
    script = re.search(r"<script>(.*?)</script>", html, re.S)
    assert script is not None
    digest = base64.b64encode(hashlib.sha256(script.group(1).encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in html  # the policy allows exactly this script
    assert "default-src 'none'" in html


def test_figure_embeds_a_png_of_the_figure_size() -> None:
    fig, axes = new_figure(2, 3.0, 2.0)
    assert len(axes) == 2
    axes[0].plot([0, 1], [1, 0])
    html = figure(fig, "the <b>caption</b>")
    found = re.fullmatch(
        r'<figure><img src="data:image/png;base64,([A-Za-z0-9+/=]+)" width="300" height="200" '
        r'alt="figure"><figcaption>the <b>caption</b></figcaption></figure>',
        html,
    )
    assert found is not None
    assert base64.b64decode(found.group(1)).startswith(b"\x89PNG\r\n\x1a\n")
