"""Which of several redundant servers to ask, and in what order: a server that fails or does not
answer in time is set aside, and comes back only once a probe finds it answering again.

This is HAProxy's health checks and Envoy's outlier detection in their smallest form. Without it
a hung server (a process stopped, not dead: its socket accepts, nothing answers) is asked first
by every request, each paying the wait before passing on to the next server. Sans-IO: callers
report outcomes with the time (monotonic seconds) and run the probes; this only keeps the book.
Two rules:
1. servers in service come first, in the order given (file order: the first is the primary);
2. a set-aside server is still asked after all of them, so that every server set aside (a
   network blip) slows requests down rather than refusing them all (Envoy's panic mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Outliers:
    names: Sequence[str]
    set_aside_at: dict[int, float] = field(default_factory=dict)  # server index -> when it was set aside
    returns: int = 0  # servers found answering again by a probe or a request

    def order(self) -> list[int]:
        """The servers' indexes in the order to ask them (rules 1 and 2)."""
        serving = [i for i in range(len(self.names)) if i not in self.set_aside_at]
        return serving + sorted(self.set_aside_at, key=self.set_aside_at.__getitem__)

    def failed(self, i: int, now: float) -> bool:
        """Server `i` failed or timed out: set it aside. True when it was in service until now
        (the caller starts probing it then, once)."""
        if i in self.set_aside_at:
            return False
        self.set_aside_at[i] = now
        return True

    def answered(self, i: int) -> None:
        """Server `i` answered (a probe, or a request that tried it as a last resort): back in service."""
        if self.set_aside_at.pop(i, None) is not None:
            self.returns += 1

    def is_set_aside(self, i: int) -> bool:
        return i in self.set_aside_at

    def aside(self) -> list[str]:
        return [self.names[i] for i in sorted(self.set_aside_at)]
