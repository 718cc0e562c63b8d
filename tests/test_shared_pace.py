"""Shards on one key share one pace and one schedule through OUT (`pipeline.shared_pace`).

Unit tests on fake clocks (a wall clock shared by the "processes" and each one's loop
clock), with the notes exchanged through a real board folder; then runs on the mock: the
board a run leaves, the next run starting from it, and one key per shard.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import yaml
from checks import ThreadedMock, write_job_spec

from pipeline.credentials import key_env_name, read_api_key
from pipeline.errors import CredentialsError, SpecError
from pipeline.jobspec.load import load_spec, spec_from_data
from pipeline.limiter import Limiter
from pipeline.mockapi.server import MockConfig
from pipeline.pace import Pace
from pipeline.run.job import run_job
from pipeline.shard import Shard
from pipeline.shared_pace import LIVE_S, SWITCH_S, PaceBoard, PaceNote, SharedPace
from pipeline.store.layout import PACE_DIR

KEY = "rf-shared-pace-UNIQUE-5b1c"
RATE = 10.0  # the spec's request rate in these tests


class Clocks:
    """One wall clock; each process's loop clock is it minus its own offset."""

    def __init__(self) -> None:
        self.wall_now = 1_800_000_000.123  # not on any round slot boundary

    def wall(self) -> float:
        return self.wall_now

    def loop_of(self, offset: float) -> float:
        return self.wall_now - offset


class Member:
    """One shard's `SharedPace`, its learner, and its loop clock."""

    def __init__(self, folder: Path, shard: Shard, clocks: Clocks, offset: float) -> None:
        self.shard = shard
        self.clocks = clocks
        self.offset = offset
        self.board = PaceBoard(folder, shard)
        self.team = SharedPace(self.board, shard, wall=clocks.wall)
        self.pace = Pace(floor=0.001, now=self.now())
        self.wakes = 0
        self.team.join(self.pace, self.now, self._wake, RATE)

    def now(self) -> float:
        return self.clocks.loop_of(self.offset)

    def _wake(self) -> None:
        self.wakes += 1

    def starts(self, count: int, since_wall: float) -> list[float]:
        """`count` starts as the limiter makes them, as early as allowed (wall times)."""
        due = since_wall - self.offset
        found = []
        for _ in range(count):
            start = self.team.align(due, RATE)
            found.append(start + self.offset)
            due = start + 1 / (RATE * self.team.factor(start))
        return found


def exchange(members: list[Member]) -> None:
    """Every member writes its note, then every member reads the board."""
    for member in members:
        member.board.write(member.team.note(member.clocks.wall()))
    for member in members:
        member.team.merge(member.board.read())


def team_of(tmp_path: Path, count: int, clocks: Clocks) -> list[Member]:
    # different loop-clock offsets: each process's monotonic clock starts elsewhere
    return [
        Member(tmp_path / PACE_DIR, Shard(i, count), clocks, offset=1000.0 * (i + 1))
        for i in range(count)
    ]


def test_a_note_survives_the_board_and_garbage_is_skipped(tmp_path: Path) -> None:
    board = PaceBoard(tmp_path, Shard(0, 3))
    note = PaceNote(0, 0.25, 0.3, 123.5, 120.0, 2, pause_until=125.0, seen=124.0)
    board.write(note)
    (tmp_path / "shard-1-of-3.json").write_text("{torn", encoding="utf-8")
    (tmp_path / "shard-2-of-3.json").write_text(json.dumps({**note.to_json(), "shard": 0}))
    (tmp_path / "shard-0-of-2.json").write_text(json.dumps(note.to_json()))  # another N
    assert board.read() == [note]
    assert PaceNote.from_json({**note.to_json(), "factor": 0}) is None
    assert PaceNote.from_json({**note.to_json(), "epoch": "soon"}) is None


def test_the_live_shards_take_the_slots_in_turn(tmp_path: Path) -> None:
    """Three shards each starting as fast as they may: together one start every 1/R
    seconds, in turn, as from one client."""
    clocks = Clocks()
    members = team_of(tmp_path, 3, clocks)
    exchange(members)
    assert [m.team.members for m in members] == [3, 3, 3]
    since = clocks.wall() + 0.037
    starts = sorted((t, m.shard.index) for m in members for t in m.starts(10, since))
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(starts)]
    assert all(math.isclose(g, 1 / RATE, abs_tol=1e-6) for g in gaps)
    owners = [index for _, index in starts]
    assert owners[:3] in ([0, 1, 2], [1, 2, 0], [2, 0, 1])
    assert owners == (owners[:3] * 10)[:30]


