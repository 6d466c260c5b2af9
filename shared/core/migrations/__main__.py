"""For developers: write a new revision under ``versions/`` (docs/migrations.md).

    python -m pacsbridge.shared.core.migrations "add the cohorts table"
    python -m pacsbridge.shared.core.migrations "add the cohorts table" --autogenerate [--database URL]

``--autogenerate`` brings a scratch database (default: a temporary SQLite file) to head and lets Alembic
write the operations that make it what ``schema.py`` declares; read and complete them (``ops.*``, a
``server_default`` for a NOT NULL column) before committing.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from alembic import command
from sqlalchemy import create_engine

from pacsbridge.shared.core.migrations import config, head, upgrade


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pacsbridge.shared.core.migrations")
    parser.add_argument("message", help="what the revision does, in a few words")
    parser.add_argument("--autogenerate", action="store_true", help="compare with schema.py and write the operations")
    parser.add_argument("--database", help="scratch database for --autogenerate (default: a temporary SQLite file)")
    args = parser.parse_args()
    rev_id = f"{int(head()) + 1:04d}"
    if not args.autogenerate:
        script = command.revision(config(), args.message, rev_id=rev_id)
        print(getattr(script, "path", script))
        return
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_engine(args.database or f"sqlite:///{Path(tmp) / 'scratch.db'}")
        with engine.begin() as conn:
            upgrade(conn)
            script = command.revision(config(conn), args.message, rev_id=rev_id, autogenerate=True)
        engine.dispose()
    print(getattr(script, "path", script))


if __name__ == "__main__":
    main()
