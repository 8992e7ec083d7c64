"""genesy-tasks: the Genesy Tasks contract as one embeddable module.

Genesy, a sales-engagement platform, creates and completes tasks in a CRM by
calling five HTTP endpoints (plus ``GET /health``) on the CRM's own server.
This module is that server. Its rooms, in dependency order:

- Tasks: the field table (_FIELDS), validation, ids and timestamps;
- Storage: :class:`TaskStore` on SQLite (WAL mode), which owns the SQL;
- Application: the Bottle app :func:`make_app` builds (routes, auth, errors,
  the request inspector) and :func:`mount` for a CRM's own app;
- Server: :class:`TaskServer`, HTTP/1.1 on an event loop, one thread;
- Check: Genesy's calls against any server, and replaying a recording;
- Command line: :func:`main`, and its workers;
- Assets: the dashboard page and the OpenAPI document.

    python genesy_tasks.py                  # serve ./tasks.db on 127.0.0.1:8080
    bottle.run(mount(crm, "/genesy", make_app("crm.db")))  # inside a CRM's app

Runtime dependencies: Bottle and the standard library.
"""

__version__ = "1.6.0"

import argparse
import asyncio
import base64
import collections
import contextlib
import functools
import hashlib
import hmac
import html
import http.client
import io
import itertools
import json
import os
import re
import secrets
import shlex
import signal
import socket
import sqlite3
import ssl
import struct
import sys
import threading
import time
import traceback
from datetime import datetime, timedelta
from urllib.parse import parse_qsl, quote, unquote_to_bytes, urlsplit

import bottle

# -- defaults and limits ------------------------------------------------------
# Every timeout and limit, by room. The DEFAULT_* that an option or an
# argument can change are its defaults; the others bound what no option does.
# Their costs are measured by bench/bench.py, not written here.

SCHEMA_VERSION = 4
# The oldest SQLite the module runs on (RHEL 8's), with its JSON functions
# (built in since 3.38, an option before that which the distributions' and
# python.org's builds turn on); the suite passes on it.
MIN_SQLITE = (3, 26, 0)

# Storage
DEFAULT_DB = "tasks.db"
DEFAULT_BUSY_TIMEOUT = 5.0  # seconds a write waits for another connection's write lock
# The commit that takes the WAL past this many pages copies them into the
# database. Each checkpoint syncs the WAL and then the database, whatever the
# size, and rewrites the pages that changed: fewer, larger checkpoints cost
# less in all, for longer pauses. SQLite's default is 1,000 pages.
DEFAULT_CHECKPOINT_PAGES = 8000
DEFAULT_CHECKPOINT_LOCK_WAIT_MS = 50  # how long a RESTART checkpoint waits for the lock
DEFAULT_CHECKPOINT_INTERVAL = 0.05  # seconds between the checkpointer's looks at the WAL
# PASSIVE checkpoints run until at most this many pages are left for the
# RESTART that holds the write lock, or this many times.
DEFAULT_CHECKPOINT_TAIL = 64
DEFAULT_CHECKPOINT_PASSES = 6
# Past this many times the checkpoint size, a WAL that cannot be checkpointed
# (another connection's long read transaction pins it) is reported.
DEFAULT_WAL_WARNING_FACTOR = 4
DEFAULT_WAL_WARNING_AFTER = 1.0  # seconds the WAL must stay pinned before it is reported
DEFAULT_IDEMPOTENCY_TTL = 24 * 60 * 60  # seconds an Idempotency-Key is remembered, at least
# Days the change feed keeps a deletion, at least; written into the trigger
# of a database when its change feed is made.
DEFAULT_DELETIONS_KEPT_DAYS = 7
# Connections kept open for threads to come when the threads that used them
# end: enough for a thread-per-request server's usual concurrency, few
# enough that a burst of threads leaves few open files behind.
DEFAULT_IDLE_CONNECTIONS = 4
# Changes waiting for slow subscribers, at most; past it they are dropped
# (and logged): a subscriber that falls behind catches up from the feed.
DEFAULT_MAX_UNDELIVERED = 100_000
DEFAULT_STOP_TIMEOUT = 10.0  # seconds close() waits for subscribers and the recording

# Application
DEFAULT_HEADER = "X-API-Key"
DEFAULT_MAX_BATCH = 10_000
# A maximal batch of 10,000 ids of up to 200 characters each, with room for
# JSON escapes and whitespace.
DEFAULT_MAX_BODY = 4 * 1024 * 1024
DEFAULT_LIST_LIMIT = 50
DEFAULT_MAX_LIST_LIMIT = 500
DEFAULT_INSPECT = 200  # requests the inspector keeps (GET /requests, the dashboard)
DEFAULT_MAX_INSPECT = 10_000  # the most it may keep: memory is this times the three below
DEFAULT_INSPECT_BODY = 64 * 1024  # bytes kept of a request's body
DEFAULT_INSPECT_ANSWER = 4 * 1024  # of the answer's body
DEFAULT_INSPECT_HEADERS = 64 * 1024  # of a request's header names and values together
# Bytes of recorded requests waiting for the recording's thread, at most: past
# it they are dropped (and counted in a log line), so a stalled disk holds up
# nobody and memory stays bounded.
DEFAULT_MAX_UNRECORDED = 64 * 1024 * 1024

# Server
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_REQUEST_TIMEOUT = 10.0  # seconds from a request's first byte to its last
DEFAULT_KEEPALIVE_TIMEOUT = 75.0  # seconds an idle connection stays open
DEFAULT_SHUTDOWN_TIMEOUT = 10.0  # seconds a stop waits for requests in flight
DEFAULT_LOCK_RETRY_INTERVAL = 0.002  # seconds between runs of a request that met a lock
# Seconds a connection closed after an error answer goes on reading (and
# dropping) what the client still sends, so that the answer is not lost to a
# reset.
DEFAULT_LINGER = 2.0
DEFAULT_MAX_CONNECTIONS = 256
# Request bytes held for all connections together (heads and bodies still
# arriving). Past it, connections that send more wait their turn.
DEFAULT_MAX_BUFFERED = 64 * 1024 * 1024
DEFAULT_MAX_REQUEST_LINE = 8 * 1024  # longer: 414
DEFAULT_MAX_HEAD = 64 * 1024  # request line and fields together; longer: 431
DEFAULT_MAX_HEADERS = 100  # more fields: 431
DEFAULT_MAX_CHUNK_EXTENSIONS = 16 * 1024  # a body's chunk extensions, all together; more: 400
DEFAULT_MAX_TRAILERS = 16 * 1024  # a chunked body's trailer section; larger: 431
DEFAULT_MAX_CHUNK_SIZE_DIGITS = 16
# A commit group (see TaskServer._handle) ends early after this many
# responses or bytes of responses, so a burst of pipelined requests is
# answered, and flow control sees the bytes, before they pile up.
DEFAULT_GROUP_MAX_RESPONSES = 64
DEFAULT_GROUP_MAX_BYTES = 1024 * 1024
DEFAULT_MAX_LOGGED_PATH = 500  # characters of a path in a log line; longer ones are cut
# A worker that exits within this many seconds of its start did not start: it
# is tried again after a pause that doubles each time, up to the last figure;
# when every worker has failed this many times in a row, the parent gives up.
DEFAULT_WORKER_STARTED = 1.0
DEFAULT_WORKER_RETRY = (0.5, 30.0)
DEFAULT_WORKER_ATTEMPTS = 5

# Check and replay
DEFAULT_CHECK_TIMEOUT = 10.0  # seconds for each request to the server checked

# The documented API (docs/embedding.md); every other name is underscored.
__all__ = [
    "TaskStore", "TaskValidationError", "IdempotencyKeyReused", "ChangesForgotten",
    "StorageError", "backup_database", "CommitGroups",            # storage
    "make_app", "mount", "openapi_document", "app",               # application
    "TaskServer",                                                 # server
    "run_contract_check", "run_replay",                           # check
    "main",                                                       # command line
    "TASK_FIELDS", "SCHEMA_VERSION", "MIN_SQLITE",
] + [name for name in list(globals()) if name.startswith("DEFAULT_")]


###############################################################################
# Tasks: fields, validation, ids and timestamps ###############################
###############################################################################

class _Field(collections.namedtuple(
        "_Field", "name column input filter schema shown")):
    """One field of a task: see _FIELDS."""


# A task's fields, in the order Genesy's JSON gives them. Everything about a
# field is derived from its row here: the table's column and its index, the
# insert, the JSON SQLite builds, validation, the list filters and their query
# parameters, the OpenAPI schemas and the dashboard's columns. Adding a field
# is one row here and a migration (docs/how-it-works.md, "Adding a field").
#   name, column: the JSON name and the column of genesy_tasks (None: derived)
#   input: what a client may send: "required" or "text" (a string or null;
#       both on create and update), "date" (text that is an ISO 8601 date or
#       date-time), "flag" (true or false, updates only), None (read-only)
#   filter: "exact" (GET /tasks?name=... matches exactly), "indexed" (the same,
#       with an index), None
#   schema: the OpenAPI type of its value; "?" means it may be null (else the
#       column is NOT NULL; every column is TEXT)
#   shown: its place among the dashboard's columns (0: not shown)
_FIELDS = (
    #      name           column          input       filter     schema        shown
    _Field("id",          "id",           None,       None,      "string",     0),
    _Field("subject",     "subject",      "required", None,      "string",     0),
    _Field("description", "description",  "text",     None,      "string?",    0),
    _Field("type",        "type",         "text",     "exact",   "string?",    1),
    _Field("ownerId",     "owner_id",     "text",     "indexed", "string?",    2),
    _Field("dueDate",     "due_date",     "date",     None,      "string?",    5),
    _Field("contactId",   "contact_id",   "text",     "indexed", "string?",    3),
    _Field("companyId",   "company_id",   "text",     "indexed", "string?",    4),
    _Field("completed",   None,           "flag",     None,      "boolean",    0),
    _Field("completedAt", "completed_at", None,       None,      "date-time?", 7),
    _Field("createdAt",   "created_at",   None,       None,      "date-time",  6),
    _Field("updatedAt",   "updated_at",   None,       None,      "date-time",  0),
)
#: A task's keys in Genesy's JSON shape, in the order they are returned.
TASK_FIELDS = tuple(field.name for field in _FIELDS)
# The fields a create takes (any other key is ignored), and those an update may change.
_CREATE_FIELDS = tuple(field for field in _FIELDS if field.input in ("required", "text", "date"))
_UPDATE_FIELDS = tuple(field for field in _FIELDS if field.input is not None)
# GET /tasks's exact-match filters: query parameter, TaskStore.list argument (the column).
_FILTERS = {field.name: field.column
            for field in sorted(_FIELDS, key=lambda field: field.filter != "indexed")
            if field.filter}


class TaskValidationError(ValueError):
    """A task's fields or a batch's ids break the contract; the message names the field."""


# ISO 8601 calendar dates and date-times, extended (2024-01-15T10:00:00Z) or
# basic (20240115T100000Z) format, with optional fraction and offset. ASCII
# digits only: \d would also accept other scripts' digits.
_ISO_EXTENDED = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
    r"(?:[Tt]([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:[.,]([0-9]+))?)?"
    r"([Zz]|([+-])([0-9]{2})(?::?([0-9]{2}))?)?)?"
)
_ISO_BASIC = re.compile(
    r"([0-9]{4})([0-9]{2})([0-9]{2})"
    r"(?:[Tt]([0-9]{2})([0-9]{2})(?:([0-9]{2})(?:[.,]([0-9]+))?)?"
    r"([Zz]|([+-])([0-9]{2})([0-9]{2})?)?)?"
)


def _parse_iso8601(value):
    """The instant ``value`` names, as a UTC datetime, or None if it is not ISO 8601.

    A date alone means its midnight, and a time without an offset is taken as
    UTC: Genesy's documentation only ever shows UTC times.
    """
    match = _ISO_EXTENDED.fullmatch(value) or _ISO_BASIC.fullmatch(value)
    if not match:
        return None
    (year, month, day, hour, minute, second, fraction, _,
     sign, off_hour, off_minute) = match.groups()
    hour, minute, second = int(hour or 0), int(minute or 0), int(second or 0)
    off_hour, off_minute = int(off_hour or 0), int(off_minute or 0)
    if hour > 23 or minute > 59 or second > 60 or off_hour > 23 or off_minute > 59:
        return None
    try:
        instant = datetime(int(year), int(month), int(day), hour, minute,
                           min(second, 59),  # a leap second counts as :59
                           int((fraction or "0")[:6].ljust(6, "0")))
    except ValueError:
        return None  # no such day (2023-02-29)
    offset = timedelta(hours=off_hour, minutes=off_minute)
    try:
        return instant - offset if sign == "+" else instant + offset
    except OverflowError:  # an offset that crosses year 1 or year 9999
        return datetime.min if sign == "+" else datetime.max


def _is_iso8601(value):
    """True if ``value`` is an ISO 8601 calendar date or date-time that exists."""
    return _parse_iso8601(value) is not None


def _utc_text(instant):
    # Not strftime: its %Y does not pad years before 1000 to four digits.
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (
        instant.year, instant.month, instant.day, instant.hour, instant.minute,
        instant.second, instant.microsecond // 1000)


def _utc_instant(value):
    """An ISO 8601 date or date-time as UTC text that sorts in time order.

    ``2024-01-15T11:00:00+01:00`` and ``20240115T1000Z`` both give
    ``2024-01-15T10:00:00.000Z``. The store keeps this beside each dueDate so
    that the dueBefore and dueAfter filters compare instants, not spellings.
    """
    instant = _parse_iso8601(value)
    if instant is None:
        raise TaskValidationError("%r is not an ISO 8601 date or date-time" % (value,))
    return _utc_text(instant)


# A character that is not blank: whitespace as Python and JavaScript both
# count it, spelled out so that the OpenAPI document's pattern is the same.
_NOT_BLANK = ("[^\\t\\n\\x0b\\x0c\\r \\x1c-\\x1f\\x85\\xa0\\u1680\\u2000-\\u200a"
              "\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff]")
_has_text = re.compile(_NOT_BLANK).search


def _check_text(name, value, required=False, date=False):
    if isinstance(value, str):
        if required and not _has_text(value):
            raise TaskValidationError("%s must not be blank" % name)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (JSON allows "\ud800") cannot be stored as UTF-8.
            raise TaskValidationError("%s must be valid Unicode text" % name) from None
        if date and not _is_iso8601(value):
            raise TaskValidationError(
                "%s must be an ISO 8601 date or date-time, "
                "such as 2024-01-15 or 2024-01-15T10:00:00Z" % name)
        return value
    if value is None and not required:
        return None
    if required:
        raise TaskValidationError("%s is required and must be a non-blank string" % name)
    raise TaskValidationError("%s must be a string or null" % name)


def _check_field(field, value):
    """``value`` for ``field``, checked by the field's input (see _FIELDS)."""
    if field.input == "flag":
        return _check_flag(field.name, value)
    return _check_text(field.name, value, required=field.input == "required",
                       date=field.input == "date")


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise TaskValidationError("%s must be true or false" % name)
    return value


def _check_object(fields, what):
    if not isinstance(fields, dict):
        raise TaskValidationError("the %s must be a JSON object" % what)


def _validate_new_task(fields):
    """The create fields of ``fields``, checked; anything else is ignored."""
    _check_object(fields, "task")
    return {field.name: _check_field(field, fields.get(field.name)) for field in _CREATE_FIELDS}


def _validate_task_changes(fields):
    """The known fields of a partial update, checked. At least one must be present."""
    _check_object(fields, "update")
    changes = {field.name: _check_field(field, fields[field.name])
               for field in _UPDATE_FIELDS if field.name in fields}
    if not changes:
        raise TaskValidationError(
            "no known field to update; send one or more of: %s"
            % ", ".join(field.name for field in _UPDATE_FIELDS))
    return changes


def _check_idempotency_key(key):
    if not isinstance(key, str) or not 1 <= len(key) <= 255 \
            or not all("!" <= char <= "~" for char in key):
        raise TaskValidationError("Idempotency-Key must be 1 to 255 visible ASCII characters")
    return key


def _validate_ids(ids):
    """``ids`` as a list of strings, or a TaskValidationError naming the bad entry."""
    if not isinstance(ids, list):
        raise TaskValidationError("ids is required and must be an array of strings")
    for index, task_id in enumerate(ids):
        if not isinstance(task_id, str):
            raise TaskValidationError("ids[%d] must be a string" % index)
    return ids


def _now():
    """The current time as (milliseconds since the epoch, UTC ISO 8601 text)."""
    ms = int(time.time() * 1000)
    seconds, millis = divmod(ms, 1000)
    return ms, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%03dZ" % millis


def _new_task_id(ms):
    """A URL-safe id: 'task-', the creation time in hex, then 80 random bits.

    Time first keeps new ids at the right-hand end of the id index, so inserts
    stay cheap as the table grows, and makes ids sort by creation time.
    """
    return "task-%012x%s" % (ms, secrets.token_hex(10))


###############################################################################
# Storage #####################################################################
###############################################################################

class StorageError(Exception):
    """The database cannot be opened or used; the message says why."""


@functools.lru_cache(maxsize=None)
def _check_sqlite():
    """Refuse, in one line, an SQLite this module cannot run on. Once a
    process has passed, it is not asked again: its library cannot change."""
    needed = "SQLite %s or newer is needed, with its JSON functions" % ".".join(
        map(str, MIN_SQLITE))
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise StorageError("%s; this Python's SQLite is %s" % (needed, sqlite3.sqlite_version))
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("SELECT json_object('a', json('[]')), "
                     "(SELECT count(*) FROM json_each('[1]'))").fetchone()
    except sqlite3.OperationalError as error:
        raise StorageError("%s; this Python's SQLite %s was built without them (%s)"
                           % (needed, sqlite3.sqlite_version, error)) from None
    finally:
        conn.close()


# seq is AUTOINCREMENT so that a position is never given twice: a cursor
# (a seq) must not come to stand for a task created after it was handed out.
_STORED = tuple(field for field in _FIELDS if field.column)


def _column_definition(field):
    return "%-12s TEXT%s%s" % (field.column, "" if field.schema.endswith("?") else " NOT NULL",
                               " UNIQUE" if field.name == "id" else "")


def _index_name(field):
    # The first indexes were named after the column without its "_id".
    return "genesy_tasks_" + re.sub("_id$", "", field.column)


_SCHEMA = """
CREATE TABLE genesy_tasks (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    %s,
    due_utc      TEXT  -- dueDate as UTC text that sorts in time order
);
%s
""" % (",\n    ".join(_column_definition(field) for field in _STORED),
       "\n".join("CREATE INDEX %s ON genesy_tasks (%s);" % (_index_name(field), field.column)
                 for field in _FIELDS if field.filter == "indexed"))
# Idempotency-Key of POST /tasks: what was asked (a fingerprint of the body)
# and what was answered, so that a retry gets the same answer.
_IDEMPOTENCY_SCHEMA = """
CREATE TABLE genesy_idempotency (
    key          TEXT PRIMARY KEY,
    fingerprint  TEXT NOT NULL,
    task         TEXT NOT NULL,
    created_ms   INTEGER NOT NULL
);
CREATE INDEX genesy_idempotency_created ON genesy_idempotency (created_ms);
"""

# The change feed (GET /changes, TaskStore.changes): one row per task, its
# latest change, which a new change replaces at the end of the feed, so the
# feed is as large as the table plus the deletions of the last
# DEFAULT_DELETIONS_KEPT_DAYS. Triggers write it, so that every writer is in it: this
# server, a CRM's own SQL, another process. They fire on the contract's
# columns only (a CRM's update of a column of its own is no change), and never
# write genesy_tasks, so a CRM's own triggers on it fire for its writes alone.
# Each deletes the task's previous row by task_id itself, rather than by
# INSERT OR REPLACE, whose conflict policy an outer statement's would override.
_CHANGE_AT_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
_CHANGES_CUTOFF = ("strftime('%%Y-%%m-%%dT%%H:%%M:%%fZ', 'now', '-%d days')"
                   % DEFAULT_DELETIONS_KEPT_DAYS)
_CONTRACT_COLUMNS = ", ".join(field.column for field in _STORED)
_CHANGES_TABLE = [
    """CREATE TABLE genesy_changes (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,  -- the feed's order, never reused
    task_id  TEXT NOT NULL UNIQUE,
    change   TEXT NOT NULL,  -- create, update or delete
    at       TEXT NOT NULL
)""",
    "CREATE INDEX genesy_changes_deleted ON genesy_changes (at) WHERE change = 'delete'",
]
_CHANGES_TRIGGERS = [
    """CREATE TRIGGER genesy_tasks_created AFTER INSERT ON genesy_tasks BEGIN
    DELETE FROM genesy_changes WHERE task_id = NEW.id;
    INSERT INTO genesy_changes (task_id, change, at) VALUES (NEW.id, 'create', NEW.created_at);
END""",
    """CREATE TRIGGER genesy_tasks_updated AFTER UPDATE OF %(columns)s ON genesy_tasks
    WHEN OLD.id IS NEW.id BEGIN
    DELETE FROM genesy_changes WHERE task_id = NEW.id;
    INSERT INTO genesy_changes (task_id, change, at) VALUES (NEW.id, 'update', NEW.updated_at);
END""" % {"columns": _CONTRACT_COLUMNS},
    # A changed id (a CRM's SQL) is the old task's deletion and the new one's update.
    """CREATE TRIGGER genesy_tasks_renamed AFTER UPDATE OF %(columns)s ON genesy_tasks
    WHEN OLD.id IS NOT NEW.id BEGIN
    DELETE FROM genesy_changes WHERE task_id IN (OLD.id, NEW.id);
    INSERT INTO genesy_changes (task_id, change, at) VALUES (OLD.id, 'delete', %(now)s);
    INSERT INTO genesy_changes (task_id, change, at) VALUES (NEW.id, 'update', NEW.updated_at);
END""" % {"columns": _CONTRACT_COLUMNS, "now": _CHANGE_AT_NOW},
    # A deletion also forgets those older than DEFAULT_DELETIONS_KEPT_DAYS, and
    # remembers up to where: a cursor from before then may have missed one.
    # GROUP BY change gives one row, or none when there is nothing to forget
    # (HAVING alone would, but SQLite accepts it only since 3.39).
    """CREATE TRIGGER genesy_tasks_deleted AFTER DELETE ON genesy_tasks BEGIN
    INSERT OR REPLACE INTO genesy_meta SELECT 'changes_forgotten', max(max(seq), coalesce(
            (SELECT CAST(value AS INTEGER) FROM genesy_meta WHERE key = 'changes_forgotten'), 0))
        FROM genesy_changes WHERE change = 'delete' AND at < %(cutoff)s
        GROUP BY change;
    DELETE FROM genesy_changes WHERE change = 'delete' AND at < %(cutoff)s;
    DELETE FROM genesy_changes WHERE task_id = OLD.id;
    INSERT INTO genesy_changes (task_id, change, at) VALUES (OLD.id, 'delete', %(now)s);
END""" % {"cutoff": _CHANGES_CUTOFF, "now": _CHANGE_AT_NOW},
]


def _split(script):
    """The statements of a script without triggers: a trigger's body holds
    semicolons of its own, which is why the triggers above are a list."""
    return [statement for statement in script.split(";") if statement.strip()]


def _never_reuse_positions(conn):
    """Schema 3: seq becomes AUTOINCREMENT, which SQLite gives a table only when
    it is created. The table is rebuilt as SQLite's documented procedure for
    other schema changes says: from its own CREATE statement, so that columns
    a CRM added to it stay, and with the indexes and triggers a CRM attached to
    it created again as they were."""
    create = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' "
                          "AND name = 'genesy_tasks'").fetchone()[0]
    create, found = re.subn(r"(?i)^(\s*CREATE\s+TABLE\s+)[\"`\[]?genesy_tasks[\"`\]]?",
                            r"\1genesy_tasks_new", create)
    create, primary = re.subn(r"(?i)\bseq\s+INTEGER\s+PRIMARY\s+KEY\b",
                              "seq INTEGER PRIMARY KEY AUTOINCREMENT", create)
    if not (found and primary == 1):
        raise sqlite3.DatabaseError("cannot upgrade its genesy_tasks table to schema 3: "
                                    "its definition is not one genesy-tasks made")
    attached = [sql for (sql,) in conn.execute(
        "SELECT sql FROM sqlite_master WHERE type IN ('index', 'trigger') "
        "AND tbl_name = 'genesy_tasks' AND sql IS NOT NULL")]
    conn.execute(create)
    columns = ", ".join('"%s"' % row[1].replace('"', '""')
                        for row in conn.execute("PRAGMA table_info(genesy_tasks)"))
    conn.execute("INSERT INTO genesy_tasks_new (%s) SELECT %s FROM genesy_tasks"
                 % (columns, columns))
    conn.execute("DROP TABLE genesy_tasks")
    # Legacy renaming: a CRM's view or trigger that names genesy_tasks names
    # nothing for a moment, which a modern rename would refuse.
    conn.execute("PRAGMA legacy_alter_table = ON")
    try:
        conn.execute("ALTER TABLE genesy_tasks_new RENAME TO genesy_tasks")
    finally:
        conn.execute("PRAGMA legacy_alter_table = OFF")
    for sql in attached:
        conn.execute(sql)


def _triggers_made_again(*names):
    """The statements that drop these change-feed triggers and create them as
    this release writes them."""
    return (["DROP TRIGGER %s" % name for name in names]
            + [trigger for trigger in _CHANGES_TRIGGERS
               if re.match(r"CREATE TRIGGER (\w+)", trigger).group(1) in names])


def _has_old_deletion_trigger(conn):
    """Whether the file has the deletion trigger of releases 1.4.0 and 1.5.0,
    whose HAVING without GROUP BY fails every deletion on SQLite before 3.39:
    a file made by them and moved to an older SQLite gets the new one."""
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger' "
                       "AND name = 'genesy_tasks_deleted'").fetchone()
    return row is not None and "HAVING max(seq) IS NOT NULL" in row[0]


def _field_added(name):
    """The upgrade for a field added to _FIELDS: its column (which may be
    null: existing tasks have none), its index if it has one, and the change
    feed's update triggers made again, since they name the contract's columns."""
    field = next(field for field in _FIELDS if field.name == name)
    if not field.schema.endswith("?"):
        raise ValueError("a field added later must allow null: existing tasks have no value")
    statements = ["ALTER TABLE genesy_tasks ADD COLUMN " + _column_definition(field)]
    if field.filter == "indexed":
        statements.append("CREATE INDEX %s ON genesy_tasks (%s)"
                          % (_index_name(field), field.column))
    # (The earlier steps of an upgrade create these triggers naming columns
    # that do not exist yet, which SQLite allows: UPDATE OF is not checked.)
    return statements + _triggers_made_again("genesy_tasks_updated", "genesy_tasks_renamed")