def test_a_cut_anywhere_is_everyone_s_pace_from_one_instant(tmp_path: Path) -> None:
    """Shard 2 meets a 429: every shard adopts its cut, and the schedule switches at a
    turn boundary, so no two starts come closer than a slot across the switch."""
    clocks = Clocks()
    members = team_of(tmp_path, 3, clocks)
    exchange(members)
    cutter = members[2]
    cutter.pace.cut(cutter.now())
    cutter.team.cut(cutter.now())
    cut_at_wall = clocks.wall()
    exchange(members)
    for member in members:
        assert member.pace.factor == pytest.approx(0.5)
        assert member.pace.threshold == pytest.approx(1.0)
        assert member.pace.last_cut == pytest.approx(member.now())  # the same instant
        assert member.team.factor(member.now()) == 1.0  # not yet: from the epoch on
        assert member.team.factor(member.now() + SWITCH_S + 0.2) == pytest.approx(0.5)
    starts = sorted(t for m in members for t in m.starts(20, cut_at_wall))
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 1 / RATE - 1e-6
    assert max(gaps) <= 1 / (RATE * 0.5) + 1e-6


def test_a_429_of_the_same_burst_does_not_cut_again_in_a_sibling(tmp_path: Path) -> None:
    """The sibling's limiter counts a 429 of a request it started before the adopted cut
    as part of that burst: one cut for the job, not one per shard."""
    clocks = Clocks()
    folder = tmp_path / PACE_DIR
    first, second = Shard(0, 2), Shard(1, 2)
    boards = [PaceBoard(folder, first), PaceBoard(folder, second)]
    teams = [
        SharedPace(boards[0], first, wall=clocks.wall),
        SharedPace(boards[1], second, wall=clocks.wall),
    ]
    limiters = [
        Limiter(rate=RATE, image_rate=None, concurrency=4, clock=clocks.wall, team=team)
        for team in teams
    ]
    for board, team in zip(boards, teams, strict=True):
        board.write(team.note(clocks.wall()))
    started = clocks.wall()
    clocks.wall_now += 0.3
    limiters[0].pause(1.0, started_at=started)  # shard 0's request: a new event
    boards[0].write(teams[0].note(clocks.wall()))
    teams[1].merge(boards[1].read() + boards[0].read())
    limiters[1].pause(1.0, started_at=started)  # shard 1's, started before that cut
    assert limiters[0].stats().slowdowns == 1
    assert limiters[1].stats().slowdowns == 0
    clocks.wall_now += SWITCH_S + 0.5
    assert limiters[1].stats().effective_rate == pytest.approx(RATE / 2)


def test_only_the_first_live_shard_grows_and_the_rest_follow(tmp_path: Path) -> None:
    clocks = Clocks()
    members = team_of(tmp_path, 2, clocks)
    for member in members:
        member.pace.adopt(0.2, None, -math.inf)
    exchange(members)
    leader, follower = members
    assert leader.team.leads
    assert not follower.team.leads
    for _ in range(30):  # 3 s of paced starts
        clocks.wall_now += 0.1
        for member in members:
            if member.team.leads:
                member.pace.grow(member.now(), paced=True)
            member.team.grew(member.now())
        exchange(members)
    clocks.wall_now += SWITCH_S + 0.1
    grown = leader.team.factor(leader.now())
    assert grown > 0.2 * 1.2  # ~10%/s far from any 429
    assert follower.team.factor(follower.now()) == pytest.approx(grown)


def test_members_are_the_live_notes_and_the_last_state_outlives_them(tmp_path: Path) -> None:
    """A stopped shard's note is kept inactive (its state is the next run's start); a
    dead one's heartbeat goes stale: neither holds slots."""
    clocks = Clocks()
    members = team_of(tmp_path, 3, clocks)
    members[0].pace.adopt(0.3, 0.32, -math.inf)
    members[0].team.cut(members[0].now())  # publishes 0.3 (via cut: a new state)
    exchange(members)
    members[0].board.write(members[0].team.note(clocks.wall(), active=False))  # it stopped
    clocks.wall_now += LIVE_S + 1
    members[2].board.write(members[2].team.note(clocks.wall()))  # alive
    members[1].team.merge(members[1].board.read())
    assert members[1].team.members == 2
    assert members[1].team.leads
    # shard 1 of 3 never heartbeat after the first exchange: to shard 2 it is dead
    members[1].board.write(members[1].team.note(clocks.wall() - LIVE_S - 1))
    members[2].team.merge(members[2].board.read())
    assert members[2].team.members == 1
    newcomer = Member(tmp_path / PACE_DIR, Shard(1, 3), clocks, offset=7.0)
    newcomer.team.merge(newcomer.board.read())
    assert newcomer.pace.factor == pytest.approx(0.3)  # the job's, not its own 1.0


