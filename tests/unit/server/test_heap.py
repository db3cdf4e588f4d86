"""Start-up objects are frozen out of the garbage collector's full collections."""

from __future__ import annotations

import gc

from execguard.server.heap import freeze_startup_objects


class _Node:
    """A container the collector tracks."""

    def __init__(self) -> None:
        self.children: list[_Node] = []


def test_objects_alive_at_start_up_leave_the_collected_generations() -> None:
    gc.unfreeze()
    built = _Node()
    built.children.append(_Node())
    try:
        assert any(built is obj for obj in gc.get_objects())  # in one of the generations
        freeze_startup_objects()
        assert gc.get_freeze_count() > 0
        for generation in (0, 1, 2):
            assert not any(built is obj for obj in gc.get_objects(generation=generation))
        later = _Node()
        assert any(later is obj for obj in gc.get_objects(generation=0))
    finally:
        gc.unfreeze()