# Upgrades of an existing database, by the version they lead to: statements,
# or a function of the connection. A field added to _FIELDS needs one: raise
# SCHEMA_VERSION by one and add, say, ``5: _field_added("priority")``.
_MIGRATIONS = {
    2: ["ALTER TABLE genesy_tasks ADD COLUMN due_utc TEXT",
        "UPDATE genesy_tasks SET due_utc = genesy_utc_instant(due_date) "
        "WHERE due_date IS NOT NULL"]
       + _split(_IDEMPOTENCY_SCHEMA),
    3: [_never_reuse_positions],
    # Every task enters the feed as it is, in the order of its last change.
    4: _CHANGES_TABLE
       + ["INSERT INTO genesy_changes (task_id, change, at) SELECT id, CASE WHEN "
          "updated_at = created_at THEN 'create' ELSE 'update' END, updated_at "
          "FROM genesy_tasks ORDER BY updated_at, seq"]
       + _CHANGES_TRIGGERS,
}

# A task's columns in TASK_FIELDS order, for _task(); "completed" is derived
# from completed_at.
_COLUMNS = ", ".join(field.column or "NULL" for field in _FIELDS)
_COMPLETED_AT = TASK_FIELDS.index("completedAt")
# A task as Genesy's JSON text, made by SQLite: reads send it as it comes, with
# no Python dict and no json.dumps per task, and TaskStore's dicts are decoded
# from it, so the API and the routes cannot disagree on a task's shape.
_TASK_JSON = "json_object(%s)" % ", ".join(
    "'%s', %s" % (field.name, field.column or
                  "json(CASE WHEN completed_at IS NULL THEN 'false' ELSE 'true' END)")
    for field in _FIELDS)
_SELECT_ONE = "SELECT %s FROM genesy_tasks WHERE id = ?" % _TASK_JSON
# One statement for any number of ids: no bound-parameter limit, one cached plan.
_SELECT_MANY = ("SELECT id, %s FROM genesy_tasks WHERE id IN (SELECT value FROM json_each(?))"
                % _TASK_JSON)
_INSERT = "INSERT INTO genesy_tasks (%s, due_utc) VALUES (%s?)" % (
    _CONTRACT_COLUMNS, "?, " * len(_STORED))
# An update reads the row first, with its rowid (seq), and then updates by
# rowid: no second id lookup, and only columns that change, so untouched
# indexes stay untouched.
_SELECT_ONE_FOR_UPDATE = "SELECT %s, seq FROM genesy_tasks WHERE id = ?" % _COLUMNS
# Only tasks whose state changes are written: a retried completion keeps its
# first completedAt and its updatedAt.
_SET_COMPLETED_MANY = (
    "UPDATE genesy_tasks SET completed_at = ?, updated_at = ? "
    "WHERE id IN (SELECT value FROM json_each(?)) AND completed_at IS %s NULL"
)
_SELECT_TO_COMPLETE = ("SELECT %s FROM genesy_tasks WHERE id IN (SELECT value FROM "
                       "json_each(?)) AND completed_at IS %%s NULL" % _COLUMNS)
# The columns an update may change: a writable field's, and completed_at,
# which "completed" sets.
_UPDATABLE_COLUMNS = dict({field.name: field.column for field in _UPDATE_FIELDS if field.column},
                          completedAt="completed_at")
# One page of the change feed, and whether the cursor is one the feed can
# still serve (a row with seq -1 when it is not), in one statement: one
# snapshot. A cursor is refused when it is older than a deletion forgotten
# since, or beyond the last position ever given (the file was restored from a
# backup, or replaced): either way, changes after it may be missed.
_SELECT_CHANGES = (
    "SELECT -1, NULL WHERE ?1 > coalesce((SELECT seq FROM sqlite_sequence "
    "WHERE name = 'genesy_changes'), 0) OR ?1 < coalesce((SELECT CAST(value AS INTEGER) "
    "FROM genesy_meta WHERE key = 'changes_forgotten'), 0) UNION ALL SELECT * FROM ("
    "SELECT c.seq, json_object('taskId', c.task_id, 'change', c.change, 'task', "
    "json(CASE WHEN genesy_tasks.id IS NULL THEN NULL ELSE %s END), 'at', c.at) "
    "FROM genesy_changes AS c LEFT JOIN genesy_tasks ON genesy_tasks.id = c.task_id "
    "WHERE c.seq > ?1 ORDER BY c.seq LIMIT ?2)" % _TASK_JSON)


def _utc_instant_or_null(value):
    instant = None if value is None else _parse_iso8601(value)
    return None if instant is None else _utc_text(instant)


def _task(row):
    """The task of a row of _COLUMNS."""
    task = dict(zip(TASK_FIELDS, row))
    task["completed"] = row[_COMPLETED_AT] is not None
    return task


def _in_request_order(ids, found):
    """The tasks of ``found`` (by id) in the order their ids first appear in ``ids``, once each."""
    return [found.pop(task_id) for task_id in ids if task_id in found]


def _json_array(texts):
    """The JSON array of these JSON texts, as UTF-8."""
    return ("[" + ",".join(texts) + "]").encode("utf-8")


# A cursor is a place in creation order (the last task's seq), so any cursor
# means something: "the tasks created before (or after) that one".
_CURSOR = re.compile(r"[0-9]{1,18}")


def _check_limit(limit):
    if isinstance(limit, bool) or not isinstance(limit, int) \
            or not 1 <= limit <= DEFAULT_MAX_LIST_LIMIT:
        raise TaskValidationError("limit must be a whole number from 1 to %d"
                                  % DEFAULT_MAX_LIST_LIMIT)


def _decode_cursor(cursor, name="cursor"):
    if not isinstance(cursor, str) or not _CURSOR.fullmatch(cursor):
        raise TaskValidationError("%s must be a nextCursor this server returned" % name)
    return int(cursor)


def _fingerprint(body):
    """A digest of a request body that ignores key order and whitespace."""
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def _newer_schema(version):
    return sqlite3.DatabaseError("its schema version %s is newer than this genesy-tasks (%s) "
                                 "understands" % (version, SCHEMA_VERSION))


def _is_lock_wait(error):
    """Whether a sqlite3 error means another connection held a lock (SQLITE_BUSY,
    SQLITE_LOCKED): the same call may succeed a moment later."""
    code = getattr(error, "sqlite_errorcode", None)  # Python 3.11 and later
    if code is not None:
        return code & 0xFF in (5, 6)
    text = str(error)
    return "database is locked" in text or "database table is locked" in text


def _recovering(method):
    """A TaskStore method that starts afresh after an operational error.

    See :meth:`TaskStore._discard_connection`. Another connection's lock is no
    reason: the connection is fine, and waiting writes are retried on it.
    """
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.OperationalError as error:
            if not _is_lock_wait(error):
                self._discard_connection()
            raise
    return wrapper


class _CommitGroup:
    """The writes of several TaskStore calls, committed together."""

    def __init__(self):
        self.connection = None  # set by the first write, which began the transaction
        self.lost = None        # the error that ended that transaction early
        self.changes = []       # for subscribers, once committed

    @property
    def writing(self):
        """Whether a write has begun the group's transaction (or had, before it was lost)."""
        return self.connection is not None


class IdempotencyKeyReused(Exception):
    """An Idempotency-Key was sent again with a different request body."""


class ChangesForgotten(Exception):
    """A change feed cursor the feed cannot serve without missing changes: older
    than the deletions it keeps, or beyond its end (a restored database)."""


def _change(kind, task_id, task, at):
    """A change in the feed's shape."""
    return {"taskId": task_id, "change": kind, "task": task, "at": at}


def _created(task):
    """The change of a task's creation, with a copy of it: the caller keeps its own."""
    return _change("create", task["id"], dict(task), task["createdAt"])


class _Deliveries(threading.Thread):
    """Calls a store's subscribers with each commit's changes, in commit order.

    A thread of its own, so that no request, and no event loop, waits for a
    subscriber, and a failing one fails nothing but itself.
    """

    def __init__(self, subscribers):
        super().__init__(name="genesy-tasks subscribers", daemon=True)
        self.subscribers = subscribers
        self.queue = collections.deque()
        self.pending = 0  # changes in the queue
        self.dropped = 0
        self.ready = threading.Condition()
        self.stopping = False

    def reserve(self):
        """A place in the queue for a commit about to happen.

        Taken while the commit's transaction holds the write lock, so places
        are in commit order whichever thread commits; fill() it afterwards.
        """
        place = [None]  # None: not committed yet
        with self.ready:
            self.queue.append(place)
        return place

    def fill(self, place, changes):
        """The place's commit happened, with these changes, or did not ([])."""
        dropped = False
        with self.ready:
            if changes and self.pending and self.pending + len(changes) > DEFAULT_MAX_UNDELIVERED:
                dropped = not self.dropped
                self.dropped += len(changes)
                changes = []
            place[0] = changes
            self.pending += len(changes)
            self.ready.notify()
        if dropped:
            _report(sys.stderr, "genesy-tasks: subscribers are more than %d changes behind; "
                                "dropping changes (read the change feed to catch up)\n"
                    % DEFAULT_MAX_UNDELIVERED)

    def stop(self, timeout=DEFAULT_STOP_TIMEOUT):
        """Deliver what was committed (for up to ``timeout`` seconds), then end."""
        with self.ready:
            self.stopping = True
            self.ready.notify()
        if threading.current_thread() is not self:
            self.join(timeout)

    def run(self):
        while True:
            with self.ready:
                while (not self.queue or self.queue[0][0] is None) and not self.stopping:
                    self.ready.wait()
                if not self.queue or self.queue[0][0] is None:
                    return  # stopping, and nothing more was committed
                changes = self.queue.popleft()[0]
                self.pending -= len(changes)
                self.dropped = 0
            if not changes:
                continue
            for callback in list(self.subscribers):
                try:
                    callback(changes)
                except Exception:
                    _report(sys.stderr, "genesy-tasks: subscriber %r failed:\n%s"
                            % (callback, traceback.format_exc()))


