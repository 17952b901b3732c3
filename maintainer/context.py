"""What a unit's blocks can see: every name of the render context, documented and built here.

Each name is declared once in `NAMES`, with the blocks that get it and what it means; the README's
context table is checked against this list by a test. The runner, the survey and `maintainer
check` build their contexts with the functions below and nowhere else, so a block never misses a
name another block of the same run has.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

# Blocks of one item's run, in order; `survey` runs once per (job, target), `check` by `maintainer check`.
ITEM_BLOCKS = ("prepare", "discover", "apply", "recheck", "after", "verify", "report")
AFTER_STEPS = ("after", "verify", "report")
ALL_BLOCKS = ("survey", *ITEM_BLOCKS, "check")


@dataclass(frozen=True)
class ContextName:
    name: str
    blocks: tuple[str, ...]
    meaning: str


NAMES: tuple[ContextName, ...] = (
    ContextName("params", (*ITEM_BLOCKS, "check"),
                "the item's params, typed and with defaults (`{}` in `check`, which runs once per unit)"),
    ContextName("target", ALL_BLOCKS, "the target's name"),
    ContextName("job", ALL_BLOCKS, "the job's name (`null` in `check`)"),
    ContextName("now", ALL_BLOCKS, "the run's start (UTC): one value for every block and batch of a run"),
    ContextName("args", ALL_BLOCKS, "values given with `--arg` (only `bind` accepts them)"),
    ContextName("dry_run", ALL_BLOCKS, "true for `plan` and `trigger --dry-run`"),
    ContextName("state_schema", ALL_BLOCKS, "the ledger's schema, e.g. for cooldowns"),
    ContextName("extensions", (*ITEM_BLOCKS, "check"),
                "installed extensions `{name: {schema, version}}`: a SELECT naming a function of a "
                "missing extension fails when parsed, so a unit branches on this at render time"),
    ContextName("ledger_exists", ITEM_BLOCKS, "whether the ledger tables exist (a dry run on a new target has none)"),
    ContextName("history", ITEM_BLOCKS,
                "for units with `forecast` front matter: earlier `ok` runs of this job, target and item whose "
                "observations a forecast reads, `[{run_id, observed_at}]` oldest first (the oldest and the newest "
                "within `forecast_window`); `[]` without a ledger or in other units. Read from the ledger the first "
                "time a block looks at it, so a unit that forecasts only in some cases pays for it only then"),
    ContextName("cooldowns", ITEM_BLOCKS,
                "for units with `cooldown` front matter: when each object last got the unit's decision on this "
                "target, `{object: timestamptz}`, over the runs within the cooldown; `{}` without a ledger or in "
                "other units"),
    ContextName("items", ("survey",), "each item of the job: `{index, params, item}`"),
    ContextName("prepared", ITEM_BLOCKS, "the first row of `prepare` (`{}` before it has run, or without one)"),
    ContextName("row", ITEM_BLOCKS, "in `apply` and `recheck`, the step's finding (the discover row); `{}` elsewhere"),
    ContextName("prev", ITEM_BLOCKS,
                "in a repeated step, the previous batch's last returned row; `null` at first and elsewhere"),
    ContextName("discovered", AFTER_STEPS, "every row of discover"),
    ContextName("steps", AFTER_STEPS,
                "what each step did: `{row, status, rows, batches}`; `batches` counts the batches of a "
                "repeated step that changed rows, 1 or 0 for any other step"),
)


class LazyRuns(Sequence[Mapping[str, Any]]):
    """`history`, read the first time a block looks at it (`partitions` forecasts only for integer
    keys; a time-keyed table's run never needs the ledger query)."""

    def __init__(self, load: Callable[[], list[dict[str, Any]]]) -> None:
        self._load = load
        self._runs: list[dict[str, Any]] | None = None

    def _all(self) -> list[dict[str, Any]]:
        if self._runs is None:
            self._runs = self._load()
        return self._runs

    @overload
    def __getitem__(self, index: int) -> Mapping[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Mapping[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> Mapping[str, Any] | Sequence[Mapping[str, Any]]:
        return self._all()[index]

    def __len__(self) -> int:
        return len(self._all())

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        return iter(self._all())


def run_context(
    *, target: str, job: str | None, state_schema: str, args: Mapping[str, Any], dry_run: bool,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """The names every block has."""
    return {
        "target": target,
        "job": job,
        "now": now or dt.datetime.now(dt.UTC),
        "args": args,
        "dry_run": dry_run,
        "state_schema": state_schema,
    }


def survey_context(run: Mapping[str, Any], items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {**run, "items": list(items)}


def item_context(
    run: Mapping[str, Any], params: Mapping[str, Any], *, extensions: Mapping[str, Any], ledger_exists: bool,
    history: Sequence[Mapping[str, Any]] = (), cooldowns: Mapping[str, dt.datetime] | None = None,
) -> dict[str, Any]:
    """An item's blocks from `prepare` on; `prepared`, `row` and `prev` are filled as the run goes."""
    return {**run, "params": params, "extensions": extensions, "ledger_exists": ledger_exists,
            "history": history, "cooldowns": dict(cooldowns or {}), "prepared": {}, "row": {}, "prev": None}


def step_context(item: Mapping[str, Any], row: Mapping[str, Any]) -> dict[str, Any]:
    return {**item, "row": row, "prev": None}


def after_steps_context(
    item: Mapping[str, Any], discovered: Sequence[Mapping[str, Any]], steps: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    return {**item, "discovered": discovered, "steps": steps}


def check_context(run: Mapping[str, Any], *, extensions: Mapping[str, Any]) -> dict[str, Any]:
    return {**run, "params": {}, "extensions": extensions}


def names_of(block: str) -> list[str]:
    """The context names `block` gets (for tests and documentation)."""
    return [entry.name for entry in NAMES if block in entry.blocks]


def markdown_table() -> str:
    """The README's context table (a test keeps the two equal)."""
    lines = ["| name | blocks | meaning |", "|---|---|---|"]
    for entry in NAMES:
        blocks = {ALL_BLOCKS: "all", ITEM_BLOCKS: "item's", (*ITEM_BLOCKS, "check"): "item's, `check`"}.get(
            entry.blocks, ", ".join(f"`{b}`" for b in entry.blocks)
        )
        lines.append(f"| `{entry.name}` | {blocks} | {entry.meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
