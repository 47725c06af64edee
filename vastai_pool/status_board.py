"""Instance statuses for a whole run from one paginated list call per round.

Every rental of a run waits for its instance to boot. Asking the API about
each instance separately costs one call per instance per round, and Vast.ai
rate-limits per endpoint and per key (show instance: one call every 2 s).
The board makes one ``VastApi.list_instances`` call per round instead and
hands each waiter its instance's row from it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vastai_pool.api import RemoteInstance, VastApi
from vastai_pool.errors import ApiError


@dataclass(frozen=True)
class Round:
    """One list call: when it finished, what it listed, or why it failed."""

    number: int
    finished_at: float
    instances: dict[int, RemoteInstance]
    error: ApiError | None = None


class StatusBoard:
    """Shares one list call per ``interval`` seconds between all waiters.

    The first waiter that finds the last round older than ``interval`` makes
    the call, outside the lock; the others wait for its result. A failed
    call is a round too, so every waiter receives the error and decides itself.
    """

    def __init__(
        self,
        api: VastApi,
        interval: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._interval = interval
        self._clock = clock
        self._changed = threading.Condition()
        self._round = Round(number=0, finished_at=float("-inf"), instances={})
        self._polling = False
        self.calls = 0

    def next_round(self, after: int) -> Round:
        """Return the first round newer than round number ``after``.

        Blocks until that round exists; makes the list call when no other waiter
        is making it and the last one is at least ``interval`` seconds old.
        """
        with self._changed:
            while True:
                current = self._round
                if current.number > after:
                    return current
                if not self._polling:
                    wait = current.finished_at + self._interval - self._clock()
                    if wait <= 0:
                        self._polling = True
                        break
                    self._changed.wait(timeout=wait)
                else:
                    self._changed.wait()

        instances: dict[int, RemoteInstance] = {}
        error: ApiError | None = None
        try:
            instances = {row.id: row for row in self._api.list_instances()}
        except ApiError as exc:
            error = exc
        finally:
            with self._changed:
                self.calls += 1
                self._round = Round(
                    number=current.number + 1,
                    finished_at=self._clock(),
                    instances=instances,
                    error=error,
                )
                self._polling = False
                self._changed.notify_all()
        return self._round