def test_a_long_pause_pauses_every_shard_a_short_one_only_its_own(tmp_path: Path) -> None:
    clocks = Clocks()
    members = team_of(tmp_path, 2, clocks)
    exchange(members)
    paused, other = members
    paused.team.paused(paused.now() + 2.0)  # a bucket's next token
    exchange(members)
    assert other.team.pause_until() < other.now()
    paused.team.paused(paused.now() + 30.0)  # a window quota spent
    exchange(members)
    assert other.team.pause_until() == pytest.approx(other.now() + 30.0)
    assert other.wakes >= 1  # the limiter's head recomputes its start


# --- runs ---------------------------------------------------------------------------------


def _spec(tmp_path: Path, base: str, **backend: str) -> Path:
    path = write_job_spec(tmp_path, base, name="pace", prompts=8, rate_limit="20/s")
    if backend:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        data["backend"].update(backend)
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)


@pytest.mark.usefixtures("key")
async def test_a_shard_starts_from_the_job_s_learned_pace_and_reports_it(tmp_path: Path) -> None:
    """The board in OUT outlives the runs: a shard of the next night starts from the job's
    learned rate (not its own summary's), writes it back, and its summary reports it."""
    with ThreadedMock(MockConfig(api_key=KEY)) as mock:
        path = _spec(tmp_path, mock.base_url)
        spec = load_spec(path)
        last_night = PaceNote(0, 0.25, 0.25, 1000.0, 999.0, 0, seen=1000.0, active=False)
        PaceBoard(spec.output_dir / PACE_DIR, Shard(0, 2)).write(last_night)
        result = await run_job(spec, spec_path=path, shard=Shard(1, 2))
    assert result.exit_code == 0
    learned = result.summary["limiter"]["learned_rate_per_s"]
    assert learned == pytest.approx(20 * 0.25, rel=0.05)  # the job's rate, not 20/s
    notes = PaceBoard(spec.output_dir / PACE_DIR, Shard(1, 2)).read()
    mine = [n for n in notes if n.shard == 1]
    assert mine
    assert not mine[0].active
    assert mine[0].factor == pytest.approx(0.25, rel=0.05)


@pytest.mark.usefixtures("key")
async def test_one_key_per_shard_paces_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RF_KEY_1", KEY)
    with ThreadedMock(MockConfig(api_key=KEY)) as mock:
        path = _spec(tmp_path, mock.base_url, api_key_env="RF_KEY_{shard}")
        spec = load_spec(path)
        result = await run_job(spec, spec_path=path, shard=Shard(1, 2))
        assert result.exit_code == 0
        assert result.summary["ok"] > 0
        assert not (spec.output_dir / PACE_DIR).exists()  # no shared pace: its own key
        with pytest.raises(CredentialsError, match=r"RF_KEY_0 is not set"):
            await run_job(spec, spec_path=path, shard=Shard(0, 2))
        with pytest.raises(CredentialsError, match=r"one key per shard.*--shard I/N"):
            await run_job(spec, spec_path=path)
    assert mock.server.stats.requests == result.summary["ok"]  # the refusals sent nothing


def test_a_shard_key_name_is_checked_and_filled_in() -> None:
    base = {
        "version": 1,
        "name": "keys",
        "output_dir": "out",
        "project_url": "p",
        "sources": [{"name": "s", "prompt": "a cat"}],
    }
    spec = spec_from_data({**base, "backend": {"api_key_env": "KEY_{shard}_RF"}})
    assert key_env_name(spec.backend, Shard(3, 4)) == "KEY_3_RF"
    assert read_api_key(spec.backend, {"KEY_3_RF": " k3 "}, shard=Shard(3, 4)) == "k3"
    with pytest.raises(SpecError, match=r"backend\.api_key_env.*\{shard\}"):
        spec_from_data({**base, "backend": {"api_key_env": "{shard}_KEY"}})
