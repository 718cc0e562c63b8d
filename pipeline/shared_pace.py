"""One quota, several shards, no coordinator: the pace the shards of a job share through OUT.

Shards on one API key that pace themselves alone collide: each start lands at a random
phase against the others', a server whose bucket holds one request refuses the second of
two close starts, and every 429 costs a whole Retry-After. So the shards of one job keep
one schedule, with nothing shared but small files in ``OUT/.synthaug.pace/``:

* **One learned rate.** Each running shard replaces its own note there (atomically): the
  job's pace as it knows it (the share of the spec's rate, the threshold of the last 429s,
  the *epoch* from which that share holds, when the last cut came), its 429 pause deadline
  and a heartbeat. Every `POLL_S` each shard reads its siblings' notes and takes the state
  of the newest epoch: a cut anywhere slows every shard, a long pause anywhere (a spent
  window quota) pauses them all.
* **One schedule, slots by turn.** The job's rate R (the spec's rate times the share)
  cuts the wall clock into slots of 1/R seconds from the epoch; the live shards, in order
  of index, take the slots in turn (rank r of M starts only in slots k with k mod M = r).
  The server sees starts evenly spaced at R, as from one client. Clocks of several
  machines need only agree to a fraction of a slot (NTP gives milliseconds; a slot at
  10/s is 100 ms).
* **One learner.** Only the live shard of lowest index grows the rate (in time, as
  `pipeline.pace` does); any shard that meets a new 429 cuts it. Every new state takes
  effect `SWITCH_S` after it is written, so every shard changes grid at the same instant.
* A shard that stops writes its note inactive; one that dies stops its heartbeat. Either
  way its slots go to the others (after `LIVE_S` for a dead one). The last state stays
  on the board: the next night's shards start from the job's learned rate.

What works on one machine works on a file system several machines share. The `Limiter`
asks this object for the schedule's share, a start's slot and the shared pause
(`pipeline.limiter.PaceTeam`); the run starts and stops its polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from .pace import Pace
from .shard import Shard
from .store.layout import write_json_atomic

__all__ = [
    "LIVE_S",
    "POLL_S",
    "SWITCH_S",
    "Board",
    "PaceBoard",
    "PaceNote",
    "SharedPace",
    "note_name",
    "read_notes",
]

log = logging.getLogger("pipeline.limiter")

POLL_S = 0.25
"""How often a shard reads its siblings' notes (a few small files)."""
HEARTBEAT_S = 1.0
"""How often a shard rewrites its note when nothing changed."""
LIVE_S = 5.0
"""A note older than this is a shard that died: its slots go to the others."""
SWITCH_S = 0.6
"""A new state takes effect this long after it is written: longer than `POLL_S` plus a
write, so every sibling has read it before the grid changes."""
SHARED_PAUSE_S = 5.0
"""A sibling's 429 pause with this long still to run pauses this shard too (a window
quota spent: every start would be refused); a shorter one (a bucket's next token) does
not, since the cut already slowed every shard, and pausing all of them for it cost a
tenth of the limit (`benchmarks/shards.py`: 87.7% of the limit shared, 93.2% not)."""
PUBLISH_EVERY_S = 1.0
"""The learner publishes its growth at most this often."""
MIN_CHANGE = 0.002
"""Growth smaller than this share is not worth a new grid."""


