"""The SQLite catalog (WAL mode): a fast index over refs and manifests, rebuildable from them.

It is never the source of truth: ``Registry.rebuild_catalog`` recreates it from the ref documents and
manifest blobs, and ``indexing.open_catalog`` does so by itself when the file is missing or damaged. Rows carry what ``ls``/``show`` need without opening manifests.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deltakit.errors import RegistryError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bases (
    name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, tree TEXT NOT NULL,
    total_bytes INTEGER NOT NULL, n_files INTEGER NOT NULL, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deltas (
    name TEXT NOT NULL, tag TEXT NOT NULL, manifest TEXT NOT NULL,
    codec TEXT, codec_version INTEGER, ratio REAL,
    base_name TEXT, base_fingerprint TEXT, target_name TEXT, target_fingerprint TEXT,
    stored_bytes INTEGER, fp16_delta_bytes INTEGER, total_bytes INTEGER, n_files INTEGER,
    created_at TEXT NOT NULL,
    PRIMARY KEY (name, tag)
);
CREATE INDEX IF NOT EXISTS deltas_base ON deltas (base_fingerprint);
CREATE TABLE IF NOT EXISTS evals (manifest TEXT PRIMARY KEY, results TEXT NOT NULL, updated_at TEXT NOT NULL);
"""

DELTA_COLUMNS = (
    "name", "tag", "manifest", "codec", "codec_version", "ratio", "base_name", "base_fingerprint",
    "target_name", "target_fingerprint", "stored_bytes", "fp16_delta_bytes", "total_bytes", "n_files",
    "created_at",
)  # fmt: skip
BASE_COLUMNS = ("name", "fingerprint", "tree", "total_bytes", "n_files", "created_at")
EVAL_COLUMNS = ("manifest", "results", "updated_at")


