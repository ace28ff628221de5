"""The one progress bar (medmim.progress) used by data preparation, training, evaluate and predict."""

import io

from medmim.progress import ProgressBar


def test_bar_reports_counts_and_messages_in_a_log_file():
    out = io.StringIO()  # not a terminal: rich draws the bar once, when it stops
    with ProgressBar(3, "predict", file=out) as bar:
        bar.print("medmim predict: a.png: not an image")
        for _ in range(3):
            bar.advance()
    text = out.getvalue()
    assert "medmim predict: a.png: not an image" in text
    assert "predict" in text and "3/3" in text


def test_stage_names_in_brackets_are_shown_as_written():
    out = io.StringIO()
    with ProgressBar(1, "[pretrain:mae] batches", file=out) as bar:
        bar.advance()
    assert "[pretrain:mae] batches" in out.getvalue()


def test_disabled_bar_writes_only_messages():
    out = io.StringIO()
    with ProgressBar(5, "evaluate test", enabled=False, file=out) as bar:
        bar.advance(5)
        bar.describe("other")
        bar.print("one line")
    assert out.getvalue() == "one line\n"


def test_empty_bar_is_off():
    out = io.StringIO()
    with ProgressBar(0, "nothing", file=out) as bar:
        bar.advance()
    assert out.getvalue() == ""
