"""Every parser of untrusted input, driven by hypothesis with random, garbage and deeply nested input: each
either parses or raises its one documented error, never anything else (a RecursionError, an
OverflowError, a KeyError), so that no input can turn into a 500 or a traceback.

The parsers: ``fedge.jsonlimits.loads`` itself, the safetensors codec, update metadata with its int8 scales,
compression, grants, update intake as a whole, and the JSON bodies of the HTTP function and the executor.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import toy_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedge.codec import CodecError, decode, decode_view, encode, metadata_of
from fedge.compression import decompress
from fedge.jsonlimits import MAX_DEPTH, JSONError, loads
from fedge.security import pki, signing
from fedge.security.revocation import Standing
from fedge.server.errors import Rejected
from fedge.server.intake import CheckedUpdate, check
from fedge.server.rounds import Federation, FederationSettings
from fedge.server.store import Store
from fedge.wire import (
    BASE_SHA256,
    COMPRESSION,
    INT8_SCALES,
    NUM_EXAMPLES,
    TRAIN_LOSS,
    MetadataError,
    UpdateMeta,
)

# hypothesis notes that these strategies' reprs are long (they hold the hostile texts' recipes): harmless
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
)


@st.composite
def nested(draw: st.DrawFn, levels: st.SearchStrategy[int]) -> tuple[str, int]:
    """JSON nested exactly ``levels`` deep in arrays and objects, with brackets inside strings along the
    way (which do not nest), and how deep it is."""
    depth = draw(levels)
    text = json.dumps(draw(scalars))
    for _ in range(depth):
        decoy = json.dumps(draw(st.text(alphabet='[]{}"\\', max_size=6)))
        text = draw(st.sampled_from([f"[{decoy},{text}]", f'{{"k":{text},{decoy}:1}}', f"[{text}]"]))
    return text, depth


hostile_json = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200),
    json_values.map(json.dumps),
    nested(st.integers(0, 3 * MAX_DEPTH)).map(lambda pair: pair[0]),
    st.integers(MAX_DEPTH + 1, 20_000).map(lambda n: "[" * n + "]" * n),
    st.integers(MAX_DEPTH + 1, 20_000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(1000, 6000).map(lambda n: "1" * n),  # past int_max_str_digits
    st.integers(300, 400).map(lambda n: f"[1{'0' * n}]"),  # an integer past the float range
)


json_texts = hostile_json.filter(lambda text: isinstance(text, str))


def depth_of(value: Any) -> int:
    """How deep a parsed value nests, walked without recursion: the oracle ``loads`` is held to."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, list | dict):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


@FUZZ
@given(text=hostile_json)
def test_bounded_json_parses_or_raises_its_one_error(text: bytes | str) -> None:
    try:
        value = loads(text, max_bytes=1 << 20)
    except JSONError as exc:
        refusal = str(exc)
    else:
        assert depth_of(value) <= MAX_DEPTH
        assert value == json.loads(text)
        return
    assert refusal
    assert "\n" not in refusal


@FUZZ
@given(value=json_values)
def test_bounded_json_reads_what_json_writes(value: Any) -> None:
    assert loads(json.dumps(value), max_bytes=1 << 20) == value


@FUZZ
@given(case=nested(st.integers(0, 2 * MAX_DEPTH)))
def test_bounded_json_refuses_exactly_what_nests_past_the_limit(case: tuple[str, int]) -> None:
    text, depth = case
    if depth <= MAX_DEPTH:
        assert depth_of(loads(text, max_bytes=1 << 20)) == depth
    else:
        with pytest.raises(JSONError, match="nests deeper"):
            loads(text, max_bytes=1 << 20)


def test_bounded_json_refuses_a_text_over_its_size_before_reading_it() -> None:
    assert loads("[1, 2]", max_bytes=6) == [1, 2]
    with pytest.raises(JSONError, match="over the limit of 5"):
        loads("[1, 2]", max_bytes=5)


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", '{"scale": -Infinity}'])
def test_bounded_json_is_json_not_pythons_extension_of_it(text: str) -> None:
    with pytest.raises(JSONError, match="is not a JSON value"):
        loads(text, max_bytes=1 << 20)


def test_bounded_json_takes_linear_time_on_escaped_quotes() -> None:
    """A megabyte of backslashes and quotes (quadratic for a regular expression that looks for strings)."""
    started = time.perf_counter()
    for text in (b'"' + b'\\"' * 500_000, b'["' + b'\\\\"' * 300_000 + b"]"):
        with pytest.raises(JSONError):
            loads(text, max_bytes=1 << 21)
    assert time.perf_counter() - started < 10


def test_bounded_json_survives_a_hundred_thousand_levels() -> None:
    with pytest.raises(JSONError, match="nests deeper"):
        loads(b"[" * 100_000 + b"]" * 100_000, max_bytes=1 << 20)


def framed(header: bytes | str, tail: bytes = b"") -> bytes:
    raw = header.encode() if isinstance(header, str) else header
    return len(raw).to_bytes(8, "little") + raw + tail


