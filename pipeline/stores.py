"""Database tracking stores (PostgreSQL, MySQL, MS SQL) checked before anything is launched.

MLflow opens such a store only when a client first asks it something, and its failures are tracebacks:
a missing driver is SQLAlchemy's ModuleNotFoundError; an unreachable server is retried for about
100 s (``create_sqlalchemy_engine_with_retry``: 10 attempts, backing off) before an OperationalError;
and a schema older than the installed MLflow's is either migrated on the spot by whichever client
opens it first (when tables are missing) or refused with an MlflowException "Detected out-of-date
database schema" (when the tables exist at an older revision). On a store a team shares, a silent
migration by one user's newer MLflow breaks the others', so sslgrid refuses both and names
``mlflow db upgrade``, the migration MLflow documents. SQLite stores are checked in pipeline/cli.py
(``store_problem``) and are left to MLflow's own migration: they are one user's.
"""
from __future__ import annotations

# the pip requirement that provides the module SQLAlchemy 2.1's default driver of a dialect imports
DRIVER_PACKAGES = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                   "pyodbc": "pyodbc"}
SERVER_DATABASES = ("postgresql", "mysql", "mssql")  # MLflow's server-backed stores (mlflow/store/db/db_types.py)
# The SQLAlchemy pool of each `sslgrid server` worker (MLflow's MLFLOW_SQLALCHEMYSTORE_POOL_SIZE and
# _MAX_OVERFLOW). MLflow's log_batch holds one pooled connection while _log_metrics takes a second
# (mlflow/store/tracking/sqlalchemy_store.py), and a worker serves up to 40 requests at once (anyio's
# default thread limiter, through which fastapi_app runs the Flask routes). With SQLAlchemy's default
# pool (5 + 10 overflow), 15 requests each holding their first connection wait on one another until
# the pool's 30 s timeout, and the writers get "400 QueuePool limit ... reached" (bench/tracking_load.py,
# 64 writers). 41 connections per worker (40 requests + 1) always lets one request finish; two
# workers stay at 82, under PostgreSQL's default max_connections of 100.
SERVER_POOL = {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "10", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "31"}
CONNECT_TIMEOUT_S = 10  # libpq's connect_timeout, in seconds: an unreachable host is said in one line, not after 100 s


def is_database(uri: str) -> bool:
    """Whether ``uri`` names a server-backed SQLAlchemy store (``postgresql://``,
    ``postgresql+psycopg://``, ``mysql://``, ``mssql://``), not SQLite, a file store or a server."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    return scheme.split("+", 1)[0] in SERVER_DATABASES


def shown(uri: str) -> str:
    """``uri`` with its password replaced by ``***`` (SQLAlchemy's rendering), for messages and logs."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(uri).render_as_string(hide_password=True)
    except ArgumentError:
        return uri.split("@", 1)[-1] if "@" in uri else uri


def database_problem(uri: str, flag: str = "--tracking-uri") -> str | None:
    """Why the database store at ``uri`` cannot be used by this MLflow, as one line naming ``flag``,
    the URI (password hidden) and the fix; None when it can, or when ``uri`` is no database store.

    Connects once (at most ``CONNECT_TIMEOUT_S`` seconds for PostgreSQL) and reads the store's alembic
    revision; creates and migrates nothing. An empty database is fine: MLflow creates its tables.
    Problems: the driver is not installed; the server cannot be reached or refuses the login or the
    database; the schema is at another revision than the installed MLflow's (older: ``mlflow db
    upgrade``; unknown, i.e. newer: upgrade MLflow). Raises nothing for those; a bug raises."""
    if not is_database(uri):
        return None
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, DBAPIError

    where = f"{flag}: {shown(uri)}"
    try:
        url = sqlalchemy.make_url(uri)
    except ArgumentError as err:
        return f"{where} is not a database URI ({err}). The form is postgresql://USER:PASSWORD@HOST:PORT/DATABASE."
    args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.get_backend_name() == "postgresql" else {}
    try:
        engine = sqlalchemy.create_engine(url, connect_args=args, poolclass=sqlalchemy.pool.NullPool)
    except ImportError as err:  # SQLAlchemy imports the dialect's driver here
        module = (getattr(err, "name", None) or str(err)).split(".")[0]
        package = DRIVER_PACKAGES.get(module, module)
        return (f"{where} needs the Python package {package}, which is not installed here ({err}). Install it "
                f"with `pip install '{package}'` (sslgrid's own install includes psycopg[binary] for PostgreSQL).")
    try:
        with engine.connect() as conn:
            revision = _revision(conn)
    except DBAPIError as err:
        reason = " ".join(str(getattr(err, "orig", None) or err).split()).rstrip(".")
        return (f"{where} cannot be reached: {reason}{'' if reason.endswith('?') else '.'} Check that the database server runs and listens at that host "
                f"and port, that the user and password are right, and that the database exists (createdb).")
    finally:
        engine.dispose()
    return _schema_problem(where, uri, revision)


def _revision(conn) -> str | None:
    """The store's alembic revision (None for a database MLflow has not set up), as MLflow reads it
    (mlflow/store/db/utils.py ``_get_schema_version``)."""
    from alembic.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def _schema_problem(where: str, uri: str, revision: str | None) -> str | None:
    """Why a store at alembic ``revision`` cannot be used by the installed MLflow, or None."""
    if revision is None:
        return None
    import mlflow
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError
    from mlflow.store.db.utils import _get_alembic_config, _get_latest_schema_revision

    head = _get_latest_schema_revision()
    if revision == head:
        return None
    try:
        known = ScriptDirectory.from_config(_get_alembic_config("")).get_revision(revision) is not None
    except CommandError:  # alembic's "No such revision"
        known = False
    if known:
        return (f"{where} has an MLflow schema older than this MLflow {mlflow.__version__}'s (revision {revision}, "
                f"needs {head}). Back the database up, then run `mlflow db upgrade {shown(uri)}` (with the "
                f"password) once; every MLflow client of that store must then be {mlflow.__version__} or newer.")
    return (f"{where} has an MLflow schema this MLflow {mlflow.__version__} does not know (revision {revision}): "
            f"a newer MLflow wrote it. Install that MLflow here (pip install -U mlflow), or use another store.")
