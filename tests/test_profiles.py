"""Device profiles for ``fedge simulate --profile``: read strictly, assigned reproducibly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fedge.client.policy import OffloadSetting
from fedge.sim.emulation import SlowDevice
from fedge.sim.profiles import ProfileError, assign, load


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "profile.toml"
    path.write_text(text)
    return path


def test_groups_take_their_share_of_clients_and_override_the_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[default]\noffload = "when-short"\nbandwidth_mbps = 50\n\n'
        "[[group]]\nshare = 0.3\nslowdown = 5\n\n"
        '[[group]]\nshare = 0.1\nmemory_mb = 64\noffload = "never"\n',
    )
    profiles = assign(load(path), 20, seed=3)
    slow = [p for p in profiles if p.slowdown == 5]
    starved = [p for p in profiles if p.memory_mb == 64]
    assert len(slow) == 6
    assert len(starved) == 2
    assert len(profiles) == 20
    assert all(p.offload is OffloadSetting.WHEN_SHORT and p.bandwidth_mbps == 50 for p in slow)
    assert all(p.offload is OffloadSetting.NEVER and p.slowdown == 1 for p in starved)
    assert profiles == assign(load(path), 20, seed=3)  # the seed decides who is who
    assert profiles != assign(load(path), 20, seed=4)


def test_dropout_is_reproducible_and_about_as_frequent_as_asked(tmp_path: Path) -> None:
    (flaky,) = assign(load(write(tmp_path, "[default]\ndropout = 0.25\n")), 1, seed=0)
    draws = [flaky.drops_out(0, round_, 0) for round_ in range(1, 2001)]
    assert draws == [flaky.drops_out(0, round_, 0) for round_ in range(1, 2001)]
    assert 0.2 < sum(draws) / len(draws) < 0.3
    (steady,) = assign(load(write(tmp_path, "[default]\n")), 1, seed=0)
    assert not any(steady.drops_out(0, round_, 0) for round_ in range(1, 200))


def test_memory_and_bandwidth_as_the_placement_and_functions_see_them(tmp_path: Path) -> None:
    (small,) = assign(load(write(tmp_path, "[default]\nmemory_mb = 64\nbandwidth_mbps = 8\n")), 1, seed=0)
    assert small.free_memory(needed=256 * 2**20) == 64 * 2**20
    assert small.bandwidth == 1e6
    (plain,) = assign(load(write(tmp_path, "[default]\n")), 1, seed=0)
    assert plain.free_memory(needed=256 * 2**20) == 256 * 2**20
    assert plain.bandwidth is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[default]\nslowdown = 0.5\n", "default.slowdown"),
        ("[[group]]\nshare = 0.5\nslowdown = 0.5\n", "group 1: slowdown"),
        ("[[group]]\nshare = 0.7\n[[group]]\nshare = 0.5\n", "add up to more than 1"),
        ("[default]\nspeed = 2\n", "default.speed"),
        ('[default]\noffload = "sometimes"\n', "default.offload"),
        ("[default\n", "is not TOML"),
    ],
)
def test_a_bad_profile_is_refused_with_where_it_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        load(write(tmp_path, text))


def test_a_missing_profile_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read the profile file"):
        load(tmp_path / "absent.toml")


def test_a_slowed_device_waits_its_slowdown_and_its_link() -> None:
    started = time.perf_counter()
    SlowDevice(slowdown=3.0).computed(0.1)  # 0.1 s of compute on a 3x device: 0.2 s more
    SlowDevice(bandwidth=1e6).transferred(100_000)  # 100 kB at 1 MB/s: 0.1 s
    SlowDevice().transferred(10**12)  # no link set: as fast as loopback
    assert time.perf_counter() - started >= 0.3


def test_the_example_profile_in_the_readme_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "slow-devices.toml"
    profiles = assign(load(example), 20, seed=0)
    assert sum(p.slowdown == 5 for p in profiles) == 6
    assert sum(p.offload is OffloadSetting.NEVER for p in profiles) == 2


def test_a_slowed_device_stops_at_the_deadline_and_says_how_much_it_lacked() -> None:
    started = time.time()
    overrun = SlowDevice(slowdown=11.0, deadline=started + 0.2).computed(0.1)  # needs 1 s more, has 0.2
    assert 0.79 < overrun <= 1.0  # what the work lacked: 1 s less the (at most 0.2 s of) room it had
    assert 0.19 < time.time() - started < 0.8  # it waited for the deadline, not for the whole second
    assert SlowDevice(slowdown=2.0, deadline=time.time() + 60).computed(0.05) == 0
