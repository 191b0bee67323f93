"""EXPLAIN, for tests: which SQL a request runs, and whether any of it reads a whole table.

    with captured_statements(engine) as statements:
        client.get("/saes/x/features/0")
    for statement, parameters in statements:
        assert whole_table_reads(engine, statement, parameters) == []

A "whole table read" is a scan of every row of a table (SQLite `SCAN t` other than a virtual
table answering a MATCH from its own index, PostgreSQL `Seq Scan` or an index scan with no condition) or a sort of the matching rows (SQLite `USE TEMP B-TREE FOR
ORDER BY`, PostgreSQL `Sort`): what an index should spare a page query. Plans are only honest on
tables of a realistic size with statistics (run ANALYZE first). PostgreSQL's plans are taken with
`enable_seqscan` off, since it rightly scans a table of a few rows (`saes`) sequentially: a
sequential scan that remains has no index to avoid it. Any page's queries fit, a future search
page's included: capture its statements and check them the same way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, event


@contextmanager
def captured_statements(engine: Engine) -> Iterator[list[tuple[str, object]]]:
    statements: list[tuple[str, object]] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def query_plan(engine: Engine, statement: str, parameters) -> list[str]:
    """The plan, one line per step: SQLite's EXPLAIN QUERY PLAN details, or PostgreSQL's nodes
    as "Node Type on relation [using index] [cond]"."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
            return [row[-1] for row in rows]
        with conn.begin():
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            raw = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}", parameters).scalar_one()
    plan = raw if isinstance(raw, list) else json.loads(raw)
    return [_describe(node) for node in _nodes(plan[0]["Plan"])]


def whole_table_reads(engine: Engine, statement: str, parameters) -> list[str]:
    """The plan steps that read or sort a whole table; [] when every step uses an index."""
    steps = query_plan(engine, statement, parameters)
    if engine.dialect.name == "sqlite":
        # A virtual table answering a constraint through its own index is no scan: FTS5's plan
        # "VIRTUAL TABLE INDEX n:M..." is a full-text MATCH (and its rank order), read from its index.
        return [step for step in steps
                if (re.match(r"SCAN (?!CONSTANT ROW)", step) and not re.search(r"VIRTUAL TABLE INDEX \d+:\S*M", step))
                or step.startswith("USE TEMP B-TREE FOR")]
    return [step for step in steps
            if step.startswith(("Seq Scan", "Sort ")) or step == "Sort"
            or (step.startswith(("Index Scan", "Index Only Scan")) and " cond " not in step)]


def _nodes(node: dict) -> Iterator[dict]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


def _describe(node: dict) -> str:
    text = node["Node Type"]
    if "Relation Name" in node:
        text += f" on {node['Relation Name']}"
    if "Index Name" in node:
        text += f" using {node['Index Name']}"
    if "Index Cond" in node:
        text += f" cond {node['Index Cond']}"
    return text