class TaskStore:
    """Genesy's tasks in SQLite: the storage the HTTP routes call, usable directly.

    ``TaskStore("crm.db")`` opens (or creates) the database, switches the file
    to WAL (for good: it is a property of the file) and creates its tables,
    ``genesy_tasks``, ``genesy_changes``, ``genesy_meta`` and
    ``genesy_idempotency``, beside any others in the file. A thread that calls
    it gets a connection of its own; when the thread ends, the next thread
    takes the connection over, so a server that starts a thread per request
    keeps a few connections, not one per request. Every method takes and
    returns plain dicts in Genesy's JSON shape (see ``TASK_FIELDS``).
    """

    def __init__(self, path, busy_timeout=DEFAULT_BUSY_TIMEOUT, validate=None):
        """:param busy_timeout: seconds a write waits for another writer's lock.
        :param validate: called with the task as it would be written, and the
            task as it was (None for a create), before each create and update;
            raising TaskValidationError refuses the write.
        """
        self.path = os.fspath(path)
        self.busy_timeout = busy_timeout
        self.validate = validate
        self._local = threading.local()
        self._owners = {}  # connection -> the thread using it
        self._idle = []    # connections of threads that ended, for the next ones
        self._connections_lock = threading.Lock()
        self._subscribers = []
        self._deliveries = None  # the thread that calls subscribers, once there is one
        # Set by a checkpointer that needs the write lock for a moment: commit
        # groups begin no transaction meanwhile (their writes wait as if locked).
        self._groups_paused = threading.Event()
        _check_sqlite()
        self._create_file()
        try:
            # Look before anything writes (WAL mode included): a file this
            # store refuses is left exactly as it was.
            self._check_schema()
            self._migrate(self._connection())
        except (sqlite3.Error, TaskValidationError) as error:
            # (A CRM's trigger may refuse what an upgrade writes.)
            self.close()
            raise StorageError("cannot use database %r: %s" % (self.path, error)) from error

    # -- connections and transactions ---------------------------------------

    def _create_file(self):
        """Create a new database file readable by its owner only: it holds the API key."""
        if self.path == ":memory:" or self.path.startswith("file:"):
            raise StorageError("TaskStore needs a database file path, not %r" % self.path)
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise StorageError("cannot use database %r: directory %r does not exist"
                               % (self.path, directory))
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as error:
            raise StorageError("cannot create database %r: %s"
                               % (self.path, error.strerror)) from error

    def _connection(self):
        conn = getattr(self._local, "connection", None)
        if conn is None:
            conn = self._take_connection()
        return conn

    def _take_connection(self):
        """A connection for this thread: one a finished thread left, or a new one."""
        thread = threading.current_thread()
        with self._connections_lock:
            self._reclaim_connections()
            conn = self._idle.pop() if self._idle else None
            if conn is not None:
                self._owners[conn] = thread
        waits = getattr(self._local, "waits", True)
        try:
            if conn is None:
                conn = sqlite3.connect(self.path, timeout=self.busy_timeout if waits else 0,
                                       isolation_level=None, check_same_thread=False,
                                       cached_statements=64)
                with self._connections_lock:
                    self._owners[conn] = thread
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise sqlite3.OperationalError(
                        "WAL journal mode is not available (got %r)" % mode)
                # WAL + NORMAL: a commit is in the operating system's hands at
                # once, so it survives a crash of this process; only a power
                # loss can take the last commits.
                conn.execute("PRAGMA synchronous = NORMAL")
            self._set_waits(conn, waits)
        except BaseException:
            if conn is not None:
                with self._connections_lock:
                    self._owners.pop(conn, None)
                conn.close()
            raise
        self._local.connection = conn
        return conn

    def _reclaim_connections(self):
        """Take back the connections of threads that have ended (with the lock held).

        Python forgets a finished thread's thread-local values, but not the
        connection this store keeps for close(): without this, a server that
        starts a thread per request would leave a connection, and its open
        files, behind each request.
        """
        for conn, thread in list(self._owners.items()):
            if thread.is_alive():
                continue
            del self._owners[conn]
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if len(self._idle) < DEFAULT_IDLE_CONNECTIONS:
                self._idle.append(conn)
            else:
                conn.close()

    @contextlib.contextmanager
    def _write(self, one_statement=False):
        """One write transaction; IMMEDIATE so it never fails half-way on a lock upgrade.

        In a commit group (see start_commit_group) it is a savepoint of the
        group's transaction instead: undone alone if it fails, committed with
        the others when the group finishes. With ``one_statement`` (the block
        changes the database with one statement at most, and raises nothing
        after it) it needs no savepoint: SQLite undoes a failed statement by
        itself, and a SAVEPOINT and RELEASE would add two statements to every write.
        """
        conn = self._connection()
        group = getattr(self._local, "group", None)
        changes = self._local.changes = []  # for subscribers: see _changed()
        try:
            if group is not None:
                with self._savepoint(conn, group, one_statement):
                    yield conn
                group.changes += changes
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                self._commit(conn, changes)
            except BaseException:
                self._roll_back(conn)
                raise
        except sqlite3.IntegrityError as error:
            # A CRM's constraint or trigger refused the write (RAISE(ABORT,
            # 'unknown contact'), a foreign key): its message says why.
            raise TaskValidationError(str(error)) from error
        finally:
            self._local.changes = None

    def _commit(self, conn, changes):
        """COMMIT, then hand the changes to subscribers, in commit order."""
        place = None
        if changes and self._subscribers:
            # Before the COMMIT, while the write lock is held: the order of
            # places is the order of commits.
            place = self._delivery_thread().reserve()
        try:
            conn.execute("COMMIT")
        except BaseException:
            if place is not None:
                self._deliveries.fill(place, [])
            raise
        if place is not None:
            self._deliveries.fill(place, changes)

    @staticmethod
    def _roll_back(conn):
        # A failed COMMIT (disk full, I/O error) can leave the transaction
        # open, and some errors end it already: roll back what is left.
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    @contextlib.contextmanager
    def _savepoint(self, conn, group, one_statement):
        if group.lost is not None:
            raise group.lost  # a new transaction now would outlive the group
        if group.connection is None:
            if self._groups_paused.is_set():
                raise sqlite3.OperationalError("database is locked (for a checkpoint)")
            conn.execute("BEGIN IMMEDIATE")
            group.connection = conn
        if one_statement and self._has_crm_triggers(conn):
            # SQLite undoes a failed statement by itself, unless a trigger
            # fails it with RAISE(FAIL), which keeps what it did so far.
            one_statement = False
        if not one_statement:
            conn.execute("SAVEPOINT genesy_write")
        try:
            yield
            if not one_statement:
                conn.execute("RELEASE genesy_write")
        except BaseException as error:
            if not conn.in_transaction:
                # Some failures end the whole transaction (a full disk, a
                # trigger's RAISE(ROLLBACK)), and the group's writes with it.
                group.lost = sqlite3.OperationalError(
                    "a failed write ended the transaction of its commit group: %s" % error)
            elif not one_statement:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK TO genesy_write")
                    conn.execute("RELEASE genesy_write")
            raise

    def _has_crm_triggers(self, conn):
        """Whether genesy_tasks has triggers other than this module's (checked
        again only when the schema changes)."""
        version = conn.execute("PRAGMA schema_version").fetchone()[0]
        known = getattr(self._local, "crm_triggers", None)
        if known is None or known[:2] != (conn, version):
            count = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND tbl_name = "
                "'genesy_tasks' AND name NOT IN ('genesy_tasks_created', 'genesy_tasks_updated', "
                "'genesy_tasks_renamed', 'genesy_tasks_deleted')").fetchone()[0]
            known = self._local.crm_triggers = (conn, version, count > 0)
        return known[2]

    def checkpoint_in_commits(self, pages):
        """Let this thread's commits checkpoint the WAL past ``pages``, as SQLite does."""
        self._connection().execute("PRAGMA wal_autocheckpoint = %d" % pages)

    def never_wait_on_this_thread(self):
        """Make this thread's connection fail at once where it would wait.

        For an event loop's thread, which must never block: a write that meets
        another connection's lock raises an error for which _is_lock_wait() is
        true instead of waiting up to the busy timeout (the caller retries it),
        and commits no longer run checkpoints, whose syncs take milliseconds
        (CommitGroups runs them on a thread of their own).
        """
        self._local.waits = False
        conn = getattr(self._local, "connection", None)
        if conn is not None:
            self._set_waits(conn, False)

    def _set_waits(self, conn, waits):
        """A connection that waits for locks and checkpoints in its commits, or not."""
        conn.execute("PRAGMA busy_timeout = %d" % (self.busy_timeout * 1000 if waits else 0))
        conn.execute("PRAGMA wal_autocheckpoint = %d" % (DEFAULT_CHECKPOINT_PAGES if waits else 0))

    def start_commit_group(self):
        """Let this thread's writes share one transaction until finish_commit_group().

        A COMMIT costs as much as a small write: committing the writes of
        several requests at once spends it once. A write that fails undoes
        only itself (one of several statements runs in a savepoint), unless
        its failure ends the whole transaction: then the group is lost, its
        later writes are refused, and finish_commit_group() raises. Until the
        group finishes, its writes are visible to this thread only and may
        still be lost, so nothing that depends on them may be acknowledged.
        The returned group's ``writing`` says whether anything depends on it
        yet.
        """
        if getattr(self._local, "group", None) is not None:
            raise RuntimeError("a commit group is already open on this thread")
        group = self._local.group = _CommitGroup()
        return group

    @_recovering
    def finish_commit_group(self):
        """Commit the open group's writes, and end the group.

        Raises sqlite3.Error (usually an OperationalError) when they were not
        committed: the COMMIT failed, or a failure ended the transaction
        before it. Then none of them were, and every answer that depended on
        them is void.
        """
        group, self._local.group = self._local.group, None
        if group.lost is not None:
            raise group.lost
        conn = group.connection
        if conn is None:
            return
        try:
            self._commit(conn, group.changes)
        except BaseException:
            self._roll_back(conn)
            raise

    # -- subscribers ------------------------------------------------------------

    def subscribe(self, callback):
        """Call ``callback(changes)`` after each commit that changed tasks.

        ``changes`` is a list in the change feed's shape (see changes()),
        in commit order: writes that were rolled back are never in it. It is
        called on a thread of the store's own, one call at a time, soon after
        the commit; an exception it raises is logged, and fails nothing else.
        Only this store's writes are seen (the feed has every writer's).
        Returns a function that unsubscribes it.
        """
        with self._connections_lock:
            self._subscribers.append(callback)

        def unsubscribe():
            with self._connections_lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)
        return unsubscribe

    def _changed(self, changes):
        """Inside a _write() block: its changes, for subscribers once committed."""
        self._local.changes += changes

    def _delivery_thread(self):
        with self._connections_lock:
            if self._deliveries is None:  # the first subscriber's, or after close()
                self._deliveries = _Deliveries(self._subscribers)
                self._deliveries.start()
            return self._deliveries

    def _check(self, task, previous):
        """Call the validator, with copies: it may keep or change what it gets."""
        if self.validate is not None:
            self.validate(dict(task), None if previous is None else dict(previous))

    def _discard_connection(self):
        """Close this thread's connection after an operational error.

        The next call opens a new one, so a database file that was read-only,
        missing or failing comes back into use by itself once it is fixed.
        """
        conn = getattr(self._local, "connection", None)
        if conn is None:
            return
        self._local.connection = None
        group = getattr(self._local, "group", None)
        if group is not None and group.connection is conn and group.lost is None:
            # The group's transaction goes with the connection.
            group.lost = sqlite3.OperationalError(
                "a failed write ended the transaction of its commit group")
        with self._connections_lock:
            self._owners.pop(conn, None)
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    def _check_schema(self):
        """Refuse, without writing, a file whose genesy_ tables this release cannot use."""
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            tables = {name for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = None
            if "genesy_meta" in tables:
                version = self._schema_version(conn)
            if version is None and "genesy_tasks" in tables:
                raise sqlite3.DatabaseError(
                    "it has a genesy_tasks table that genesy-tasks did not create")
            if version is not None and version > SCHEMA_VERSION:
                raise _newer_schema(version)
        finally:
            conn.close()

    def _migrate(self, conn):
        if self._schema_version(conn) == SCHEMA_VERSION:
            if _has_old_deletion_trigger(conn):
                with self._write():
                    if _has_old_deletion_trigger(conn):  # read again inside the lock
                        for statement in _triggers_made_again("genesy_tasks_deleted"):
                            conn.execute(statement)
            return  # the usual case needs no write lock, so a busy CRM cannot stop a start
        conn.create_function("genesy_utc_instant", 1, _utc_instant_or_null, deterministic=True)
        with self._write():
            conn.execute("CREATE TABLE IF NOT EXISTS genesy_meta "
                         "(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            # Read again inside the lock: another process may have migrated meanwhile.
            version = self._schema_version(conn)
            if version is None:
                statements = (_split(_SCHEMA) + _split(_IDEMPOTENCY_SCHEMA)
                              + _CHANGES_TABLE + _CHANGES_TRIGGERS)
            elif version > SCHEMA_VERSION:  # written by another process since _check_schema
                raise _newer_schema(version)
            else:
                statements = [statement for step in range(version + 1, SCHEMA_VERSION + 1)
                              for statement in _MIGRATIONS[step]]
            # Not executescript(): it would commit this transaction first.
            for statement in statements:
                if callable(statement):
                    statement(conn)
                elif statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT OR REPLACE INTO genesy_meta VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))

    @staticmethod
    def _schema_version(conn):
        try:
            row = conn.execute(
                "SELECT value FROM genesy_meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError:
            return None  # no genesy_meta table yet
        if row is None:
            return None
        if not isinstance(row[0], str) or not row[0].isdigit():
            raise sqlite3.DatabaseError("its schema version %r is not one genesy-tasks wrote"
                                        % (row[0],))
        return int(row[0])

    def close(self):
        """Close every connection this store opened, in any thread, after
        handing the changes committed so far to subscribers."""
        deliveries, self._deliveries = self._deliveries, None
        if deliveries is not None:
            deliveries.stop()
        with self._connections_lock:
            connections = list(self._owners) + self._idle
            self._owners, self._idle = {}, []
        for conn in connections:
            conn.close()
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- settings -------------------------------------------------------------

    @_recovering
    def generated_api_key(self):
        """The API key generated for this database on first use, then kept in it."""
        conn = self._connection()
        row = conn.execute("SELECT value FROM genesy_meta WHERE key = 'api_key'").fetchone()
        if row is None:
            with self._write():
                conn.execute("INSERT OR IGNORE INTO genesy_meta VALUES ('api_key', ?)",
                             (secrets.token_urlsafe(32),))
                row = conn.execute(
                    "SELECT value FROM genesy_meta WHERE key = 'api_key'").fetchone()
        return row[0]

    # -- tasks ------------------------------------------------------------------

    @staticmethod
    def _new_task(fields):
        """The whole new task for ``fields``, and its row for _INSERT."""
        ms, now = _now()
        task = {"id": _new_task_id(ms), **_validate_new_task(fields), "completed": False,
                "completedAt": None, "createdAt": now, "updatedAt": now}
        task = {name: task.get(name) for name in TASK_FIELDS}
        row = tuple(task[field.name] for field in _STORED) + (
            _utc_instant_or_null(task["dueDate"]),)
        return task, row

    @_recovering
    def create(self, fields):
        """Create a task from the create fields of ``fields``; return it whole."""
        task, row = self._new_task(fields)
        with self._write(one_statement=True) as conn:
            self._check(task, None)
            conn.execute(_INSERT, row)
            if self._subscribers:
                self._changed([_created(task)])
        return task

    @_recovering
    def create_idempotent(self, fields, key):
        """Create a task once per ``key``: return ``(task, replayed)``.

        The first call creates the task. A later call with the same key and
        the same fields (in any key order) creates nothing and returns the
        task as it was first returned, with ``replayed`` true; with other
        fields it raises :class:`IdempotencyKeyReused`. Keys are kept for
        DEFAULT_IDEMPOTENCY_TTL seconds at least.
        """
        _check_idempotency_key(key)
        task, row = self._new_task(fields)
        fingerprint = _fingerprint(fields)
        now_ms = int(time.time() * 1000)
        with self._write() as conn:
            # Inside the write lock: a concurrent retry waits here, then replays.
            found = conn.execute(
                "SELECT fingerprint, task FROM genesy_idempotency WHERE key = ?",
                (key,)).fetchone()
            if found is not None:
                if found[0] != fingerprint:
                    raise IdempotencyKeyReused(
                        "this Idempotency-Key was used with a different request body")
                return json.loads(found[1]), True
            self._check(task, None)  # after the lookup: a replay is no new write
            conn.execute(_INSERT, row)
            conn.execute("INSERT INTO genesy_idempotency VALUES (?, ?, ?, ?)",
                         (key, fingerprint, json.dumps(task, ensure_ascii=False), now_ms))
            conn.execute("DELETE FROM genesy_idempotency WHERE created_ms < ?",
                         (now_ms - DEFAULT_IDEMPOTENCY_TTL * 1000,))
            if self._subscribers:
                self._changed([_created(task)])
        return task, False

    @_recovering
    def create_many(self, tasks):
        """Create many tasks in one transaction (an import); return their ids in order."""
        new = [self._new_task(fields) for fields in tasks]
        with self._write() as conn:
            for task, _ in new:
                self._check(task, None)
            conn.executemany(_INSERT, [row for _, row in new])
            if self._subscribers:
                self._changed([_created(task) for task, _ in new])
        return [task["id"] for task, _ in new]

    def get(self, task_id):
        """The task with this id, or None."""
        text = self.get_json(task_id)
        return None if text is None else json.loads(text)

    @_recovering
    def get_json(self, task_id):
        """The task with this id as JSON (UTF-8 bytes), or None."""
        if not isinstance(task_id, str):
            return None
        row = self._connection().execute(_SELECT_ONE, (task_id,)).fetchone()
        return None if row is None else row[0].encode("utf-8")

    @_recovering
    def update(self, task_id, fields):
        """Apply the known fields of ``fields``; return the whole task, or None if unknown.

        ``completed: true`` sets completedAt unless the task is already
        completed (the first completedAt is kept); ``completed: false`` reopens.
        """
        changes = _validate_task_changes(fields)
        if not isinstance(task_id, str):
            return None
        with self._write(one_statement=True) as conn:
            row = conn.execute(_SELECT_ONE_FOR_UPDATE, (task_id,)).fetchone()
            if row is None:
                return None
            task = _task(row)
            updated = dict(task)
            _, now = _now()
            for name, value in changes.items():
                if name != "completed":
                    updated[name] = value
                elif value and not task["completed"]:
                    updated["completed"], updated["completedAt"] = True, now
                elif not value:
                    updated["completed"], updated["completedAt"] = False, None
            changed = [name for name in _UPDATABLE_COLUMNS if updated[name] != task[name]]
            if not changed:
                return task
            updated["updatedAt"] = now
            self._check(updated, task)
            columns = [_UPDATABLE_COLUMNS[name] for name in changed]
            values = [updated[name] for name in changed]
            if "dueDate" in changed:
                columns.append("due_utc")
                values.append(_utc_instant_or_null(updated["dueDate"]))
            conn.execute(
                "UPDATE genesy_tasks SET %s, updated_at = ? WHERE seq = ?"
                % ", ".join(column + " = ?" for column in columns),
                values + [now, row[-1]])
            if self._subscribers:
                self._changed([_change("update", task_id, dict(updated), now)])
        return updated

    @_recovering
    def delete(self, task_id):
        """Delete the task with this id; return whether there was one."""
        if not isinstance(task_id, str):
            return False
        with self._write(one_statement=True) as conn:
            deleted = conn.execute("DELETE FROM genesy_tasks WHERE id = ?",
                                   (task_id,)).rowcount > 0
            if deleted and self._subscribers:
                self._changed([_change("delete", task_id, None, _now()[1])])
        return deleted

    def list(self, **filters):
        """One page of tasks: ``{"tasks": [...], "nextCursor": str or None}``.

        See list_json() for the filters.
        """
        return json.loads(self.list_json(**filters))

    @_recovering
    def list_json(self, *, completed=None, due_before=None, due_after=None, order="newest",
                  limit=DEFAULT_LIST_LIMIT, cursor=None, **equal):
        """One page of tasks as JSON: ``{"tasks": [...], "nextCursor": str or null}``.

        ``owner_id``, ``contact_id``, ``company_id`` and ``type`` (the columns
        of the fields that filter, see _FIELDS) match exactly; ``completed``
        is True, False or None (both);
        ``due_before`` (exclusive) and ``due_after`` (inclusive) are ISO 8601 and
        compare instants, leaving out tasks without a dueDate. ``order`` is
        "newest" (creation, newest first) or "oldest". Pass the returned
        ``nextCursor`` with the same arguments for the next page: pages are
        keyed on creation order, so tasks created meanwhile never shift them.
        """
        unknown = sorted(set(equal) - set(_FILTERS.values()))
        if unknown:
            raise TypeError("TaskStore.list_json() got an unexpected keyword argument %r"
                            % unknown[0])
        _check_limit(limit)
        if order not in ("newest", "oldest"):
            raise TaskValidationError("order must be newest or oldest")
        where, params = [], []
        for name, column in _FILTERS.items():
            value = equal.get(column)
            if value is not None:
                where.append(column + " = ?")
                params.append(_check_text(name, value))
        if completed is not None:
            _check_flag("completed", completed)
            where.append("completed_at IS NOT NULL" if completed else "completed_at IS NULL")
        for name, condition, value in (("dueBefore", "due_utc < ?", due_before),
                                       ("dueAfter", "due_utc >= ?", due_after)):
            if value is not None:
                instant = _utc_instant_or_null(value) if isinstance(value, str) else None
                if instant is None:
                    raise TaskValidationError(
                        "%s must be an ISO 8601 date or date-time, such as 2024-01-15 "
                        "or 2024-01-15T10:00:00Z" % name)
                where.append(condition)
                params.append(instant)
        if cursor is not None:
            where.append("seq < ?" if order == "newest" else "seq > ?")
            params.append(_decode_cursor(cursor))
        rows = self._connection().execute(
            "SELECT %s, seq FROM genesy_tasks%s ORDER BY seq %s LIMIT ?"
            % (_TASK_JSON, " WHERE " + " AND ".join(where) if where else "",
               "DESC" if order == "newest" else "ASC"),
            params + [limit + 1]).fetchall()
        next_cursor = "null"
        if len(rows) > limit:  # one row more than asked says there is a next page
            rows = rows[:limit]
            next_cursor = '"%d"' % rows[-1][-1]
        return b'{"tasks":%s,"nextCursor":%s}' % (_json_array(row[0] for row in rows),
                                                   next_cursor.encode())

    def changes(self, after=None, limit=DEFAULT_LIST_LIMIT):
        """The change feed: ``{"changes": [...], "nextCursor": str}``.

        Each change is ``{"taskId", "change", "task", "at"}``: ``change`` is
        the latest thing that happened to the task (create, update or
        delete), ``task`` the task as it is now (None once deleted), ``at``
        when. Every task is in the feed once, at its latest change, in commit
        order: pass ``nextCursor`` (always given) as ``after`` to get what
        changed since. Without ``after`` it starts from the oldest change
        kept. Deletions are kept DEFAULT_DELETIONS_KEPT_DAYS; a cursor older than a
        deletion forgotten since, or beyond the feed's end (a restored
        database), raises ChangesForgotten.
        """
        return json.loads(self.changes_json(after, limit))

    @_recovering
    def changes_json(self, after=None, limit=DEFAULT_LIST_LIMIT):
        """changes() as JSON (UTF-8 bytes)."""
        _check_limit(limit)
        position = 0 if after is None else _decode_cursor(after, "after")
        rows = self._connection().execute(_SELECT_CHANGES, (position, limit)).fetchall()
        expired = any(row[0] == -1 for row in rows)
        # Without after, the feed starts from what it kept: nothing was missed.
        if expired and after is not None:
            raise ChangesForgotten(
                "this cursor is older than the changes kept (deletions are kept %d days) "
                "or newer than any (the database was restored or replaced); start again "
                "without after" % DEFAULT_DELETIONS_KEPT_DAYS)
        rows = [row for row in rows if row[0] != -1]
        if rows:
            position = rows[-1][0]
        return b'{"changes":%s,"nextCursor":"%d"}' % (_json_array(row[1] for row in rows),
                                                      position)

    def get_many(self, ids):
        """The tasks with these ids, in the order of first appearance; unknown ids omitted."""
        return json.loads(self.get_many_json(ids))

    @_recovering
    def get_many_json(self, ids):
        """get_many() as a JSON array (UTF-8 bytes)."""
        _validate_ids(ids)
        if not ids:
            return b"[]"
        found = dict(self._connection().execute(_SELECT_MANY, (json.dumps(ids),)))
        return _json_array(_in_request_order(ids, found))

    def set_completed_many(self, ids, completed):
        """Complete (or reopen) these tasks in one transaction; return them like get_many."""
        return json.loads(self.set_completed_many_json(ids, completed))

    @_recovering
    def set_completed_many_json(self, ids, completed):
        """set_completed_many() answering with a JSON array (UTF-8 bytes)."""
        _validate_ids(ids)
        _check_flag("completed", completed)
        if not ids:
            return b"[]"
        _, now = _now()
        ids_json = json.dumps(ids)
        changes = None
        with self._write() as conn:
            if self.validate is not None or self._subscribers:
                changes = self._completions(conn, ids_json, completed, now)
            conn.execute(_SET_COMPLETED_MANY % ("" if completed else "NOT"),
                         (now if completed else None, now, ids_json))
            found = dict(conn.execute(_SELECT_MANY, (ids_json,)))
            answer = _json_array(_in_request_order(ids, found))
            if changes and self._subscribers:
                self._changed(changes)
        return answer

    def _completions(self, conn, ids_json, completed, now):
        """The changes a batch completion makes, each validated first."""
        changes = []
        for row in conn.execute(_SELECT_TO_COMPLETE % ("" if completed else "NOT"),
                                (ids_json,)):
            task = _task(row)
            updated = dict(task, completed=completed, completedAt=now if completed else None,
                           updatedAt=now)
            self._check(updated, task)
            changes.append(_change("update", task["id"], updated, now))
        return changes

    @_recovering
    def count(self):
        """How many tasks the store holds."""
        return self._connection().execute("SELECT count(*) FROM genesy_tasks").fetchone()[0]


def backup_database(source, dest, overwrite=False, pages=1024, progress=None):
    """Copy the SQLite file ``source`` to ``dest`` consistently while it is in use.

    One read transaction pins a snapshot for the whole copy: in WAL mode
    writers go on meanwhile, and the stepwise copy never restarts. The copy
    is written beside ``dest`` (0600: it holds the API key), checked with
    ``PRAGMA quick_check`` and only then renamed into place, so ``dest`` is
    never a half-written file. ``progress(copied_pages, total_pages)`` is
    called after each step of ``pages`` pages. Returns the number of tasks
    copied; raises :class:`StorageError`.
    """
    source, dest = os.fspath(source), os.fspath(dest)
    if not os.path.isfile(source):
        raise StorageError("no database file at %r" % source)
    if os.path.exists(dest) and not overwrite:
        raise StorageError("%r already exists; choose another name or pass --overwrite" % dest)
    if os.path.exists(dest) and os.path.samefile(source, dest):
        raise StorageError("the backup cannot replace the database itself")
    partial = dest + ".partial"
    for leftover in (partial, partial + "-wal", partial + "-shm", partial + "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(leftover)
    try:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as error:
        raise StorageError("cannot create %r: %s" % (partial, error.strerror)) from error
    try:
        src = sqlite3.connect(source, isolation_level=None)
        target = sqlite3.connect(partial, isolation_level=None)
        try:
            src.execute("BEGIN")  # the snapshot starts at the first read
            tasks = src.execute("SELECT count(*) FROM genesy_tasks").fetchone()[0]
            src.backup(target, pages=pages, progress=None if progress is None else
                       lambda status, remaining, total: progress(total - remaining, total))
            src.execute("COMMIT")
            verdict = target.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                raise sqlite3.DatabaseError("the copy failed its integrity check: %s" % verdict)
        finally:
            target.close()
            src.close()
        os.replace(partial, dest)
    except (sqlite3.Error, OSError) as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        raise StorageError("cannot back up %r: %s"
                           % (source, getattr(error, "strerror", None) or error)) from error
    return tasks


# -- serving a store from an event loop ---------------------------------------

#: Set by TaskServer in a request's environ when it can run the request again
#: later if it meets another connection's write lock (its value: until when,
#: on time.monotonic()). The application then sets _MET_LOCK_KEY beside its
#: 503, and the server retries instead of sending it.
_RETRY_ON_LOCK_KEY = "genesy_tasks.retry_on_lock"
_MET_LOCK_KEY = "genesy_tasks.met_lock"
_WILL_RETRY_KEY = "genesy_tasks.will_retry"


def _will_retry(environ):
    """Whether the server runs this request again rather than send its answer:
    decided once, so that the server and the inspector agree."""
    if _WILL_RETRY_KEY not in environ:
        environ[_WILL_RETRY_KEY] = (bool(environ.get(_MET_LOCK_KEY))
                                    and time.monotonic() < environ.get(_RETRY_ON_LOCK_KEY, 0))
    return environ[_WILL_RETRY_KEY]


# Set by the app on an answer that rests on nothing its commit group wrote: a
# health check, a request refused for its own content (a validator, a CRM's
# constraint). It stands even if the group is lost (a trigger's
# RAISE(ROLLBACK) loses it): a refusal replaced by a 503 would be retried for
# ever.
_INDEPENDENT_KEY = "genesy_tasks.independent"


class CommitGroups:
    """What TaskServer needs to serve a TaskStore: ``TaskServer(app, commits=...)``.

    - ``open(log)`` and ``close()``, around serving, on the server's thread:
      that thread's connection then never waits (TaskStore.never_wait_on_this_thread),
      and a thread of its own checkpoints the WAL, so that no checkpoint's
      syncs run on the event loop. ``log`` takes one line; it is called from
      the checkpointer's thread.
    - ``start()`` and ``finish()``: one commit group
      (TaskStore.start_commit_group, TaskStore.finish_commit_group).
    - ``lock_timeout``: seconds a request may wait for another connection's
      write lock before its 503 is sent (the store's busy timeout).

    ``checkpoint_pages`` is the WAL length, in pages, past which it is copied
    into the database and started over; 0 leaves checkpoints to another
    process (Litestream, say).
    """

    def __init__(self, store, checkpoint_pages=DEFAULT_CHECKPOINT_PAGES):
        self.store = store
        self.lock_timeout = store.busy_timeout
        self.checkpoint_pages = checkpoint_pages
        self._checkpointer = None

    def open(self, log):
        self.store.never_wait_on_this_thread()
        if self.checkpoint_pages:
            try:
                conn = sqlite3.connect(self.store.path, timeout=0, isolation_level=None,
                                       check_same_thread=False)
                page_size = conn.execute("PRAGMA page_size").fetchone()[0]
                conn.execute("PRAGMA wal_autocheckpoint = 0")
            except sqlite3.Error as error:
                # Better checkpoints on the loop than a WAL that grows for ever.
                log("- - checkpoints run in commits: no checkpointer thread: %s" % error)
                self.store.checkpoint_in_commits(self.checkpoint_pages)
                return
            for path in (self.store.path, self.store.path + "-shm"):
                with contextlib.suppress(OSError):
                    _descriptor(path)  # opened now, so the server's descriptors stay put
            self._checkpointer = _Checkpointer(conn, page_size, self.store,
                                               self.checkpoint_pages, log)
            self._checkpointer.start()

    def close(self):
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None

    def start(self):
        return self.store.start_commit_group()

    def finish(self):
        self.store.finish_commit_group()


_descriptors = {}  # (path, inode): a descriptor kept open until the process ends
_descriptors_lock = threading.Lock()


def _descriptor(path):
    """A read-only descriptor of one of SQLite's files, never closed.

    Closing any descriptor of a file releases every POSIX lock this process
    holds on it, SQLite's included: another process could then take the
    database for unused and reset its shared memory under this one (SQLite's
    "How To Corrupt An SQLite Database File", 2.2). So a descriptor opened
    here stays open, one per file (by inode) for the life of the process.
    """
    inode = os.stat(path).st_ino
    with _descriptors_lock:
        fd = _descriptors.get((path, inode))
        if fd is None:
            fd = _descriptors[path, inode] = os.open(path, os.O_RDONLY)
        return fd


class _Checkpointer(threading.Thread):
    """Keeps a WAL that the event loop's commits never checkpoint bounded.

    It reads the WAL's length from the wal-index (the -shm file, whose layout
    SQLite documents in "WAL-mode File Format"). Past the checkpoint size,
    PASSIVE checkpoints copy pages into the database without blocking anyone,
    until few are left; then a RESTART checkpoint, which takes the write lock
    only if it is free at once, copies those few and lets the next commit
    start the WAL file over. Writers that meet that lock are retried by the
    server, so its brief hold costs them little. A WAL file left larger than
    DEFAULT_WAL_WARNING_FACTOR times the checkpoint size is truncated instead
    (TRUNCATE).

    A reader that pins old pages (another connection's long read
    transaction) stops all of this: that is reported once, and everything is
    given back as soon as the reader ends.
    """

    def __init__(self, conn, page_size, store, pages, log):
        super().__init__(name="genesy-tasks checkpointer", daemon=True)
        self.conn, self.page_size, self.path = conn, page_size, store.path
        self.pages, self.log = pages, log
        self._groups_paused = store._groups_paused
        self._stopping = threading.Event()
        self._warned = False   # about a pinned WAL
        self._pinned_since = None  # when checkpoints began to find the WAL pinned
        self._failing = False  # checkpoints fail (a full disk, say)

    def stop(self):
        self._stopping.set()
        self.join()

    def run(self):
        try:
            while not self._stopping.wait(DEFAULT_CHECKPOINT_INTERVAL):
                try:
                    self._checkpoint_if_needed(self.conn)
                except Exception:  # a bug: said, and the next tick tries again
                    self.log("- - WAL checkpointer: %s"
                             % traceback.format_exc().strip().splitlines()[-1])
        finally:
            self.conn.close()

    def _wal_frames(self):
        """(frames in the WAL, frames already copied into the database), or None."""
        try:
            header = os.pread(_descriptor(self.path + "-shm"), 100, 0)
        except OSError:
            return None
        if len(header) < 100:
            return None
        # mxFrame at byte 16 of the header, nBackfill at 96, in native order.
        return struct.unpack_from("=I", header, 16)[0], struct.unpack_from("=I", header, 96)[0]

    def _checkpoint_if_needed(self, conn):
        frames = self._wal_frames()
        if frames is None or frames[0] < self.pages:
            return
        try:
            for _ in range(DEFAULT_CHECKPOINT_PASSES):
                _, log, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                frames = self._wal_frames()
                if copied < log or frames is None or frames[0] - copied < DEFAULT_CHECKPOINT_TAIL:
                    break  # a reader pins the rest, or little is left for RESTART
            else:
                # Writes outran the passes: a RESTART now would hold the write
                # lock while it copies many pages. Wait for a quieter moment,
                # unless the WAL is already twice as long as it should be.
                if frames[0] < 2 * self.pages:
                    return
            # Under steady writes a PASSIVE checkpoint never sees the WAL's
            # end, and so never syncs the database: the pages it copied would
            # all be synced by the RESTART, with the write lock held. Sync
            # them now, holding nothing.
            with contextlib.suppress(OSError):
                os.fsync(_descriptor(self.path))
            try:
                size = os.path.getsize(self.path + "-wal")
            except OSError:
                size = 0
            # Truncating costs the next commits a file to extend again: only a
            # WAL that a long reader let grow is given back.
            mode = ("TRUNCATE" if size > DEFAULT_WAL_WARNING_FACTOR * self.pages * self.page_size
                    else "RESTART")
            if copied < log:
                # A reader still needs pages: the RESTART cannot finish, so it
                # is tried without waiting, and copies what it can.
                busy = conn.execute("PRAGMA wal_checkpoint(%s)" % mode).fetchone()[0]
            else:
                # Nothing pins the WAL: let the server's current commit group
                # end and start no other (its writes wait, as for any lock)
                # while the RESTART takes the write lock and copies the last
                # few pages. Waiting a moment is fine here, on this thread.
                try:
                    self._groups_paused.set()
                    conn.execute("PRAGMA busy_timeout = %d" % DEFAULT_CHECKPOINT_LOCK_WAIT_MS)
                    busy = conn.execute("PRAGMA wal_checkpoint(%s)" % mode).fetchone()[0]
                    if not busy:
                        # The first commit into a restarted WAL writes and syncs
                        # its new header: this thread makes it, not the loop.
                        conn.execute("INSERT OR REPLACE INTO genesy_meta VALUES "
                                     "('wal_restarted', strftime('%Y-%m-%dT%H:%M:%fZ'))")
                finally:
                    self._groups_paused.clear()
                    conn.execute("PRAGMA busy_timeout = 0")
        except sqlite3.Error as error:  # a full disk, say: tried again on the next tick
            if not self._failing:  # once, not every tick
                self._failing = True
                self.log("- - WAL checkpoint failed, retrying: %s" % error)
            return
        if self._failing:
            self._failing = False
            self.log("- - WAL checkpoints work again")
        # PASSIVE copies every page no reader still needs: some do. Only a pin
        # that lasts is reported, not the server's own reads of a moment
        # while the checkpointer is behind.
        pinned = busy and copied < log and log >= DEFAULT_WAL_WARNING_FACTOR * self.pages
        if not pinned:
            self._pinned_since = None
        elif self._pinned_since is None:
            self._pinned_since = time.monotonic()
        if not busy:
            if self._warned:
                self._warned = False
                self.log("- - the WAL is checkpointed and started over again: "
                         "the read transaction that pinned it ended")
        elif pinned and not self._warned \
                and time.monotonic() - self._pinned_since >= DEFAULT_WAL_WARNING_AFTER:
            self._warned = True
            self.log("- - warning: the WAL of %s has grown to %d MB and cannot be "
                     "checkpointed: another connection holds a long read transaction (a "
                     "report or a backup?); it shrinks once that ends"
                     % (self.path, log * self.page_size // 1_000_000))


###############################################################################
# Application: the routes, auth, errors and the request inspector #############
###############################################################################

_JSON_MEDIA_TYPES = ("application/json",)
_decode_json = json.JSONDecoder(parse_constant=lambda name: _reject_constant(name)).decode
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % name)


def _json_bytes(value):
    return _encode_json(value).encode("utf-8")


class _RequestError(Exception):
    """A request the API refuses: the status, a short title and a message naming the cause."""

    def __init__(self, status, title, message, headers=None):
        super().__init__(message)
        self.status, self.title, self.message = status, title, message
        self.headers = headers or {}


def _error_body(title, message):
    """An error body in the shape Genesy documents."""
    return _json_bytes({"error": title, "message": message})


def _error_response(status, title, message, headers=None):
    response = bottle.HTTPResponse(_error_body(title, message), status, headers)
    response.content_type = "application/json"
    response.set_header("X-Content-Type-Options", "nosniff")
    return response


def _read_json(environ, max_body):
    """The request's JSON body, refusing what is not declared as JSON or is too large."""
    media_type = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
    if media_type not in _JSON_MEDIA_TYPES and not media_type.endswith("+json"):
        raise _RequestError(415, "Unsupported media type",
                           "the request body must be JSON, sent with "
                           "Content-Type: application/json")
    length = environ.get("CONTENT_LENGTH")
    if length:
        try:
            length = int(length)
        except ValueError:
            raise _RequestError(400, "Bad request", "Content-Length is not a number") from None
        if length > max_body:
            raise _body_too_large(max_body)
        body = environ["wsgi.input"].read(length)
    elif "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        body = environ["wsgi.input"].read(max_body + 1)
        if len(body) > max_body:
            raise _body_too_large(max_body)
    else:
        body = b""
    try:
        return _decode_json(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise _RequestError(400, "Invalid JSON", "the request body is not UTF-8") from None
    except (ValueError, RecursionError) as error:
        raise _RequestError(400, "Invalid JSON",
                           "the request body is not valid JSON: %s" % error) from None


def _body_too_large(max_body):
    return _RequestError(413, "Payload too large",
                        "the request body is larger than %d bytes" % max_body)


def _batch_ids(body, max_batch):
    if not isinstance(body, dict):
        raise TaskValidationError("the request body must be a JSON object with an ids array")
    ids = _validate_ids(body.get("ids"))
    if len(ids) > max_batch:
        raise _RequestError(413, "Batch too large",
                           "ids has %d entries; the maximum is %d" % (len(ids), max_batch))
    return ids


# GET /tasks query parameters and the TaskStore.list arguments they become.
_LIST_PARAMETERS = dict(_FILTERS, completed="completed", dueBefore="due_before",
                        dueAfter="due_after", order="order", limit="limit", cursor="cursor")
# GET /changes query parameters and the TaskStore.changes arguments they become.
_CHANGES_PARAMETERS = {"after": "after", "limit": "limit"}


def _query_arguments(environ, parameters):
    """TaskStore keyword arguments from the query string, by ``parameters``.

    Unknown or repeated parameters are refused, so a typo such as ``ownerID``
    is an error rather than a silently unfiltered list.
    """
    try:
        pairs = parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True,
                          strict_parsing=False, encoding="utf-8", errors="strict",
                          max_num_fields=len(parameters))
    except UnicodeDecodeError:
        raise TaskValidationError("the query string is not UTF-8") from None
    except ValueError:
        raise TaskValidationError("too many query parameters") from None
    arguments = {}
    for name, value in pairs:
        if name not in parameters:
            raise TaskValidationError("unknown query parameter %r; known: %s"
                                      % (name, ", ".join(parameters)))
        if parameters[name] in arguments:
            raise TaskValidationError("%s is given more than once" % name)
        arguments[parameters[name]] = value
    if "completed" in arguments:
        flag = arguments["completed"]
        if flag not in ("true", "false"):
            raise TaskValidationError("completed must be true or false")
        arguments["completed"] = flag == "true"
    if "limit" in arguments:  # a number when it reads as one; the store checks it
        text = arguments["limit"]
        if text.isascii() and text.isdigit() and len(text) <= 18:
            arguments["limit"] = int(text)
    return arguments


def _idempotency_key(environ):
    """The Idempotency-Key header, or None. The IETF draft sends it as a quoted
    string ("abc"), Stripe bare (abc): both mean abc."""
    key = environ.get("HTTP_IDEMPOTENCY_KEY")
    if key is None:
        return None
    key = key.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    # Refused before the body is read, which may be large.
    return _check_idempotency_key(key)


def _unavailable_message(error):
    """What a 503 says when SQLite refused: why, in a few words a client may see."""
    return "the task database is unavailable (%s); retry later" % _unavailable_reason(error)


def _unavailable_reason(error):
    text = str(error).lower()
    for words, reason in ((("locked", "busy"), "busy: another writer holds it"),
                          (("readonly", "read-only"), "read-only"),
                          (("full",), "disk full"),
                          (("i/o",), "I/O error"),
                          (("unable to open",), "cannot open the file")):
        if any(word in text for word in words):
            return reason
    return "storage error"


def _write_lines(stream, lines):
    """Write whole lines, in writes of at most PIPE_BUF bytes each: the kernel
    writes those to a pipe in one piece, so the lines of several workers
    sharing one stderr never mix within a line."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None  # a StringIO, say: no one else writes to it
    if fd is None:
        _report(stream, "".join(lines))
        return
    chunk = b""
    with contextlib.suppress(OSError, ValueError):
        stream.flush()  # what was written through it before goes first
        for line in lines:
            data = line.encode("utf-8", "replace")
            if chunk and len(chunk) + len(data) > _LOG_WRITE:
                os.write(fd, chunk)
                chunk = b""
            chunk += data
        if chunk:
            os.write(fd, chunk)


def _report(stream, text):
    """Write to a log stream; a log on a full disk must not fail the request."""
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):
        pass


def _task_not_found(task_id):
    return _RequestError(404, "Task not found", "No task exists with ID: %s" % task_id)


# -- the request inspector ----------------------------------------------------
#: Requests that carry this header are the dashboard's own: not kept.
_DASHBOARD_HEADER = "X-Genesy-Dashboard"
_REDACTED = "[redacted]"


class _BodyReplay(io.RawIOBase):
    """A request body whose first bytes were read ahead: those, then the rest."""

    def __init__(self, head, rest):
        super().__init__()
        self.head, self.rest = io.BytesIO(head), rest
        self.read_later = 0  # bytes read from ``rest``

    def readable(self):
        return True

    def read(self, size=-1):
        data = self.head.read(size)
        if size is None or size < 0:
            later = self.rest.read()
        elif len(data) < size:
            later = self.rest.read(size - len(data))
        else:
            return data
        self.read_later += len(later)
        return data + later

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def readline(self, size=-1):
        line = self.head.readline(size)
        if line.endswith(b"\n") or (size is not None and 0 <= size <= len(line)):
            return line
        return line + self.rest.readline(-1 if size is None or size < 0 else size - len(line))


def _text(data):
    return data.decode("utf-8", "replace")


def _headers_of(environ, redacted, scrub):
    """The request's headers as {Name: value}, the secrets' values redacted."""
    headers, size = {}, 0
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:]
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            name = key
        else:
            continue
        name = "-".join(part.capitalize() for part in name.split("_"))
        value = _REDACTED if key in redacted else scrub(_text(value.encode("latin-1",
                                                                             "replace")))
        size += len(name) + len(value)
        if size > DEFAULT_INSPECT_HEADERS:
            headers["..."] = "more headers, not kept"
            break
        headers[name] = value
    return headers


class _RequestInspector:
    """The last ``capacity`` requests the app answered, with their answers.

    Kept in memory for GET /requests and the dashboard, and, with ``record``,
    appended to that file as JSON lines (created readable by its owner only).
    Values of the API key header, Authorization and Cookie are replaced by
    "[redacted]", and so is an accepted key wherever else it appears (sent in
    another header, a query, a body). The dashboard's own requests and the
    inspector's are not kept.
    """

    def __init__(self, capacity, key_header=DEFAULT_HEADER, record=None,
                 max_body=DEFAULT_MAX_BODY):
        self.capacity, self.max_body = capacity, max_body
        self.keys = []  # the accepted keys, as text, and the check of a request's
        self.authorized = lambda environ: False  # key: both set by make_app
        self.kept = collections.deque(maxlen=capacity)
        self.last = 0  # the last id given
        self.lock = threading.Lock()
        self.redacted = {_environ_key(key_header), "HTTP_AUTHORIZATION",
                         "HTTP_PROXY_AUTHORIZATION", "HTTP_COOKIE"}
        self.recording = _Recording(record) if record else None

    def close(self):
        if self.recording is not None:
            self.recording.close()

    def _recorded_body(self, data, size):
        """A body for the recording: as text, or base64 when it is not UTF-8, so
        that replay sends the same bytes."""
        if not data:
            return {"body": None, "truncated": False}
        cut = len(data) < size
        try:
            return {"body": self.scrub(data.decode("utf-8")), "truncated": cut}
        except UnicodeDecodeError:
            return {"body": base64.b64encode(data).decode("ascii"), "encoding": "base64",
                    "truncated": cut}

    def scrub(self, text):
        """``text`` with every accepted key in it redacted."""
        for key in self.keys:
            if key in text:
                text = text.replace(key, _REDACTED)
        return text

    def requests(self, limit, after=None):
        """The newest ``limit`` requests kept, newest first; with ``after``, the
        ``limit`` that came right after the one numbered so (a script paging
        forward misses none)."""
        with self.lock:
            if after is None:
                return list(itertools.islice(reversed(self.kept), limit))
            newer = [entry for entry in self.kept if entry["id"] > after]
        return newer[:limit][::-1]

    def serve(self, app, environ, start_response):
        """Run the WSGI ``app`` on this request, keeping it and its answer."""
        started = time.perf_counter()
        when = _now()[1]
        whole = self.recording is not None  # the recording keeps whole bodies
        body, size = b"", None
        length = environ.get("CONTENT_LENGTH", "")
        length = int(length) if length.isascii() and length.isdigit() else None
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        replay = None
        if length or (chunked and length is None):
            # Read ahead (the app reads it again from _BodyReplay), at most
            # what the app would accept: a recording keeps whole bodies.
            limit = self.max_body + 1 if whole else DEFAULT_INSPECT_BODY + 1
            if length is not None:
                limit = min(limit, length)
            body = environ["wsgi.input"].read(limit)
            replay = environ["wsgi.input"] = _BodyReplay(body, environ["wsgi.input"])
            size = length
        entry = {
            "id": None, "time": when, "method": environ.get("REQUEST_METHOD", ""),
            "path": self.scrub(_request_target(environ)),
            "request": {"headers": _headers_of(environ, self.redacted, self.scrub)},
        }
        answer = {}

        def start(status, headers, exc_info=None):
            answer["status"], answer["headers"] = status, headers
            return start_response(status, headers, exc_info)

        chunks = app(environ, start)
        return _Answered(chunks, self, environ, entry, body, (size, replay), answer, started)

    def _keep(self, environ, entry, body, size, answer, answered, total, started):
        if _will_retry(environ):
            return  # the server runs it again once the lock is gone: that one is kept
        entry["durationMs"] = round((time.perf_counter() - started) * 1000, 3)
        request = entry["request"]
        size, replay = size
        if size is None:  # chunked: as many as were read, here and by the app
            size = len(body) + (replay.read_later if replay is not None else 0)
        request["bytes"] = size
        status = answer.get("status", "500")
        entry["response"] = {
            "status": int(status[:3]) if status[:3].isdigit() else 0,
            "headers": {name: value for name, value in answer.get("headers", ())},
            "bytes": total,
        }
        recorded = None
        if self.recording is not None:
            # Whole bodies for requests with the key; others' as the
            # inspector keeps them: no one fills the disk by knocking.
            whole = self.authorized(environ)
            sent = body if whole else body[:DEFAULT_INSPECT_BODY]
            got = answered if whole else answered[:DEFAULT_INSPECT_ANSWER]
            recorded = (dict(request, **self._recorded_body(sent, size)),
                        dict(entry["response"], **self._recorded_body(got, total)))
        request["body"] = self.scrub(_text(body[:DEFAULT_INSPECT_BODY])) if body else None
        request["truncated"] = max(request["bytes"], len(body)) > DEFAULT_INSPECT_BODY
        entry["response"]["body"] = (self.scrub(_text(answered[:DEFAULT_INSPECT_ANSWER]))
                                     if answered else None)
        entry["response"]["truncated"] = total > DEFAULT_INSPECT_ANSWER
        with self.lock:
            # Numbered by the time it is kept, in microseconds, and always
            # above the last: ids go up in the order kept (a poller's "after"
            # misses none), and a restarted server's follow the last one's.
            # The recording gets its line in the same order.
            entry["id"] = self.last = max(self.last + 1, int(time.time() * 1_000_000))
            self.kept.append(entry)
            if recorded is not None:
                self.recording.append(_json_bytes(dict(entry, request=recorded[0],
                                                       response=recorded[1])) + b"\n")


class _Answered:
    """The app's answer, passed on as it comes, its bytes kept for the inspector
    (the first DEFAULT_INSPECT_ANSWER, or all of them for a recording)."""

    def __init__(self, chunks, inspector, environ, entry, body, size, answer, started):
        self.chunks, self.inspector, self.entry = chunks, inspector, entry
        self.environ = environ
        self.body, self.size, self.answer, self.started = body, size, answer, started
        self.kept, self.total = bytearray(), 0
        self.whole = inspector.recording is not None

    def __iter__(self):
        for chunk in self.chunks:
            self.total += len(chunk)
            if self.whole:
                self.kept += chunk
            elif len(self.kept) <= DEFAULT_INSPECT_ANSWER:
                self.kept += chunk[:DEFAULT_INSPECT_ANSWER + 1 - len(self.kept)]
            yield chunk

    def close(self):
        try:
            if hasattr(self.chunks, "close"):
                self.chunks.close()
        finally:
            self.inspector._keep(self.environ, self.entry, self.body, self.size, self.answer,
                                 bytes(self.kept), self.total, self.started)


class _Recording(threading.Thread):
    """Appends recorded requests to a file, from a thread of its own: no request
    waits for the disk."""

    def __init__(self, path):
        super().__init__(name="genesy-tasks recording", daemon=True)
        self.path = path
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as error:
            raise ValueError("cannot open the recording file %s: %s"
                             % (path, error.strerror or error)) from None
        self.lines = collections.deque()
        self.waiting = 0  # bytes in self.lines
        self.ready = threading.Condition()
        self.stopping = False
        self.dropped = 0
        self.start()

    def append(self, line):
        with self.ready:
            if self.waiting + len(line) > DEFAULT_MAX_UNRECORDED and self.lines:
                self.dropped += 1
                return
            self.lines.append(line)
            self.waiting += len(line)
            self.ready.notify()

    def close(self, timeout=DEFAULT_STOP_TIMEOUT):
        with self.ready:
            self.stopping = True
            self.ready.notify()
        self.join(timeout)

    def run(self):
        failed = False
        while True:
            with self.ready:
                while not self.lines and not self.stopping:
                    self.ready.wait()
                if not self.lines:
                    break
                lines, self.lines = self.lines, collections.deque()
                self.waiting = 0
                dropped, self.dropped = self.dropped, 0
            if dropped:
                _report(sys.stderr, "genesy-tasks: recording: the disk is %d MiB behind; %d "
                                    "requests were not recorded\n"
                        % (DEFAULT_MAX_UNRECORDED // 1024 // 1024, dropped))
            try:
                data = memoryview(b"".join(lines))
                while data:
                    data = data[os.write(self.fd, data):]
            except OSError as error:
                if not failed:  # once, not once a request
                    _report(sys.stderr, "genesy-tasks: cannot write the recording %s: %s\n"
                            % (self.path, error.strerror or error))
                failed = True
        os.close(self.fd)




def _request_target(environ):
    """The request's path and query, from the app's root: what replay sends to
    another server's base URL (a mount prefix is the base URL's)."""
    path = environ.get("PATH_INFO", "").encode("latin-1", "replace")
    query = environ.get("QUERY_STRING", "")
    return quote(path or b"/", safe="/%:@!$&'()*+,;=-._~") + ("?" + query if query else "")


def _inspected(environ, authorized):
    """Whether the inspector keeps this request: not the dashboard's, nor its own.
    (A request saying it is the dashboard's without the key is kept: no one
    hides from the inspector by saying so.)"""
    if _DASHBOARD_ENVIRON in environ and authorized(environ):
        return False
    return not (environ.get("REQUEST_METHOD") in ("GET", "HEAD")
                and environ.get("PATH_INFO", "") in ("", "/", "/requests"))


class _TasksApp(bottle.Bottle):
    """The Bottle application :func:`make_app` returns; ``close()`` also closes its
    store. ``inspector`` is its _RequestInspector, or None; ``authorized(environ)``,
    set by make_app, says whether a request carries an accepted key."""

    def __init__(self, store, max_body, max_batch, inspector=None):
        super().__init__()
        self.store, self.max_body, self.max_batch = store, max_body, max_batch
        self.inspector = inspector

    def __call__(self, environ, start_response):
        if self.inspector is not None and _inspected(environ, self.authorized):
            return self.inspector.serve(self.wsgi, environ, start_response)
        return self.wsgi(environ, start_response)

    def close(self):
        super().close()
        if self.inspector is not None:
            self.inspector.close()
        self.store.close()

    def default_error_handler(self, res):
        # Router errors (404, 405) and failures outside a route: JSON too, never HTML.
        bottle.response.content_type = "application/json"
        bottle.response.set_header("X-Content-Type-Options", "nosniff")
        request = bottle.request
        # The path as the client sent it: mounted under a prefix, the prefix
        # is in SCRIPT_NAME.
        path = request.environ.get("SCRIPT_NAME", "").rstrip("/") + request.path
        if res.status_code == 404:
            return _error_body("Not found", "No route for %s %s" % (request.method, path))
        if res.status_code == 405:
            return _error_body("Method not allowed", "%s is not allowed on %s; allowed: %s"
                              % (request.method, path,
                                 res.get_header("Allow", "").replace(",", ", ")))
        if res.status_code >= 500:
            return _error_body("Internal server error",
                              "the server failed to handle the request; the error was logged")
        return _error_body(res.status_line.partition(" ")[2] or "Error", str(res.body))


def _check_users(users, source):
    """GET /users' list: ``[{"id", "name", "email"?}]``, or a ValueError naming the fault."""
    if not isinstance(users, list):
        raise ValueError("%s must be a JSON array of users" % source)
    seen = set()
    for index, user in enumerate(users):
        where = "%s[%d]" % (source, index)
        if not isinstance(user, dict):
            raise ValueError("%s must be an object with id, name and, optionally, email"
                             % where)
        unknown = sorted(set(user) - {"id", "name", "email"})
        if unknown:
            raise ValueError("%s has an unknown field %r (known: id, name, email)"
                             % (where, unknown[0]))
        for name in ("id", "name", "email"):
            if name not in user and name == "email":
                continue
            if not isinstance(user.get(name), str) or not user[name].strip():
                raise ValueError("%s.%s must be a non-empty string" % (where, name))
        if user["id"] in seen:
            raise ValueError("%s.id %r is given twice" % (where, user["id"]))
        seen.add(user["id"])
    return users


def _users_file(path):
    """The users in a JSON file, for --users; a one-line error when it is unusable."""
    try:
        with open(path, encoding="utf-8") as file:
            users = _decode_json(file.read())
        return _check_users(users, path)
    except OSError as error:
        raise argparse.ArgumentTypeError("cannot read %s: %s"
                                         % (path, error.strerror or error)) from None
    except ValueError as error:  # bad JSON or UTF-8 included
        raise argparse.ArgumentTypeError(
            str(error) if str(error).startswith(path) else "%s is not valid JSON: %s"
            % (path, error)) from None


def _warn_if_others_can_read(path):
    """One line when the generated key sits in files other users can read: the
    database, and its -wal and -shm files, which hold its recent pages."""
    readable = []
    for name in (path, path + "-wal", path + "-shm"):
        try:
            mode = os.stat(name).st_mode
        except OSError:
            continue
        if mode & 0o044:
            readable.append("%s (mode %04o)" % (name, mode & 0o7777))
    if readable:
        files = " ".join(shlex.quote(name) for name in
                         (path, path + "-wal", path + "-shm") if os.path.exists(name))
        _report(sys.stderr, "genesy-tasks: warning: other users can read the generated API "
                            "key in %s; run chmod 600 %s, or set GENESY_API_KEY\n"
                % (", ".join(readable), files))


def mount(app, prefix, tasks_app):
    """A WSGI application serving ``tasks_app`` under ``prefix`` and ``app`` elsewhere.

    Every request below the prefix goes to the API before ``app`` sees it, so
    the API answers it whole: its own JSON 404 and 405, none of ``app``'s
    hooks, plugins or error pages. Works for any WSGI ``app``: Bottle
    (``bottle.run(mount(crm, "/genesy", api))``), Flask (``crm.wsgi_app =
    mount(crm.wsgi_app, "/genesy", api)``) and others.
    """
    prefix = "/" + prefix.strip("/")
    if prefix == "/":
        raise ValueError("mount the API under a prefix such as /genesy, not /")

    def application(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == prefix or path.startswith(prefix + "/"):
            environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "").rstrip("/") + prefix
            environ["PATH_INFO"] = path[len(prefix):]
            return tasks_app(environ, start_response)
        return app(environ, start_response)
    return application


def _parse_api_keys(api_keys):
    """Keys from a comma-separated string or an iterable; blanks dropped, spaces trimmed."""
    if api_keys is None:
        return []
    if isinstance(api_keys, str):
        api_keys = api_keys.split(",")
    return [key.strip() for key in api_keys if key and key.strip()]


_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


def _environ_key(header):
    """The WSGI environ key that carries a request header."""
    if not _HEADER_NAME.fullmatch(header or ""):
        raise ValueError("invalid API key header name (GENESY_API_KEY_HEADER): %r" % (header,))
    if header.lower() in ("content-type", "content-length"):
        raise ValueError("the API key header cannot be %s" % header)
    return "HTTP_" + header.upper().replace("-", "_")


_DASHBOARD_ENVIRON = _environ_key(_DASHBOARD_HEADER)


def make_app(db_path, api_keys=None, header=DEFAULT_HEADER,
             max_body=DEFAULT_MAX_BODY, max_batch=DEFAULT_MAX_BATCH,
             busy_timeout=DEFAULT_BUSY_TIMEOUT, users=None, validate=None,
             inspect=DEFAULT_INSPECT, record=None):
    """Build the Genesy Tasks API as a Bottle application.

    To serve it under a prefix of another application, see :func:`mount`.

    :param db_path: the SQLite file (created if missing), or an open TaskStore.
    :param api_keys: accepted keys, a list or a comma-separated string; when
        empty or None, the key generated for (and kept in) the database.
    :param header: the request header that carries the key (default X-API-Key).
    :param max_body: the largest request body accepted, in bytes (default 4 MiB).
    :param max_batch: the most ids accepted in one batch (default 10,000).
    :param busy_timeout: seconds a write waits for another writer (default 5),
        when the app opens the database itself.
    :param users: GET /users: a list of ``{"id", "name", "email"?}``, or a
        function returning one at each request; None answers it with a 404
        (Genesy's "owner selection off").
    :param validate: see :class:`TaskStore`; set on the store.
    :param inspect: how many requests the request inspector keeps for GET
        /requests and the dashboard (default 200); 0 turns it off.
    :param record: a file to append every request and its answer to, as JSON
        lines (created readable by its owner only).
    """
    if users is not None and not callable(users):
        users = _json_bytes(_check_users(users, "users"))
    key_environ = _environ_key(header)
    if isinstance(inspect, bool) or not isinstance(inspect, int) \
            or not 0 <= inspect <= DEFAULT_MAX_INSPECT:
        raise ValueError("inspect must be a whole number of requests from 0 (none) to %d"
                         % DEFAULT_MAX_INSPECT)
    keys = _parse_api_keys(api_keys)
    opened = not isinstance(db_path, TaskStore)
    store = TaskStore(db_path, busy_timeout=busy_timeout) if opened else db_path
    if validate is not None:
        store.validate = validate
    try:
        if not keys:
            keys = [store.generated_api_key()]
            _warn_if_others_can_read(store.path)
        inspector = (_RequestInspector(inspect, header, record, max_body)
                     if inspect or record else None)
    except BaseException:
        if opened:  # nobody else will
            store.close()
        raise
    keys_text = list(keys)
    keys = [key.encode("utf-8") for key in keys]
    app = _TasksApp(store, max_body, max_batch, inspector)
    app.uninstall(True)  # no JSON or template plugins: routes return bytes

    def authorized(environ):
        # WSGI carries headers as latin-1 text; compare with every key so the
        # time taken says nothing about which one nearly matched.
        given = environ.get(key_environ, "")
        try:
            given = given.encode("latin-1")
        except UnicodeEncodeError:  # a server that did not follow PEP 3333
            given = given.encode("utf-8", "surrogatepass")
        match = False
        for key in keys:
            match |= hmac.compare_digest(given, key)
        return match

    app.authorized = authorized
    if inspector is not None:
        inspector.keys, inspector.authorized = keys_text, authorized

    def api(callback):
        """Wrap a route: the API key first, then every failure as Genesy's JSON error."""
        def route(**url_args):
            environ = bottle.request.environ
            if not authorized(environ):
                return _error_response(401, "Unauthorized",
                                       "missing or invalid API key in the %s header" % header)
            try:
                body = callback(environ, **url_args)
            except _RequestError as error:
                return _error_response(error.status, error.title, error.message, error.headers)
            except TaskValidationError as error:
                environ[_INDEPENDENT_KEY] = True
                return _error_response(400, "Invalid request", str(error))
            except IdempotencyKeyReused as error:
                return _error_response(422, "Idempotency key reused", str(error))
            except ChangesForgotten as error:
                return _error_response(410, "Cursor expired", str(error))
            except sqlite3.OperationalError as error:
                # Locked past the busy timeout, read-only, disk full: the
                # request may succeed later, so say so instead of failing.
                if environ.get(_RETRY_ON_LOCK_KEY) and _is_lock_wait(error):
                    environ[_MET_LOCK_KEY] = True  # the server runs it again later
                else:
                    _report(environ["wsgi.errors"],
                            "genesy-tasks: storage unavailable: %s\n" % error)
                return _error_response(503, "Service unavailable",
                                       _unavailable_message(error), {"Retry-After": "1"})
            except Exception:
                _report(environ["wsgi.errors"], traceback.format_exc())
                return _error_response(500, "Internal server error",
                                       "the server failed to handle the request; "
                                       "the error was logged")
            response = bottle.response
            if body:  # a 204 has no body, so no type
                response.content_type = "application/json"
            response.set_header("X-Content-Type-Options", "nosniff")
            return body
        route.__name__ = callback.__name__
        return route

    def base_path(environ):
        """Where the app's routes start, "" at the root: mounted inside another
        Bottle app, they carry its mount prefix."""
        return (environ.get("SCRIPT_NAME", "").rstrip("/")
                + app.config.get("_mount.prefix", "/").rstrip("/"))

    def task_location(environ, task_id):
        return base_path(environ) + "/tasks/" + task_id

    documents, pages = {}, {}  # encoded once per base path the app is reached under

    @app.get("/")
    def dashboard():
        base = base_path(bottle.request.environ)
        if base not in pages:
            pages[base] = _dashboard_page(header, base)
        bottle.response.content_type = "text/html; charset=utf-8"
        for name, value in _DASHBOARD_HEADERS.items():
            bottle.response.set_header(name, value)
        return pages[base]

    @app.get("/openapi.json")
    def openapi():
        base = base_path(bottle.request.environ)
        if base not in documents:
            documents[base] = _json_bytes(openapi_document(header, max_body, max_batch,
                                                           base or "/", users is not None,
                                                           bool(inspect)))
        bottle.response.content_type = "application/json"
        bottle.response.set_header("X-Content-Type-Options", "nosniff")
        return documents[base]

    @app.get("/health")
    @api
    def health(environ):
        environ[_INDEPENDENT_KEY] = True
        return b'{"status":"ok"}'

    @app.get("/tasks")
    @api
    def list_tasks(environ):
        return store.list_json(**_query_arguments(environ, _LIST_PARAMETERS))

    @app.get("/changes")
    @api
    def list_changes(environ):
        return store.changes_json(**_query_arguments(environ, _CHANGES_PARAMETERS))

    @app.get("/requests")
    @api
    def list_requests(environ):
        if not inspect:
            raise _RequestError(404, "Not found", "the request inspector is off (--inspect 0)")
        arguments = _query_arguments(environ, {"limit": "limit", "after": "after"})
        limit = arguments.get("limit")
        if limit is not None:
            _check_limit(limit)
        after = arguments.get("after")
        if after is not None:
            if not (after.isascii() and after.isdigit()) or len(after) > 18:
                raise TaskValidationError("after must be the id of a request, a whole number")
            after = int(after)
        return _json_bytes({"requests": inspector.requests(limit or DEFAULT_LIST_LIMIT,
                                                           after)})

    if users is not None:
        @app.get("/users")
        @api
        def list_users(environ):
            if callable(users):
                return _json_bytes(_check_users(users(), "the users function's result"))
            return users

    @app.post("/tasks")
    @api
    def create_task(environ):
        key = _idempotency_key(environ)
        body = _read_json(environ, max_body)
        if key is None:
            task = store.create(body)
        else:
            task, replayed = store.create_idempotent(body, key)
            if replayed:
                bottle.response.set_header("Idempotent-Replayed", "true")
        bottle.response.status = 201
        bottle.response.set_header("Location", task_location(environ, task["id"]))
        return _json_bytes(task)

    # The batch paths are registered before, and excluded from, the single-task
    # pattern: "batch" is never looked up as a task id.
    @app.post("/tasks/batch")
    @api
    def get_tasks_batch(environ):
        ids = _batch_ids(_read_json(environ, max_body), max_batch)
        return store.get_many_json(ids)

    @app.route("/tasks/batch", method="PATCH")
    @api
    def complete_tasks_batch(environ):
        body = _read_json(environ, max_body)
        ids = _batch_ids(body, max_batch)
        if "completed" not in body:
            raise TaskValidationError("completed is required and must be true or false")
        return store.set_completed_many_json(ids, body["completed"])

    single_task = "/tasks/<task_id:re:(?!batch$)[^/]+>"

    @app.get(single_task)
    @api
    def get_task(environ, task_id):
        task = store.get_json(task_id)
        if task is None:
            raise _task_not_found(task_id)
        return task

    @app.route(single_task, method="PATCH")
    @api
    def update_task(environ, task_id):
        task = store.update(task_id, _read_json(environ, max_body))
        if task is None:
            raise _task_not_found(task_id)
        return _json_bytes(task)

    @app.route(single_task, method="DELETE")
    @api
    def delete_task(environ, task_id):
        if not store.delete(task_id):
            raise _task_not_found(task_id)
        bottle.response.status = 204
        return b""

    return app


def _app_from_environment():
    """The app as configured by the environment (used by ``app``): every
    GENESY_TASKS_* option that applies to the app, as on the command line.
    Raises ValueError or StorageError, with one line, when it cannot be built."""
    options = _environment_options(app_only=True)
    api_keys = _parse_api_keys(os.environ.get("GENESY_API_KEY"))
    header = _env_default("GENESY_API_KEY_HEADER", DEFAULT_HEADER)
    app = make_app(options.pop("db"), api_keys, header, **options)
    if not api_keys:
        _report(sys.stderr, "genesy-tasks: no GENESY_API_KEY set; %s: %s\n"
                % (header, app.store.generated_api_key()))
    return app


class _LazyApp:
    """A WSGI callable that builds the app from the environment on its first request.

    It lets ``gunicorn genesy_tasks:app`` work while importing the module
    touches no file. While it cannot be built (a bad variable, a database it
    cannot use), every request is a JSON 500 and the reason is logged once.
    """

    def __init__(self):
        self._app = None
        self._lock = threading.Lock()
        self._failure = None

    def __call__(self, environ, start_response):
        if self._app is None:
            with self._lock:
                if self._app is None:
                    try:
                        self._app = _app_from_environment()
                    except (ValueError, StorageError, sqlite3.Error) as error:
                        if str(error) != self._failure:
                            self._failure = str(error)
                            _report(environ.get("wsgi.errors", sys.stderr),
                                    "genesy-tasks: cannot start: %s\n" % error)
                        start_response("500 Internal Server Error", list(_ERROR_HEADERS))
                        return [_error_body("Internal server error",
                                           "the server is misconfigured; the error was logged")]
        return self._app(environ, start_response)


app = _LazyApp()


###############################################################################
# Server: HTTP/1.1 on an event loop, one thread ###############################
###############################################################################

# -- HTTP/1.1 request parsing -------------------------------------------------

# The request parser is the server's security boundary: a proxy in front of it
# must never disagree with it about where a request ends. It follows RFC 9112
# (message syntax) and RFC 9110 section 5 (fields), refuses with 400 and a close
# wherever framing is in doubt, and looks at each byte once, however the
# stream is cut. Limits are enforced at the byte that passes them, a malformed
# line when its end arrives: the status of every answer is the same however
# the bytes arrived.

_TOKEN = r"[-!#$%&'*+.^_`|~0-9A-Za-z]+"  # RFC 9110 5.6.2
# RFC 9112 3: method SP request-target SP HTTP-version, single spaces. The
# target is visible ASCII; the version is checked apart, so HTTP/2.0 is a 505.
_REQUEST_LINE = re.compile(r"(%s) ([\x21-\x7e]+) (HTTP/[0-9]\.[0-9])" % _TOKEN)
# RFC 9112 5 and RFC 9110 5.5: a token, a colon with no space before it, and a
# value of visible characters, spaces, tabs and obs-text. Other control
# characters (NUL, CR and LF among them) are refused, never passed on. A line
# that starts with whitespace (obs-fold) is refused too (RFC 9112 5.2).
_FIELD_LINE = re.compile(r"(%s):([\t\x20-\x7e\x80-\xff]*)" % _TOKEN)
_TRAILER_LINE = re.compile(_FIELD_LINE.pattern.encode("latin-1"))
_NOT_IN_TRAILERS = {b"content-length", b"transfer-encoding", b"host", b"content-type",
                    b"trailer", b"connection", b"expect"}
# RFC 9112 3.2.2: http(s)://authority, then the path and query, if any.
_ABSOLUTE_FORM = re.compile(r"https?://([^/?]*)(.*)", re.IGNORECASE)
# RFC 9110 7.2 and RFC 3986 3.2.2: uri-host [ ":" port ].
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[-A-Za-z0-9._~!$&'()*+,;=%]*)(?::[0-9]*)?")
# RFC 9112 7.1: chunk-size [ chunk-ext ]. The whitespace RFC 9112 tolerates
# before ";" is refused, as h11 does: a proxy may read such a line otherwise.
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,%d})(;[\t\x20-\x7e\x80-\xff]*)?"
                         % DEFAULT_MAX_CHUNK_SIZE_DIGITS)


