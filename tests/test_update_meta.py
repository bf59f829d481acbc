"""An update's metadata: one type builds and parses it, and bad values are refused with a clear error."""

from __future__ import annotations

import pytest

from fedge.pricing import Usage
from fedge.wire import Compression, CompressionError, MetadataError, UpdateMeta

SHA = "ab" * 32


def test_metadata_round_trips_through_its_strings() -> None:
    meta = UpdateMeta(12, 0.25, SHA, Compression("int8", {"w": 0.5, "b": 2.0}))
    assert UpdateMeta.from_metadata(meta.to_metadata()) == meta
    assert UpdateMeta(3).to_metadata() == {"num_examples": "3"}


@pytest.mark.parametrize(
    ("metadata", "error"),
    [
        ({}, MetadataError),
        ({"num_examples": "0"}, MetadataError),
        ({"num_examples": "ten"}, MetadataError),
        ({"num_examples": "1", "train_loss": "low"}, MetadataError),
        ({"num_examples": "1", "base_sha256": "not a sha"}, MetadataError),
        ({"num_examples": "1", "compression": "zip"}, CompressionError),
        ({"num_examples": "1", "compression": "int8"}, CompressionError),
        ({"num_examples": "1", "compression": "int8", "int8_scales": '{"w": {"x": 1}}'}, CompressionError),
        ({"num_examples": "1", "compression": "int8", "int8_scales": '{"w": [1]}'}, CompressionError),
        ({"num_examples": "1", "compression": "int8", "int8_scales": '{"w": true}'}, CompressionError),
        ({"num_examples": "1", "compression": "int8", "int8_scales": "[1, 2]"}, CompressionError),
        ({"num_examples": "1", "compression": "int8", "int8_scales": "[" * 100_000}, CompressionError),
        ({"num_examples": "1", "compression": "int8", "int8_scales": "{" * 2_000_000}, CompressionError),
    ],
    ids=["missing", "zero", "not-int", "loss", "sha", "unknown-kind", "no-scales", "nested-object",
         "nested-list", "bool", "list", "deep", "long"],
)  # fmt: skip
def test_bad_metadata_is_refused_with_its_reason(metadata: dict[str, str], error: type[Exception]) -> None:
    with pytest.raises(error):
        UpdateMeta.from_metadata(metadata)


def test_compression_is_checked_before_the_example_count() -> None:
    """A compressed body with broken scales says so, whatever else is wrong with it (the server's order)."""
    with pytest.raises(CompressionError):
        UpdateMeta.from_metadata({"compression": "int8"})


def test_names_with_brackets_inside_strings_are_not_nesting() -> None:
    meta = UpdateMeta.from_metadata(
        {"num_examples": "1", "compression": "int8", "int8_scales": '{"a[0]{": 1}'}
    )
    assert meta.compression.int8_scales == {"a[0]{": 1.0}


def test_usage_round_trips_and_unknown_usage_fields_are_ignored() -> None:
    usage = Usage(executor_seconds=2.5, executor_gb_seconds=5.0, executor_invocations=1, gpu_seconds=2.5)
    meta = UpdateMeta(4, usage=usage)
    assert UpdateMeta.from_metadata(meta.to_metadata()).usage == usage
    later = {"num_examples": "4", "usage": '{"device_seconds": 1, "tpu_seconds": 3}'}
    assert UpdateMeta.from_metadata(later).usage == Usage(device_seconds=1.0)
    assert UpdateMeta.from_metadata({"num_examples": "4"}).usage is None


@pytest.mark.parametrize(
    "usage",
    [
        "[1, 2]",
        '{"device_seconds": -1}',
        '{"device_seconds": 1e300}',
        '{"device_seconds": "1"}',
        '{"device_seconds": true}',
        '{"device_invocations": 1.5}',
        '{"bytes_down": ' + "9" * 3000 + "}",
    ],
)
def test_bad_usage_is_refused(usage: str) -> None:
    with pytest.raises(MetadataError, match="usage"):
        UpdateMeta.from_metadata({"num_examples": "1", "usage": usage})
