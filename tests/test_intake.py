"""Update intake as a function: a body in, a checked update or a coded refusal out, the round untouched."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import toy_model, update_body

from fedge.codec import decode, encode
from fedge.compression import compress
from fedge.server.errors import Rejected
from fedge.server.intake import check
from fedge.server.rounds import Federation, FederationSettings
from fedge.server.store import Store
from fedge.wire import UpdateMeta

CLIENTS = ["alice", "bob"]


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    federation = Federation(
        Store(tmp_path),
        FederationSettings(federation="test", task="toy", rounds=2, max_update_norm=10.0),
        registered_clients=lambda: CLIENTS,
        initial_model=encode(toy_model(1.0)),
    )
    federation.tick()
    return federation


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ({}, "bad_metadata"),
        ({"num_examples": "-3"}, "bad_metadata"),
        ({"num_examples": "3", "base_sha256": "../etc"}, "bad_metadata"),
        ({"num_examples": "3", "compression": "zip"}, "bad_compression"),
        ({"num_examples": "3", "compression": "int8", "int8_scales": '{"w": {"a": 1}}'}, "bad_compression"),
    ],
)  # fmt: skip
def test_bad_metadata_is_refused_with_its_code(fed: Federation, metadata: dict[str, str], code: str) -> None:
    with pytest.raises(Rejected) as refused:
        check(1, "alice", encode(toy_model(1.5), metadata), fed, fed.settings.max_update_norm)
    assert refused.value.code == code


def test_a_compressed_update_comes_out_at_full_precision_and_is_stored_as_sent(fed: Federation) -> None:
    sent, how = compress(toy_model(1.5), fed.model.tensors, "int8")
    body = encode(sent, {"num_examples": "7", **how.to_metadata()})
    checked = check(1, "alice", body, fed, fed.settings.max_update_norm)
    assert checked.body == body  # what the signature covers
    assert checked.meta.num_examples == 7
    assert checked.meta.compression.kind == "int8"
    for tensor in checked.tensors.values():
        assert tensor.dtype == np.float32
        np.testing.assert_allclose(tensor, 1.5, atol=1e-6)
    assert checked.restored is not None
    restored, metadata = decode(checked.restored)
    assert metadata == {"num_examples": "7"}
    np.testing.assert_array_equal(restored["layer.weight"], checked.tensors["layer.weight"])


def test_an_uncompressed_update_is_stored_only_as_sent(fed: Federation) -> None:
    checked = check(1, "alice", update_body(1.5), fed, fed.settings.max_update_norm)
    assert checked.restored is None


def test_the_norm_is_bounded_against_the_model_the_update_was_trained_from(fed: Federation) -> None:
    # toy_model has 15 entries: moving each by 2 is sqrt(60) ~ 7.7 away, by 3 is sqrt(135) ~ 11.6 away.
    check(1, "alice", update_body(3.0), fed, 10.0)
    with pytest.raises(Rejected) as refused:
        check(1, "alice", update_body(4.0), fed, 10.0)
    assert (refused.value.status, refused.value.code) == (422, "norm_too_large")
    check(1, "alice", update_body(4.0), fed, None)


def test_who_may_send_is_answered_before_what_was_sent(fed: Federation) -> None:
    with pytest.raises(Rejected) as refused:
        check(1, "mallory", b"\x00" * 64, fed, None)
    assert refused.value.code == "not_selected"
    with pytest.raises(Rejected) as refused:
        check(1, "alice", b"\x00" * 64, fed, None)
    assert refused.value.code == "malformed_update"


def test_a_refused_update_leaves_store_and_model_untouched(fed: Federation, tmp_path: Path) -> None:
    before = fed.model.sha256
    for body in [update_body(np.nan), update_body(50.0), encode(toy_model(), {"num_examples": "x"})]:
        with pytest.raises(Rejected):
            fed.submit(check(1, "alice", body, fed, fed.settings.max_update_norm))
    assert Store(tmp_path).updates(1) == []
    assert fed.model.sha256 == before
    for client in CLIENTS:
        fed.submit(check(1, client, update_body(2.0), fed, fed.settings.max_update_norm))
    np.testing.assert_allclose(fed.model.tensors["layer.bias"], 2.0)


def test_the_round_refuses_a_checked_update_it_no_longer_takes(fed: Federation) -> None:
    """Intake runs outside the round's lock: the round may close between the check and the submit."""
    late = check(1, "alice", update_body(2.0), fed, None)
    fed.submit(check(1, "bob", update_body(2.0), fed, None))
    fed.tick(now=time.time() + 3600)  # the deadline closes the round on bob's update alone
    with pytest.raises(Rejected) as refused:
        fed.submit(late)
    assert refused.value.code == "round_closed"


def test_a_stale_int8_update_is_restored_against_the_model_it_was_trained_from(tmp_path: Path) -> None:
    """Asynchronous mode: the change is from the version the client fetched, not from the current one."""
    fed = Federation(
        Store(tmp_path),
        FederationSettings(federation="test", task="toy", rounds=5, buffer=2),
        registered_clients=lambda: ["alice", "bob", "carol"],
        initial_model=encode(toy_model(1.0)),
    )
    fed.tick()
    version0, sha0 = fed.model.tensors, fed.model.sha256
    for client in ["alice", "bob"]:
        fed.submit(check(1, client, update_body(3.0), fed, None))
    assert fed.model.round == 1  # the current model is now 3.0 everywhere
    sent, how = compress(toy_model(2.0), version0, "int8")
    body = encode(sent, UpdateMeta(10, base_sha256=sha0, compression=how).to_metadata())
    checked = check(1, "carol", body, fed, None)
    np.testing.assert_allclose(checked.tensors["layer.weight"], 2.0, atol=1e-6)
    assert fed.submit(checked).staleness == 1
