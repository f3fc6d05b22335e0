"""The evaluation report's wasted-time bars: a legend entry only for a bar that is drawn."""
from __future__ import annotations

from evaluate_sections.failures import grouped_bars
from evaluate_sections.figures import pyplot


def test_a_method_without_a_positive_value_has_no_bar_and_no_legend_entry():
    plt = pyplot()
    fig, ax = plt.subplots()
    series = {"GEMINI": [0.08, 0.2], "HighFreq": [5.3, None], "Strawman": [0.0, None]}
    handles = grouped_bars(ax, ["worker", "machine"], series, {})
    assert list(handles) == ["GEMINI", "HighFreq"]
    ax.set_yscale("log")
    ax.legend(list(handles.values()), list(handles))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["GEMINI", "HighFreq"]
    assert len(ax.patches) == 4   # 2 methods x 2 kinds (HighFreq's missing machine kill: height 0)
    plt.close(fig)
