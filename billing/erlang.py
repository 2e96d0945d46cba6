"""Closed-form M/M/c queueing (Erlang C): the yardstick the simulator is validated against."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErlangC:
    servers: int
    arrival_rate: float  # lambda, requests per second
    service_rate: float  # mu, per server

    @property
    def offered_load(self) -> float:
        return self.arrival_rate / self.service_rate

    @property
    def utilization(self) -> float:
        return self.offered_load / self.servers

    @property
    def probability_of_waiting(self) -> float:
        """C(c, a): the chance an arrival finds every server busy. Computed from the Erlang B recursion, which stays
        stable for large c (no factorials)."""
        a, c = self.offered_load, self.servers
        if a >= c:
            return 1.0
        blocking = 1.0
        for k in range(1, c + 1):
            blocking = a * blocking / (k + a * blocking)
        return blocking / (1.0 - (a / c) * (1.0 - blocking))

    @property
    def mean_wait(self) -> float:
        """Wq = C(c, a) / (c mu - lambda), seconds in the queue before service starts."""
        if self.offered_load >= self.servers:
            return float("inf")
        return self.probability_of_waiting / (self.servers * self.service_rate - self.arrival_rate)
