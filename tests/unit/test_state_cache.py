"""Both jobs turn the SDK's state cache on unless told otherwise (Beam 2.73 leaves it off)."""

from apache_beam.options.pipeline_options import PipelineOptions, WorkerOptions

from pipelines.options import STATE_CACHE_MB, with_state_cache


def cache_mb(argv: list[str]) -> int:
    return PipelineOptions(with_state_cache(argv)).view_as(WorkerOptions).max_cache_memory_usage_mb


def test_the_cache_is_on_by_default():
    assert cache_mb(["--runner=PrismRunner"]) == STATE_CACHE_MB > 0


def test_an_explicit_size_wins_in_either_spelling():
    assert cache_mb(["--max_cache_memory_usage_mb=16"]) == 16
    assert cache_mb(["--max_cache_memory_usage_mb", "0"]) == 0
