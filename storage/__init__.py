"""Results database: SQLAlchemy 2.0 models, engine/session setup and the repository (all SQL)."""