def _bad_request(message):
    return _RequestError(400, "Bad request", message)


def _malformed(line, message):
    # A head split at CRLF may hold a bare LF inside a line: refused as it is
    # when the head is read line by line (see _RequestReader._read_head).
    return _bad_request("lines must end with CRLF" if "\n" in line else message)


def _too_large(message):
    return _RequestError(431, "Request header fields too large", message)


def _list_items(value):
    """The lower-cased items of a comma-separated field value (RFC 9110 5.6.1)."""
    return [item.strip(" \t").lower() for item in value.split(",")]


class _RequestReader:
    """Reads HTTP/1.1 requests from one connection's bytes as they arrive.

    ``feed(data)`` appends what was received; ``next_request()`` returns the next
    whole request as ``(environ, keep_alive)``, its body in
    ``environ["wsgi.input"]``, or None until it has fully arrived. It raises
    _RequestError for a request to refuse; the connection must then close,
    since where the next request would start is no longer known.

    State is kept between reads, so no byte is parsed twice. ``held`` is what
    it holds: bytes received and not yet parsed, and the chunked body decoded
    so far.
    """

    def __init__(self, base_environ, max_body, peer="-"):
        self.buffer = bytearray()
        self.base_environ = base_environ
        self.max_body = max_body
        self.peer = peer
        self.expect_continue = False  # the client waits for 100 Continue to send its body
        self._scanned = 0       # bytes at the buffer's start known to hold no LF
        self._environ = None    # of the head being read, once its request line is in
        self._authority = None  # the host of an absolute-form target
        self._head_size = 0
        self._fields = 0
        self._request = None    # (environ, keep_alive, length) once its head is whole
        # A chunked body being decoded: the bytes so far, the data still to come
        # in the current chunk (None: a chunk-size line is next; -1: the CRLF
        # after a chunk's data), and the extension and trailer bytes seen.
        self._body = None
        self._chunk_left = None
        self._extensions = 0
        self._trailers = None

    @property
    def held(self):
        return len(self.buffer) + (len(self._body) if self._body is not None else 0)

    def feed(self, data):
        self.buffer += data

    def next_request(self):
        if self._request is None and (not self.buffer or not self._read_head()):
            return None
        environ, keep_alive, length = self._request
        if length == "chunked":
            body = self._read_chunked()
            if body is None:
                return None
            environ["CONTENT_LENGTH"] = str(len(body))
        elif len(self.buffer) >= length:
            body = bytes(self.buffer[:length])
            del self.buffer[:length]
        else:
            return None
        self._request = None
        self.expect_continue = False
        environ["wsgi.input"] = io.BytesIO(body)
        return environ, keep_alive

    def _find_lf(self, pos):
        lf = self.buffer.find(b"\n", max(pos, self._scanned))
        if lf < 0:
            self._scanned = len(self.buffer)
        return lf

    def _consume(self, pos):
        del self.buffer[:pos]
        self._scanned = max(0, self._scanned - pos)

    def _crlf_line(self, pos, lf):
        """The line from ``pos`` to the LF at ``lf``, without its CRLF."""
        if lf == pos or self.buffer[lf - 1] != 13:
            raise _bad_request("lines must end with CRLF")  # RFC 9112 2.2
        return bytes(self.buffer[pos:lf - 1])

    # -- the head (RFC 9112 2-5) -----------------------------------------------

    def _read_head(self):
        """Parse the lines of the head that have arrived; True once it is whole."""
        buffer, pos = self.buffer, 0
        if self._head_size == 0 and not buffer.startswith(b"\r\n"):
            # Most heads arrive whole: split them at CRLF at once. The checks
            # are those of a head read line by line below, in the same order.
            end = buffer.find(b"\r\n\r\n", 0, DEFAULT_MAX_HEAD)
            if end > 0:
                lines = buffer[:end].decode("latin-1").split("\r\n")
                if len(lines[0]) <= DEFAULT_MAX_REQUEST_LINE:
                    del buffer[:end + 4]
                    self._scanned = 0
                    self._request_line(lines[0])
                    self._read_fields(itertools.islice(lines, 1, None))
                    self._request = self._end_of_head()
                    return True
        try:
            while True:
                lf = self._find_lf(pos)
                # Limits come first, and are checked on a line still arriving
                # too, so that a refusal comes at the same byte however the
                # stream was cut.
                # The line's length with its CRLF, or the least it can be.
                length = (lf if lf >= 0 else len(buffer)) + 1 - pos
                if self._environ is None and length > DEFAULT_MAX_REQUEST_LINE + 2:
                    raise _RequestError(414, "URI too long", "the request line is longer "
                                       "than %d bytes" % DEFAULT_MAX_REQUEST_LINE)
                if self._head_size + length > DEFAULT_MAX_HEAD:
                    raise _too_large("the request head is larger than %d bytes" % DEFAULT_MAX_HEAD)
                if lf < 0:
                    return False
                self._head_size += length
                line = self._crlf_line(pos, lf).decode("latin-1")
                pos = lf + 1
                if self._environ is None:
                    if line:  # RFC 9112 2.2: empty lines before it are ignored
                        self._request_line(line)
                elif line:
                    self._read_fields((line,))
                else:
                    self._request = self._end_of_head()
                    return True
        finally:
            self._consume(pos)

    def _request_line(self, line):
        request_line = _REQUEST_LINE.fullmatch(line)
        if request_line is None:
            raise _malformed(line, "malformed request line")
        method, target, protocol = request_line.groups()
        if protocol not in ("HTTP/1.1", "HTTP/1.0"):
            raise _RequestError(505, "HTTP version not supported",
                               "only HTTP/1.0 and HTTP/1.1 are supported")
        if not method.isalpha() or not method.isupper():
            raise _bad_request("malformed request method")
        if "#" in target:
            raise _bad_request("a request target has no fragment")  # RFC 9112 3.2
        authority = None
        path = target
        if not target.startswith("/"):
            # RFC 9112 3.2.2: the absolute form, as sent to proxies. The
            # authority ends at the first "/" or "?", and replaces Host.
            absolute = _ABSOLUTE_FORM.fullmatch(target)
            if absolute is None:
                raise _bad_request("malformed request target")
            authority, path = absolute.group(1), absolute.group(2) or "/"
            if not path.startswith("/"):
                path = "/" + path  # "?query" right after the authority
        path, _, query = path.partition("?")
        environ = self.base_environ.copy()
        environ["REQUEST_METHOD"] = method
        environ["PATH_INFO"] = unquote_to_bytes(path).decode("latin-1") if "%" in path else path
        environ["QUERY_STRING"] = query
        environ["RAW_URI"] = target
        environ["SERVER_PROTOCOL"] = protocol
        environ["REMOTE_ADDR"] = self.peer
        self._environ = environ
        self._authority = authority
        self._fields = 0

    def _read_fields(self, lines):
        environ, fields = self._environ, self._fields
        for line in lines:
            field = _FIELD_LINE.fullmatch(line)
            if field is None:
                raise _malformed(line, "malformed request header")
            fields += 1
            if fields > DEFAULT_MAX_HEADERS:
                raise _too_large("more than %d request headers" % DEFAULT_MAX_HEADERS)
            name, value = field.groups()
            if "_" in name:
                # Dropped, as nginx and gunicorn do: WSGI spells "-" as "_", so
                # Content_Length would otherwise stand for Content-Length.
                continue
            value = value.strip(" \t")
            key = name.upper().replace("-", "_")
            if key == "CONTENT_LENGTH" or key == "CONTENT_TYPE":
                if key in environ and environ[key] != value:
                    raise _bad_request("conflicting %s headers" % name)
                environ[key] = value
                continue
            key = "HTTP_" + key
            if key in environ:
                if key == "HTTP_HOST":
                    raise _bad_request("a request must have one Host header")
                value = environ[key] + "," + value
            elif key == "HTTP_HOST" and not _HOST.fullmatch(value):
                raise _bad_request("the Host header is not a host and an optional port")
            environ[key] = value
        self._fields = fields

    def _end_of_head(self):
        """(environ, keep_alive, length) of the head just read; length may be "chunked"."""
        environ, self._environ, self._head_size = self._environ, None, 0
        http10 = environ["SERVER_PROTOCOL"] == "HTTP/1.0"
        if not http10 and "HTTP_HOST" not in environ:
            raise _bad_request("an HTTP/1.1 request must have a Host header")  # RFC 9112 3.2
        if self._authority is not None:
            environ["HTTP_HOST"] = self._authority
        connection = environ.get("HTTP_CONNECTION")
        keep_alive = not http10
        if connection:
            connection = _list_items(connection)
            keep_alive = ("keep-alive" in connection) if http10 else ("close" not in connection)
        transfer_encoding = environ.pop("HTTP_TRANSFER_ENCODING", None)
        if transfer_encoding is not None:
            # RFC 9112 6.1 and 6.3: both framings at once is how requests are
            # smuggled, and a body is chunked only if chunked is its last coding.
            if "CONTENT_LENGTH" in environ:
                raise _bad_request("Content-Length and Transfer-Encoding together")
            codings = _list_items(transfer_encoding)
            if codings[-1] != "chunked" or codings.count("chunked") > 1 or "" in codings:
                raise _bad_request("the final transfer coding must be chunked, applied once")
            if len(codings) > 1:
                raise _RequestError(501, "Not implemented",
                                   "only the chunked transfer coding is supported")
            if http10:
                keep_alive = False  # RFC 9112 6.1: framing from 1.1 in a 1.0 message
            length = "chunked"
            self._body, self._chunk_left, self._extensions, self._trailers = (
                bytearray(), None, 0, None)
        elif "CONTENT_LENGTH" in environ:
            length = self._content_length(environ["CONTENT_LENGTH"])
            environ["CONTENT_LENGTH"] = str(length)  # leading zeros would trouble apps
        else:
            length = 0
        # RFC 9110 15.2: no 1xx answer may go to an HTTP/1.0 client.
        self.expect_continue = (length != 0 and not http10
                                and environ.get("HTTP_EXPECT", "").lower() == "100-continue")
        return environ, keep_alive, length

    def _content_length(self, text):
        # RFC 9112 6.3: a length that is not all digits (empty, a list) is invalid.
        if not text.isdigit() or not text.isascii():
            raise _bad_request("Content-Length is not a number")
        digits = text.lstrip("0") or "0"
        if len(digits) > len(str(self.max_body)) or int(digits) > self.max_body:
            raise _body_too_large(self.max_body)
        return int(digits)

    # -- a chunked body (RFC 9112 7.1) ------------------------------------------

    def _read_chunked(self):
        """Decode what has arrived of a chunked body: the body once it is whole,
        else None. Decoded bytes leave the buffer as they go."""
        buffer, body, pos = self.buffer, self._body, 0
        try:
            while True:
                if self._chunk_left is not None and self._chunk_left > 0:
                    data = buffer[pos:pos + self._chunk_left]
                    if not data:
                        return None
                    body += data
                    pos += len(data)
                    self._chunk_left = self._chunk_left - len(data) or -1
                    continue
                if self._chunk_left == -1:  # the CRLF that ends a chunk's data
                    ending = buffer[pos:pos + 2]
                    if ending != b"\r\n"[:len(ending)]:
                        raise _bad_request("chunk data longer than its chunk size")
                    if len(ending) < 2:
                        return None
                    pos += 2
                    self._chunk_left = None
                    continue
                lf = self._find_lf(pos)
                length = (lf if lf >= 0 else len(buffer)) + 1 - pos  # as in _read_head
                if self._trailers is None:  # a chunk-size line
                    room = (DEFAULT_MAX_CHUNK_SIZE_DIGITS + DEFAULT_MAX_CHUNK_EXTENSIONS
                            - self._extensions)
                    if length > room + 2:
                        raise _bad_request("chunk extensions longer than %d bytes"
                                           % DEFAULT_MAX_CHUNK_EXTENSIONS)
                elif self._trailers + length > DEFAULT_MAX_TRAILERS:
                    raise _too_large("the trailer section is larger than %d bytes"
                                     % DEFAULT_MAX_TRAILERS)
                if lf < 0:
                    return None
                line = self._crlf_line(pos, lf)
                pos = lf + 1
                if self._trailers is not None:
                    self._trailers += length
                    if not line:  # the end of the trailer section, and of the body
                        self._body = self._trailers = None
                        return bytes(body)
                    trailer = _TRAILER_LINE.fullmatch(line)  # checked, then ignored
                    if trailer is None:
                        raise _bad_request("malformed trailer field")
                    if trailer.group(1).lower() in _NOT_IN_TRAILERS:  # RFC 9110 6.5.1
                        raise _bad_request("%s is not allowed in a trailer section"
                                           % trailer.group(1).decode("latin-1"))
                    continue
                chunk = _CHUNK_LINE.fullmatch(line)
                if chunk is None:
                    raise _bad_request("malformed chunk size")
                self._extensions += len(line) - len(chunk.group(1))
                if self._extensions > DEFAULT_MAX_CHUNK_EXTENSIONS:
                    raise _bad_request("chunk extensions longer than %d bytes"
                                       % DEFAULT_MAX_CHUNK_EXTENSIONS)
                size = int(chunk.group(1), 16)
                if len(body) + size > self.max_body:
                    raise _body_too_large(self.max_body)
                if size:
                    self._chunk_left = size
                else:
                    self._trailers = 0
        finally:
            self._consume(pos)


