"""who may call which model, metered calls, feedback, operating hours and outcome indicators

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "model_access",
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("owner_member_id", sa.String(64), nullable=False, index=True),
        sa.Column("visibility", sa.String(16), nullable=False),  # private | shared | consortium
        sa.Column("shared_with", sa.Text, nullable=False, server_default=""),  # comma-separated member ids
        sa.Column("process", sa.String(64), nullable=False, server_default=""),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "calls",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(64), nullable=False, unique=True),
        sa.Column("member_id", sa.String(64), nullable=False, index=True),
        sa.Column("model", sa.String(128), nullable=False, index=True),
        sa.Column("model_version", sa.Integer, nullable=True),
        sa.Column("process", sa.String(64), nullable=False, server_default=""),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("instances", sa.Integer, nullable=False, server_default="1"),
    )
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(64), nullable=False, index=True),
        sa.Column("member_id", sa.String(64), nullable=False, index=True),
        sa.Column("rating", sa.Integer, nullable=False),
        sa.Column("true_label", sa.String(128), nullable=True),
        sa.Column("comment", sa.Text, nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "operating_hours",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("member_id", sa.String(64), nullable=False, index=True),
        sa.Column("process", sa.String(64), nullable=False),
        sa.Column("day", sa.Date, nullable=False),
        sa.Column("hours", sa.Float, nullable=False),
        sa.UniqueConstraint("member_id", "process", "day", name="uq_operating_hours_day"),
    )
    op.create_table(
        "outcomes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("member_id", sa.String(64), nullable=False, index=True),
        sa.Column("process", sa.String(64), nullable=False),
        sa.Column("indicator", sa.String(32), nullable=False),  # defect_rate | labour | operating_cost | uptime
        sa.Column("phase", sa.String(8), nullable=False),  # before | after
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("unit", sa.String(32), nullable=False, server_default=""),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    for table in ("outcomes", "operating_hours", "feedback", "calls", "model_access"):
        op.drop_table(table)
