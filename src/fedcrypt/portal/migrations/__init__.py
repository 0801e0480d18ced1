"""Alembic revisions of the portal database schema (run by :mod:`fedcrypt.portal.migrate`)."""
