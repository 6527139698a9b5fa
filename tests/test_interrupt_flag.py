"""A Ctrl-C that Python swallows (raised inside a callback whose exceptions it ignores,
such as logging's at-fork hook while Ray starts processes) still stops the command."""

from __future__ import annotations

import argparse
import os
import signal

import pytest

from mendis_ray import cli, interrupt


def _swallowed_ctrl_c() -> None:
    """Press Ctrl-C inside ``__del__``: the KeyboardInterrupt is printed and ignored."""

    class Eats:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)

    Eats()


def test_the_cli_stops_on_a_swallowed_ctrl_c(monkeypatch, capsys) -> None:
    ran = []

    def command(args) -> int:
        _swallowed_ctrl_c()
        ran.append("to the end")  # the exception did not reach us
        return 0

    parser = argparse.ArgumentParser()
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_subparsers(dest="command").add_parser("x").set_defaults(func=command)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    stopped = []  # not a Ray this test session may have started: record the call
    monkeypatch.setattr(cli, "_stop_embedded_ray", lambda: stopped.append(1))
    before = signal.getsignal(signal.SIGINT)
    assert cli.main(["x"]) == 130
    assert ran == ["to the end"] and "interrupted" in capsys.readouterr().err
    assert stopped == [1]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_pending_lasts_for_its_run_only_and_plain_ctrl_c_still_raises() -> None:
    with interrupt.catching():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert interrupt.pending()
    assert not interrupt.pending()
