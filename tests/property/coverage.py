"""Runs a state machine for a fixed budget and returns how often each rule fired (events.EVENTS)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.property import events

# Every event the machines must reach; the test fails if a change to the strategies loses one.
REQUIRED = (
    "rule 1: copy-on-write",
    "rule 3: prefix hit",
    "rule 3: a cached (refcount 0) block reused",
    "rule 4: duplicate kept",
    "rule 5/6: allocation with an empty free queue",
    "rule 6: eviction under pressure",
    "rule 6: eviction while indexed blocks are referenced",
    "rule 6: evict() evicted",
    "rule 6: release touches an indexed block",
    "rule 7: out of blocks, nothing changed",
    "rule 3/7: out of blocks only because the prompt's own matches are pinned",
    "rule 8: trim released blocks",
    "rule 9: fork",
)


def rule_counts(machine, examples: int, steps: int) -> dict[str, int]:
    events.EVENTS.clear()
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            derandomize=True,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    return dict(events.EVENTS)
