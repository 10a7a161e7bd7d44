"""Hold an SQLite write lock (``BEGIN IMMEDIATE``) on a database file until stdin gets a line.

Prints ``locked`` once the lock is held. Run as ``python -m tests.faults.hold_sqlite_lock DB_PATH``.
"""

from __future__ import annotations

import sqlite3
import sys


def main(path: str) -> int:
    """Take the lock, announce it, wait for a line (or EOF) on stdin, roll back."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    sys.stdin.readline()
    conn.execute("ROLLBACK")
    conn.close()
    print("released", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