# -- the server ---------------------------------------------------------------

_LOG_WRITE = 4096      # bytes: PIPE_BUF on Linux, and the least POSIX allows
# The most asyncio reads from a socket at once.
_READ_SIZE = 256 * 1024
_ERROR_HEADERS = [("Content-Type", "application/json"), ("X-Content-Type-Options", "nosniff")]
_RETRY_HEADERS = _ERROR_HEADERS + [("Retry-After", "1")]
_HOP_BY_HOP = frozenset(("connection", "keep-alive", "transfer-encoding", "upgrade"))
_READS = frozenset(("GET", "HEAD"))


class _Connection(asyncio.Protocol):
    """One client connection: reads whole requests, then hands them to the server.

    A request reaches the application only once it has fully arrived, so a
    client that stalls half-way holds up nobody but itself.
    """

    def __init__(self, server):
        self.server = server
        self.transport = None
        self.reader = None          # the _RequestReader of this connection's bytes
        self.request_started = None  # monotonic time its first byte arrived
        self.idle_since = time.monotonic()
        self.answered = 0           # responses sent; 0 means a new connection
        self.closing = False        # answering nothing more on this connection
        self.linger_until = None    # draining input after a final response
        self.write_paused = False
        self.held = 0               # reader.held as counted in the server's budget
        self.starved = False        # reading paused until the budget has room
        self.peer = "-"
        self.tls = False
        self.parked = None          # a request waiting for another connection's write lock
        self.eof = False            # the client half-closed: it sends nothing more

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = peer[0]
        self.tls = transport.get_extra_info("sslcontext") is not None
        self.reader = _RequestReader(self.server._base_environ, self.server.max_body,
                                     self.peer)
        self.number = next(self.server._arrivals)
        self.server._connections.add(self)
        self._timer = self.server._loop.call_later(self.server.request_timeout, self._on_timer)
        self.server._budget(self)  # not read at all while the budget is spent

    def connection_lost(self, exc):
        self._timer.cancel()
        self.reader = _RequestReader({}, 0)  # what it held is let go
        self.server._connection_closed(self)

    def _on_timer(self):
        """This connection's timeouts: a request that does not arrive in time, a
        connection idle too long, the end of a linger.

        The timer is not moved on every request: it fires at the latest one
        request timeout after it was set, and then looks at the connection's
        times (request_started, idle_since), set as requests come and go, to
        act or to set itself again for what is left.
        """
        server, now = self.server, time.monotonic()
        if self.linger_until is not None:
            due = self.linger_until
            if now >= due:
                self.transport.abort()
                return
        elif (self.starved and not server._stopping) or self.parked is not None:
            due = now + server.request_timeout  # waiting for the server: not its fault
        elif self.request_started is not None:
            due = self.request_started + server.request_timeout
            if now >= due:
                self.finish_with_error(
                    408, "Request timeout",
                    "the request did not arrive within %g seconds" % server.request_timeout)
                return
        else:
            due = self.idle_since + (server.keepalive_timeout if self.answered
                                     else server.request_timeout)
            if now >= due or server._stopping:
                server._end_group()  # its last answer may be held
                self.transport.close()  # idle kept-alive, or new and silent
                return
        server._feed_starved()  # in case the one let in last had nothing to send
        self._set_timer(min(due - now, server.request_timeout))

    def _set_timer(self, delay):
        self._timer.cancel()
        self._timer = self.server._loop.call_later(delay, self._on_timer)

    # No exception may escape a protocol callback: asyncio would drop the
    # connection with nothing sent, answers held for earlier requests
    # included. None should; if one does, it is logged and answered (_failed).

    def data_received(self, data):
        if self.linger_until is not None:
            return  # a final response was sent: input is drained and dropped
        try:
            if self.request_started is None:
                self.request_started = time.monotonic()
            self.reader.buffer += data  # feed(), without the call on the hot path
            self._process()
            self.server._budget(self)
        except Exception:
            self._failed()

    def eof_received(self):
        # The client half-closed: answer what has fully arrived, then close.
        try:
            self.eof = True
            self._process()
        except Exception:
            self._failed()
        return not self.tls  # a TLS transport cannot stay half-open

    def pause_writing(self):
        # The client is not reading its responses: stop reading its requests.
        self.write_paused = True
        self.transport.pause_reading()

    def resume_writing(self):
        self.write_paused = False
        try:
            if not self.starved:
                self.transport.resume_reading()
            self._process()
            self.server._budget(self)
        except Exception:
            self._failed()

    def _failed(self):
        _report(self.server._log_stream, traceback.format_exc())
        if self.linger_until is None and not self.transport.is_closing():
            try:
                self.finish_with_error(500, "Internal server error",
                                       "the server failed to read the request; "
                                       "the error was logged")
            except Exception:
                self.transport.abort()

    def _process(self):
        server, reader = self.server, self.reader
        while not self.write_paused and self.linger_until is None and self.parked is None:
            try:
                request = reader.next_request()
            except _RequestError as error:
                self.finish_with_error(error.status, error.title, error.message)
                break
            if request is None:
                if reader.expect_continue and not self.eof:
                    # curl and others wait for it before sending a large body.
                    server._end_group()  # answers held for earlier requests go first
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    reader.expect_continue = False
                break
            if not server._handle(self, *request) or not self.answered_one():
                return
        if self.eof and self.parked is None and not self.write_paused:
            # The client sent all it will: what fully arrived is answered.
            server._close_when_answered(self)

    def answered_one(self):
        """Count an answer; False if the connection is to close after it."""
        self.answered += 1
        if self.closing:
            self.server._close_when_answered(self)
            return False
        if self.reader.held:
            self.request_started = time.monotonic()
        else:
            self.request_started = None
            self.idle_since = time.monotonic()
        return True

    def finish_with_error(self, status, title, message):
        """Send a final error response, then drain input briefly so the client can read it."""
        server = self.server
        server._end_group()  # answers held for earlier requests go first
        body = _error_body(title, message)
        self.transport.write(server._response_head(
            "%d %s" % (status, title), _ERROR_HEADERS, body, keep_alive=False) + body)
        server._log("%s - %d (%s)" % (self.peer, status, message))
        self.closing = True
        self.reader = _RequestReader({}, 0)  # nothing more is parsed
        server._budget(self)
        self.linger_until = time.monotonic() + DEFAULT_LINGER
        self._set_timer(DEFAULT_LINGER)
        if self.starved:  # draining holds nothing: read on
            self.starved = False
            if not self.write_paused:
                self.transport.resume_reading()
        # A client still sending its body would see a reset, not the answer, if
        # the connection closed now: it stays open, its input read and dropped,
        # until the client closes it or the linger ends (_on_timer). TLS has no
        # half-close, so there the client learns the end from Content-Length.
        if self.transport.can_write_eof():
            self.transport.write_eof()


