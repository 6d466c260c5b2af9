"""Sealed node secrets (issue 18): a node may keep its DICOMweb password or token in its row, encrypted with a
key derived from the deployment's PACSBRIDGE_SECRET_KEY (shared/nodes/credentials.py), instead of naming one.

``web_secret_sealed`` is '' for every existing node: it keeps using the secret its ``web_secret`` names.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa

from pacsbridge.shared.core.migrations import ops

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    ops.add_column("pacsbridge_nodes", sa.Column("web_secret_sealed", sa.Text, nullable=False, server_default=""))


def downgrade() -> None:
    raise NotImplementedError("pacsbridge migrates forward only (docs/migrations.md)")
