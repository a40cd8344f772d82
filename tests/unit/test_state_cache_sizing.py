"""The state cache weighs our state values the same, without walking every module's globals each time."""

import objsize
from apache_beam.runners.worker.statecache import get_deep_size

from transforms.dedup import SeenIds
from transforms.state_cache import measure_cached_state_cheaply


def test_module_globals_are_no_longer_walked_and_sizes_stay_the_same(monkeypatch):
    # objsize's own default; a pipeline run earlier in this process may have switched it already.
    monkeypatch.setattr(objsize, "default_settings", objsize.default_settings.replace(exclude_modules_globals=True))
    values = [[SeenIds(0b1011, 123).encode()], [b"x" * 24, 7], [("key", 3)]]
    before = [get_deep_size(value) for value in values]
    assert objsize.default_settings.exclude_modules_globals  # objsize's default, the slow path

    measure_cached_state_cheaply()

    assert objsize.default_settings.exclude_modules_globals is False
    assert [get_deep_size(value) for value in values] == before
