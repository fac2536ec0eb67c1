"""idempotency keys of job submissions: a retried POST finds the job its first try created

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_table(
        "submission_keys",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("member_id", sa.String(64), nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("submission_id", sa.String(128), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),  # sha256 of the submission as sent
        sa.Column("state", sa.String(16), nullable=False),  # pending (reserved) | submitted (Ray accepted it)
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("member_id", "key", name="uq_submission_keys_member_key"),
    )


def downgrade() -> None:
    op.drop_table("submission_keys")