class TaskServer:
    """An HTTP/1.1 server for a WSGI app: keep-alive, one thread, no slow-client stalls.

    Connections are handled by an asyncio event loop; a request is passed to
    the application only once it has fully arrived, and the application runs
    on the loop's thread. SQLite answers in microseconds, so running requests
    one at a time costs less than handing them between threads (the GIL makes
    threads take turns anyway), while no client can hold up another by being
    slow to send or to read.

    It serves any WSGI application. Given ``commits`` (a CommitGroups of the
    application's TaskStore), the writes of all requests handled in one turn
    of the loop commit together, once (TaskStore.start_commit_group), and
    their responses are sent after that COMMIT: one commit per turn rather
    than per request, and nothing is acknowledged before it is committed.
    If the commit fails, every response that depended on it becomes a 503.
    A request that meets another connection's write lock is run again from
    the loop until it goes through or its lock timeout has passed; the loop
    itself never waits on SQLite, and checkpoints run on another thread.

    At most ``max_connections`` connections are open at once; more wait in
    the kernel's listen queue, unanswered but not refused, until one closes.
    Requests still arriving may hold ``max_buffered`` bytes in all; past
    that, a connection that sends more is not read until there is room (one
    at a time always goes on, so uploads finish). A request must arrive
    within ``request_timeout`` seconds of its first byte (else 408), and a
    new connection must start one within as long.
    With ``ssl_context`` (an ``ssl.SSLContext`` with a certificate loaded) it
    serves HTTPS.

    ``server = TaskServer(app, host, port)`` binds at once (``server.port``
    tells the port when 0 was asked); ``server.serve_forever()`` runs until
    ``server.shutdown()``, SIGINT or SIGTERM, then finishes in-flight requests.
    """

    def __init__(self, app, host=DEFAULT_HOST, port=DEFAULT_PORT, *,
                 max_body=DEFAULT_MAX_BODY, request_timeout=DEFAULT_REQUEST_TIMEOUT,
                 keepalive_timeout=DEFAULT_KEEPALIVE_TIMEOUT,
                 shutdown_timeout=DEFAULT_SHUTDOWN_TIMEOUT,
                 max_connections=DEFAULT_MAX_CONNECTIONS, max_buffered=DEFAULT_MAX_BUFFERED,
                 ssl_context=None, log=None, commits=None, sock=None, name=None):
        """``sock``: a listening socket to serve instead of binding one (a
        worker's, shared with the others); ``name`` tags its log lines."""
        self.app = app
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.keepalive_timeout = keepalive_timeout
        self.shutdown_timeout = shutdown_timeout
        self.max_connections = max_connections
        # Never less than one whole request, or a large one could never finish.
        self.max_buffered = max(max_buffered, max_body + DEFAULT_MAX_HEAD)
        self._buffered = 0
        self._starved = collections.deque()  # in order of arrival
        self._arrivals = itertools.count()
        self.ssl_context = ssl_context
        self._log_stream = log or sys.stderr
        self._log_lines = []
        self._connections = set()
        self._opening = 0  # accepted, TLS handshake not finished yet
        self._stopping = False
        self._socket = self._listen(host, port) if sock is None else sock
        self._socket.setblocking(False)
        self.host, self.port = host, self._socket.getsockname()[1]
        self._name = "" if name is None else "[%s] " % name
        self._loop = asyncio.new_event_loop()
        self._slot_freed = None  # an asyncio.Event, made on the loop's thread
        self._accepting = None
        self._base_environ = {
            "wsgi.version": (1, 0), "wsgi.url_scheme": "https" if ssl_context else "http",
            "wsgi.errors": self._log_stream, "wsgi.multithread": False,
            "wsgi.multiprocess": False, "wsgi.run_once": False,
            "SERVER_NAME": host, "SERVER_PORT": str(self.port),
            "SCRIPT_NAME": "", "SERVER_SOFTWARE": "genesy-tasks",
        }
        self._date_second = None
        self._date_header = ""
        self._stopped = self._loop.create_future()
        self._commits = commits  # a CommitGroups, or None: no groups, no lock retries
        self._group = None   # the open commit group
        self._parked = []    # connections whose request waits for another's write lock
        self._retry = None   # the timer that runs them again
        self._held = []      # responses waiting for its commit, in order
        self._held_bytes = 0

    @staticmethod
    def _listen(host, port):
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    @property
    def url(self):
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s://%s:%d" % ("https" if self.ssl_context else "http", host, self.port)

    # -- connections ------------------------------------------------------------

    async def _accept_forever(self):
        """Accept connections while there is room; at the cap, leave them queued."""
        loop = self._loop
        while True:
            while len(self._connections) + self._opening >= self.max_connections:
                await self._make_room()
            try:
                sock, _ = await loop.sock_accept(self._socket)
            except OSError as error:  # out of file descriptors, say: try again shortly
                self._log("- - accept failed: %s" % error)
                await asyncio.sleep(0.1)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._opening += 1
            loop.create_task(self._open(sock))

    async def _open(self, sock):
        try:
            await self._loop.connect_accepted_socket(
                lambda: _Connection(self), sock, ssl=self.ssl_context,
                ssl_handshake_timeout=self.request_timeout if self.ssl_context else None)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as error:
            # Plain HTTP on the HTTPS port, a failed or stalled TLS handshake.
            sock.close()
            self._log("- - connection dropped during the TLS handshake: %s"
                      % (str(error) or type(error).__name__))
        finally:
            self._opening -= 1
            self._slot_freed.set()

    async def _make_room(self):
        """At the cap: wait for a connection to close. If a client arrives in the
        meantime, close the connection idle the longest, if any, to let it in."""
        loop, listener = self._loop, self._socket.fileno()
        self._slot_freed.clear()
        slot = loop.create_task(self._slot_freed.wait())
        client_waiting = loop.create_future()
        loop.add_reader(listener, lambda: client_waiting.done() or client_waiting.set_result(None))
        try:
            await asyncio.wait([slot, client_waiting], return_when=asyncio.FIRST_COMPLETED)
            if not slot.done():
                self._close_an_idle_connection()
            await slot
        finally:
            loop.remove_reader(listener)
            slot.cancel()

    def _connection_closed(self, conn):
        self._connections.discard(conn)
        self._budget(conn)
        self._slot_freed.set()

    def _budget(self, conn):
        """Count ``conn``'s buffered bytes; when the budget is spent, stop
        reading every connection but one, else let waiting ones read again.

        The one left reading is the one holding most, the closest to a whole
        request, so that requests still finish one at a time. Bytes already
        read cannot be refused: the total may pass the budget by one request,
        and by one read (_READ_SIZE) from each connection whose data arrived
        in the same turn of the event loop.
        """
        held = conn.reader.held
        self._buffered += held - conn.held
        conn.held = held
        if self._buffered < self.max_buffered and not self._starved:
            return  # the usual case
        if self._buffered >= self.max_buffered:
            reading = [other for other in self._connections if not other.starved
                       and other.linger_until is None and not other.transport.is_closing()]
            if len(reading) > 1:
                runner = max(reading, key=lambda other: other.held)
                for other in sorted(reading, key=lambda other: other.number):
                    if other is not runner:
                        other.starved = True
                        other.transport.pause_reading()
                        self._starved.append(other)
        self._feed_starved()

    def _feed_starved(self):
        """Let waiting connections read again, first come first served, while
        there is room for one more read from each new one, and always at
        least one when no request is being read (waiting ones keep what they
        hold, and may hold the whole budget)."""
        room = self.max_buffered - self._buffered
        while self._starved:
            if room <= 0 and any(conn.held and not conn.starved and conn.linger_until is None
                                 for conn in self._connections):
                return  # someone with a request under way is still being read
            waiting = self._starved.popleft()
            if waiting.starved and waiting in self._connections:
                if not waiting.held:
                    room -= _READ_SIZE
                waiting.starved = False
                # Its timeouts start afresh: the time it waited was the server's.
                waiting.idle_since = time.monotonic()
                if waiting.request_started is not None:
                    waiting.request_started = waiting.idle_since
                if not waiting.write_paused:
                    waiting.transport.resume_reading()

    def _close_an_idle_connection(self):
        """Close the kept-alive connection idle the longest, if any.

        Only connections between two requests are closed. One with a request on
        the way, or new and yet to send its first, keeps its place until it is
        answered or times out.
        """
        self._end_group()  # an idle connection's last answer may be held
        idle = [conn for conn in self._connections if conn.answered
                and conn.request_started is None and conn.linger_until is None]
        if idle:
            min(idle, key=lambda conn: conn.idle_since).transport.close()

    # -- running and stopping -------------------------------------------------

    def serve_forever(self):
        loop = self._loop
        asyncio.set_event_loop(loop)
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, self._begin_shutdown)
        if self._commits is not None:
            self._commits.open(lambda line: loop.call_soon_threadsafe(self._log, line))
        self._slot_freed = asyncio.Event()
        self._accepting = loop.create_task(self._accept_forever())
        try:
            loop.run_until_complete(self._stopped)
            loop.run_until_complete(self._drain())
        finally:
            self._end_group()  # its end may be among the callbacks the loop did not run
            if self._commits is not None:
                self._commits.close()
                loop.run_until_complete(asyncio.sleep(0))  # its last log lines
            self._socket.close()
            self._flush_log()
            if threading.current_thread() is threading.main_thread():
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(signum)
            loop.close()

    def shutdown(self):
        """Stop accepting, finish in-flight requests, then return from serve_forever()."""
        self._loop.call_soon_threadsafe(self._begin_shutdown)

    def _begin_shutdown(self):
        if self._stopping:
            return
        self._stopping = True
        self._end_group()  # idle connections are closed below: send their answers
        if self._accepting is not None:
            self._accepting.cancel()
        # A request waiting for another connection's lock waits no longer than
        # the drain does, so that it gets its 503 rather than a reset.
        latest = time.monotonic() + self.shutdown_timeout / 2
        for conn in list(self._connections):
            if conn.parked is not None:
                environ, keep_alive, deadline = conn.parked
                conn.parked = (environ, keep_alive, min(deadline, latest))
            if conn.request_started is None and conn.linger_until is None:
                conn.transport.close()  # idle keep-alive: flushes, then closes
            else:
                conn.closing = True
                if conn.starved:  # read again: finish the request, or see the client leave
                    conn.starved = False
                    conn.transport.resume_reading()
        self._starved.clear()
        if not self._stopped.done():
            self._stopped.set_result(None)

    async def _drain(self):
        deadline = time.monotonic() + self.shutdown_timeout
        while self._connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            for conn in list(self._connections):
                # Closed with everything written: a TLS close would otherwise
                # wait for the client's close_notify, which an idle client
                # never sends.
                if conn.transport.is_closing() and not conn.transport.get_write_buffer_size():
                    conn.transport.abort()
        for conn in list(self._connections):
            conn.transport.abort()
        if self._accepting is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting

    # -- requests ---------------------------------------------------------------

    def _handle(self, conn, environ, keep_alive, deadline=None):
        """Run the application on one complete request and send its response.

        With commit groups, a request that met another connection's write
        lock is parked instead, and run again from the loop until ``deadline``
        (its arrival plus the lock timeout), so that no wait for a lock ever
        happens on this thread. Returns False when it was parked.
        """
        started = time.perf_counter()
        if self._stopping or conn.closing:
            keep_alive = False
        commits = self._commits
        if commits is not None:
            if self._group is None:
                # The group ends at the start of the loop's next turn, after the
                # requests that arrived in this one.
                self._group = commits.start()
                self._loop.call_soon(self._end_group)
            if environ["REQUEST_METHOD"] not in _READS:
                # Writes meet other writers' locks; reads, in WAL mode, all but
                # never do (and then get their 503 at once).
                if deadline is None:
                    deadline = time.monotonic() + commits.lock_timeout
                pristine = environ.copy()  # the application adds to it
                environ[_RETRY_ON_LOCK_KEY] = deadline
        response = []

        def start_response(status, headers, exc_info=None):
            response[:] = [status, headers]

        try:
            result = self.app(environ, start_response)
            try:
                body = b"".join(result)
            finally:
                if hasattr(result, "close"):
                    result.close()
            status, headers = response
        except Exception:
            _report(self._log_stream, traceback.format_exc())
            status = "500 Internal Server Error"
            headers = _ERROR_HEADERS
            body = _error_body("Internal server error",
                              "the server failed to handle the request; the error was logged")
        if commits is not None and environ.get(_MET_LOCK_KEY):
            if _will_retry(environ):
                conn.parked = (pristine, keep_alive, deadline)
                self._parked.append(conn)
                if self._retry is None:
                    self._retry = self._loop.call_later(DEFAULT_LOCK_RETRY_INTERVAL,
                                                        self._retry_parked)
                return False
            self._log_lock_timeout(conn)
        self._answer(conn, environ, keep_alive, status, headers, body, started)
        return True

    def _log_lock_timeout(self, conn):
        self._log("%s - storage unavailable: database is locked by another connection; "
                  "waited %g s" % (conn.peer, self._commits.lock_timeout))

    def _answer(self, conn, environ, keep_alive, status, headers, body, started):
        """Send a response, or hold it for the open commit group."""
        head_only = environ["REQUEST_METHOD"] == "HEAD"
        if head_only:
            body = b""
        http10 = environ["SERVER_PROTOCOL"] == "HTTP/1.0"
        head = self._response_head(status, headers, body, keep_alive, http10)
        if not keep_alive:
            conn.closing = True
        path = environ["PATH_INFO"]
        if not path.isprintable():
            path = path.encode("unicode_escape").decode("ascii")  # no forged log lines
        if len(path) > DEFAULT_MAX_LOGGED_PATH:  # the line keeps its status and duration
            path = path[:DEFAULT_MAX_LOGGED_PATH] + "..."
        request = "%s %s %s" % (conn.peer, environ["REQUEST_METHOD"], path)
        elapsed = (time.perf_counter() - started) * 1000
        if self._group is None:
            conn.transport.write(head + body)
            self._log("%s %s %.2fms" % (request, status[:3], elapsed))
            return
        depends = self._group.writing and not environ.get(_INDEPENDENT_KEY)
        self._held.append((conn, head + body, depends,
                           (keep_alive, http10, head_only), (request, status[:3], elapsed)))
        self._held_bytes += len(body)
        if len(self._held) >= DEFAULT_GROUP_MAX_RESPONSES \
                or self._held_bytes >= DEFAULT_GROUP_MAX_BYTES:
            self._end_group()

    def _retry_parked(self):
        """Run again, oldest first, the requests that met another connection's
        write lock. One whose time is up runs a last time: its answer is sent,
        the 503 if the lock is still held."""
        self._retry = None
        parked, self._parked = self._parked, []
        locked = False
        for conn in parked:
            if conn.parked is None or conn.transport.is_closing():
                conn.parked = None
                continue
            environ, keep_alive, deadline = conn.parked
            expired = time.monotonic() >= deadline
            if locked and not expired:
                self._parked.append(conn)  # the lock is still held: no use trying now
                continue
            conn.parked = None
            try:
                environ["wsgi.input"].seek(0)
                if not self._handle(conn, dict(environ), keep_alive, deadline):
                    locked = True
                    continue
                if conn.answered_one():
                    conn._process()  # its next requests, held back until now
                self._budget(conn)
            except Exception:
                conn._failed()
        if self._parked and self._retry is None:
            soonest = min(conn.parked[2] for conn in self._parked) - time.monotonic()
            self._retry = self._loop.call_later(
                max(0.0, min(DEFAULT_LOCK_RETRY_INTERVAL, soonest)), self._retry_parked)

    def _close_when_answered(self, conn):
        """Close ``conn`` once its responses, held ones included, are sent."""
        if self._group is None:
            conn.transport.close()
        else:
            self._held.append((conn, None, False, None, None))

    def _end_group(self):
        """Commit the open commit group, if any, then send the responses it held.

        When the commit fails, none of the group's writes happened: each
        response given after its first write (which may say that they did,
        or rest on what they wrote) is replaced by a 503, so the client
        retries, and nothing unsaved is ever acknowledged.
        """
        group, self._group = self._group, None
        if group is None:
            return
        held, self._held, self._held_bytes = self._held, [], 0
        void = None  # the body that replaces answers that depended on a failed commit
        try:
            self._commits.finish()
        except sqlite3.Error as error:
            void = _error_body("Service unavailable", _unavailable_message(error))
            self._log("- - storage unavailable: the commit of a group of writes failed: %s"
                      % error)
        for conn, data, depends, shape, logged in held:
            if conn.transport.is_closing():
                continue  # the client left, or the connection was closed in order
            if data is None:
                conn.transport.close()
                continue
            request, status, elapsed = logged
            if void is not None and depends:
                keep_alive, http10, head_only = shape
                status = "503"
                data = self._response_head("503 Service Unavailable", _RETRY_HEADERS, void,
                                           keep_alive, http10) + (b"" if head_only else void)
            conn.transport.write(data)
            self._log("%s %s %.2fms" % (request, status, elapsed))

    def _response_head(self, status, headers, body, keep_alive, http10=False):
        lines = ["HTTP/1.1 " + status]
        has_length = False
        for name, value in headers:
            lowered = name.lower()
            if lowered in _HOP_BY_HOP:
                continue
            if lowered == "content-length":
                has_length = True
            lines.append(name + ": " + value)
        if not has_length and not status.startswith(("204", "304")):  # those have no body
            lines.append("Content-Length: %d" % len(body))
        if not keep_alive:
            lines.append("Connection: close")
        elif http10:
            lines.append("Connection: keep-alive")
        lines.append(self._date())
        lines.append("\r\n")
        return "\r\n".join(lines).encode("latin-1")

    def _date(self):
        second = int(time.time())
        if second != self._date_second:
            self._date_second = second
            self._date_header = "Date: " + time.strftime(
                "%a, %d %b %Y %H:%M:%S GMT", time.gmtime(second))
        return self._date_header

    def _log(self, line):
        # Lines are written once per turn of the event loop, not once per request.
        if not self._log_lines:
            self._loop.call_soon(self._flush_log)
        self._log_lines.append(line)

    def _flush_log(self):
        lines, self._log_lines = self._log_lines, []
        if not lines:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime()) + self._name
        _write_lines(self._log_stream, [stamp + line + "\n" for line in lines])


###############################################################################
# Check: Genesy's calls against any server, and replay ########################
###############################################################################

#: Tasks the check creates carry this in their subject, so they can be found.
_CHECK_SUBJECT = "genesy-tasks check: safe to delete"


class _CheckClient:
    """Just enough HTTP for the check: one kept-alive connection, JSON in and out."""

    def __init__(self, url, key, header, timeout, insecure):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the URL must start with http:// or https://, not %r" % url)
        self.base = parts.path.rstrip("/")
        self.key, self.header = key, header
        if parts.scheme == "https":
            context = ssl.create_default_context()
            if insecure:
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            self._connect = lambda: http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=timeout, context=context)
        else:
            self._connect = lambda: http.client.HTTPConnection(
                parts.hostname, parts.port, timeout=timeout)
        self._conn = None

    def call(self, method, path, body=None, key=True):
        """(status, parsed JSON body or None, raw text) for one request."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {} if data is None else {"Content-Type": "application/json"}
        return self.send(method, path, data, headers, key)

    def send(self, method, path, data=None, headers=None, key=True):
        """call() with the body's bytes and headers as given; ``key`` is True (the
        key), a string (that key) or None (no key header)."""
        headers = {"Accept": "application/json", **(headers or {})}
        if key is True:
            headers[self.header] = self.key
        elif key:
            headers[self.header] = key
        for attempt in (1, 2):  # once more on a fresh connection if the kept one was closed
            if self._conn is None:
                self._conn = self._connect()
            try:
                self._conn.request(method, self.base + path, body=data, headers=headers)
                response = self._conn.getresponse()
                raw = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._conn.close()
                self._conn = None
                if attempt == 2:
                    raise
        if response.will_close:
            self._conn.close()
            self._conn = None
        text = raw.decode("utf-8", "replace")
        try:
            parsed = json.loads(text) if text else None
        except ValueError:
            parsed = None
        return response.status, parsed, text

    def close(self):
        if self._conn is not None:
            self._conn.close()


class _CheckFailed(Exception):
    """One check's failure; the message says what was seen."""


def _seen(status, text, limit=160):
    """A response in a few words for a check line."""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit] + "..."
    return "%s %s" % (status, text) if text else str(status)


def _expect(condition, message):
    if not condition:
        raise _CheckFailed(message)


def _expect_status(result, expected, what):
    status, _, text = result
    _expect(status in expected, "%s -> %s (expected %s)"
            % (what, _seen(status, text), " or ".join(map(str, expected))))


def _expect_task(task, what, sent=None, completed=None):
    _expect(isinstance(task, dict), "%s: the body is not a JSON object" % what)
    _expect(isinstance(task.get("id"), str) and task["id"], "%s: no string id" % what)
    for name, value in (sent or {}).items():
        _expect(task.get(name) == value, "%s: %s is %s, sent %s" % (
            what, name, json.dumps(task.get(name)), json.dumps(value)))
    if completed is not None:
        _expect(task.get("completed") is completed, "%s: completed is %s, expected %s"
                % (what, json.dumps(task.get("completed")), json.dumps(completed)))
        if completed:
            at = task.get("completedAt")
            _expect(isinstance(at, str) and _is_iso8601(at),
                    "%s: completedAt %s is not an ISO 8601 date-time" % (what, json.dumps(at)))


def _expect_array(result, what):
    _expect(isinstance(result[1], list), "%s -> %s: not a JSON array"
            % (what, _seen(result[0], result[2])))


def _expect_error_body(result, what):
    status, body, text = result
    _expect(isinstance(body, dict) and isinstance(body.get("error"), str)
            and isinstance(body.get("message"), str),
            "%s -> %s: not Genesy's error body {\"error\": ..., \"message\": ...}"
            % (what, _seen(status, text)))


def run_contract_check(url, key, header=DEFAULT_HEADER, timeout=DEFAULT_CHECK_TIMEOUT,
                       insecure=False, out=None, owner_id=None, contact_id=None,
                       company_id=None):
    """Run Genesy's calls against the server at ``url``; print a line per check.

    Returns the number of failed checks. Tasks it creates have _CHECK_SUBJECT
    in their subject and are deleted afterwards where the server allows it.
    They carry ``owner_id``, ``contact_id`` and ``company_id``, for a CRM that
    refuses ids it does not know; without ``owner_id``, the first user of GET
    /users if the server offers it.
    """
    out = out or sys.stdout
    client = _CheckClient(url, key, header, timeout, insecure)
    marker = "%s %s" % (_CHECK_SUBJECT, secrets.token_hex(4))
    missing = "genesy-check-missing-" + secrets.token_hex(8)
    sent = {"subject": marker, "description": "Created by genesy-tasks check",
            "type": "call", "ownerId": owner_id or "genesy-check-owner",
            "dueDate": "2030-01-15T10:00:00Z",
            "contactId": contact_id or "genesy-check-contact",
            "companyId": company_id or "genesy-check-company"}
    created, state, failures = [], {}, []

    def path_of(task_id):
        return "/tasks/" + quote(task_id, safe="")

    def create(what):
        result = client.call("POST", "/tasks", sent)
        _expect_status(result, (200, 201), what)
        _expect_task(result[1], what, sent)
        created.append(result[1]["id"])
        return result[1]["id"]

    def check_health():
        result = client.call("GET", "/health")
        _expect(200 <= result[0] < 300,
                "GET /health -> %s (expected 2xx)" % _seen(result[0], result[2]))
        return "GET /health -> %d" % result[0]

    def check_health_key():
        result = client.call("GET", "/health", key="genesy-check-wrong-key")
        _expect_status(result, (401,), "GET /health with a wrong key")
        return "GET /health with a wrong key -> 401"

    def check_users():
        result = client.call("GET", "/users")
        if result[0] in (404, 405, 501):
            return "GET /users -> %d: not offered, so Genesy turns owner selection off" \
                % result[0]
        _expect_status(result, (200,), "GET /users")
        try:
            users = _check_users(result[1], "GET /users")
        except ValueError as error:
            raise _CheckFailed("%s (expected [{\"id\", \"name\", \"email\"?}])"
                               % error) from None
        if users and owner_id is None:
            sent["ownerId"] = users[0]["id"]
        return "GET /users -> 200, %d users, each with an id and a name%s" % (
            len(users), "; tasks go to the first, %s" % users[0]["id"]
            if users and owner_id is None else "")

    def check_create():
        state["task"] = create("POST /tasks")
        return "POST /tasks -> id %s" % state["task"]

    def needs_task():
        _expect("task" in state, "needs the task from the create check, which failed")
        return state["task"]

    def check_get():
        task_id = needs_task()
        what = "GET " + path_of(task_id)
        result = client.call("GET", path_of(task_id))
        _expect_status(result, (200,), what)
        _expect_task(result[1], what, dict(sent, id=task_id), completed=False)
        return "%s -> 200, the fields sent, completed false" % what

    def check_missing():
        what = "GET " + path_of(missing)
        result = client.call("GET", path_of(missing))
        _expect_status(result, (404,), what)
        _expect_error_body(result, what)
        return "%s -> 404 %s" % (what, result[1]["error"])

    def check_complete():
        task_id = needs_task()
        what = "PATCH %s {\"completed\": true}" % path_of(task_id)
        result = client.call("PATCH", path_of(task_id), {"completed": True})
        _expect_status(result, (200,), what)
        _expect_task(result[1], what, {"id": task_id}, completed=True)
        again = client.call("GET", path_of(task_id))
        _expect_task(again[1], "GET " + path_of(task_id) + " afterwards",
                     {"id": task_id}, completed=True)
        return "%s -> 200, completed, completedAt %s" % (what, result[1]["completedAt"])

    def check_batch_get():
        state["pair"] = pair = [create("POST /tasks"), create("POST /tasks")]
        what = "POST /tasks/batch with 2 ids and a missing one"
        result = client.call("POST", "/tasks/batch", {"ids": [pair[0], missing, pair[1]]})
        state["batch get"] = result
        _expect_status(result, (200,), what)
        _expect_array(result, what)
        ids = [task.get("id") if isinstance(task, dict) else task for task in result[1]]
        _expect(sorted(ids) == sorted(pair), "%s -> ids %s (expected %s, the missing one "
                                             "omitted)" % (what, ids, pair))
        return "%s -> 200, the 2 tasks, the missing id omitted" % what

    def check_batch_complete():
        _expect("pair" in state, "needs the tasks from the batch get check, which failed")
        pair = state["pair"]
        what = "PATCH /tasks/batch {\"ids\": [2 ids], \"completed\": true}"
        result = client.call("PATCH", "/tasks/batch", {"ids": pair, "completed": True})
        state["batch complete"] = result
        _expect_status(result, (200,), what)
        _expect_array(result, what)
        ids = sorted(task.get("id") for task in result[1] if isinstance(task, dict))
        _expect(ids == sorted(pair), "%s -> ids %s (expected %s)" % (what, ids, pair))
        for task in result[1]:
            _expect_task(task, what, completed=True)
        for task_id in pair:
            _expect_task(client.call("GET", path_of(task_id))[1],
                         "GET %s afterwards" % path_of(task_id), completed=True)
        return "%s -> 200, both completed" % what

    def check_batch_routing():
        # Genesy's own example server registers PATCH /tasks/:id first, so its
        # batch complete reaches the single-task handler with the id "batch".
        for method, key in (("POST", "batch get"), ("PATCH", "batch complete")):
            _expect(key in state, "needs the %s check's response" % key)
            status, body, text = state[key]
            as_task_id = ((isinstance(body, dict) and body.get("id") == "batch")
                          or (status == 404 and "batch" in text))
            _expect(not as_task_id, "%s /tasks/batch was handled as the task id \"batch\": %s"
                    % (method, _seen(status, text)))
            _expect(isinstance(body, list), "%s /tasks/batch -> %s: not the batch handler's "
                                            "array" % (method, _seen(status, text)))
        return "POST and PATCH /tasks/batch reach the batch handlers"

    def check_create_key():
        result = client.call("POST", "/tasks", sent, key="genesy-check-wrong-key")
        if 200 <= result[0] < 300 and isinstance(result[1], dict) and result[1].get("id"):
            created.append(result[1]["id"])
        _expect_status(result, (401,), "POST /tasks with a wrong key")
        return "POST /tasks with a wrong key -> 401"

    def check_no_key():
        task_id = state.get("task", missing)
        result = client.call("GET", path_of(task_id), key=None)
        _expect_status(result, (401,), "GET %s without a key" % path_of(task_id))
        _expect_error_body(result, "GET %s without a key" % path_of(task_id))
        return "GET %s without a key -> 401" % path_of(task_id)

    checks = [
        ("health", check_health),
        ("health refuses a wrong key", check_health_key),
        ("users (optional)", check_users),
        ("create", check_create),
        ("get", check_get),
        ("missing task is a 404", check_missing),
        ("complete", check_complete),
        ("batch get omits missing ids", check_batch_get),
        ("batch complete", check_batch_complete),
        ("batch paths are not task ids", check_batch_routing),
        ("create refuses a wrong key", check_create_key),
        ("get refuses a missing key", check_no_key),
    ]
    print("genesy-tasks check %s (key in the %s header)" % (url, header), file=out)
    try:
        for name, check in checks:
            try:
                print("PASS  %s: %s" % (name, check()), file=out)
            except _CheckFailed as failure:
                failures.append(name)
                print("FAIL  %s: %s" % (name, failure), file=out)
            except (OSError, http.client.HTTPException) as error:
                failures.append(name)
                print("FAIL  %s: cannot talk to %s: %s" % (name, url, error), file=out)
                if not created and name == checks[0][0]:
                    print("      (the server cannot be reached; the other checks were not run)",
                          file=out)
                    failures.extend(other for other, _ in checks[1:])
                    break
            out.flush()
        _clean_up(client, created, path_of, marker, out)
    finally:
        client.close()
    print("%d checks: %d passed, %d failed" % (len(checks), len(checks) - len(failures),
                                               len(failures)), file=out)
    return len(failures)


# -- replay -------------------------------------------------------------------

def _json_type(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(value)]


def _shape_differences(recorded, got, where="body"):
    """How ``got`` differs from ``recorded`` in shape: keys, value types and array
    lengths, not values (ids and timestamps differ by nature)."""
    if _json_type(recorded) != _json_type(got):
        return ["%s: %s, recorded %s" % (where, _json_type(got), _json_type(recorded))]
    if isinstance(recorded, dict):
        differences = ["%s: no %r" % (where, name) for name in recorded if name not in got]
        differences += ["%s: %r, not recorded" % (where, name)
                        for name in got if name not in recorded]
        for name in recorded:
            if name in got:
                differences += _shape_differences(recorded[name], got[name],
                                                  "%s.%s" % (where, name))
        return differences
    if isinstance(recorded, list):
        if len(recorded) != len(got):
            return ["%s: %d items, recorded %d" % (where, len(got), len(recorded))]
        differences = []
        for index, (before, after) in enumerate(zip(recorded, got)):
            differences += _shape_differences(before, after, "%s[%d]" % (where, index))
        return differences
    return []


def _recorded_requests(path):
    """The requests of a recording, in order; ValueError names a bad line."""
    requests = []
    try:
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    entry = _decode_json(line)
                    well_formed = (
                        isinstance(entry["method"], str) and isinstance(entry["path"], str)
                        and isinstance(entry["request"]["headers"], dict)
                        and all(isinstance(value, str)
                                for value in entry["request"]["headers"].values())
                        and isinstance(entry["request"].get("body"), (str, type(None)))
                        and isinstance(entry["response"]["status"], int)
                        and isinstance(entry["response"].get("body"), (str, type(None))))
                except (ValueError, KeyError, TypeError):
                    well_formed = False
                if not well_formed:
                    raise ValueError("%s line %d is not a recorded request" % (path, number))
                requests.append(entry)
    except OSError as error:
        raise ValueError("cannot read %s: %s" % (path, error.strerror or error)) from None
    except UnicodeDecodeError:
        raise ValueError("%s is not UTF-8" % path) from None
    return requests


# Recorded headers that replay does not send again: the connection's own, and
# the length, which follows the body as sent.
_NOT_REPLAYED = frozenset(("host", "content-length", "connection", "keep-alive",
                           "transfer-encoding", "te", "upgrade", "expect", "accept-encoding"))


def _with_ids(text, ids):
    """``text`` with each recorded task id replaced by the target's."""
    if text:
        for recorded in sorted(ids, key=len, reverse=True):
            text = text.replace(recorded, ids[recorded])
    return text


