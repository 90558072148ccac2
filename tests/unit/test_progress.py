import io

from action3d import progress


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_bars_only_at_a_terminal_and_not_when_quiet(monkeypatch, capsys):
    monkeypatch.setattr(progress, "_quiet", False)
    assert progress.show_bars(True, Tty()) and not progress.show_bars(False, Tty())
    assert not progress.show_bars(True, io.StringIO())  # a pipe or a log file
    progress.say("epoch 1")
    progress.set_quiet()
    assert not progress.show_bars(True, Tty())
    progress.say("epoch 2")
    assert capsys.readouterr().out == "epoch 1\n"
