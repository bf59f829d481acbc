"""The LEAF-style Shakespeare data: roles parsed from the real plays, one client per (play, role)."""

from __future__ import annotations

import numpy as np

from fedge.edge_functions import datasets, shakespeare

SCENE = """ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Ber.
Long live the king!

Ham.
Now I am alone.
O, what a rogue and peasant slave am I! [Exit.]

First Clown.
Is she to be buried in Christian burial?
"""


def test_speeches_are_grouped_by_role_without_stage_directions() -> None:
    roles = shakespeare.speeches(SCENE)
    assert roles == {
        "Ber": "Who's there?\nLong live the king!",
        "Fran": "Nay, answer me: stand, and unfold yourself.",
        "Ham": "Now I am alone.\nO, what a rogue and peasant slave am I!",
        "First Clown": "Is she to be buried in Christian burial?",
    }


def test_the_real_plays_give_naturally_non_iid_clients() -> None:
    data = datasets.load("shakespeare")
    assert data.groups_train is not None
    assert len(data.y_test) == 2000
    sizes = np.bincount(data.groups_train)
    assert len(sizes) > 500
    assert sizes.max() <= shakespeare.MAX_PER_ROLE
    assert data.x_train.shape[1] == shakespeare.SEQUENCE
    assert data.x_train.max() < len(shakespeare.ALPHABET)
    hamlet = shakespeare.speeches(shakespeare.plays(shakespeare.fetch(datasets.cache_dir()))["hamlet"])
    assert {"Ham", "King", "Oph", "Ghost"} <= hamlet.keys()
    assert "To be, or not to be" in hamlet["Ham"]