def _replay_one(client, entry, ids, header, run):
    """Send one recorded request; (what was sent, the differences, the answer).
    ``run`` tells this replay's idempotency keys from an earlier one's."""
    method, recorded = entry["method"], entry["response"]
    body = entry["request"].get("body")
    if entry["request"].get("encoding") == "base64":
        data = base64.b64decode(body)  # not UTF-8: the bytes as recorded
    else:
        data = None if body is None else _with_ids(body, ids).encode("utf-8")
    path = _with_ids(entry["path"], ids)
    headers, sent_key = {}, False
    for name, value in entry["request"]["headers"].items():
        if name.lower() == header.lower():
            sent_key = True
        elif name.lower() == "idempotency-key":
            # The same key within this replay (a recorded retry replays as
            # one), another than the last replay's (its tasks are gone).
            headers[name] = value + "-" + run
        elif name.lower() not in _NOT_REPLAYED and value != _REDACTED:
            headers[name] = value.encode("utf-8").decode("latin-1")  # the bytes as sent
    # A request sent without a key, or with a wrong one, is replayed so.
    key = (True if recorded["status"] != 401 else "genesy-replay-wrong-key") if sent_key \
        else None
    status, parsed, text = client.send(method, path, data, headers, key)
    differences = []
    if status != recorded["status"]:
        differences.append("status %d, recorded %d%s" % (
            status, recorded["status"], " (the key was refused: see --api-key and --header)"
            if status == 401 and key is True else ""))
    try:
        expected = (None if recorded.get("encoding") == "base64"
                    else _decode_json(recorded.get("body") or ""))
    except ValueError:
        expected = None  # not JSON (or cut): the status says enough
    if expected is not None and not recorded.get("truncated"):
        if parsed is None:
            differences.append("body: not JSON: %s" % _seen(status, text))
        else:
            differences += _shape_differences(expected, parsed)
    return "%s %s" % (method, path), differences, (status, parsed)


def _recorded_key_header(requests):
    """The header the recording's key came in: the redacted one that is not a
    standard secret's, else X-API-Key."""
    for entry in requests:
        for name, value in entry["request"]["headers"].items():
            if value == _REDACTED and name.lower() not in (
                    "authorization", "proxy-authorization", "cookie"):
                return name
    return DEFAULT_HEADER


def run_replay(path, url, key, header=None, timeout=DEFAULT_CHECK_TIMEOUT, insecure=False,
               out=None):
    """Send the requests recorded in ``path`` (--record) to the server at ``url``,
    in order, and compare each answer with the recorded one; print a line each.

    The status must be the same, and a JSON answer the same shape: the same
    keys, value types and array lengths (values such as ids and timestamps
    differ by nature). An id a recorded create returned stands for the id the
    target returned for it in later paths and bodies. Tasks the replay
    created are deleted afterwards where the target allows it. ``header`` is
    the key's header; None: the one the recording shows. Returns the number
    of requests that differed; ValueError for a bad file or URL.
    """
    out = out or sys.stdout
    requests = _recorded_requests(path)
    if not requests:
        raise ValueError("%s holds no recorded request" % path)
    if header is None:
        header = _recorded_key_header(requests)
    client = _CheckClient(url, key, header, timeout, insecure)
    ids, created, failed, run = {}, [], 0, secrets.token_hex(4)
    print("genesy-tasks replay of %s (%d requests) against %s" % (path, len(requests), url),
          file=out)
    try:
        for number, entry in enumerate(requests, 1):
            try:
                what, differences, (status, parsed) = _replay_one(client, entry, ids, header,
                                                                  run)
            except ValueError as error:  # a header or body this client cannot send
                failed += 1
                print("FAIL  #%d %s %s: cannot send it: %s" % (
                    number, entry["method"], entry["path"], error), file=out)
                continue
            except (OSError, http.client.HTTPException) as error:
                print("FAIL  #%d %s %s: cannot talk to %s: %s" % (
                    number, entry["method"], entry["path"], url, error), file=out)
                failed += len(requests) - number + 1
                if number < len(requests):
                    print("      (the %d requests after it were not sent)"
                          % (len(requests) - number), file=out)
                break
            recorded = entry["response"]
            if entry["method"] == "POST" and entry["path"].split("?")[0].endswith("/tasks"):
                try:
                    recorded_id = _decode_json(recorded.get("body") or "null")["id"]
                    ids[recorded_id] = parsed["id"]
                    if parsed["id"] not in created:  # a replayed retry: the same task
                        created.append(parsed["id"])
                except (ValueError, TypeError, KeyError):
                    pass  # not a create that succeeded on both sides
            if entry["method"] == "DELETE" and 200 <= status < 300:
                created = [task_id for task_id in created if not what.endswith("/" + task_id)]
            if differences:
                failed += 1
                print("FAIL  #%d %s -> %d: %s" % (number, what, status, "; ".join(differences)),
                      file=out)
            else:
                print("PASS  #%d %s -> %d" % (number, what, status), file=out)
            out.flush()
    finally:
        _clean_up(client, created, lambda task_id: "/tasks/" + quote(task_id, safe=""),
                  None, out, "the replay")
        client.close()
    print("%d requests: %d passed, %d failed" % (len(requests), len(requests) - failed, failed),
          file=out)
    return failed


def _clean_up(client, created, path_of, marker, out, who="the check"):
    """Delete the tasks ``who`` created; say whether that worked (and, if not,
    how to find them: ``marker``, their subject, or their ids)."""
    if not created:
        return
    answers = set()
    for task_id in created:
        try:
            answers.add(client.call("DELETE", path_of(task_id))[0])
        except (OSError, http.client.HTTPException) as error:
            answers.add(str(error))
    if all(isinstance(answer, int) and 200 <= answer < 300 for answer in answers):
        print("cleanup: deleted the %d tasks %s created" % (len(created), who), file=out)
    else:
        print("cleanup: left %d tasks %s (DELETE answered %s)"
              % (len(created), "with the subject %r" % marker if marker
                 else "%s created: %s" % (who, ", ".join(created)),
                 ", ".join(sorted(map(str, answers)))), file=out)


###############################################################################
# Command line ################################################################
###############################################################################

def _env_default(name, default):
    value = os.environ.get(name, "").strip()
    return value if value else default


