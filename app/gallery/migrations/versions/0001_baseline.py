"""Baseline: the gallery schema of release 0.3 (tables of release 0.2 plus the review UI's
event_embeddings and face_clusters). Galleries of 0.2 are brought here by creating the two new
tables and stamped with this revision.

Revision ID: 0001
Revises: 
Create Date: 2026-12-01 11:47:02.005400
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('identity', sa.String(length=256), nullable=True),
    sa.Column('detail', sa.String(length=2048), nullable=False),
    sa.Column('os_user', sa.String(length=256), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('camera', sa.String(length=256), nullable=False),
    sa.Column('track_id', sa.Integer(), nullable=False),
    sa.Column('identity', sa.String(length=256), nullable=True),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('start', sa.Float(), nullable=False),
    sa.Column('end', sa.Float(), nullable=False),
    sa.Column('frames', sa.Integer(), nullable=False),
    sa.Column('bbox_x', sa.Float(), nullable=False),
    sa.Column('bbox_y', sa.Float(), nullable=False),
    sa.Column('bbox_w', sa.Float(), nullable=False),
    sa.Column('bbox_h', sa.Float(), nullable=False),
    sa.Column('model', sa.String(length=256), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_events_camera'), ['camera'], unique=False)
        batch_op.create_index(batch_op.f('ix_events_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_events_identity'), ['identity'], unique=False)

    op.create_table('face_clusters',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model', sa.String(length=256), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('centroid', sa.LargeBinary(), nullable=False),
    sa.Column('members', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('identities',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=256), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('meta',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('value', sa.String(length=1024), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_table('event_crops',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('event_id', sa.Integer(), nullable=False),
    sa.Column('quality', sa.Float(), nullable=False),
    sa.Column('crop', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['event_id'], ['events.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('event_crops', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_event_crops_event_id'), ['event_id'], unique=False)

    op.create_table('event_embeddings',
    sa.Column('event_id', sa.Integer(), nullable=False),
    sa.Column('model', sa.String(length=256), nullable=False),
    sa.Column('vector', sa.LargeBinary(), nullable=False),
    sa.Column('cluster_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['cluster_id'], ['face_clusters.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['event_id'], ['events.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('event_id')
    )
    with op.batch_alter_table('event_embeddings', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_event_embeddings_cluster_id'), ['cluster_id'],
                              unique=False)

    op.create_table('templates',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('identity_id', sa.Integer(), nullable=False),
    sa.Column('vector', sa.LargeBinary(), nullable=False),
    sa.Column('dim', sa.Integer(), nullable=False),
    sa.Column('model_name', sa.String(length=256), nullable=False),
    sa.Column('model_version', sa.String(length=256), nullable=False),
    sa.Column('source', sa.String(length=1024), nullable=False),
    sa.Column('quality', sa.Float(), nullable=False),
    sa.Column('crop', sa.LargeBinary(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['identity_id'], ['identities.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('templates', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_templates_identity_id'), ['identity_id'], unique=False)

def downgrade() -> None:
    with op.batch_alter_table('templates', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_templates_identity_id'))

    op.drop_table('templates')
    with op.batch_alter_table('event_embeddings', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_event_embeddings_cluster_id'))

    op.drop_table('event_embeddings')
    with op.batch_alter_table('event_crops', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_event_crops_event_id'))

    op.drop_table('event_crops')
    op.drop_table('meta')
    op.drop_table('identities')
    op.drop_table('face_clusters')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_events_identity'))
        batch_op.drop_index(batch_op.f('ix_events_created_at'))
        batch_op.drop_index(batch_op.f('ix_events_camera'))

    op.drop_table('events')
    op.drop_table('audit')