def header_of(tensors: dict[str, Any], metadata: Any) -> str:
    return json.dumps({"__metadata__": metadata, **tensors})


safetensors_bodies = st.one_of(
    st.binary(max_size=300),
    hostile_json.map(framed),
    st.builds(lambda meta, tail: framed(header_of({}, meta), tail), json_values, st.binary(max_size=64)),
    json_texts.map(lambda text: framed(f'{{"__metadata__":{text}}}')),  # deep metadata, not a string
    st.builds(
        lambda dtype, shape, offsets: framed(
            header_of({"t": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}, {}), bytes(64)
        ),
        st.sampled_from(["F32", "I8", "BOOL", "BF16", "F8_E4M3", "C64", "X", 3]) | json_values,
        st.lists(st.integers(-2, 2**40), max_size=3) | json_values,
        st.lists(st.integers(-2, 2**66), max_size=3) | json_values,
    ),
)


@pytest.mark.parametrize("dtype", ["BF16", "F8_E5M2", "F8_E4M3", "F8_E8M0"])
def test_a_dtype_numpy_cannot_hold_is_a_codec_error(dtype: str) -> None:
    body = framed(header_of({"t": {"dtype": dtype, "shape": [8], "data_offsets": [0, 16]}}, {}), bytes(16))
    with pytest.raises(CodecError, match="which fedge does not take"):
        decode(body)


@FUZZ
@given(body=safetensors_bodies)
def test_the_safetensors_codec_decodes_or_raises_codec_error(body: bytes) -> None:
    try:
        metadata = metadata_of(body)
        tensors, again = decode(body)
    except CodecError as exc:
        refusal = str(exc)
    else:
        assert again == metadata
        assert all(isinstance(t, np.ndarray) for t in tensors.values())
        return
    assert refusal.startswith(("body", "safetensors", "malformed", "tensor"))


encoded_bodies = st.builds(
    lambda n, cut, tail: (
        encode({"a": np.arange(n, dtype=np.float32), "b": np.ones(n % 3, np.int8)})[:cut] + tail
    ),
    st.integers(0, 6),
    st.integers(0, 200) | st.none(),
    st.binary(max_size=3),
)  # whole bodies, truncated ones and ones with bytes after the data


@FUZZ
@given(body=safetensors_bodies | encoded_bodies)
def test_the_zero_copy_decoder_takes_and_refuses_exactly_what_the_library_does(body: bytes) -> None:
    try:
        expected = decode(body)
    except CodecError:
        with pytest.raises(CodecError):
            decode_view(body)
        return
    tensors, metadata = decode_view(body)
    assert metadata == expected[1]
    assert tensors.keys() == expected[0].keys()
    for name, tensor in expected[0].items():
        assert tensors[name].dtype == tensor.dtype
        np.testing.assert_array_equal(tensors[name], tensor)


metadata_texts = st.text(max_size=30) | json_texts
metadata_dicts = st.fixed_dictionaries(
    {},
    optional={
        NUM_EXAMPLES: st.sampled_from(["10", "0", "-1", "1e3", "9" * 5000]) | metadata_texts,
        TRAIN_LOSS: st.sampled_from(["0.5", "nan", "inf", "x"]) | metadata_texts,
        BASE_SHA256: st.sampled_from(["", "a" * 64]) | metadata_texts,
        COMPRESSION: st.sampled_from(["none", "float16", "int8", "zip"]),
        INT8_SCALES: st.dictionaries(
            st.sampled_from(["layer.weight", "layer.bias", "other"]),
            st.floats() | st.integers() | json_values,
            max_size=3,
        ).map(json.dumps)
        | metadata_texts,
    },
)


@FUZZ
@given(metadata=metadata_dicts)
def test_update_metadata_parses_or_raises_metadata_error(metadata: dict[str, str]) -> None:
    try:
        meta = UpdateMeta.from_metadata(metadata)
    except MetadataError as exc:  # CompressionError included
        refusal = str(exc)
    else:
        assert 0 < meta.num_examples < 2**31
        return
    assert refusal
    assert "\n" not in refusal


def int8_change(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.integers(-127, 128, t.shape, dtype=np.int8) for name, t in toy_model().items()}


@FUZZ
@given(metadata=metadata_dicts, seed=st.integers(0, 3), int8=st.booleans())
def test_decompression_restores_or_raises_compression_error(
    metadata: dict[str, str], seed: int, int8: bool
) -> None:
    base = toy_model(1.0)
    sent = int8_change(seed) if int8 else toy_model(2.0)
    try:
        restored = decompress(sent, metadata, base)
    except MetadataError as exc:
        refusal = str(exc)
    else:
        assert restored.keys() == sent.keys()
        return
    assert refusal
    assert "\n" not in refusal


@pytest.fixture(scope="module")
def grant_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("grants")
    pki.init_ca(directory, "test")
    pki.issue(directory, pki.Role.CLIENT, "alice")
    pki.issue(directory, pki.Role.EXECUTOR, "gpu")
    return directory


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


