"""The training loops' shared stop request: Ctrl-C or SIGTERM once asks, twice interrupts."""

import signal

import pytest

from egaku.training.runtime import StopOnSignal


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_asks_to_stop_the_second_interrupts_and_handlers_come_back(first):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with StopOnSignal() as stop:
        assert not stop.requested
        signal.raise_signal(first)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert {sig: signal.getsignal(sig) for sig in before} == before
