"""A Ctrl-C that lands where Python swallows it (a finalizer) still stops the study's loops."""
import signal

import pytest

from compsearch.search.interrupts import interrupts_remembered, raise_if_interrupted


class _InterruptedWhileFinalized:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)  # the handler runs here, inside __del__: Python ignores its exception
        sum(range(10))


def test_an_interrupt_swallowed_by_a_finalizer_is_raised_at_the_next_check():
    with interrupts_remembered():
        _InterruptedWhileFinalized()
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
    raise_if_interrupted()  # forgotten once the block ends
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_remembered():
            signal.raise_signal(signal.SIGINT)
            raise_if_interrupted()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
