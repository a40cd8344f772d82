"""The state cache weighs our state values the same, without walking every module's globals each time."""

import objsize
from apache_beam.runners.worker.statecache import get_deep_size

from transforms.dedup import SeenIds
from transforms.state_cache import PickledCell, measure_cached_state_cheaply


def test_module_globals_are_no_longer_walked_and_sizes_stay_the_same(monkeypatch):
    # objsize's own default; a pipeline run earlier in this process may have switched it already.
    monkeypatch.setattr(objsize, "default_settings", objsize.default_settings.replace(exclude_modules_globals=True))
    values = [[SeenIds(0b1011, 123).encode()], [b"x" * 24, 7], [("key", 3)]]
    before = [get_deep_size(value) for value in values]
    assert objsize.default_settings.exclude_modules_globals  # objsize's default, the slow path

    measure_cached_state_cheaply()

    assert objsize.default_settings.exclude_modules_globals is False
    assert [get_deep_size(value) for value in values] == before


class BytesOnlyCell:
    """A ReadModifyWrite cell that, like one with a BytesCoder, holds bytes or nothing."""

    def __init__(self) -> None:
        self.value: bytes | None = None

    def read(self) -> bytes | None:
        return self.value

    def write(self, value: bytes) -> None:
        assert isinstance(value, bytes)
        self.value = value

    def clear(self) -> None:
        self.value = None


def test_a_pickled_cell_keeps_a_many_object_value_as_bytes_the_cache_weighs_at_once():
    users = {f"00000000-0000-4000-8000-{i:012d}" for i in range(3000)}
    cell = BytesOnlyCell()
    pickled = PickledCell(cell)  # type: ignore[arg-type]
    assert pickled.read() is None

    pickled.write((users, 7))

    assert isinstance(cell.value, bytes)
    assert pickled.read() == (users, 7)
    # The cache weighs what the cell holds: one bytes object instead of 3,000 strings in a set.
    assert get_deep_size([cell.value]) < get_deep_size([(users, 7)])
    pickled.clear()
    assert pickled.read() is None
