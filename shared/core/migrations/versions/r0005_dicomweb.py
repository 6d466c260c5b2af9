"""DICOMweb (issue 18): a node's DICOMweb part: its URLs, authentication (the name of a secret, never the
secret), TLS, timeout and the order in which retrieve prefers WADO-RS, WADO-URI, C-GET and C-MOVE.

Every column has a server default that keeps an existing node what it was: a DIMSE node without DICOMweb.
A DICOMweb-only node is a row with ``ae_title`` '' and ``port`` 0 (no column changes for it).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa

from pacsbridge.shared.core.migrations import ops

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_S = sa.String


def upgrade() -> None:
    for name in ("web_url", "qido_url", "wado_url", "wado_uri_url", "stow_url"):
        ops.add_column("pacsbridge_nodes", sa.Column(name, _S(2048), nullable=False, server_default=""))
    ops.add_column("pacsbridge_nodes", sa.Column("web_auth", _S(8), nullable=False, server_default="none"))
    ops.add_column("pacsbridge_nodes", sa.Column("web_user", _S(255), nullable=False, server_default=""))
    ops.add_column("pacsbridge_nodes", sa.Column("web_secret", _S(128), nullable=False, server_default=""))
    ops.add_column("pacsbridge_nodes", sa.Column("web_verify", sa.Boolean, nullable=False, server_default="1"))
    ops.add_column("pacsbridge_nodes", sa.Column("web_ca_bundle", _S(1024), nullable=False, server_default=""))
    ops.add_column("pacsbridge_nodes", sa.Column("web_timeout", sa.Float, nullable=False, server_default="60"))
    ops.add_column("pacsbridge_nodes", sa.Column("prefer", _S(64), nullable=False,
                                                 server_default="wado-rs,c-get,c-move"))


def downgrade() -> None:
    raise NotImplementedError("pacsbridge migrates forward only (docs/migrations.md)")