grant_fields = st.fixed_dictionaries(
    {},
    optional={
        "federation": json_values,
        "round": st.integers() | st.floats() | st.text(max_size=30) | json_values,
        "client": json_values,
        "executor": json_values,
        "expires_at": st.floats() | st.integers(-(10**400), 10**400) | json_values,
        "signature": json_values,
        "certificate": json_values,
    },
)
grant_headers = st.one_of(
    st.text(max_size=100),
    hostile_json.map(lambda t: b64(t if isinstance(t, bytes) else t.encode())),
    grant_fields.map(lambda fields: b64(json.dumps(fields).encode())),
    st.integers(20_000, 40_000).map(lambda n: b64(b"[" * n + b"]" * n)),
)


@FUZZ
@given(header=grant_headers)
def test_a_grant_reads_or_raises_signature_error(grant_pki: Path, header: str) -> None:
    ca = (grant_pki / "ca.pem").read_bytes()
    try:
        signing.grant_client(header)
        signing.read_grant(ca, header, time.time())
    except signing.SignatureError as exc:
        refusal = str(exc)
    else:
        raise AssertionError("a grant nobody signed was accepted")
    assert refusal
    assert "\n" not in refusal


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    fed = Federation(
        Store(tmp_path_factory.mktemp("intake")),
        FederationSettings(federation="test", task="toy", rounds=2, max_update_norm=10.0),
        registered_clients=lambda: ["alice"],
        initial_model=encode(toy_model(1.0)),
    )
    fed.tick()
    return fed


update_bodies = st.one_of(
    safetensors_bodies,
    st.builds(lambda meta: encode(toy_model(1.5), meta), metadata_dicts),
    st.builds(lambda meta, seed: encode(int8_change(seed), meta), metadata_dicts, st.integers(0, 3)),
)


@FUZZ
@given(body=update_bodies, round_=st.sampled_from([1, 2, 2**31 - 1]))
def test_intake_checks_an_update_or_rejects_it_with_a_code(
    federation: Federation, body: bytes, round_: int
) -> None:
    try:
        checked = check(round_, "alice", body, federation, federation.settings.max_update_norm)
    except Rejected as exc:
        status = exc.status
    else:
        assert isinstance(checked, CheckedUpdate)
        assert all(np.isfinite(t).all() for t in checked.tensors.values())
        return
    assert 400 <= status < 500


event_bodies = st.one_of(
    hostile_json.map(lambda t: t if isinstance(t, bytes) else t.encode()),
    st.integers(1 << 20, (1 << 20) + 10).map(lambda n: b" " * n),  # over the HTTP function's event limit
)


@settings(FUZZ, max_examples=60)
@given(body=event_bodies, function=st.sampled_from(["train", "evaluate", "initial_model", "calibrate", "x"]))
def test_the_http_function_answers_any_body_with_a_client_error(body: bytes, function: str) -> None:
    from fedge.edge_functions.adapters import http

    status, payload, _ = http._invoke(function, body)
    assert 400 <= status < 500, payload
    assert set(payload) == {"error", "detail"}


job_fields = st.fixed_dictionaries(
    {"task": st.just("toy"), "round": st.integers(0, 3), "config": st.just({}), "shard": st.just({})},
    optional={"grant": grant_headers, "weight": st.floats()},
)


@settings(FUZZ, max_examples=60)
@given(body=event_bodies | job_fields.map(lambda job: json.dumps(job).encode()))
def test_the_executor_answers_any_job_body_with_a_client_error(grant_pki: Path, body: bytes) -> None:
    from fedge.edge_functions.executor import Executor, _invoke

    creds = pki.credentials(grant_pki, pki.Role.EXECUTOR, "gpu")
    gpu = Executor("gpu", "test", "https://127.0.0.1:1", creds, Standing(grant_pki))
    alice = pki.Identity("test", pki.Role.CLIENT, "alice")
    status, payload = _invoke(gpu, body, alice)
    assert 400 <= status < 500, payload
    assert set(payload) == {"error", "detail"}


calibration_fields = st.fixed_dictionaries(
    {"task": st.sampled_from(["toy", "nope"]), "config": st.just({})},
    optional={"shape": json_values, "classes": json_values, "steps": json_values},
)


@settings(FUZZ, max_examples=60)
@given(body=event_bodies | calibration_fields.map(lambda fields: json.dumps(fields).encode()))
def test_the_executor_answers_any_calibration_body_with_a_client_error(grant_pki: Path, body: bytes) -> None:
    from fedge.edge_functions.executor import Executor, _calibrate

    creds = pki.credentials(grant_pki, pki.Role.EXECUTOR, "gpu")
    gpu = Executor("gpu", "test", "https://127.0.0.1:1", creds, Standing(grant_pki))
    status, payload = _calibrate(gpu, body)
    assert 400 <= status < 500, payload
    assert set(payload) == {"error", "detail"}