class CatalogDamaged(RegistryError):
    """``catalog.sqlite`` is not a readable catalog of this schema (garbage, truncated, foreign schema)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


@contextlib.contextmanager
def _guard(path: Path) -> Iterator[None]:
    """Turn SQLite failures on a damaged file into a one-line CatalogDamaged."""
    try:
        yield
    except sqlite3.DatabaseError as exc:  # includes OperationalError, e.g. "no such column"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CatalogDamaged(
            f"catalog {path} is damaged ({reason}); Registry.rebuild_catalog() recreates it from the refs",
            reason,
        ) from None


class Catalog:
    """A connection to ``catalog.sqlite``; each write is one short transaction (safe across processes).

    Raises CatalogDamaged on open when the file is not a catalog of this schema, and from any later
    query that fails because the file was damaged meanwhile.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with _guard(path):
            self.conn = sqlite3.connect(path, timeout=60.0, isolation_level=None, check_same_thread=False)
        try:
            with _guard(path):
                self.conn.row_factory = sqlite3.Row
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=NORMAL")
                self.conn.executescript(_SCHEMA)
                self.conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                self._check_schema()
        except BaseException:
            self.conn.close()
            raise

    def _check_schema(self) -> None:
        version = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if version is None or version[0] != str(SCHEMA_VERSION):
            raise sqlite3.DatabaseError(f"schema version {version[0] if version else None!r}")
        for table, columns in (("deltas", DELTA_COLUMNS), ("bases", BASE_COLUMNS), ("evals", EVAL_COLUMNS)):
            found = tuple(r[1] for r in self.conn.execute(f"PRAGMA table_info({table})"))
            if found != columns:
                raise sqlite3.DatabaseError(f"table {table} has columns {found}")
        check = self.conn.execute("PRAGMA quick_check").fetchone()  # reads every page: finds truncation
        if check is None or check[0] != "ok":
            raise sqlite3.DatabaseError(f"integrity check: {check[0] if check else 'no answer'}")

    def is_empty(self) -> bool:
        """No delta and no base rows."""
        return not self._rows("SELECT 1 FROM deltas LIMIT 1") and not self._rows(
            "SELECT 1 FROM bases LIMIT 1"
        )

    def was_rebuilt(self) -> bool:
        """Whether this catalog file has been indexed from the refs by :meth:`replace_all`."""
        return bool(self._rows("SELECT 1 FROM meta WHERE key = 'rebuilt'"))

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def _write(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        with _guard(self.path):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                self.conn.execute(sql, params)
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with _guard(self.path):
            return self.conn.execute(sql, params).fetchall()

    # -- deltas --------------------------------------------------------------------------------
    def upsert_delta(self, row: dict[str, Any]) -> None:
        """Insert or replace one ``(name, tag)`` row; ``row`` has every key of DELTA_COLUMNS."""
        cols = ", ".join(DELTA_COLUMNS)
        marks = ", ".join("?" for _ in DELTA_COLUMNS)
        self._write(
            f"INSERT OR REPLACE INTO deltas ({cols}) VALUES ({marks})", tuple(row[c] for c in DELTA_COLUMNS)
        )

    def delete_delta(self, name: str, tag: str) -> None:
        """Remove one ``(name, tag)`` row if present."""
        self._write("DELETE FROM deltas WHERE name = ? AND tag = ?", (name, tag))

    def get_delta(self, name: str, tag: str) -> dict[str, Any] | None:
        """The row of ``name:tag`` or None."""
        rows = self._rows("SELECT * FROM deltas WHERE name = ? AND tag = ?", (name, tag))
        return dict(rows[0]) if rows else None

    def list_deltas(self, base_fingerprint: str | None = None, base_name: str | None = None) -> list[dict]:
        """Rows sorted by name and tag; filtered by base fingerprint if given, else by manifest base name."""
        if base_fingerprint is not None:
            where, params = "WHERE base_fingerprint = ?", (base_fingerprint,)
        elif base_name is not None:
            where, params = "WHERE base_name = ?", (base_name,)
        else:
            where, params = "", ()
        return [dict(r) for r in self._rows(f"SELECT * FROM deltas {where} ORDER BY name, tag", params)]

    def deltas_of_base(self, fingerprint: str) -> list[dict]:
        """Rows of deltas whose manifest names this base fingerprint."""
        return self.list_deltas(base_fingerprint=fingerprint)

    # -- bases ---------------------------------------------------------------------------------
    def upsert_base(self, row: dict[str, Any]) -> None:
        """Insert or replace one base row."""
        cols = ", ".join(BASE_COLUMNS)
        marks = ", ".join("?" for _ in BASE_COLUMNS)
        self._write(
            f"INSERT OR REPLACE INTO bases ({cols}) VALUES ({marks})", tuple(row[c] for c in BASE_COLUMNS)
        )

    def delete_base(self, name: str) -> None:
        """Remove a base row if present."""
        self._write("DELETE FROM bases WHERE name = ?", (name,))

    def get_base(self, name: str) -> dict[str, Any] | None:
        """The row of base ``name`` or None."""
        rows = self._rows("SELECT * FROM bases WHERE name = ?", (name,))
        return dict(rows[0]) if rows else None

    def base_by_fingerprint(self, fingerprint: str) -> dict[str, Any] | None:
        """A base row with this fingerprint (the first by name) or None."""
        rows = self._rows("SELECT * FROM bases WHERE fingerprint = ? ORDER BY name LIMIT 1", (fingerprint,))
        return dict(rows[0]) if rows else None

    def list_bases(self) -> list[dict]:
        """Every base row, sorted by name."""
        return [dict(r) for r in self._rows("SELECT * FROM bases ORDER BY name")]

    # -- evals ---------------------------------------------------------------------------------
    def set_eval(self, manifest: str, results: dict[str, Any], updated_at: str) -> None:
        """Store the eval results of a delta's content (keyed by manifest digest)."""
        self._write(
            "INSERT OR REPLACE INTO evals (manifest, results, updated_at) VALUES (?, ?, ?)",
            (manifest, json.dumps(results, sort_keys=True), updated_at),
        )

    def get_eval(self, manifest: str) -> dict[str, Any] | None:
        """Eval results of a manifest digest or None."""
        rows = self._rows("SELECT results FROM evals WHERE manifest = ?", (manifest,))
        return json.loads(rows[0]["results"]) if rows else None

    def delete_eval(self, manifest: str) -> None:
        """Forget the eval results of a manifest digest."""
        self._write("DELETE FROM evals WHERE manifest = ?", (manifest,))

    def all_evals(self) -> dict[str, dict[str, Any]]:
        """Every stored eval, by manifest digest."""
        return {
            r["manifest"]: json.loads(r["results"]) for r in self._rows("SELECT manifest, results FROM evals")
        }

    # -- whole-catalog -------------------------------------------------------------------------
    def replace_all(self, deltas: list[dict], bases: list[dict], evals: list[tuple[str, dict, str]]) -> None:
        """Replace every row in one transaction (used by rebuild)."""
        with _guard(self.path):
            self._replace_all(deltas, bases, evals)

    def _replace_all(self, deltas: list[dict], bases: list[dict], evals: list[tuple[str, dict, str]]) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for table in ("deltas", "bases", "evals"):
                self.conn.execute(f"DELETE FROM {table}")
            self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('rebuilt', '1')")
            dcols, bcols = ", ".join(DELTA_COLUMNS), ", ".join(BASE_COLUMNS)
            self.conn.executemany(
                f"INSERT INTO deltas ({dcols}) VALUES ({', '.join('?' for _ in DELTA_COLUMNS)})",
                [tuple(r[c] for c in DELTA_COLUMNS) for r in deltas],
            )
            self.conn.executemany(
                f"INSERT INTO bases ({bcols}) VALUES ({', '.join('?' for _ in BASE_COLUMNS)})",
                [tuple(r[c] for c in BASE_COLUMNS) for r in bases],
            )
            self.conn.executemany(
                "INSERT INTO evals (manifest, results, updated_at) VALUES (?, ?, ?)",
                [(m, json.dumps(r, sort_keys=True), t) for m, r, t in evals],
            )
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
