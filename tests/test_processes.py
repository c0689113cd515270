"""Process start-up helpers (maskdiff.ops.processes): the collector paused while a command
imports its libraries."""

from __future__ import annotations

import gc

import pytest

from maskdiff.ops.processes import paused_gc


@pytest.fixture
def gc_state():
    """Turns the collector back on or off as the test found it."""
    enabled = gc.isenabled()
    yield
    if enabled:
        gc.enable()
    else:
        gc.disable()


def test_the_collector_is_off_inside_and_what_was_made_is_frozen_after(gc_state) -> None:
    gc.enable()
    frozen = gc.get_freeze_count()
    with paused_gc():
        assert not gc.isenabled()
        made = [[] for _ in range(1000)]  # tracked containers, as an import makes them
        assert gc.get_freeze_count() == frozen
    assert gc.isenabled()
    assert gc.get_freeze_count() >= frozen + len(made)


def test_an_error_inside_still_turns_it_back_on(gc_state) -> None:
    gc.enable()
    with pytest.raises(ImportError), paused_gc():
        raise ImportError("a missing extra")
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off(gc_state) -> None:
    gc.disable()
    with paused_gc():
        pass
    assert not gc.isenabled()
