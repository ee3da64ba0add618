import gc

import pytest

from compressor.gc_pause import paused_gc


def test_the_collector_is_off_inside_and_back_on_after():
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_the_collector_comes_back_after_an_error():
    with pytest.raises(RuntimeError), paused_gc():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_collector_the_caller_disabled_stays_disabled():
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_objects_made_inside_are_frozen_out_of_later_collections():
    before = gc.get_freeze_count()
    with paused_gc():
        kept = [[i] for i in range(1000)]
    assert gc.get_freeze_count() >= before + len(kept)
    gc.unfreeze()
