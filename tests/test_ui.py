"""flame.ui: what a user sees on a terminal and off one."""

import io

from rich.console import Console

from flame import ui


def _terminals(monkeypatch):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(ui, "console", Console(file=out, force_terminal=True, width=80, markup=False, highlight=False))
    monkeypatch.setattr(
        ui, "err_console", Console(file=err, force_terminal=True, width=80, markup=False, highlight=False)
    )
    monkeypatch.delenv("FLAME_QUIET", raising=False)
    return out, err


def test_a_line_printed_while_a_progress_display_is_live_goes_above_it(monkeypatch):
    out, err = _terminals(monkeypatch)
    bar = ui.progress()
    bar.add_task("train gla", total=10)
    bar.start()
    ui.print0("first step took 1.2 s (not counted in tokens/s)")  # it once ran into the bar's line on stderr
    bar.stop()
    assert out.getvalue() == ""
    assert "first step took 1.2 s (not counted in tokens/s)" in err.getvalue()
    ui.print0("after")  # no display live: stdout, as always
    assert out.getvalue() == "after\n" and ui._LIVE == []


def test_off_a_terminal_lines_stay_on_stdout(monkeypatch):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(ui, "console", Console(file=out, width=80))
    monkeypatch.setattr(ui, "err_console", Console(file=err, width=80))
    bar = ui.progress()  # disabled off a terminal: callers print plain lines
    bar.start()
    ui.print0("step 10  loss 4.1801")
    bar.stop()
    assert out.getvalue() == "step 10  loss 4.1801\n" and err.getvalue() == "" and ui._LIVE == []