def _whole_number(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a whole number" % (text,)) from None
    if value < 0:
        raise argparse.ArgumentTypeError("%r is negative" % (text,))
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, like every other refusal at start, instead of the usage text.
        self.exit(2, "%s: %s (see --help)\n" % (self.prog, message))


def _build_parser():
    parser = _Parser(
        prog="genesy-tasks",
        description="Serve the Genesy Tasks API from a SQLite file. Requests must carry "
                    "the API key in the header named by GENESY_API_KEY_HEADER (default "
                    "X-API-Key). The key comes from GENESY_API_KEY (several may be given, "
                    "separated by commas); without it, a key is generated on first start, "
                    "kept in the database and printed at every start.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def option(name, target=parser, text=None):
        # No default here: main() takes the environment variable, else the
        # default, for what the command line leaves out, and so knows what
        # it was given.
        option = _OPTIONS[name]
        default = "" if option.default is None else " (default: %s)" % option.default
        target.add_argument(option.flag, type=option.kind, default=argparse.SUPPRESS,
                            help="%s (env %s)%s" % (text or option.text, option.env, default))

    for name in _OPTIONS:
        option(name)
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     title="commands (without one, the server runs)")
    check = commands.add_parser(
        "check", help="run Genesy's calls against a server and report each check",
        description="Run Genesy's Tasks calls against the server at URL (this one or "
                    "your own CRM's) and print PASS or FAIL for each check. Exits 1 if "
                    "any check fails. Tasks it creates have the subject %r and are "
                    "deleted afterwards where the server allows it." % _CHECK_SUBJECT,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    replay = commands.add_parser(
        "replay", help="send recorded requests (--record) to a server and compare the answers",
        description="Send the requests recorded in FILE (by --record) to the server at URL "
                    "(your CRM, say), in order, and compare each answer with the recorded "
                    "one: the status, and the JSON's shape (keys, value types, array "
                    "lengths), not values such as ids and timestamps. An id a recorded "
                    "create returned stands for the id URL returned for it. Prints PASS or "
                    "FAIL for each request; exits 1 if any differs. Tasks it creates are "
                    "deleted afterwards where the server allows it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    replay.add_argument("file", help="a recording made with --record")
    for command in (check, replay):
        command.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8080")
        command.add_argument("--api-key", help="the key to send (default: GENESY_API_KEY, "
                                               "else the key generated in --db)")
        command.add_argument(
            "--header", default=_env_default(
                "GENESY_API_KEY_HEADER", DEFAULT_HEADER if command is check else None),
            help="the header that carries the key (env GENESY_API_KEY_HEADER)%s"
                 % ("" if command is check else "; default: the one the recording shows"))
        option("db", command,
               "where to find a generated key when none is given, opened read-only")
        command.add_argument("--timeout", type=_seconds, default=DEFAULT_CHECK_TIMEOUT,
                             help="seconds per request")
        command.add_argument("--insecure", action="store_true",
                             help="accept any TLS certificate (a self-signed test server)")
    for field in ("owner", "contact", "company"):
        check.add_argument(
            "--%s-id" % field, help="the %sId of the tasks it creates, for a CRM that refuses "
                                    "ids it does not know%s" % (field, " (default: the first "
                                    "user of GET /users, if offered)" if field == "owner"
                                                                 else ""))
    backup = commands.add_parser(
        "backup", help="copy the live database consistently to DEST",
        description="Copy the database (--db) to DEST with SQLite's online backup, while "
                    "the server keeps serving. The copy is checked and renamed into place "
                    "only when complete. To restore: stop the server, copy DEST over the "
                    "database file, delete the database's -wal and -shm files, start again.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    backup.add_argument("dest", help="the backup file to write")
    option("db", backup, "the database to copy")
    backup.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    return parser


def _port(text):
    value = _whole_number(text)
    if value > 65535:
        raise argparse.ArgumentTypeError("%r is not a port (0 to 65535)" % (text,))
    return value


def _positive_number(text):
    value = _whole_number(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number of seconds" % (text,)) from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("%r must be more than 0" % (text,))
    return value


class _Option:
    """One setting: a flag, an environment variable, and an argument of
    make_app (``app``) or of the built-in server only."""

    def __init__(self, name, default, kind, text, app):
        self.name, self.default, self.kind, self.text, self.app = name, default, kind, text, app
        self.flag = "--" + name.replace("_", "-")
        self.env = "GENESY_TASKS_" + name.upper()

    def from_text(self, text, where):
        try:
            return self.kind(text)
        except (argparse.ArgumentTypeError, ValueError) as error:
            raise ValueError("%s: %s" % (where, error)) from None

    def from_environment(self):
        """The value of its environment variable, else the default; ValueError
        names the variable."""
        text = os.environ.get(self.env, "").strip()
        return self.from_text(text, self.env) if text else self.default


def _options(*options):
    return {option.name: option for option in options}


# The settings of the server and the application, in one place: the command
# line, the environment and the WSGI ``app`` (gunicorn) all read them here.
_OPTIONS = _options(
    _Option("host", DEFAULT_HOST, str, "address to listen on", app=False),
    _Option("port", DEFAULT_PORT, _port,
            "port to listen on, 0 for any free port", app=False),
    _Option("db", DEFAULT_DB, str, "SQLite database file, created if missing", app=True),
    _Option("max_batch", DEFAULT_MAX_BATCH, _whole_number,
            "most ids in one batch request; more is a 413", app=True),
    _Option("max_body", DEFAULT_MAX_BODY, _whole_number,
            "largest request body in bytes; more is a 413", app=True),
    _Option("busy_timeout", DEFAULT_BUSY_TIMEOUT, _seconds,
            "seconds a write waits for another writer's lock, then 503", app=True),
    _Option("users", None, _users_file,
            "JSON file of the users GET /users offers Genesy as task owners: "
            '[{"id", "name", "email"}]; unset, GET /users is a 404', app=True),
    _Option("inspect", DEFAULT_INSPECT, _whole_number,
            "requests the inspector keeps for GET /requests and the dashboard; 0: none",
            app=True),
    _Option("record", None, str, "append every request and its answer to this file, as "
            "JSON lines (the key redacted), for replay", app=True),
    _Option("workers", 1, _whole_number,
            "processes serving the port, each with its own event loop and connection; "
            "0: one per CPU", app=False),
    _Option("max_connections", DEFAULT_MAX_CONNECTIONS, _positive_number,
            "most connections open at once (per worker); more wait in the listen queue",
            app=False),
    _Option("request_timeout", DEFAULT_REQUEST_TIMEOUT, _seconds,
            "seconds for a request's head and body to arrive, else 408", app=False),
    _Option("checkpoint_pages", DEFAULT_CHECKPOINT_PAGES, _whole_number,
            "WAL pages past which a thread of the server copies it into the database "
            "and starts it over; 0 leaves checkpoints to another process, such as "
            "Litestream", app=False),
    _Option("tls_cert", None, str, "PEM certificate chain: serve HTTPS", app=False),
    _Option("tls_key", None, str, "PEM private key of --tls-cert, if not in the same file",
            app=False),
)
# The options a command takes from before its name (genesy-tasks --db crm.db backup).
_COMMAND_OPTIONS = {"check": {"db"}, "backup": {"db"}, "replay": {"db"}}


def _environment_options(app_only=False):
    """Every option's value (or the application's only) from its environment
    variable, else its default."""
    values = {}
    for option in _OPTIONS.values():
        if app_only and not option.app:
            continue  # the built-in server's: no business of gunicorn's
        values[option.name] = option.from_environment()
    return values


def _backup_command(args):
    started = time.monotonic()
    shown = [started]  # the first progress line after a second: small files show none

    def progress(copied, total):
        now = time.monotonic()
        if now - shown[0] >= 1.0 and copied < total:  # large files: a line a second
            shown[0] = now
            print("backup: %d%% (%d of %d pages)" % (copied * 100 // total, copied, total),
                  file=sys.stderr, flush=True)

    try:
        tasks = backup_database(args.db, args.dest, overwrite=args.overwrite, progress=progress)
    except StorageError as error:
        print("genesy-tasks backup: %s" % error, file=sys.stderr)
        return 2
    print("backup: copied %s to %s (%d tasks, %.1f MB) in %.1f s; integrity check ok"
          % (args.db, args.dest, tasks, os.path.getsize(args.dest) / 1e6,
             time.monotonic() - started))
    return 0


def _tls_context(cert, key):
    """An SSLContext serving ``cert``, or None without one; ValueError says what is wrong."""
    if not cert:
        if key:
            raise ValueError("--tls-key needs --tls-cert")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as error:
        raise ValueError("cannot load the TLS certificate %r%s: %s"
                         % (cert, " and key %r" % key if key else "",
                            getattr(error, "strerror", None) or error)) from None
    return context


def _generated_key_in(path):
    """The key generated in an existing database file, read without writing, or None."""
    if not os.path.isfile(path):
        return None
    try:
        conn = sqlite3.connect("file:%s?mode=ro" % quote(os.path.abspath(path)), uri=True)
        try:
            row = conn.execute("SELECT value FROM genesy_meta WHERE key = 'api_key'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return None if row is None else row[0]


def _client_command(args, run):
    """check and replay: find the key, run, and turn the outcome into an exit status."""
    keys = _parse_api_keys(os.environ.get("GENESY_API_KEY"))
    key = args.api_key or (keys[0] if keys else None) or _generated_key_in(args.db)
    if not key:
        print("genesy-tasks %s: no API key: pass --api-key or set GENESY_API_KEY "
              "(no generated key found in %s)" % (args.command, args.db), file=sys.stderr)
        return 2
    try:
        failed = run(key)
    except ValueError as error:
        print("genesy-tasks %s: %s" % (args.command, error), file=sys.stderr)
        return 2
    return 1 if failed else 0


def _check_command(args):
    return _client_command(args, lambda key: run_contract_check(
        args.url, key, args.header, args.timeout, args.insecure, owner_id=args.owner_id,
        contact_id=args.contact_id, company_id=args.company_id))


def _replay_command(args):
    return _client_command(args, lambda key: run_replay(
        args.file, args.url, key, args.header, args.timeout, args.insecure))


def _parse_arguments(argv):
    """The command line's arguments, with every option the command line left out
    taken from its environment variable, else its default."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    given = set(vars(args)) & set(_OPTIONS)
    if args.command is not None:
        for name in sorted(given - _COMMAND_OPTIONS[args.command]):
            parser.error("%s does not apply to the %s command"
                         % (_OPTIONS[name].flag, args.command))
    for name in set(_OPTIONS) - given:
        if args.command is not None and name not in _COMMAND_OPTIONS[args.command]:
            continue  # a variable of the server's does not stop a command
        try:
            setattr(args, name, _OPTIONS[name].from_environment())
        except ValueError as error:
            parser.error(str(error))
    return args


def main(argv=None):
    """Run the server until SIGINT or SIGTERM, or a command; return the exit status."""
    args = _parse_arguments(argv)
    if args.command == "check":
        return _check_command(args)
    if args.command == "replay":
        return _replay_command(args)
    if args.command == "backup":
        return _backup_command(args)
    try:
        tls = _tls_context(args.tls_cert, args.tls_key)
    except ValueError as error:
        print("genesy-tasks: %s" % error, file=sys.stderr)
        return 2
    header = _env_default("GENESY_API_KEY_HEADER", DEFAULT_HEADER)
    api_keys = _parse_api_keys(os.environ.get("GENESY_API_KEY"))
    workers = args.workers or os.cpu_count() or 1
    if workers > 1 and not hasattr(os, "fork"):
        print("genesy-tasks: --workers needs os.fork (Linux, macOS, BSD); run one worker "
              "here", file=sys.stderr)
        return 2
    new_file = not os.path.exists(args.db)
    try:
        store = TaskStore(args.db, busy_timeout=args.busy_timeout)
    except StorageError as error:
        print("genesy-tasks: %s" % error, file=sys.stderr)
        if new_file:
            _remove_database(args.db)
        return 2
    served, tasks_app = False, None
    try:
        try:
            tasks_app = _app_for(args, store, api_keys, header)
            generated_key = None if api_keys else store.generated_api_key()
        except ValueError as error:  # the key header's name, the recording file
            print("genesy-tasks: %s" % error, file=sys.stderr)
            return 2
        except sqlite3.Error as error:
            print("genesy-tasks: cannot use database %r: %s" % (args.db, error), file=sys.stderr)
            return 2
        try:
            sock = TaskServer._listen(args.host, args.port)
        except OSError as error:
            print("genesy-tasks: cannot listen on %s:%s: %s"
                  % (args.host, args.port, error.strerror or error), file=sys.stderr)
            return 2
        server = None
        if workers == 1:
            server = _server_for(args, tasks_app, tls, sock, args.checkpoint_pages)
            url = server.url
        else:
            # Each worker opens the database for itself: no SQLite connection
            # (nor the recording's thread) may cross a fork.
            tasks_app.close()
            tasks_app = None
            url = "%s://%s:%d" % ("https" if tls else "http",
                                  "[%s]" % args.host if ":" in args.host else args.host,
                                  sock.getsockname()[1])
        print("genesy-tasks %s serving %s (database %s%s)"
              % (__version__, url, args.db, ", %d workers" % workers if workers > 1 else ""))
        if generated_key is None:
            print("API key header: %s (key from GENESY_API_KEY, not shown)" % header)
        else:
            print("API key header: %s" % header)
            print("API key: %s (generated and kept in %s; set GENESY_API_KEY to use your own)"
                  % (generated_key, args.db))
        if args.record:
            print("Recording every request and its answer to %s" % args.record)
        sys.stdout.flush()
        served = True
        if server is None:
            # The workers take the key the parent settled on (and warned about).
            keys = api_keys or [generated_key]
            return _supervise(workers, lambda number: _start_worker(
                number, args, sock, tls, header, keys), args.request_timeout)
        server.serve_forever()
        _report(sys.stderr, "genesy-tasks: stopped\n")
        return 0
    finally:
        if tasks_app is not None:
            tasks_app.close()  # the recording's last lines too, then the store
        else:
            store.close()
        if new_file and not served:  # a start that failed leaves nothing behind
            _remove_database(args.db)




def _app_for(args, store, api_keys, header):
    """The application as the command line configures it, on ``store``."""
    return make_app(store, api_keys, header, max_body=args.max_body,
                    max_batch=args.max_batch, users=args.users, inspect=args.inspect,
                    record=args.record)


def _server_for(args, tasks_app, tls, sock, checkpoint_pages, name=None):
    """The built-in server as the command line configures it, on ``sock``."""
    return TaskServer(tasks_app, args.host, args.port, max_body=args.max_body,
                      request_timeout=args.request_timeout,
                      max_connections=args.max_connections, ssl_context=tls,
                      commits=CommitGroups(tasks_app.store, checkpoint_pages), sock=sock,
                      name=name)


def _supervise(count, start, request_timeout):
    """Run ``count`` workers (``start(number)`` forks one, returns its pid) until
    SIGTERM or SIGINT; replace any that exits meanwhile. Returns 0 once all
    have stopped, each after finishing its requests in flight, or 1 when no
    worker could start."""
    stopping = []
    # The handler only takes note: an exception raised from it could land in
    # fork()'s own hooks, which swallow it, and the stop would be lost.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stopping.append(signum))
    children = {}  # pid: (number, when it started)
    failures = dict.fromkeys(range(1, count + 1), 0)  # failed starts in a row
    due = {number: 0.0 for number in failures}        # workers to start, and when
    status = 0
    while not stopping:
        now = time.monotonic()
        for number, when in list(due.items()):
            if when <= now and not stopping:
                del due[number]
                children[start(number)] = (number, now)
        pid, wait_status = _reap() or (0, 0)
        if not pid:
            time.sleep(0.05)
            continue
        number, started = children.pop(pid, (None, 0))
        if number is None or stopping:
            continue
        failed = time.monotonic() - started < DEFAULT_WORKER_STARTED
        failures[number] = failures[number] + 1 if failed else 0
        if min(failures.values()) >= DEFAULT_WORKER_ATTEMPTS:
            _report(sys.stderr, "genesy-tasks: no worker could start, %d times each (see "
                                "above); stopping\n" % DEFAULT_WORKER_ATTEMPTS)
            status = 1
            break
        pause = (min(DEFAULT_WORKER_RETRY[0] * 2 ** (failures[number] - 1), DEFAULT_WORKER_RETRY[1])
                 if failed else 0.0)
        _report(sys.stderr, "genesy-tasks: worker %d (pid %d) %s; starting another%s\n"
                % (number, pid, _exit_status(wait_status),
                   " in %g s" % pause if pause else ""))
        due[number] = time.monotonic() + pause
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    # A worker drains for up to its shutdown timeout, and a request waiting
    # for a lock for up to half of it.
    deadline = time.monotonic() + 1.5 * DEFAULT_SHUTDOWN_TIMEOUT + request_timeout
    while children and time.monotonic() < deadline:
        reaped = _reap()
        if reaped is None:
            break
        pid, _ = reaped
        if pid:
            children.pop(pid, None)
        else:
            time.sleep(0.05)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _report(sys.stderr, "genesy-tasks: stopped\n")
    return status


def _reap():
    """(pid, wait status) of a worker that has ended, (0, 0) when none has, or
    None when none is running (all wait for their next try)."""
    try:
        return os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return None


def _exit_status(status):
    if os.WIFSIGNALED(status):
        return "was killed by signal %d" % os.WTERMSIG(status)
    return "exited with status %d" % os.WEXITSTATUS(status)


def _start_worker(number, args, sock, tls, header, api_keys):
    """Fork worker ``number``: its own store, app and event loop on ``sock``."""
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    # Signals wait while the child takes the parent's handlers off: one that
    # came in between would only be noted, in the parent's list, and lost.
    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        pid = os.fork()
    finally:
        if os.getpid() == parent:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    if pid:
        return pid
    status = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        tasks_app = _app_for(args, TaskStore(args.db, busy_timeout=args.busy_timeout),
                             api_keys, header)
        try:
            # One checkpointer for the file, not one per worker.
            server = _server_for(args, tasks_app, tls, sock,
                                 args.checkpoint_pages if number == 1 else 0, "w%d" % number)
            threading.Thread(target=_stop_with_parent, args=(server, parent),
                             name="genesy-tasks parent watch", daemon=True).start()
            server.serve_forever()
        finally:
            tasks_app.close()
        status = 0
    except StorageError as error:  # the database went away, say: one line
        _report(sys.stderr, "genesy-tasks: worker %d cannot start: %s\n" % (number, error))
    except BaseException:
        _report(sys.stderr, "genesy-tasks: worker %d failed:\n%s"
                % (number, traceback.format_exc()))
    finally:
        os._exit(status)


def _stop_with_parent(server, parent):
    """A worker whose parent (``parent``, its pid before the fork) is gone
    (killed) stops as after SIGTERM, rather than serve on, unsupervised, a
    port that a new start cannot take."""
    while os.getppid() == parent:
        time.sleep(1)
    server.shutdown()


def _remove_database(path):
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            os.remove(path + suffix)



###############################################################################
# Assets: the dashboard page and the OpenAPI document #########################
###############################################################################

# The dashboard at GET /: one page, no build step, nothing fetched from
# elsewhere. Task fields are untrusted, so the script only ever puts them in
# the page as text (textContent, attribute values), never as HTML, and the
# Content-Security-Policy allows this page's own script and style only.
_DASHBOARD_STYLE = """
:root { color-scheme: light dark; --line: #8884; --muted: #888; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1rem; }
header { display: flex; align-items: baseline; gap: 1rem; flex-wrap: wrap; }
h1 { font-size: 1.3rem; margin: 0 1rem 0 0; }
form { display: flex; gap: .5rem; align-items: center; flex-wrap: wrap; margin: 1rem 0; }
input, select, button { font: inherit; padding: .3rem .5rem; }
button { cursor: pointer; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; vertical-align: top; padding: .4rem;
         border-bottom: 1px solid var(--line); }
th { font-weight: 600; }
th, .ownerId, .contactId, .companyId, .dueDate, .createdAt, .completedAt { white-space: nowrap; }
tr.done .subject { text-decoration: line-through; color: var(--muted); }
.id, .description, #status, .empty { color: var(--muted); }
.id { font: 12px ui-monospace, monospace; white-space: nowrap; }
.description { white-space: pre-wrap; }
.error { color: #c53030; }
nav { display: flex; gap: .25rem; }
nav button[aria-pressed="true"] { font-weight: 600; }
#request-list { list-style: none; padding: 0; margin: 0; }
#request-list li { border-bottom: 1px solid var(--line); }
#request-list summary { cursor: pointer; padding: .35rem 0; display: flex; gap: .75rem; }
.method { font-weight: 600; min-width: 4.5em; }
.target { font-family: ui-monospace, monospace; word-break: break-all; flex: 1; }
.status-2 { color: #2f855a; } .status-3 { color: #2b6cb0; }
.status-4 { color: #c05621; } .status-5 { color: #c53030; }
.time, .duration, .note { color: var(--muted); white-space: nowrap; }
.exchange { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; padding: 0 0 .75rem; }
.exchange h3 { font-size: .9rem; margin: .5rem 0 .25rem; }
.exchange table { font: 12px ui-monospace, monospace; }
.exchange th, .exchange td { padding: .1rem .4rem; word-break: break-all; }
pre { font: 12px ui-monospace, monospace; white-space: pre-wrap; word-break: break-all;
      margin: 0; padding: .5rem; background: #8881; max-height: 30rem; overflow: auto; }
[hidden] { display: none !important; }
"""

_DASHBOARD_SCRIPT = """
"use strict";
const base = document.body.dataset.base, keyHeader = document.body.dataset.keyHeader;
const storageKey = "genesy-tasks-api-key";
const $ = (id) => document.getElementById(id);
const columns = JSON.parse(document.body.dataset.columns);  // the fields shown
const limits = JSON.parse(document.body.dataset.limits);    // the server's
let pageSize = 100, timer = null, requestsTimer = null, view = "tasks";
const opened = new Set();  // the requests shown expanded, kept so across refreshes
let seen = [];             // the requests fetched so far, newest first

class Unauthorized extends Error {}

async function call(method, path, body) {
  // The inspector leaves out the dashboard's own requests: it says who it is.
  const headers = {"Accept": "application/json", "X-Genesy-Dashboard": "1"};
  headers[keyHeader] = sessionStorage.getItem(storageKey) || "";
  const init = {method, headers, cache: "no-store", credentials: "omit"};
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(base + path, init);
  if (response.status === 401) throw new Unauthorized();
  const data = response.status === 204 ? null : await response.json();
  if (!response.ok) throw new Error(data && data.message ? data.message : response.statusText);
  return data;
}

function showLogin(message) {
  clearTimeout(timer);
  clearTimeout(requestsTimer);
  sessionStorage.removeItem(storageKey);
  $("tasks-view").hidden = true;
  $("requests-view").hidden = true;
  $("views").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("key").value = "";
  $("key").focus();
}

function failed(error, what) {
  if (error instanceof Unauthorized) {
    showLogin("The server refused that key.");
  } else {
    $("status").textContent = what + ": " + error.message;
    $("status").className = "error";
  }
}

function updated() {
  $("status").textContent = "Updated " + new Date().toLocaleTimeString();
  $("status").className = "";
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function textBlock(className, text) {
  const div = document.createElement("div");
  div.className = className;
  div.textContent = text;
  return div;
}

function render(page) {
  const body = document.createElement("tbody");
  body.id = "rows";
  const owners = new Set();
  for (const task of page.tasks) {
    const row = document.createElement("tr");
    row.dataset.taskId = task.id;
    if (task.completed) row.className = "done";
    const first = cell(row, "", "");
    first.append(textBlock("subject", task.subject), textBlock("id", task.id));
    if (task.description) first.append(textBlock("description", task.description));
    for (const name of columns) cell(row, task[name], name);
    const action = document.createElement("button");
    action.type = "button";
    action.className = "toggle";
    action.textContent = task.completed ? "Reopen" : "Complete";
    action.addEventListener("click", () => toggle(task, action));
    row.appendChild(document.createElement("td")).appendChild(action);
    body.appendChild(row);
    if (task.ownerId) owners.add(task.ownerId);
  }
  $("rows").replaceWith(body);
  $("empty").hidden = page.tasks.length > 0;
  $("more").hidden = !page.nextCursor || pageSize >= limits.page;
  const list = $("owners");
  for (const owner of owners) {
    if (![...list.options].some((option) => option.value === owner)) {
      const option = document.createElement("option");
      option.value = owner;
      list.appendChild(option);
    }
  }
}

async function refresh() {
  clearTimeout(timer);
  const query = new URLSearchParams({limit: String(pageSize)});
  const state = $("state").value;
  if (state !== "all") query.set("completed", state === "completed" ? "true" : "false");
  const owner = $("owner").value.trim();
  if (owner) query.set("ownerId", owner);
  try {
    render(await call("GET", "/tasks?" + query));
    updated();
  } catch (error) {
    failed(error, "Could not refresh");
    if (error instanceof Unauthorized) return;
  }
  if (view === "tasks") timer = setTimeout(refresh, 2000);
}

async function toggle(task, button) {
  button.disabled = true;
  try {
    await call("PATCH", "/tasks/" + encodeURIComponent(task.id), {completed: !task.completed});
  } catch (error) {
    failed(error, "Could not update the task");
  }
  if (sessionStorage.getItem(storageKey)) refresh();
}


function show(name) {
  view = name;
  clearTimeout(timer);
  clearTimeout(requestsTimer);
  $("login").hidden = true;
  $("views").hidden = false;
  $("tasks-view").hidden = name !== "tasks";
  $("requests-view").hidden = name !== "requests";
  $("show-tasks").setAttribute("aria-pressed", String(name === "tasks"));
  $("show-requests").setAttribute("aria-pressed", String(name === "requests"));
  if (name === "tasks") refresh(); else refreshRequests();
}

function pretty(text) {
  if (text === null || text === undefined || text === "") return "(empty)";
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch (error) { return text; }
}

function headerTable(headers) {
  const table = document.createElement("table");
  for (const [name, value] of Object.entries(headers || {})) {
    const row = table.insertRow();
    cell(row, name, "");
    cell(row, value, "");
  }
  return table;
}

function side(title, message, limitNote) {
  const div = document.createElement("div");
  const heading = document.createElement("h3");
  heading.textContent = title;
  const body = document.createElement("pre");
  body.textContent = pretty(message.body);
  div.append(heading, headerTable(message.headers), body);
  if (message.truncated) {
    div.append(textBlock("note", "Cut: " + limitNote + " of " + message.bytes + " bytes shown."));
  }
  return div;
}

function requestItem(entry) {
  // Request bodies come from anyone who can reach the server: text only.
  const item = document.createElement("li");
  const details = document.createElement("details");
  details.dataset.requestId = String(entry.id);
  details.open = opened.has(entry.id);
  details.addEventListener("toggle", () => {
    if (details.open) opened.add(entry.id); else opened.delete(entry.id);
  });
  const summary = document.createElement("summary");
  const status = entry.response.status;
  for (const [className, text] of [
      ["time", new Date(entry.time).toLocaleTimeString()], ["method", entry.method],
      ["target", entry.path], ["status status-" + String(status)[0], String(status)],
      ["duration", entry.durationMs.toFixed(1) + " ms"]]) {
    const span = document.createElement("span");
    span.className = className;
    span.textContent = text;
    summary.appendChild(span);
  }
  const exchange = document.createElement("div");
  exchange.className = "exchange";
  exchange.append(side("Request", entry.request, "the first " + limits.body / 1024 + " KiB"),
                  side("Answer", entry.response, "the first " + limits.answer / 1024 + " KiB"));
  details.append(summary, exchange);
  item.appendChild(details);
  return item;
}

function renderRequests() {
  const statusClass = $("status-class").value, pathPart = $("path-filter").value.trim();
  const list = document.createElement("ol");
  list.id = "request-list";
  for (const entry of seen) {
    if (statusClass !== "all" && String(entry.response.status)[0] !== statusClass) continue;
    if (pathPart && !entry.path.includes(pathPart)) continue;
    list.appendChild(requestItem(entry));
  }
  $("request-list").replaceWith(list);
  $("no-requests").hidden = seen.length > 0;
  $("no-match").hidden = !seen.length || list.children.length > 0;
}

let loadingRequests = false;

async function refreshRequests() {
  // Only what is new since the last look: the page keeps the rest.
  clearTimeout(requestsTimer);
  if (loadingRequests) return;  // one look at a time: each would add the same ones
  loadingRequests = true;
  const query = seen.length ? "?limit=" + limits.page + "&after=" + seen[0].id
                            : "?limit=" + limits.requests;
  try {
    const page = await call("GET", "/requests" + query);
    if (page.requests.length || !seen.length) {
      seen = page.requests.concat(seen).slice(0, 500);
      renderRequests();
    }
    updated();
  } catch (error) {
    failed(error, "Could not load the requests");
    // Unauthorized: the login form is back. Off (--inspect 0): nothing to wait for.
    if (error instanceof Unauthorized || error.message.includes("--inspect 0")) {
      loadingRequests = false;
      return;
    }
  }
  loadingRequests = false;
  if (view === "requests") requestsTimer = setTimeout(refreshRequests, 1000);
}

$("header-name").textContent = keyHeader;
$("show-tasks").addEventListener("click", () => show("tasks"));
$("show-requests").addEventListener("click", () => show("requests"));
$("request-filters").addEventListener("submit", (event) => {
  event.preventDefault();
  renderRequests();
});
$("status-class").addEventListener("change", renderRequests);
$("path-filter").addEventListener("input", renderRequests);
$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  sessionStorage.setItem(storageKey, $("key").value.trim());
  try {
    await call("GET", "/tasks?limit=1");
  } catch (error) {
    if (error instanceof Unauthorized) return showLogin("The server refused that key.");
    $("login-error").textContent = "Could not reach the server: " + error.message;
    return;
  }
  show("tasks");
});
$("filters").addEventListener("submit", (event) => { event.preventDefault(); refresh(); });
$("state").addEventListener("change", refresh);
$("owner").addEventListener("change", refresh);
$("forget").addEventListener("click", () => showLogin("Key forgotten."));
$("more").addEventListener("click", () => {
  pageSize = Math.min(pageSize + 100, limits.page);
  refresh();
});
if (sessionStorage.getItem(storageKey)) {
  show("tasks");
} else {
  showLogin("");
}
"""

_DASHBOARD_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>genesy-tasks</title>
<link rel="icon" href="data:,">
<style>%(style)s</style>
</head>
<body data-base="%(base)s" data-key-header="%(header)s" data-columns="%(columns)s"
      data-limits="%(limits)s">
<header><h1>genesy-tasks</h1>
  <nav id="views" hidden><button type="button" id="show-tasks" aria-pressed="true">Tasks</button>
    <button type="button" id="show-requests" aria-pressed="false">Requests</button></nav>
  <span id="status" role="status"></span></header>
<form id="login" hidden method="post" action="#">
  <label>API key (sent in the <code id="header-name"></code> header)
    <input id="key" type="password" autocomplete="off" required></label>
  <button type="submit">Open</button>
  <span id="login-error" class="error" role="alert"></span>
</form>
<main id="tasks-view" hidden>
  <form id="filters" method="post" action="#">
    <label>Show <select id="state">
      <option value="all">all tasks</option>
      <option value="open">open tasks</option>
      <option value="completed">completed tasks</option>
    </select></label>
    <label>Owner <input id="owner" list="owners" placeholder="any ownerId"></label>
    <datalist id="owners"></datalist>
    <button type="submit">Filter</button>
    <button type="button" id="forget">Forget key</button>
  </form>
  <table>
    <thead><tr><th>Subject</th>%(headers)s<th></th></tr></thead>
    <tbody id="rows"></tbody>
  </table>
  <p id="empty" class="empty" hidden>No tasks here yet. Tasks Genesy creates appear within
    a few seconds.</p>
  <p><button type="button" id="more" hidden>Show more</button></p>
</main>
<main id="requests-view" hidden>
  <form id="request-filters" method="post" action="#">
    <label>Show <select id="status-class">
      <option value="all">all answers</option>
      <option value="2">2xx</option>
      <option value="3">3xx</option>
      <option value="4">4xx</option>
      <option value="5">5xx</option>
    </select></label>
    <label>Path <input id="path-filter" placeholder="part of the path, e.g. /tasks/batch"></label>
  </form>
  <ol id="request-list"></ol>
  <p id="no-match" class="empty" hidden>No request kept matches these filters.</p>
  <p id="no-requests" class="empty" hidden>No requests yet. Every request Genesy (or anyone)
    sends appears here within a second, with its headers, its body and the answer.</p>
</main>
<script>%(script)s</script>
</body>
</html>
"""


def _csp_hash(source):
    return "'sha256-%s'" % base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()


_DASHBOARD_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src %s; style-src %s; connect-src 'self'; "
        "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        % (_csp_hash(_DASHBOARD_SCRIPT), _csp_hash(_DASHBOARD_STYLE))),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


# The dashboard's headings of the task fields it shows (others show their name).
_COLUMN_HEADERS = {"type": "Type", "ownerId": "Owner", "contactId": "Contact",
                   "companyId": "Company", "dueDate": "Due", "createdAt": "Created",
                   "completedAt": "Completed"}


def _dashboard_page(header=DEFAULT_HEADER, base_path=""):
    """The dashboard's HTML for an app reached at ``base_path`` with this key header."""
    columns = [field.name for field in sorted(_FIELDS, key=lambda field: field.shown)
               if field.shown]
    return (_DASHBOARD_PAGE % {
        "style": _DASHBOARD_STYLE, "script": _DASHBOARD_SCRIPT,
        "base": html.escape(base_path), "header": html.escape(header),
        "columns": html.escape(json.dumps(columns)),
        "headers": "".join("<th>%s</th>" % html.escape(_COLUMN_HEADERS.get(name, name))
                           for name in columns),
        "limits": html.escape(json.dumps({
            "requests": DEFAULT_INSPECT, "page": DEFAULT_MAX_LIST_LIMIT,
            "body": DEFAULT_INSPECT_BODY, "answer": DEFAULT_INSPECT_ANSWER})),
    }).encode("utf-8")


def _error_responses(*statuses):
    return {str(status): {"$ref": "#/components/responses/%d" % status}
            for status in statuses + (401, 500, 503)}


_ERROR_DESCRIPTIONS = {
    400: "Invalid request: bad JSON, a field or parameter that breaks the contract",
    401: "Missing or invalid API key",
    404: "No task with this id",
    405: "The method is not allowed here: the task id \"batch\" names the batch path; "
         "the Allow header lists the methods that are",
    410: "The change feed cursor is older than the deletions kept; start again without after",
    413: "Request body or batch too large",
    415: "Request body not declared as JSON",
    422: "Idempotency-Key reused with a different request body",
    500: "Unexpected failure; the traceback is logged, never sent",
    503: "The task database is unavailable (locked, read-only, disk full); retry",
}


def _iso8601_pattern(date_separator, time_separator):
    """A regular expression for exactly the dates and times _is_iso8601 accepts,
    in one format (extended: "-" and ":"; basic: none), leap days included."""
    # Years 0001 to 9999; leap years are those divisible by 4, but of the
    # centuries only those divisible by 400.
    year = "([0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"
    leap_year = "([0-9]{2}(0[48]|[2468][048]|[13579][26])|([13579][26]|[2468][048]|0[48])00)"
    d = date_separator
    date = ("(%(year)s%(d)s((0[1-9]|1[0-2])%(d)s(0[1-9]|1[0-9]|2[0-8])"
            "|(0[13-9]|1[0-2])%(d)s(29|30)|(0[13578]|1[02])%(d)s31)"
            "|%(leap)s%(d)s02%(d)s29)" % {"year": year, "d": d, "leap": leap_year})
    t = time_separator
    hour, minute = "([01][0-9]|2[0-3])", "[0-5][0-9]"
    offset = "[+-]%s(%s%s)?" % (hour, ":?" if t else "", minute)
    time_of_day = "[Tt]%s%s%s(%s([0-5][0-9]|60)([.,][0-9]+)?)?([Zz]|%s)?" % (
        hour, t, minute, t, offset)
    return "%s(%s)?" % (date, time_of_day)


def _value_schema(schema):
    """The OpenAPI schema of a field's value from its type in _FIELDS."""
    kind = schema.rstrip("?")
    value = {"type": "string", "format": kind} if kind == "date-time" else {"type": kind}
    if schema.endswith("?"):
        value["type"] = [value["type"], "null"]
    return value


def openapi_document(header=DEFAULT_HEADER, max_body=DEFAULT_MAX_BODY,
                     max_batch=DEFAULT_MAX_BATCH, base_path="/", users=False, inspect=True):
    """The OpenAPI 3.1 description of the routes :func:`make_app` serves
    (``users``, ``inspect``: whether it serves GET /users, GET /requests)."""
    iso8601 = "^(%s|%s)$" % (_iso8601_pattern("-", ":"), _iso8601_pattern("", ""))
    inputs = {  # what a client may send, by the field's input
        "required": {"type": "string", "pattern": _NOT_BLANK, "description": "Not blank"},
        "text": {"type": ["string", "null"]},
        "date": {"type": ["string", "null"], "pattern": iso8601,
                 "description": "ISO 8601 date or date-time, e.g. 2024-01-15T10:00:00Z"},
        "flag": {"type": "boolean"},
    }
    timestamp = _value_schema("date-time")
    new_task = {field.name: dict(inputs[field.input]) for field in _CREATE_FIELDS}
    task_changes = {field.name: dict(inputs[field.input]) for field in _UPDATE_FIELDS}
    ids = {"type": "array", "items": {"type": "string"}, "maxItems": max_batch}
    cursor = {"type": "string", "pattern": "^%s$" % _CURSOR.pattern}

    def body(schema_name, description):
        return {"required": True, "description": description, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/" + schema_name}}}}

    def json_response(description, schema, headers=None):
        response = {"description": description,
                    "content": {"application/json": {"schema": schema}}}
        if headers:
            response["headers"] = headers
        return response

    task = {"$ref": "#/components/schemas/Task"}
    tasks = {"type": "array", "items": task}
    task_id = {"name": "taskId", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": "^[^/]+$", "not": {"const": "batch"}}}
    list_parameters = [
        {"name": name, "in": "query", "required": False, "schema": schema,
         "description": description}
        for name, schema, description in [
            (name, {"type": "string"}, "Only tasks with this %s" % name) for name in _FILTERS
        ] + [
            ("completed", {"type": "boolean"}, "Only completed (true) or open (false) tasks"),
            ("dueBefore", {"type": "string", "pattern": iso8601},
             "Only tasks due before this instant (exclusive)"),
            ("dueAfter", {"type": "string", "pattern": iso8601},
             "Only tasks due at or after this instant"),
            ("order", {"type": "string", "enum": ["newest", "oldest"], "default": "newest"},
             "Creation order"),
            ("limit", {"type": "integer", "minimum": 1, "maximum": DEFAULT_MAX_LIST_LIMIT,
                       "default": DEFAULT_LIST_LIMIT}, "Tasks per page"),
            ("cursor", cursor,
             "nextCursor of the previous page, with the same other parameters"),
        ]]
    limit = {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": DEFAULT_MAX_LIST_LIMIT,
                        "default": DEFAULT_LIST_LIMIT}}
    change_paths = {"/changes": {"get": {
        "operationId": "listChanges",
        "summary": "Every task at its latest change, in commit order",
        "description": "Follow nextCursor (always present) as after to get what changed "
                       "since; deleted tasks are kept %d days." % DEFAULT_DELETIONS_KEPT_DAYS,
        "parameters": [{"name": "after", "in": "query", "required": False, "schema": cursor,
                        "description": "nextCursor of the previous call; without it, the "
                                       "oldest change kept"},
                       dict(limit, description="Changes per page")],
        "responses": {"200": json_response("One page of changes", {
            "type": "object", "required": ["changes", "nextCursor"],
            "additionalProperties": False,
            "properties": {"nextCursor": cursor, "changes": {"type": "array", "items": {
                "type": "object", "required": ["taskId", "change", "task", "at"],
                "additionalProperties": False,
                "properties": {
                    "taskId": {"type": "string"},
                    "change": {"enum": ["create", "update", "delete"]},
                    "task": {"oneOf": [task, {"type": "null"}]},
                    "at": timestamp}}}}}),
            **_error_responses(400, 410)},
    }}}
    message = {"type": "object", "required": ["headers", "body", "bytes", "truncated"],
               "properties": {"headers": {"type": "object",
                                          "additionalProperties": {"type": "string"}},
                              "body": {"type": ["string", "null"]},
                              "bytes": {"type": "integer", "minimum": 0},
                              "truncated": {"type": "boolean"}}}
    requests_path = {"get": {
        "operationId": "listRequests",
        "summary": "The requests the server answered lately, newest first (the inspector)",
        "description": "Every request but the dashboard's and the inspector's own, with its "
                       "answer; the API key's value is [redacted]. Request bodies are cut "
                       "at %d bytes, answers at %d."
                       % (DEFAULT_INSPECT_BODY, DEFAULT_INSPECT_ANSWER),
        "parameters": [dict(limit, description="Requests to return",
                            schema={"type": "integer", "minimum": 1,
                                    "maximum": DEFAULT_MAX_LIST_LIMIT}),
                       {"name": "after", "in": "query", "required": False,
                        "description": "Only the requests right after this one (the oldest of "
                       "them first to go, newest first in the answer)",
                        "schema": {"type": "integer", "minimum": 0,
                                   "maximum": 10 ** 18 - 1}}],
        "responses": {"200": json_response("The requests", {
            "type": "object", "required": ["requests"], "additionalProperties": False,
            "properties": {"requests": {"type": "array", "items": {
                "type": "object",
                "required": ["id", "time", "method", "path", "request", "response",
                             "durationMs"],
                "properties": {
                    "id": {"type": "integer"}, "time": timestamp,
                    "method": {"type": "string"}, "path": {"type": "string"},
                    "durationMs": {"type": "number"},
                    "request": message,
                    "response": {"allOf": [message, {
                        "type": "object", "required": ["status"],
                        "properties": {"status": {"type": "integer"}}}]}}}}}}),
            **_error_responses(400)},
    }}
    if inspect:
        change_paths["/requests"] = requests_path
    if users:
        change_paths["/users"] = {"get": {
            "operationId": "listUsers",
            "summary": "The users Genesy offers as task owners (their id is a task's ownerId)",
            "responses": {"200": json_response("The users", {
                "type": "array", "items": {
                    "type": "object", "required": ["id", "name"],
                    "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                                   "email": {"type": "string"}}}}),
                **_error_responses()},
        }}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Genesy Tasks API (genesy-tasks)",
            "version": __version__,
            "description": (
                "The Tasks endpoints Genesy calls on a CRM, plus listing and deleting. "
                "Every error body is {\"error\": title, \"message\": cause}. A method a "
                "path does not support is a 405 with an Allow header; an unknown path "
                "is a 404. Request bodies are limited to %d bytes and batches to %d ids."
                % (max_body, max_batch)),
        },
        "servers": [{"url": base_path}],
        "security": [{"apiKey": []}],
        "paths": {
            "/health": {"get": {
                "operationId": "health", "summary": "Health check for Genesy",
                "responses": {"200": json_response("Serving", {
                    "type": "object", "required": ["status"],
                    "properties": {"status": {"const": "ok"}}}),
                    **_error_responses()},
            }},
            "/tasks": {
                "get": {
                    "operationId": "listTasks", "summary": "List tasks, newest first",
                    "parameters": list_parameters,
                    "responses": {"200": json_response("One page of tasks", {
                        "type": "object", "required": ["tasks", "nextCursor"],
                        "additionalProperties": False,
                        "properties": {"tasks": tasks,
                                       "nextCursor": dict(cursor, type=["string", "null"])}}),
                        **_error_responses(400)},
                },
                "post": {
                    "operationId": "createTask", "summary": "Create a task",
                    "parameters": [{
                        "name": "Idempotency-Key", "in": "header", "required": False,
                        "description": "Retries with this key and the same body return the "
                                       "first response instead of creating another task "
                                       "(kept %d hours). Bare or quoted."
                                       % (DEFAULT_IDEMPOTENCY_TTL // 3600),
                        "schema": {"type": "string",
                                   "pattern": '^("[!-~]{1,255}"|(?!".*"$)[!-~]{1,255})$'}}],
                    "requestBody": body("NewTask", "The task; unknown fields are ignored"),
                    "responses": {"201": json_response("Created", task, {
                        "Location": {"description": "The task's URL",
                                     "schema": {"type": "string"}},
                        "Idempotent-Replayed": {
                            "description": "true when this is a stored earlier response",
                            "schema": {"type": "string", "enum": ["true"]}}}),
                        **_error_responses(400, 413, 415, 422)},
                },
            },
            "/tasks/batch": {
                "post": {
                    "operationId": "getTasksBatch", "summary": "Get many tasks",
                    "requestBody": body("BatchGet", "The ids to fetch"),
                    "responses": {"200": json_response(
                        "The tasks found, in request order, each once; unknown ids omitted",
                        tasks), **_error_responses(400, 413, 415)},
                },
                "patch": {
                    "operationId": "completeTasksBatch",
                    "summary": "Complete (or reopen) many tasks in one transaction",
                    "requestBody": body("BatchComplete", "The ids and the completed state"),
                    "responses": {"200": json_response(
                        "The tasks found, updated, in request order; unknown ids omitted",
                        tasks), **_error_responses(400, 413, 415)},
                },
            },
            "/tasks/{taskId}": {
                "parameters": [task_id],
                "get": {
                    "operationId": "getTask", "summary": "Get a task",
                    "responses": {"200": json_response("The task", task),
                                  **_error_responses(404, 405)},
                },
                "patch": {
                    "operationId": "updateTask",
                    "summary": "Update a task: complete, reopen, or change fields",
                    "requestBody": body("TaskChanges", "The fields to change"),
                    "responses": {"200": json_response("The updated task", task),
                                  **_error_responses(400, 404, 413, 415)},
                },
                "delete": {
                    "operationId": "deleteTask", "summary": "Delete a task",
                    "responses": {"204": {"description": "Deleted"},
                                  **_error_responses(404, 405)},
                },
            },
            **change_paths,
            "/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This document", "security": [],
                "responses": {"200": json_response("OpenAPI 3.1", {"type": "object"})},
            }},
            "/": {"get": {
                "operationId": "dashboard", "security": [],
                "summary": "A page to watch and complete tasks; it asks for the key",
                "responses": {"200": {"description": "The dashboard",
                                      "content": {"text/html": {"schema": {"type": "string"}}}}},
            }},
        },
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": header}},
            "schemas": {
                "Task": {
                    "type": "object", "required": list(TASK_FIELDS),
                    "additionalProperties": False,
                    "properties": {field.name: _value_schema(field.schema)
                                   for field in _FIELDS},
                },
                "NewTask": {
                    "type": "object",
                    "required": [field.name for field in _CREATE_FIELDS
                                 if field.input == "required"],
                    "properties": new_task,
                },
                "TaskChanges": {
                    "type": "object",
                    "description": "At least one known field; completed true keeps the "
                                   "first completedAt, false reopens",
                    "properties": task_changes,
                    "anyOf": [{"required": [name]} for name in task_changes],
                },
                "BatchGet": {
                    "type": "object", "required": ["ids"], "properties": {"ids": ids},
                },
                "BatchComplete": {
                    "type": "object", "required": ["ids", "completed"],
                    "properties": {"ids": ids, "completed": {"type": "boolean"}},
                },
                "Error": {
                    "type": "object", "required": ["error", "message"],
                    "additionalProperties": False,
                    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
                },
            },
            "responses": {
                str(status): json_response(description, {"$ref": "#/components/schemas/Error"},
                                           {"Retry-After": {"schema": {"type": "string"}}}
                                           if status == 503 else None)
                for status, description in _ERROR_DESCRIPTIONS.items()},
        },
    }


if __name__ == "__main__":
    sys.exit(main())
