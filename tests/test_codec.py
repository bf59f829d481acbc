"""The tensor codec accepts well-formed safetensors and refuses everything else with a clear error."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from safetensors.numpy import save

from fedge.codec import CodecError, decode, decode_view, encode, encode_hashed, sha256


def test_round_trip_keeps_names_dtypes_values_and_metadata() -> None:
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], dtype=np.int64)}
    decoded, metadata = decode(encode(tensors, {"num_examples": "7"}))
    assert metadata == {"num_examples": "7"}
    assert decoded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert decoded[name].dtype == t.dtype
        np.testing.assert_array_equal(decoded[name], t)


def test_encoding_is_canonical_so_models_can_be_named_by_hash() -> None:
    tensors = {"z": np.ones(4, np.float32), "a": np.arange(3, dtype=np.int64), "h": np.zeros(2, np.float16)}
    metadata = {"round": "1", "task": "mnist", "num_examples": "9"}
    bodies = {encode(tensors, metadata) for _ in range(20)}
    bodies.add(encode(dict(reversed(tensors.items())), dict(reversed(metadata.items()))))
    assert len({sha256(body) for body in bodies}) == 1


def test_encoding_without_metadata_is_byte_identical_to_the_safetensors_library() -> None:
    tensors = {"z": np.ones((2, 3), np.float32), "a": np.arange(3, dtype=np.int64), "b": np.array([True])}
    assert encode(tensors) == save(tensors)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x01\x00",
        (10**9).to_bytes(8, "little") + b"{}",
        (5).to_bytes(8, "little") + b"nope!",
        (2).to_bytes(8, "little") + b"[]",
        pickle.dumps({"w": np.ones(3)}),
        (22).to_bytes(8, "little") + b'{"w":{"dtype":"F32"}}  ',
    ],
    ids=["empty", "short", "huge-header", "not-json", "not-object", "pickle", "bad-tensor-entry"],
)
def test_malformed_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(CodecError):
        decode(body)


def test_the_zero_copy_decoder_gives_read_only_views_of_the_body() -> None:
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], dtype=np.int64)}
    body = encode(tensors, {"num_examples": "7"})
    decoded, metadata = decode_view(body)
    assert metadata == {"num_examples": "7"}
    for name, t in tensors.items():
        np.testing.assert_array_equal(decoded[name], t)
        assert not decoded[name].flags.writeable
        assert np.shares_memory(decoded[name], np.frombuffer(body, np.uint8))


def test_a_body_hashed_while_encoded_is_the_same_body_with_its_sha256() -> None:
    tensors = {"z": np.ones((3, 4), np.float32), "a": np.arange(3, dtype=np.int64)}
    body, digest = encode_hashed(tensors, {"num_examples": "2"})
    assert body == encode(tensors, {"num_examples": "2"})
    assert digest == sha256(body)


def test_metadata_must_be_strings() -> None:
    header = b'{"__metadata__":{"n":5}}'
    with pytest.raises(CodecError, match="metadata"):
        decode(len(header).to_bytes(8, "little") + header)