@dataclass(frozen=True, slots=True)
class PaceNote:
    """What one shard says on the board (wall-clock times, seconds since the epoch)."""

    shard: int
    factor: float  # the job's rate over the spec's rate
    threshold: float | None  # the factor the last 429s came at
    epoch: float  # from when `factor` holds: the slot grid's origin
    cut_at: float  # when the last congestion event came (0: never)
    writer: int  # the shard that learned this state
    pause_until: float = 0.0  # this shard's 429 pause
    seen: float = 0.0  # heartbeat
    active: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "factor": self.factor,
            "threshold": self.threshold,
            "epoch": self.epoch,
            "cut_at": self.cut_at,
            "writer": self.writer,
            "pause_until": self.pause_until,
            "seen": self.seen,
            "active": self.active,
        }

    @classmethod
    def from_json(cls, data: object) -> PaceNote | None:
        """The note in `data`; None for anything else (a half-known file proves nothing)."""
        if not isinstance(data, dict):
            return None
        try:
            threshold = data.get("threshold")
            note = cls(
                shard=int(data["shard"]),
                factor=float(data["factor"]),
                threshold=None if threshold is None else float(threshold),
                epoch=float(data["epoch"]),
                cut_at=float(data["cut_at"]),
                writer=int(data["writer"]),
                pause_until=float(data["pause_until"]),
                seen=float(data["seen"]),
                active=bool(data["active"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        if not (0 < note.factor <= 1 and all(map(math.isfinite, (note.epoch, note.seen)))):
            return None
        return note

    @property
    def state(self) -> tuple[float, float | None, float, float, int]:
        """The shared part: what a sibling adopts."""
        return (self.factor, self.threshold, self.epoch, self.cut_at, self.writer)


class Board(Protocol):
    """Where the shards' notes are: a folder (`PaceBoard`), or a bucket (an OUT on object
    storage, `pipeline.run.mirror`)."""

    def read(self) -> list[PaceNote]:
        """Every readable note of this N."""
        ...

    def write(self, note: PaceNote) -> None:
        """Replace this shard's note."""
        ...


def note_name(shard: Shard, index: int) -> str:
    """The name of shard `index`'s note among the shards of `shard`'s N."""
    return f"shard-{index}-of-{shard.count}.json"


def read_notes(shard: Shard, fetch: Callable[[str], str | bytes | None]) -> list[PaceNote]:
    """Every readable note of `shard`'s N, each fetched by its name (None: absent); a
    torn or foreign note is skipped. The board's one reading rule, wherever it lives."""
    notes = []
    for index in range(shard.count):
        raw = fetch(note_name(shard, index))
        if raw is None:
            continue
        with contextlib.suppress(ValueError):
            note = PaceNote.from_json(json.loads(raw))
            if note is not None and note.shard == index:
                notes.append(note)
    return notes


class PaceBoard:
    """The notes of the shards of one N, one file each, in `folder` (`OUT/.synthaug.pace`)."""

    def __init__(self, folder: Path, shard: Shard) -> None:
        self._folder = folder
        self._shard = shard

    def path(self, index: int) -> Path:
        return self._folder / note_name(self._shard, index)

    def read(self) -> list[PaceNote]:
        """Every readable note of this N (a missing or torn file is skipped)."""
        return read_notes(self._shard, self._read_file)

    def _read_file(self, name: str) -> str | None:
        try:
            return (self._folder / name).read_text(encoding="utf-8")
        except OSError:
            return None

    def write(self, note: PaceNote) -> None:
        """Replace this shard's note (atomically: a reader sees the old note or the new)."""
        os.makedirs(self._folder, exist_ok=True)
        write_json_atomic(self.path(note.shard), note.to_json())


class SharedPace:
    """The shards' one pace and one schedule; see the module docstring.

    `wall` is the wall clock (shared between processes and, roughly, machines); the
    limiter's clock (`join`) is its own event loop's. Everything the limiter calls is
    synchronous and in memory; the board is read and written by `polling`.
    """

    def __init__(
        self,
        board: Board,
        shard: Shard,
        *,
        wall: Callable[[], float] = time.time,
        poll_s: float = POLL_S,
    ) -> None:
        self._board = board
        self._poll_s = poll_s
        # every sibling reads a new state before it takes effect (a bucket polls slower)
        self._switch_s = max(SWITCH_S, 1.5 * poll_s + 0.2)
        self._shard = shard
        self._wall = wall
        self._pace: Pace | None = None
        self._clock: Callable[[], float] = time.monotonic
        self._wake: Callable[[], None] = lambda: None
        self._state = PaceNote(shard.index, 1.0, None, 0.0, 0.0, shard.index)
        self._previous: PaceNote | None = None
        self._members: tuple[int, ...] = (shard.index,)
        self._sibling_pause = 0.0
        self._own_pause = 0.0
        self._last_publish = -math.inf
        self._last_write = -math.inf
        self._dirty = asyncio.Event()
        self._rate: float | None = None  # the spec's request rate (the limiter's)
        self._write_failed = False

    # --- what the limiter asks (loop clock) ------------------------------------------

    def join(
        self,
        pace: Pace,
        clock: Callable[[], float],
        wake: Callable[[], None],
        rate: float | None,
    ) -> None:
        """Bind the limiter's learner, clock, wake-up and request rate (the spec's)."""
        self._pace, self._clock, self._wake, self._rate = pace, clock, wake, rate
        # Epoch 0: any state on the board (a sibling's, or the last night's) is newer.
        self._state = PaceNote(
            self._shard.index, pace.factor, pace.threshold, 0.0, 0.0, self._shard.index
        )

    @property
    def members(self) -> int:
        """How many shards share the schedule now (live ones)."""
        return len(self._members)

    @property
    def leads(self) -> bool:
        """Whether this shard is the one that grows the rate (the live one of lowest index)."""
        return self._members[0] == self._shard.index

    def factor(self, now: float) -> float:
        """The job's share of the spec's rate at loop time `now` (a new state from its epoch)."""
        state = self._state_at(self._to_wall(now))
        return state.factor

    def pause_until(self) -> float:
        """When this shard may start again after a 429 (loop clock): its own pause, and a
        sibling's that still has `SHARED_PAUSE_S` or more to run."""
        wall = self._wall()
        sibling = self._sibling_pause if self._sibling_pause - wall >= SHARED_PAUSE_S else 0.0
        return self._to_loop(max(sibling, self._own_pause))

    def align(self, due: float, rate: float) -> float:
        """The first start of this shard's turn at or after `due` (loop clock); `rate` is
        the spec's request rate."""
        if len(self._members) == 1:
            return due
        at = self._to_wall(due)
        state = self._state_at(at)
        slot = self._slot(state, at, rate)
        if state is not self._state and slot >= self._state.epoch:
            slot = self._slot(self._state, max(at, self._state.epoch), rate)
        return self._to_loop(slot)

    def cut(self, now: float) -> None:
        """The limiter's pace just cut (a new 429): it is the job's new state."""
        pace = self._pace
        if pace is None:
            return
        wall = self._to_wall(now)
        self._publish(pace.factor, pace.threshold, cut_at=wall, wall=wall)

    def paused(self, until: float) -> None:
        """The limiter paused until `until` (loop clock): the siblings pause with it."""
        self._own_pause = max(self._own_pause, self._to_wall(until))
        self._dirty.set()

    def grew(self, now: float) -> None:
        """The learner's pace may have grown: publish it now and then."""
        pace = self._pace
        if pace is None or not self.leads:
            return
        wall = self._to_wall(now)
        if wall - self._last_publish < PUBLISH_EVERY_S:
            return
        if abs(pace.factor - self._state.factor) < MIN_CHANGE * self._state.factor:
            return
        self._publish(pace.factor, pace.threshold, cut_at=self._state.cut_at, wall=wall)

    # --- the board ---------------------------------------------------------------------

    async def start(self) -> None:
        """Read the board once before the first start: join the job's pace where it is."""
        await self.poll()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The board read once before the body (the job's pace joined where it stands),
        then polled beside it; left (the state kept) when the body ends."""
        await self.poll()
        stop = asyncio.Event()
        task = asyncio.create_task(self.polling(stop), name="shared-pace")
        try:
            yield
        finally:
            stop.set()
            self._dirty.set()
            await task

    async def polling(self, stop: asyncio.Event) -> None:
        """Read and write the board every `POLL_S` (at once after a cut or a pause) until
        `stop`; then leave the board, the state kept for the next run."""
        try:
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):  # not TimeoutError before 3.11
                    await asyncio.wait_for(self._dirty.wait(), self._poll_s)
                await self.poll()
        finally:
            await asyncio.to_thread(self._leave)

    async def poll(self) -> None:
        """One exchange with the board: read the siblings, adopt, write our note if due."""
        try:
            notes = await asyncio.to_thread(self._board.read)
        except OSError as exc:  # a board we cannot read: pace alone until it comes back
            log.debug("pace board unreadable: %s", exc)
            notes = []
        self.merge(notes)
        wall = self._wall()
        if self._dirty.is_set() or wall - self._last_write >= HEARTBEAT_S:
            self._dirty.clear()
            self._last_write = wall
            try:
                await asyncio.to_thread(self._board.write, self.note(wall))
            except OSError as exc:  # said once: the siblings pace without this shard's news
                if not self._write_failed:
                    log.warning("could not write the shared pace in OUT: %s", exc)
                self._write_failed = True

    def merge(self, notes: list[PaceNote]) -> None:
        """Take what the siblings' `notes` say: members, the newest state, their pauses."""
        wall = self._wall()
        me = self._shard.index
        live = [n for n in notes if n.shard != me and n.active and n.seen >= wall - LIVE_S]
        members = tuple(sorted({me, *(n.shard for n in live)}))
        changed = members != self._members
        self._members = members
        pause = max((n.pause_until for n in live), default=0.0)
        if pause > self._sibling_pause:
            changed = True
            if self._pace is not None:  # no growth credited for time spent paused
                self._pace.hold(self._to_loop(pause))
        self._sibling_pause = pause
        newest = max(notes, key=lambda n: (n.epoch, -n.factor), default=None)
        if newest is not None and _newer(newest, self._state):
            self._adopt(newest)
            changed = True
        if changed:
            self._wake()

    def note(self, wall: float, *, active: bool = True) -> PaceNote:
        """This shard's note: the state it keeps, its pause, its heartbeat."""
        return replace(
            self._state,
            shard=self._shard.index,
            pause_until=self._own_pause,
            seen=wall,
            active=active,
        )

    def _leave(self) -> None:
        with contextlib.suppress(OSError):
            self._board.write(self.note(self._wall(), active=False))

    # --- inside ------------------------------------------------------------------------

    def _publish(
        self, factor: float, threshold: float | None, *, cut_at: float, wall: float
    ) -> None:
        """A state this shard learned: everyone's from `SWITCH_S` on."""
        me = self._shard.index
        old = self._state_at(wall)
        self._previous = old
        epoch = self._turn_boundary(old, wall + self._switch_s)
        self._state = PaceNote(me, factor, threshold, epoch, cut_at, me)
        self._last_publish = wall
        self._dirty.set()

    def _adopt(self, note: PaceNote) -> None:
        """A sibling's newer state: the schedule switches at its epoch, the learner now."""
        self._previous = self._state_at(self._wall())
        self._state = replace(note, shard=self._shard.index)
        pace = self._pace
        if pace is not None:
            cut_at = self._to_loop(note.cut_at) if note.cut_at else -math.inf
            pace.adopt(note.factor, note.threshold, cut_at)

    def _state_at(self, wall: float) -> PaceNote:
        previous = self._previous
        if wall < self._state.epoch and previous is not None:
            return previous
        return self._state

    def _turn_boundary(self, state: PaceNote, at: float) -> float:
        """The first start of a round of turns on `state`'s grid at or after `at`: a new
        grid begins there, so the last start on the old grid (the last rank's) and the
        first on the new (rank 0's) are a slot apart, not any two instants."""
        if self._rate is None:
            return at
        per_s = self._rate * state.factor
        k = math.ceil((at - state.epoch) * per_s - 1e-6)
        k += (-k) % len(self._members)
        return state.epoch + k / per_s

    def _slot(self, state: PaceNote, at: float, rate: float) -> float:
        """The start of this shard's first slot at or after `at` on `state`'s grid."""
        per_s = rate * state.factor
        members = self._members
        rank, count = members.index(self._shard.index), len(members)
        k = math.ceil((at - state.epoch) * per_s - 1e-6)
        k += (rank - k) % count
        return state.epoch + k / per_s

    def _to_wall(self, loop_time: float) -> float:
        return loop_time + (self._wall() - self._clock())

    def _to_loop(self, wall_time: float) -> float:
        return wall_time - (self._wall() - self._clock())


def _newer(note: PaceNote, than: PaceNote) -> bool:
    """Whether `note`'s state replaces `than`'s: a later epoch; at one epoch, the slower."""
    if note.state == than.state:
        return False
    return (note.epoch, -note.factor) > (than.epoch, -than.factor)
