"""Tests for genesy_tasks: WebTest against make_app, TaskStore directly, and the
real server as a process. Each test gets a fresh database in tmp_path."""

import ast
import asyncio
import contextlib
import functools
import glob
import http.client
import importlib.util
import inspect
import io
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import wsgiref.simple_server
from urllib.parse import quote, urlencode

import bottle
import pytest
import webtest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

import genesy_tasks
from genesy_tasks import TaskStore, TaskValidationError, make_app

# The servers the tests start compile the module once, not once each: a
# machine that sets PYTHONDONTWRITEBYTECODE would pay for each start.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

KEY = "test-key-0123456789"
HEADERS = {"X-API-Key": KEY}
HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.join(HERE, "genesy_tasks.py")
TASK_KEYS = set(genesy_tasks.TASK_FIELDS)  # the field table's; pinned by the test below
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
FULL_TASK = {
    "subject": "Follow up with John",
    "description": "Discuss pricing proposal from last meeting",
    "type": "call",
    "ownerId": "user-123",
    "dueDate": "2024-01-15T10:00:00Z",
    "contactId": "contact-456",
    "companyId": "company-789",
}


# -- fixtures and shared helpers -----------------------------------------------
# What a test opens (a store, an app, a server, a process) is closed or stopped
# by a fixture at its end, pass or fail: one ExitStack, last opened first.

@pytest.fixture
def cleanup():
    """The test's ExitStack: what is pushed on it is undone at the test's end, last first."""
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.fixture
def closing(cleanup):
    """``closing(thing)`` is ``thing`` (a store, an app), closed at the test's end. A test
    may close it earlier itself: close() may be called again."""
    return lambda thing: cleanup.enter_context(contextlib.closing(thing))


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "tasks.db")


@pytest.fixture
def tasks_app(db_path, closing):
    return closing(make_app(db_path, api_keys=KEY))


@pytest.fixture
def api(tasks_app):
    return webtest.TestApp(tasks_app)


@pytest.fixture
def store(tasks_app):
    return tasks_app.store


@pytest.fixture
def lazy_app(cleanup):
    """A new app of the module-level app's kind (genesy_tasks.app): built from the
    environment on its first request, and closed at the test's end if it was built."""
    lazy = genesy_tasks._LazyApp()
    cleanup.callback(lambda: lazy._app is not None and lazy._app.close())
    return lazy


@pytest.fixture
def serve(cleanup):
    """``serve(app, **options)``: a TaskServer serving ``app`` on a free port from a
    thread of this process, so that tests can look inside; the API's app commits in
    groups, as main serves it. ``serve(app, via=make)`` serves it with ``make(app)``
    instead, a socketserver (wsgiref's, werkzeug's). ``server.stop()`` stops the
    server and waits for its thread; the test's end does, if the test did not."""
    def start(app, via=None, **options):
        if via is None:
            if hasattr(app, "store"):
                options.setdefault("commits", genesy_tasks.CommitGroups(app.store))
            options.setdefault("log", io.StringIO())
            server = genesy_tasks.TaskServer(app, "127.0.0.1", 0, **options)
            run = server.serve_forever
        else:
            server = via(app, **options)
            # A short poll: a socketserver's shutdown() waits for one.
            run = functools.partial(server.serve_forever, poll_interval=0.05)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        stopped = []

        def stop():
            if stopped:
                return
            stopped.append(True)
            if thread.is_alive():
                with contextlib.suppress(RuntimeError):  # its loop closed: it stopped itself
                    server.shutdown()
            thread.join(timeout=15)
            assert not thread.is_alive(), "the server's thread did not stop in 15 s"
            if via is not None:
                server.server_close()

        server.stop = stop
        cleanup.callback(stop)
        return server
    return start


@pytest.fixture
def start_process(tmp_path, cleanup):
    """``start_process(*args, env=..., db=...)``: ``python genesy_tasks.py --port 0 ARGS``
    as a process (a Server, below), stopped at the test's end if the test did not stop it."""
    def start(*args, **options):
        running = Server(tmp_path, *args, **options)
        cleanup.callback(running.close)
        return running
    return start


@pytest.fixture
def spawn(cleanup):
    """``spawn(argv, **popen_options)``: a subprocess.Popen that is ended (SIGTERM, then
    SIGKILL) and reaped at the test's end, if the test did not end it."""
    def start(argv, **options):
        process = subprocess.Popen(argv, **options)
        cleanup.callback(_end_process, process)
        return process
    return start


def _end_process(process, timeout=15):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def _wait_for(check, timeout=10.0, step=0.01, ignoring=(), what=None):
    """Poll ``check`` every ``step`` seconds until it returns something true, and return
    that; fail the test after ``timeout`` seconds, saying what was awaited (``what``, or
    a function that tells it; by default the source of ``check``). Exceptions of the
    ``ignoring`` types count as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except ignoring:
            result = None
        if result:
            return result
        if time.monotonic() >= deadline:
            if callable(what):
                what = what()
            if what is None:
                try:
                    what = inspect.getsource(check).strip()
                except (OSError, TypeError):
                    what = repr(check)
            pytest.fail("timed out after %g s waiting for: %s" % (timeout, what))
        time.sleep(step)


def _read_by_the_server(sock):
    """Whether every byte sent on ``sock`` has been read by the process at its other
    end, on this machine: none waits in this end's send queue, nor in the other
    end's receive queue (/proc/net/tcp)."""
    def address(host, port):
        return "%s:%04X" % (socket.inet_aton(host)[::-1].hex().upper(), port)

    here, there = address(*sock.getsockname()), address(*sock.getpeername())
    queues = {}
    with open("/proc/net/tcp") as table:
        for line in table.read().splitlines()[1:]:
            fields = line.split()
            tx_queue, rx_queue = (int(size, 16) for size in fields[4].split(":"))
            queues[fields[1], fields[2]] = tx_queue, rx_queue
    unsent, unread = queues.get((here, there), (1, 1))[0], queues.get((there, here), (1, 1))[1]
    return unsent == 0 and unread == 0


def _wait_while_alive(condition, threads, timeout=30):
    """Wait for ``condition`` while any of ``threads`` is alive to bring it about."""
    def source():
        return inspect.getsource(condition).strip()

    _wait_for(lambda: condition() or not any(thread.is_alive() for thread in threads),
              timeout, what=source)
    if not condition():
        pytest.fail("the threads ended before this came about: %s" % source())


def _clock_passes(instant):
    """Wait until the clock tasks' times are taken from is past ``instant`` (an
    ISO_UTC text), so that a time taken now differs from it."""
    def now():
        seconds, ms = divmod(int(time.time() * 1000), 1000)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%03dZ" % ms

    _wait_for(lambda: now() > instant, what="the clock to pass %s" % instant)


def create(api, **fields):
    body = {"subject": "A task", **fields}
    return api.post_json("/tasks", body, headers=HEADERS, status=201).json


def assert_error(response, status, title=None, mentions=()):
    assert response.status_int == status
    assert response.content_type == "application/json"
    body = response.json
    assert set(body) == {"error", "message"}
    assert body["error"] and body["message"]
    if title is not None:
        assert body["error"] == title
    for word in mentions:
        assert word in body["message"], body["message"]
    return body


class Server:
    """``python genesy_tasks.py`` as a process, on a free port. Tests start one with the
    start_process fixture, which stops it at their end."""

    def __init__(self, tmp_path, *args, env=None, db=None):
        self.db = db or str(tmp_path / "server.db")
        environment = {k: v for k, v in os.environ.items() if not k.startswith("GENESY_")}
        environment.update(env if env is not None else {"GENESY_API_KEY": KEY})
        self.stderr_path = tmp_path / ("stderr-%d.log" % time.monotonic_ns())
        self.stderr = open(self.stderr_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, MODULE, "--port", "0", "--db", self.db, *args],
            stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=environment,
            cwd=str(tmp_path))
        try:
            self.banner = [self.process.stdout.readline()]
            match = re.search(r"serving https?://([\d.]+):(\d+)", self.banner[0])
            assert match, self.banner
            self.host, self.port = match.group(1), int(match.group(2))
            self.banner.append(self.process.stdout.readline())
            if not environment.get("GENESY_API_KEY", "").strip():
                self.banner.append(self.process.stdout.readline())
        except BaseException:
            self.close()
            raise

    def connect(self, timeout=5):
        if self.banner[0].split()[3].startswith("https:"):
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                               context=self.tls_client)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    tls_client = None  # an ssl.SSLContext that trusts the server's certificate

    def status(self):
        """The server process's resident memory (kB), threads and open descriptors."""
        fields = dict(line.split(":", 1) for line in
                      open("/proc/%d/status" % self.process.pid).read().splitlines())
        return (int(fields["VmRSS"].split()[0]), int(fields["Threads"]),
                len(os.listdir("/proc/%d/fd" % self.process.pid)))

    def request(self, method, path, body=None, headers=HEADERS, conn=None):
        conn = conn or self.connect()
        data = json.dumps(body).encode() if body is not None else None
        all_headers = dict(headers)
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=all_headers)
        response = conn.getresponse()
        answer = response.read()
        return (response.status, dict(response.getheaders()),
                json.loads(answer) if answer else None)

    def raw(self, data, read_timeout=5):
        with socket.create_connection((self.host, self.port), timeout=read_timeout) as sock:
            sock.sendall(data)
            return _read_all(sock)

    def stop(self, signum=signal.SIGTERM):
        if self.process.poll() is None:
            self.process.send_signal(signum)
        code = self.process.wait(timeout=15)
        self.stderr.close()
        return code

    def close(self):
        """Stop it if it still runs, whatever its exit status: a test's cleanup."""
        _end_process(self.process)
        self.stderr.close()

    def log(self):
        if not self.stderr.closed:
            self.stderr.flush()
        return self.stderr_path.read_text()


def _read_all(sock, timeout=60):
    """What ``sock`` receives until the other end closes it, resets it or is silent for
    the socket's timeout; for ``timeout`` seconds at most."""
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def server(start_process):
    return start_process()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server for the many cases of tests that only send a request and read
    the answer: a process for each case would cost more than all of them."""
    with contextlib.closing(Server(tmp_path_factory.mktemp("shared"))) as running:
        yield running


def _request_bytes(method, path, body=None, headers=None):
    head = "%s %s HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\n" % (method, path, KEY)
    for name, value in (headers or {}).items():
        head += "%s: %s\r\n" % (name, value)
    data = b"" if body is None else json.dumps(body).encode()
    if body is not None:
        head += "Content-Type: application/json\r\nContent-Length: %d\r\n" % len(data)
    return head.encode() + b"\r\n" + data


def _pipelined(port, *requests):
    """Send ``requests`` in one write, the last asking to close; the responses, in
    order, as (status, headers, body) with JSON bodies decoded."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"".join(requests))
        reply = _read_all(sock)
    responses = []
    while reply:  # each turn takes a response off reply
        head, _, rest = reply.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        length = int(headers.get("Content-Length", 0))
        body, reply = rest[:length], rest[length:]
        responses.append((int(lines[0].split()[1]), headers,
                          json.loads(body) if body else None))
    return responses


def _answers(reply):
    """The responses in ``reply``, as (status, headers, body), interim 100s left out."""
    answers = []
    while reply:  # each turn takes a response off reply
        head, separator, rest = reply.partition(b"\r\n\r\n")
        assert separator, reply
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        headers.pop("Date", None)
        status = int(lines[0].split()[1])
        length = int(headers.get("Content-Length", 0))
        body, reply = rest[:length], rest[length:]
        if status != 100:
            answers.append((status, headers, body))
    return answers


def _health(extra=b"", version=b"HTTP/1.1"):
    return b"GET /health " + version + b"\r\nHost: x\r\nX-API-Key: " + KEY.encode() + \
        b"\r\n" + extra + b"\r\n"


def _read_all_until(sock, marker, timeout=60):
    data, deadline = b"", time.monotonic() + timeout
    while marker not in data and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _on_server_thread(server, function):
    """Run ``function`` on the server's thread, between two turns of its loop; wait for it."""
    async def call():
        return function()
    return asyncio.run_coroutine_threadsafe(call(), server._loop).result(timeout=10)


def _accepted(server, sock):
    """Whether the server (in this process) has taken ``sock``'s connection in."""
    return _on_server_thread(server, lambda: any(
        conn.transport.get_extra_info("peername") == sock.getsockname()
        for conn in server._connections))


def _subjects(store):
    return sorted(task["subject"] for task in store.list(limit=500)["tasks"])


_LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


@contextlib.contextmanager
def _locked_by_another_process(db):
    """Another process holds ``db``'s write lock until the block ends, or until
    ``release()`` is called on what it yields."""
    locker = subprocess.Popen([sys.executable, "-c", _LOCKER, db], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def release():
        if locker.poll() is None:
            locker.communicate("\n", timeout=10)

    try:
        assert locker.stdout.readline() == "locked\n"
        yield release
    finally:
        release()


def _refused_at_start(*args):
    """Start ``python genesy_tasks.py --port 0 ARGS``; it must exit 2 with one stderr line."""
    result = subprocess.run([sys.executable, MODULE, "--port", "0", *args],
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, "GENESY_API_KEY": KEY})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genesy-tasks: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def _check(url, *args):
    """Run ``genesy-tasks check`` in this process: (exit status, output lines)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = genesy_tasks.main(["check", url, *args])
    return status, out.getvalue().splitlines()


# Bounded so the whole suite stays fast; derandomized so it is deterministic.
# (Run with FUZZ_EXAMPLES=2000 for a longer hunt.)
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)), deadline=None,
                derandomize=True, database=None, suppress_health_check=list(HealthCheck))


###############################################################################
# Tasks: fields, validation, ids and timestamps ###############################
###############################################################################

# -- fields and times ----------------------------------------------------------

def test_a_task_has_genesys_fields_in_genesys_order():
    # The contract's task shape, which the field table must keep.
    assert genesy_tasks.TASK_FIELDS == (
        "id", "subject", "description", "type", "ownerId", "dueDate", "contactId",
        "companyId", "completed", "completedAt", "createdAt", "updatedAt")


def _module_with_a_new_field(tmp_path):
    """genesy_tasks with one field more, added as docs/how-it-works.md says:
    a row in _FIELDS, SCHEMA_VERSION + 1 and its migration."""
    with open(MODULE, encoding="utf-8") as file:
        source = file.read()
    last = '    _Field("updatedAt",   "updated_at",   None,       None,      "date-time",  0),\n'
    edits = [
        (last, last + '    _Field("priority", "priority", "text", "indexed", "string?", 8),\n'),
        ("\nSCHEMA_VERSION = 4\n", "\nSCHEMA_VERSION = 5\n"),
        ("\n_MIGRATIONS = {\n", '\n_MIGRATIONS = {\n    5: _field_added("priority"),\n'),
    ]
    for old, new in edits:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    path = tmp_path / "genesy_tasks_with_priority.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("genesy_tasks_with_priority", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_field_added_to_the_field_table_flows_everywhere(tmp_path, closing):
    db = str(tmp_path / "crm.db")
    with TaskStore(db) as store:  # schema 4, as this release leaves it
        old = store.create({"subject": "Made before the new field"})
    module = _module_with_a_new_field(tmp_path)
    assert module.TASK_FIELDS[-1] == "priority"
    api = webtest.TestApp(closing(module.make_app(db, api_keys=[KEY])))
    # The upgrade: existing tasks have no priority, and it can be set.
    assert api.get("/tasks/" + old["id"], headers=HEADERS).json["priority"] is None
    changed = api.patch_json("/tasks/" + old["id"], {"priority": "high"}, headers=HEADERS)
    assert changed.json["priority"] == "high"
    refused = api.patch_json("/tasks/" + old["id"], {"priority": 5}, headers=HEADERS, status=400)
    assert refused.json == {"error": "Invalid request",
                            "message": "priority must be a string or null"}
    # Created, returned in its place, filtered on, in the change feed.
    created = api.post_json("/tasks", {"subject": "New", "priority": "low"},
                            headers=HEADERS, status=201).json
    assert list(created) == list(module.TASK_FIELDS) and created["priority"] == "low"
    listed = api.get("/tasks?priority=high", headers=HEADERS).json["tasks"]
    assert [task["id"] for task in listed] == [old["id"]]
    feed = api.get("/changes", headers=HEADERS).json["changes"]
    assert [change["task"]["priority"] for change in feed] == ["high", "low"]
    # The OpenAPI document and the dashboard know it.
    document = api.get("/openapi.json").json
    schemas = document["components"]["schemas"]
    assert schemas["Task"]["properties"]["priority"] == {"type": ["string", "null"]}
    assert schemas["NewTask"]["properties"]["priority"] == {"type": ["string", "null"]}
    assert {"required": ["priority"]} in schemas["TaskChanges"]["anyOf"]
    assert "priority" in [parameter["name"]
                          for parameter in document["paths"]["/tasks"]["get"]["parameters"]]
    page = api.get("/").text  # the dashboard's last column, with its heading
    assert "&quot;completedAt&quot;, &quot;priority&quot;]" in page
    assert "<th>Completed</th><th>priority</th><th></th>" in page
    # Its index, and the change feed's triggers watch its column: a CRM's own
    # UPDATE of it is a change.
    conn = closing(sqlite3.connect(db))
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'index' "
                        "AND name = 'genesy_tasks_priority'").fetchone()[0] == 1
    with conn:
        conn.execute("UPDATE genesy_tasks SET priority = 'urgent' WHERE id = ?", (old["id"],))
    assert conn.execute("SELECT task_id, change FROM genesy_changes "
                        "ORDER BY seq DESC LIMIT 1").fetchone() == (old["id"], "update")


def test_the_public_names_are_the_documented_api():
    with open(MODULE, encoding="utf-8") as file:
        tree = ast.parse(file.read())
    defined = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined.update(target.id for target in node.targets if isinstance(target, ast.Name))
    assert {name for name in defined if not name.startswith("_")} == set(genesy_tasks.__all__)
    documentation = ""
    for path in [os.path.join(HERE, "README.md")] + glob.glob(os.path.join(HERE, "docs", "*.md")):
        with open(path, encoding="utf-8") as file:
            documentation += file.read()
    assert [name for name in genesy_tasks.__all__ if name not in documentation] == []


def test_utc_instant_normalises_every_iso8601_spelling():
    assert genesy_tasks._utc_instant("2024-01-15") == "2024-01-15T00:00:00.000Z"
    assert genesy_tasks._utc_instant("2024-01-15T11:00:00+01:00") == "2024-01-15T10:00:00.000Z"
    assert genesy_tasks._utc_instant("20240115T1000Z") == "2024-01-15T10:00:00.000Z"
    assert genesy_tasks._utc_instant("2024-01-15T10:00:00.1239-0530") == "2024-01-15T15:30:00.123Z"
    assert genesy_tasks._utc_instant("2016-12-31T23:59:60Z") == "2016-12-31T23:59:59.000Z"
    assert genesy_tasks._utc_instant("0999-01-01") == "0999-01-01T00:00:00.000Z"
    with pytest.raises(TaskValidationError):
        genesy_tasks._utc_instant("2023-02-29")


###############################################################################
# Storage #####################################################################
###############################################################################

# -- the store -----------------------------------------------------------------

def test_an_sqlite_older_than_the_minimum_gets_one_line_at_start(tmp_path):
    db = tmp_path / "tasks.db"
    # The server's own start, in a process whose sqlite3 reports an old SQLite.
    start = ("import runpy, sqlite3, sys; sqlite3.sqlite_version_info = (3, 20, 0); "
             "sqlite3.sqlite_version = '3.20.0'; sys.argv = sys.argv[1:]; "
             "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", start, MODULE, "--port", "0", "--db", str(db)],
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, "GENESY_API_KEY": KEY})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "genesy-tasks: SQLite %s or newer is needed, with its JSON functions; "
        "this Python's SQLite is 3.20.0" % ".".join(map(str, genesy_tasks.MIN_SQLITE))]
    assert not db.exists()


def test_the_sqlite_here_is_one_the_module_runs_on():
    assert sqlite3.sqlite_version_info >= genesy_tasks.MIN_SQLITE


def test_store_api_returns_plain_dicts_in_the_json_shape(db_path):
    with TaskStore(db_path) as store:
        task = store.create({"subject": "Call", "ownerId": "u1", "id": "ignored"})
        assert set(task) == TASK_KEYS and task["ownerId"] == "u1"
        assert store.get(task["id"]) == task
        assert store.get("task-missing") is None and store.get(None) is None
        done = store.update(task["id"], {"completed": True})
        assert done["completed"] is True
        assert store.update("task-missing", {"completed": True}) is None
        assert store.get_many([task["id"], "nope"]) == [done]
        assert store.set_completed_many([task["id"]], False)[0]["completed"] is False
        with pytest.raises(TaskValidationError):
            store.create({"subject": ""})
        with pytest.raises(TaskValidationError):
            store.update(task["id"], {"nothing": 1})
        with pytest.raises(TaskValidationError):
            store.get_many("task-1")
        with pytest.raises(TaskValidationError):
            store.set_completed_many([task["id"]], "yes")
        assert json.loads(json.dumps(store.get(task["id"]))) == store.get(task["id"])


@pytest.mark.parametrize("text", [
    'quote " backslash \\ slash / apostrophe \'', "tab\t newline\n return\r",
    "\x00nul \x01 \x1f \x7f controls", "ünïcödé ✓ 😀 \u2028 \u2029 \ufeff",
    "<script>alert(1)</script> &amp;", "  padded  ", "x" * 10000,
])
def test_sqlite_made_json_is_exactly_the_task_as_written(store, text):
    # Reads send the JSON SQLite makes (_TASK_JSON); the dicts are decoded from
    # it. Both must be the task as written, and as Python would encode it.
    fields = dict(FULL_TASK, subject=text, description=text, ownerId=text, type=None)
    task = store.create(fields)
    done = store.set_completed_many([task["id"]], True)[0]
    assert {**done, "completed": False, "completedAt": None,
            "updatedAt": task["updatedAt"]} == task
    assert done["completed"] is True and done["subject"] == text
    conn = store._connection()
    row = conn.execute("SELECT %s FROM genesy_tasks" % genesy_tasks._COLUMNS).fetchone()
    assert genesy_tasks._task(row) == done
    page = store.list_json(owner_id=text)
    assert json.loads(page) == {"tasks": [done], "nextCursor": None}
    for sent in (store.get_json(task["id"]), store.get_many_json([task["id"]])[1:-1],
                 store.set_completed_many_json([task["id"]], True)[1:-1]):
        assert json.loads(sent) == done
        assert list(json.loads(sent)) == list(genesy_tasks.TASK_FIELDS)
        assert sent == genesy_tasks._json_bytes(done)


def test_create_many_is_all_or_nothing(db_path):
    with TaskStore(db_path) as store:
        ids = store.create_many([{"subject": "one"}, {"subject": "two", "type": "call"}])
        assert [t["subject"] for t in store.get_many(ids)] == ["one", "two"]
        with pytest.raises(TaskValidationError, match="subject"):
            store.create_many([{"subject": "three"}, {"subject": ""}])
        assert store.count() == 2


def test_tasks_persist_across_reopening(db_path, closing):
    first = webtest.TestApp(closing(make_app(db_path, api_keys=KEY)))
    task = first.post_json("/tasks", FULL_TASK, headers=HEADERS).json
    first.app.close()
    second = closing(make_app(db_path, api_keys=KEY))
    assert webtest.TestApp(second).get("/tasks/" + task["id"], headers=HEADERS).json == task


def test_the_store_uses_wal_and_namespaced_tables_beside_a_crms_own(db_path):
    crm = sqlite3.connect(db_path)
    crm.execute("CREATE TABLE tasks (id INTEGER PRIMARY KEY, title TEXT)")
    crm.execute("INSERT INTO tasks (title) VALUES ('the CRM''s own task')")
    crm.commit()
    with TaskStore(db_path) as store:
        store.create({"subject": "Genesy's task"})
    tables = {row[0] for row in crm.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    # sqlite_sequence is SQLite's own, made for any AUTOINCREMENT table.
    assert tables == {"tasks", "genesy_tasks", "genesy_meta", "genesy_idempotency",
                      "genesy_changes", "sqlite_sequence"}
    assert crm.execute("SELECT title FROM tasks").fetchall() == [("the CRM's own task",)]
    assert crm.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert crm.execute("SELECT value FROM genesy_meta WHERE key = 'schema_version'"
                       ).fetchone()[0] == str(genesy_tasks.SCHEMA_VERSION)
    indexed = {row[0] for row in crm.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'genesy_tasks'")}
    assert {"genesy_tasks_owner", "genesy_tasks_contact", "genesy_tasks_company"} <= indexed
    plan = " ".join(str(row) for row in crm.execute(
        "EXPLAIN QUERY PLAN " + genesy_tasks._SELECT_MANY, ('["a"]',)))
    assert "USING INDEX" in plan and "SCAN genesy_tasks" not in plan
    crm.close()


def test_a_new_database_file_is_private_to_its_owner(db_path):
    TaskStore(db_path).close()
    assert os.stat(db_path).st_mode & 0o777 == 0o600


def test_concurrent_writers_lose_nothing_and_never_see_locked(db_path, tasks_app):
    client = webtest.TestApp(tasks_app)
    other_process_like = [TaskStore(db_path) for _ in range(2)]
    errors = []
    per_thread = 40

    def through_http(n):
        try:
            for i in range(per_thread):
                client.post_json("/tasks", {"subject": "http %d-%d" % (n, i)},
                                 headers=HEADERS, status=201)
        except Exception as error:  # collected, then asserted below
            errors.append(error)

    def through_store(store, n):
        try:
            for i in range(per_thread):
                task = store.create({"subject": "store %d-%d" % (n, i)})
                store.update(task["id"], {"completed": True})
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=through_http, args=(n,)) for n in range(4)]
    threads += [threading.Thread(target=through_store, args=(other_process_like[n % 2], n))
                for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert tasks_app.store.count() == 8 * per_thread
    for store in other_process_like:
        store.close()


def test_store_list_and_delete(store):
    ids = store.create_many([{"subject": "one", "ownerId": "u"}, {"subject": "two"}])
    page = store.list(owner_id="u")
    assert [task["id"] for task in page["tasks"]] == ids[:1] and page["nextCursor"] is None
    first = store.list(limit=1)
    assert [task["id"] for task in first["tasks"]] == ids[1:]
    second = store.list(limit=1, cursor=first["nextCursor"])
    assert [task["id"] for task in second["tasks"]] == ids[:1]
    assert store.delete(ids[0]) is True and store.delete(ids[0]) is False
    assert store.count() == 1
    for bad in ({"limit": 0}, {"limit": True}, {"completed": "yes"}, {"order": "due"},
                {"due_before": "soon"}, {"owner_id": 7}):
        with pytest.raises(TaskValidationError):
            store.list(**bad)


def test_connections_of_finished_threads_are_reused_then_closed(store):
    def read():
        store.count()

    for _ in range(50):
        thread = threading.Thread(target=read)
        thread.start()
        thread.join()
    # One connection follows the threads from one to the next.
    assert len(store._owners) + len(store._idle) <= 2
    barrier = threading.Barrier(20)
    threads = [threading.Thread(target=lambda: (barrier.wait(10), read())) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Twenty at once needed twenty; the next thread to want one closes all
    # but a few, kept for the threads to come.
    thread = threading.Thread(target=read)
    thread.start()
    thread.join()
    assert len(store._owners) + len(store._idle) <= genesy_tasks.DEFAULT_IDLE_CONNECTIONS + 1


def test_the_event_loops_new_connections_never_wait_for_a_lock(db_path, closing):
    store = closing(TaskStore(db_path))
    store.never_wait_on_this_thread()
    store._discard_connection()  # as after an error: the next call opens a new one
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("PRAGMA locking_mode = EXCLUSIVE")
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE crm_x (a)")
    other.execute("COMMIT")  # the exclusive lock is kept
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.count()
    assert time.monotonic() - started < 1  # not the 5-second busy timeout
    other.close()


# -- schema upgrades -----------------------------------------------------------

_SCHEMA_V1 = """
CREATE TABLE genesy_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO genesy_meta VALUES ('schema_version', '1');
CREATE TABLE genesy_tasks (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, subject TEXT NOT NULL,
    description TEXT, type TEXT, owner_id TEXT, due_date TEXT, contact_id TEXT,
    company_id TEXT, completed_at TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
INSERT INTO genesy_tasks (id, subject, due_date, created_at, updated_at) VALUES
    ('task-old', 'from release 1', '2024-01-15T11:00:00+01:00', '2024-01-01T00:00:00.000Z',
     '2024-01-01T00:00:00.000Z');
"""


def test_a_release_1_database_is_upgraded_in_place(db_path):
    conn = sqlite3.connect(db_path)
    conn.executescript(_SCHEMA_V1)
    conn.close()
    with TaskStore(db_path) as store:
        assert store.get("task-old")["subject"] == "from release 1"
        page = store.list(due_after="2024-01-15T10:00:00Z", due_before="2024-01-15T10:00:01Z")
        assert [task["id"] for task in page["tasks"]] == ["task-old"]
        assert store.create_idempotent({"subject": "new"}, "key-1")[1] is False
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT value FROM genesy_meta WHERE key = 'schema_version'"
                        ).fetchone()[0] == str(genesy_tasks.SCHEMA_VERSION)
    conn.close()


_SCHEMA_V2 = """
CREATE TABLE genesy_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO genesy_meta VALUES ('schema_version', '2');
CREATE TABLE genesy_tasks (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, subject TEXT NOT NULL,
    description TEXT, type TEXT, owner_id TEXT, due_date TEXT, contact_id TEXT,
    company_id TEXT, completed_at TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    due_utc TEXT);
CREATE INDEX genesy_tasks_owner ON genesy_tasks (owner_id);
CREATE INDEX genesy_tasks_contact ON genesy_tasks (contact_id);
CREATE INDEX genesy_tasks_company ON genesy_tasks (company_id);
CREATE TABLE genesy_idempotency (key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL,
    task TEXT NOT NULL, created_ms INTEGER NOT NULL);
CREATE INDEX genesy_idempotency_created ON genesy_idempotency (created_ms);
INSERT INTO genesy_tasks (seq, id, subject, created_at, updated_at) VALUES
    (1, 'task-a', 'A', '2024-01-01T00:00:00.000Z', '2024-01-01T00:00:00.000Z'),
    (2, 'task-b', 'B', '2024-01-01T00:00:00.000Z', '2024-01-01T00:00:00.000Z'),
    (3, 'task-c', 'C', '2024-01-01T00:00:00.000Z', '2024-01-01T00:00:00.000Z');
-- A CRM's own objects on the table survive the upgrade.
CREATE TABLE crm_log (task_id TEXT);
CREATE TRIGGER crm_on_delete AFTER DELETE ON genesy_tasks
    BEGIN INSERT INTO crm_log VALUES (old.id); END;
CREATE INDEX crm_by_type ON genesy_tasks (type);
CREATE VIEW crm_open_tasks AS SELECT id FROM genesy_tasks WHERE completed_at IS NULL;
ALTER TABLE genesy_tasks ADD COLUMN crm_deal_id TEXT DEFAULT 'none';
UPDATE genesy_tasks SET crm_deal_id = 'deal-' || id WHERE id = 'task-a';
CREATE INDEX crm_by_deal ON genesy_tasks (crm_deal_id);
"""


def _cursor_skip_reproduction(store, first, deleted):
    """List from ``first`` in creation order, delete ``deleted``, create D: D must be listed."""
    page = store.list(order="oldest", limit=1, cursor=first)
    cursor = page["nextCursor"]
    for task_id in deleted:
        assert store.delete(task_id)
    created = store.create({"subject": "D"})
    assert [task["id"] for task in store.list(order="oldest", cursor=cursor)["tasks"]] == [
        created["id"]]


def test_a_cursor_never_skips_a_task_created_after_deletions(store):
    a, b, c = (store.create({"subject": name})["id"] for name in "ABC")
    first = store.list(order="oldest", limit=1)["nextCursor"]  # the position of A
    assert store.list(order="oldest", limit=1, cursor=first)["tasks"][0]["id"] == b
    _cursor_skip_reproduction(store, first, [b, c])


def test_a_release_2_database_is_upgraded_and_its_cursors_never_skip(db_path):
    conn = sqlite3.connect(db_path)
    conn.executescript(_SCHEMA_V2)
    conn.close()
    with TaskStore(db_path) as store:
        assert [task["id"] for task in store.list(order="oldest")["tasks"]] == [
            "task-a", "task-b", "task-c"]
        _cursor_skip_reproduction(store, "1", ["task-b", "task-c"])
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT value FROM genesy_meta WHERE key = 'schema_version'"
                        ).fetchone()[0] == str(genesy_tasks.SCHEMA_VERSION)
    assert "AUTOINCREMENT" in conn.execute(
        "SELECT sql FROM sqlite_master WHERE name = 'genesy_tasks'").fetchone()[0]
    assert conn.execute("SELECT task_id FROM crm_log ORDER BY task_id").fetchall() == [
        ("task-b",), ("task-c",)]
    assert conn.execute("SELECT count(*) FROM crm_open_tasks").fetchone()[0] == 2
    assert conn.execute("SELECT id, crm_deal_id FROM genesy_tasks ORDER BY seq").fetchall()[:1] \
        == [("task-a", "deal-task-a")]  # a column the CRM added stays, with its data
    names = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    assert {"crm_by_type", "crm_by_deal", "crm_on_delete", "genesy_tasks_owner",
            "genesy_tasks_contact", "genesy_tasks_company"} <= names
    assert "genesy_tasks_new" not in names
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_a_database_from_a_newer_release_is_refused(db_path):
    TaskStore(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE genesy_meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(genesy_tasks.StorageError, match="newer"):
        TaskStore(db_path)


def test_the_deletion_trigger_of_1_5_0_is_replaced_at_open(db_path):
    # Releases 1.4.0 and 1.5.0 made it with HAVING and no GROUP BY, which
    # SQLite before 3.39 refuses when it runs: every deletion would fail there.
    with TaskStore(db_path) as store:
        kept = store.create({"subject": "kept"})["id"]
        gone = store.create({"subject": "gone"})["id"]
    conn = sqlite3.connect(db_path)
    (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'genesy_tasks_deleted'"
                          ).fetchone()
    old = sql.replace("\n        GROUP BY change;", "\n        HAVING max(seq) IS NOT NULL;")
    assert old != sql
    with conn:
        conn.execute("DROP TRIGGER genesy_tasks_deleted")
        conn.execute(old)
    conn.close()
    with TaskStore(db_path) as store:
        assert store.delete(gone) and store.get(kept) is not None
        assert [change["change"] for change in store.changes()["changes"]] == ["create", "delete"]
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT sql FROM sqlite_master WHERE name = 'genesy_tasks_deleted'"
                        ).fetchone() == (sql,)
    conn.close()


# -- the change feed -----------------------------------------------------------

def _follow(store, after=None, limit=3):
    """Poll the feed from ``after`` to its end, as a poller would: (changes, cursor)."""
    changes = []
    for _ in range(10_000):
        page = store.changes(after=after, limit=limit)
        assert isinstance(page["nextCursor"], str)
        changes += page["changes"]
        if not page["changes"]:
            return changes, page["nextCursor"]
        after = page["nextCursor"]
    raise AssertionError("the feed did not end")


def test_the_feed_has_each_task_once_at_its_latest_change_in_commit_order(store):
    a = store.create({"subject": "A"})
    b = store.create({"subject": "B"})
    c = store.create({"subject": "C"})
    store.update(a["id"], {"description": "changed"})
    assert store.delete(b["id"])
    changes, cursor = _follow(store)
    assert [(change["taskId"], change["change"]) for change in changes] == [
        (c["id"], "create"), (a["id"], "update"), (b["id"], "delete")]
    assert changes[0]["task"] == c and changes[0]["at"] == c["createdAt"]
    assert changes[1]["task"] == store.get(a["id"])
    assert changes[1]["at"] == changes[1]["task"]["updatedAt"]
    assert changes[2]["task"] is None and ISO_UTC.match(changes[2]["at"])
    # Nothing new: an empty page, and the same cursor to come back with.
    assert store.changes(after=cursor) == {"changes": [], "nextCursor": cursor}
    store.set_completed_many([a["id"], c["id"]], True)
    store.set_completed_many([a["id"], c["id"]], True)  # a retry changes nothing
    store.update(c["id"], {"subject": "C"})              # nor does the same value
    later, _ = _follow(store, cursor)
    assert [(change["taskId"], change["task"]["completed"]) for change in later] == [
        (a["id"], True), (c["id"], True)]


def test_a_poller_following_the_cursors_ends_with_every_tasks_latest_state(store):
    # Random writes between polls of a few changes each: what the poller
    # built from the feed is exactly what the store holds.
    import random
    rng = random.Random(12)
    seen, cursor, ids = {}, None, []
    for step in range(300):
        action = rng.random()
        if action < 0.35 or not ids:
            ids.append(store.create({"subject": "task %d" % step})["id"])
        elif action < 0.6:
            store.update(rng.choice(ids), {"description": "step %d" % step,
                                           "completed": rng.random() < 0.5})
        elif action < 0.75:
            store.set_completed_many(rng.sample(ids, min(3, len(ids))), rng.random() < 0.5)
        elif action < 0.85:
            store.delete(ids.pop(rng.randrange(len(ids))))
        if rng.random() < 0.3:
            page = store.changes(after=cursor, limit=rng.randint(1, 4))
            for change in page["changes"]:
                seen[change["taskId"]] = change["task"]
            cursor = page["nextCursor"]
    changes, _ = _follow(store, cursor)
    for change in changes:
        seen[change["taskId"]] = change["task"]
    assert {task_id: task for task_id, task in seen.items() if task is not None} == {
        task["id"]: task for task in store.list(limit=500)["tasks"]}


def test_the_feed_sees_a_crms_own_sql_on_the_contracts_columns_only(store, db_path):
    task = store.create({"subject": "A"})
    _, cursor = _follow(store)
    crm = sqlite3.connect(db_path)
    crm.execute("ALTER TABLE genesy_tasks ADD COLUMN crm_note TEXT")
    crm.execute("UPDATE genesy_tasks SET crm_note = 'the CRM''s own column'")
    crm.commit()
    assert store.changes(after=cursor)["changes"] == []
    crm.execute("UPDATE genesy_tasks SET subject = 'renamed by the CRM'")
    crm.commit()
    crm.close()
    [change] = store.changes(after=cursor)["changes"]
    assert (change["change"], change["task"]["subject"]) == ("update", "renamed by the CRM")
    assert change["taskId"] == task["id"]


def test_the_feed_stays_as_large_as_the_tasks_plus_recent_deletions(store, db_path):
    ids = store.create_many([{"subject": "t%d" % n} for n in range(30)])
    for round_ in range(5):
        store.set_completed_many(ids, round_ % 2 == 0)
    for task_id in ids[:10]:
        store.delete(task_id)

    def rows():
        with contextlib.closing(sqlite3.connect(db_path)) as conn:
            return conn.execute("SELECT count(*) FROM genesy_changes").fetchone()[0]

    assert rows() == 30  # 20 tasks, 10 deletions
    # Deletions older than DEFAULT_DELETIONS_KEPT_DAYS go at the next deletion, and a
    # cursor from before them is refused: it may have missed one.
    old_cursor = _follow(store, limit=500)[1]
    stale = store.changes(limit=1)["nextCursor"]
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.execute("UPDATE genesy_changes SET at = '2000-01-01T00:00:00.000Z' "
                     "WHERE change = 'delete'")
        conn.commit()
    store.delete(ids[10])
    assert rows() == 20
    with pytest.raises(genesy_tasks.ChangesForgotten, match="start again without after"):
        store.changes(after=stale)
    assert store.changes(after=old_cursor)["changes"][0]["taskId"] == ids[10]
    assert len(_follow(store, limit=500)[0]) == 20  # without after: from the oldest kept


def test_get_changes_over_http(api, store):
    task = create(api)
    response = api.get("/changes", headers=HEADERS, status=200)
    assert response.content_type == "application/json"
    assert response.json == {"changes": [{"taskId": task["id"], "change": "create",
                                          "task": task, "at": task["createdAt"]}],
                             "nextCursor": response.json["nextCursor"]}
    cursor = response.json["nextCursor"]
    api.patch_json("/tasks/" + task["id"], {"completed": True}, headers=HEADERS)
    page = api.get("/changes?after=%s&limit=1" % cursor, headers=HEADERS).json
    assert [change["change"] for change in page["changes"]] == ["update"]
    assert page["changes"][0]["task"]["completed"] is True
    assert_error(api.get("/changes", status=401), 401)
    for query, mentions in (("after=abc", "after"), ("limit=0", "limit"),
                            ("limit=501", "limit"), ("since=1", "unknown"),
                            ("after=1&after=2", "more than once")):
        assert_error(api.get("/changes?" + query, headers=HEADERS, status=400), 400,
                     mentions=[mentions])


def test_a_cursor_beyond_the_feed_is_a_410_after_a_restore(api, store, tmp_path, closing):
    create(api)
    backup = str(tmp_path / "backup.db")
    genesy_tasks.backup_database(store.path, backup)
    create(api)
    create(api)
    cursor = api.get("/changes", headers=HEADERS).json["nextCursor"]  # 3
    restored = closing(make_app(backup, api_keys=KEY))  # the file as it was before the second
    client = webtest.TestApp(restored)
    create(client)
    assert_error(client.get("/changes?after=" + cursor, headers=HEADERS, status=410), 410,
                 "Cursor expired", ["restored"])
    assert len(client.get("/changes", headers=HEADERS).json["changes"]) == 2


def test_an_expired_cursor_is_a_410(api, store, db_path):
    store.delete(create(api)["id"])
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.execute("UPDATE genesy_changes SET at = '2000-01-01T00:00:00.000Z'")
        conn.commit()
    store.delete(create(api)["id"])
    body = assert_error(api.get("/changes?after=0", headers=HEADERS, status=410), 410,
                        "Cursor expired", ["without after"])
    assert "7 days" in body["message"]
    assert api.get("/changes", headers=HEADERS, status=200).json["changes"][0]["change"] \
        == "delete"


_SCHEMA_V3_TASKS = [
    ("task-a", "A", "2024-01-01T00:00:00.000Z", "2024-01-03T00:00:00.000Z"),
    ("task-b", "B", "2024-01-02T00:00:00.000Z", "2024-01-02T00:00:00.000Z"),
]


def test_a_release_3_database_gets_its_tasks_into_the_feed(db_path):
    TaskStore(db_path).close()
    with contextlib.closing(sqlite3.connect(db_path)) as conn:  # back to schema 3, by hand
        for name in ("genesy_tasks_created", "genesy_tasks_updated", "genesy_tasks_renamed",
                     "genesy_tasks_deleted"):
            conn.execute("DROP TRIGGER %s" % name)
        conn.execute("DROP TABLE genesy_changes")
        conn.executemany("INSERT INTO genesy_tasks (id, subject, created_at, updated_at) "
                         "VALUES (?, ?, ?, ?)", _SCHEMA_V3_TASKS)
        conn.execute("UPDATE genesy_meta SET value = '3' WHERE key = 'schema_version'")
        conn.commit()
    with TaskStore(db_path) as store:
        changes, _ = _follow(store)
        # In the order of their last change; created and never changed is a create.
        assert [(c["taskId"], c["change"]) for c in changes] == [
            ("task-b", "create"), ("task-a", "update")]
        store.update("task-b", {"completed": True})
        assert [c["taskId"] for c in _follow(store)[0]] == ["task-a", "task-b"]


def test_a_crms_own_triggers_fire_for_writes_only_never_for_the_feed_or_its_upgrade(db_path):
    with TaskStore(db_path) as store:
        kept = store.create({"subject": "from release 3", "contactId": "contact-1"})
    with contextlib.closing(sqlite3.connect(db_path)) as conn:  # back to schema 3
        for name in ("genesy_tasks_created", "genesy_tasks_updated", "genesy_tasks_renamed",
                     "genesy_tasks_deleted"):
            conn.execute("DROP TRIGGER %s" % name)
        conn.execute("DROP TABLE genesy_changes")
        conn.execute("UPDATE genesy_meta SET value = '3' WHERE key = 'schema_version'")
        conn.execute("CREATE TABLE crm_audit (what TEXT)")
        conn.execute("""CREATE TRIGGER crm_audits AFTER UPDATE ON genesy_tasks
            BEGIN INSERT INTO crm_audit VALUES ('update ' || NEW.subject); END""")
        conn.execute("""CREATE TRIGGER crm_refuses BEFORE UPDATE ON genesy_tasks
            WHEN NEW.contact_id = 'contact-1' AND NEW.subject = 'from release 3'
            BEGIN SELECT RAISE(ABORT, 'the CRM refuses this update'); END""")
        conn.commit()
    with TaskStore(db_path) as store:  # the upgrade updates no task: nothing refused
        assert [c["taskId"] for c in _follow(store)[0]] == [kept["id"]]
        store.create({"subject": "new"})
        store.update(kept["id"], {"subject": "renamed"})
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("SELECT what FROM crm_audit").fetchall() == [("update renamed",)]


def test_a_changed_id_and_a_crms_insert_or_replace_keep_the_feed_true(store, db_path):
    a = store.create({"subject": "A"})
    _, cursor = _follow(store)
    with contextlib.closing(sqlite3.connect(db_path)) as crm:
        crm.execute("UPDATE genesy_tasks SET id = 'task-renamed' WHERE id = ?", (a["id"],))
        crm.execute("INSERT OR REPLACE INTO genesy_tasks (id, subject, created_at, updated_at) "
                    "VALUES ('task-renamed', 'replaced', 'x', 'x')")
        crm.commit()
    changes = store.changes(after=cursor)["changes"]
    assert [(c["taskId"], c["change"]) for c in changes] == [
        (a["id"], "delete"), ("task-renamed", "create")]
    assert changes[1]["task"]["subject"] == "replaced"
    with contextlib.closing(sqlite3.connect(db_path)) as conn:  # one row per task still
        assert conn.execute("SELECT count(*) FROM genesy_changes").fetchone()[0] == 2


# -- subscribers ---------------------------------------------------------------

class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, changes):
        self.calls.append(changes)

    def wait(self, count):
        _wait_for(lambda: len(self.calls) >= count)
        return self.calls


def test_a_subscriber_gets_each_commits_changes_in_the_feeds_shape(store):
    recorder = _Recorder()
    unsubscribe = store.subscribe(recorder)
    task = store.create({"subject": "A"})
    store.update(task["id"], {"completed": True})
    store.update(task["id"], {"completed": True})  # no change, no call
    store.set_completed_many([task["id"], "task-missing"], False)
    store.delete(task["id"])
    calls = recorder.wait(4)
    assert [[(c["taskId"], c["change"]) for c in call] for call in calls] == [
        [(task["id"], "create")], [(task["id"], "update")], [(task["id"], "update")],
        [(task["id"], "delete")]]
    assert calls[0][0] == {"taskId": task["id"], "change": "create", "task": task,
                           "at": task["createdAt"]}
    assert calls[1][0]["task"]["completed"] is True
    assert calls[2][0]["task"]["completed"] is False and calls[3][0]["task"] is None
    # The subscriber's changes are the feed's, but for the task's state then.
    assert set(calls[1][0]) == {"taskId", "change", "task", "at"}
    unsubscribe()
    store.create({"subject": "after unsubscribing"})
    store.close()  # hands over what was committed, then stops
    assert len(recorder.calls) == 4


def test_a_subscriber_never_hears_of_a_write_that_was_rolled_back(db_path, monkeypatch,
                                                                  closing):
    store = closing(TaskStore(db_path))
    recorder = _Recorder()
    store.subscribe(recorder)
    kept = store.create({"subject": "kept"})

    def fail(*args):
        raise RuntimeError("failure after the UPDATE ran")

    monkeypatch.setattr(genesy_tasks, "_in_request_order", fail)
    with pytest.raises(RuntimeError):
        store.set_completed_many([kept["id"]], True)
    monkeypatch.undo()
    group = store.start_commit_group()
    store.create({"subject": "in a group that is lost"})
    group.lost = sqlite3.OperationalError("lost")
    with pytest.raises(sqlite3.OperationalError):
        store.finish_commit_group()
    store._roll_back(store._connection())
    store.start_commit_group()
    store.create({"subject": "in a group that commits"})
    assert recorder.calls == [[recorder.calls[0][0]]]  # nothing before the group's commit
    store.finish_commit_group()
    store.close()
    assert [[c["task"]["subject"] for c in call] for call in recorder.calls] == [
        ["kept"], ["in a group that commits"]]


def test_a_failing_subscriber_is_logged_and_fails_nothing(tasks_app, capfd):
    def broken(changes):
        raise ValueError("the subscriber's own bug")

    recorder = _Recorder()
    tasks_app.store.subscribe(broken)
    tasks_app.store.subscribe(recorder)
    api = webtest.TestApp(tasks_app)
    task = create(api)
    recorder.wait(1)  # the next subscriber is still called
    err = []
    _wait_for(lambda: err.append(capfd.readouterr().err) or "own bug" in "".join(err))
    assert re.search(r"genesy-tasks: subscriber <function .*broken.*> failed:\n"
                     r"Traceback .*ValueError: the subscriber's own bug", "".join(err), re.S)
    assert api.get("/tasks/" + task["id"], headers=HEADERS).json == task


def test_subscribers_under_the_built_in_server_hear_after_the_group_commits(db_path, closing,
                                                                           serve):
    store = closing(TaskStore(db_path))
    recorder = _Recorder()
    store.subscribe(recorder)
    application = closing(make_app(store, api_keys=KEY))
    server = serve(application)
    creates = [_request_bytes("POST", "/tasks", {"subject": "burst %02d" % n})
               for n in range(10)]
    responses = _pipelined(server.port, *creates,
                           _request_bytes("GET", "/health", headers={"Connection": "close"}))
    assert [status for status, _, _ in responses] == [201] * 10 + [200]
    _wait_for(lambda: sum(len(call) for call in recorder.calls) == 10)
    server.stop()
    assert [c["task"]["subject"] for call in recorder.calls for c in call] == [
        "burst %02d" % n for n in range(10)]


def test_subscribers_hear_of_commits_in_commit_order_whatever_the_thread(db_path, closing):
    # A CRM trigger logs each update inside its transaction, so in commit
    # order; the subscriber must hear them in that same order.
    store = closing(TaskStore(db_path))
    task = store.create({"subject": "contended"})
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.execute("CREATE TABLE crm_log (seq INTEGER PRIMARY KEY, description TEXT)")
        conn.execute("""CREATE TRIGGER crm_logs AFTER UPDATE ON genesy_tasks
            BEGIN INSERT INTO crm_log (description) VALUES (NEW.description); END""")
        conn.commit()
    heard = []
    store.subscribe(lambda changes: heard.extend(c["task"]["description"] for c in changes))

    def updates(thread):
        for n in range(60):
            store.update(task["id"], {"description": "%d-%d" % (thread, n)})

    threads = [threading.Thread(target=updates, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        committed = [row[0] for row in conn.execute("SELECT description FROM crm_log ORDER BY seq")]
    assert len(committed) == 240 and heard == committed


def test_subscribers_keep_hearing_after_close_as_the_store_is_used_again(db_path, closing):
    store = closing(TaskStore(db_path))
    recorder = _Recorder()
    store.subscribe(recorder)
    store.create({"subject": "before"})
    store.close()
    store.create({"subject": "after"})  # the store opens again, and so does delivery
    recorder.wait(2)


# -- validation ----------------------------------------------------------------

def _known_contacts_only(task, previous):
    if task["contactId"] not in (None, "contact-1"):
        raise TaskValidationError("unknown contact: %s" % task["contactId"])


def test_a_validator_refuses_creates_and_updates_with_a_400_and_writes_nothing(db_path, closing):
    calls = []

    def validate(task, previous):
        calls.append((dict(task), previous and dict(previous)))
        _known_contacts_only(task, previous)

    application = closing(make_app(db_path, api_keys=KEY, validate=validate))
    api = webtest.TestApp(application)
    body = assert_error(api.post_json("/tasks", {"subject": "x", "contactId": "contact-9"},
                                      headers=HEADERS, status=400), 400, "Invalid request")
    assert body["message"] == "unknown contact: contact-9"
    assert application.store.count() == 0
    task = create(api, contactId="contact-1")
    assert calls[-1] == (task, None)
    assert_error(api.patch_json("/tasks/" + task["id"], {"contactId": "contact-9"},
                                headers=HEADERS, status=400), 400, mentions=["contact-9"])
    assert calls[-1][1] == task and calls[-1][0]["contactId"] == "contact-9"
    assert api.get("/tasks/" + task["id"], headers=HEADERS).json == task
    done = api.patch_json("/tasks/" + task["id"], {"completed": True}, headers=HEADERS).json
    assert calls[-1] == (done, task)


def test_a_validator_refusing_one_task_of_a_batch_completes_none(db_path, closing):
    def validate(task, previous):
        if task["completed"] and task["subject"] == "not yet":
            raise TaskValidationError("%s cannot be completed yet" % task["id"])

    application = closing(make_app(db_path, api_keys=KEY, validate=validate))
    api = webtest.TestApp(application)
    ok, refused = create(api, subject="fine"), create(api, subject="not yet")
    assert_error(api.patch_json("/tasks/batch", {"ids": [ok["id"], refused["id"]],
                                                 "completed": True},
                                headers=HEADERS, status=400), 400, mentions=[refused["id"]])
    assert [t["completed"] for t in application.store.get_many([ok["id"], refused["id"]])] \
        == [False, False]


@pytest.mark.parametrize("served", [False, True])
def test_a_crms_refusing_trigger_is_a_400_with_its_message(db_path, served, closing, serve):
    TaskStore(db_path).close()
    with contextlib.closing(sqlite3.connect(db_path)) as crm:
        crm.execute("CREATE TABLE contacts (id TEXT PRIMARY KEY)")
        crm.execute("INSERT INTO contacts VALUES ('contact-1')")
        crm.execute("""CREATE TRIGGER crm_known_contacts BEFORE INSERT ON genesy_tasks
            WHEN NEW.contact_id IS NOT NULL
             AND NEW.contact_id NOT IN (SELECT id FROM contacts)
            BEGIN SELECT RAISE(ABORT, 'unknown contact'); END""")
        crm.commit()
    application = closing(make_app(db_path, api_keys=KEY))
    if served:
        server = serve(application)
        responses = _pipelined(server.port, *[
            _request_bytes("POST", "/tasks", {"subject": "x", "contactId": contact})
            for contact in ("contact-9", "contact-1")],
            _request_bytes("GET", "/health", headers={"Connection": "close"}))
        server.stop()
        assert [status for status, _, _ in responses] == [400, 201, 200]
        assert responses[0][2] == {"error": "Invalid request", "message": "unknown contact"}
    else:
        api = webtest.TestApp(application)
        assert assert_error(api.post_json("/tasks", {"subject": "x", "contactId": "contact-9"},
                                          headers=HEADERS, status=400), 400)["message"] \
            == "unknown contact"
        create(api, contactId="contact-1")
    assert [task["contactId"] for task in application.store.list()["tasks"]] == ["contact-1"]


def test_a_trigger_that_rolls_back_is_still_a_400_for_its_request_under_the_server(db_path,
                                                                                  closing, serve):
    # RAISE(ROLLBACK) ends the commit group's transaction: the writes before it
    # in the group are lost (503, retry), but the refused request's own answer
    # is its refusal, not a 503 that a client would retry for ever.
    TaskStore(db_path).close()
    with contextlib.closing(sqlite3.connect(db_path)) as crm:
        crm.execute("""CREATE TRIGGER crm_refuses BEFORE INSERT ON genesy_tasks
            WHEN NEW.subject = 'refused' BEGIN SELECT RAISE(ROLLBACK, 'refused by the CRM'); END""")
        crm.commit()
    application = closing(make_app(db_path, api_keys=KEY))
    server = serve(application)
    responses = _pipelined(server.port, *[
        _request_bytes("POST", "/tasks", {"subject": subject})
        for subject in ("before", "refused")],
        _request_bytes("GET", "/health", headers={"Connection": "close"}))
    server.stop()
    assert [status for status, _, _ in responses] == [503, 400, 200]
    assert responses[1][2] == {"error": "Invalid request", "message": "refused by the CRM"}
    assert application.store.count() == 0


def test_a_validator_runs_inside_the_write_and_never_refuses_a_replay(db_path, closing):
    contacts = {"contact-1"}
    locked = []

    def validate(task, previous):
        # Inside the write transaction: another writer cannot get in.
        with contextlib.closing(sqlite3.connect(db_path, timeout=0)) as other:
            try:
                other.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as error:
                locked.append("locked" in str(error))
        if task["contactId"] not in contacts:
            raise TaskValidationError("unknown contact")

    store = closing(TaskStore(db_path, validate=validate))
    first, replayed = store.create_idempotent({"subject": "x", "contactId": "contact-1"}, "k1")
    contacts.clear()  # the contact is deleted; Genesy retries the create
    assert store.create_idempotent({"subject": "x", "contactId": "contact-1"}, "k1") == (
        first, True)
    with pytest.raises(TaskValidationError):
        store.create({"subject": "y", "contactId": "contact-1"})
    with pytest.raises(TaskValidationError):
        store.create_many([{"subject": "z", "contactId": "contact-1"}])
    assert locked == [True] * 3 and store.count() == 1


def test_a_trigger_that_fails_half_way_in_a_commit_group_keeps_nothing(db_path, closing):
    # RAISE(FAIL) keeps what its statement did so far: here, the task row.
    store = closing(TaskStore(db_path))
    with contextlib.closing(sqlite3.connect(db_path)) as crm:
        crm.execute("""CREATE TRIGGER crm_fails AFTER INSERT ON genesy_tasks
            WHEN NEW.subject = 'refused' BEGIN SELECT RAISE(FAIL, 'refused late'); END""")
        crm.commit()
    store.start_commit_group()
    store.create({"subject": "before"})
    with pytest.raises(TaskValidationError, match="refused late"):
        store.create({"subject": "refused"})
    store.create({"subject": "after"})
    store.finish_commit_group()
    assert _visible_elsewhere(db_path) == ["after", "before"]
    assert [c["task"]["subject"] for c in _follow(store)[0]] == ["before", "after"]


# -- backups -------------------------------------------------------------------

def test_backup_copies_a_live_database_consistently_during_writes(tmp_path, start_process):
    running = start_process()
    acknowledged, stop = [], threading.Event()

    def writer():
        conn, deadline = running.connect(), time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            status, _, task = running.request("POST", "/tasks", {"subject": "during backup"},
                                              conn=conn)
            assert status == 201
            acknowledged.append(task["id"])

    with TaskStore(running.db) as store:  # enough pages for a copy in many steps
        store.create_many([{"subject": "seed %d" % n, "description": "x" * 200}
                           for n in range(20000)])
    writers = [threading.Thread(target=writer) for _ in range(3)]
    for thread in writers:
        thread.start()
    try:
        _wait_while_alive(lambda: len(acknowledged) >= 50, writers)
        before = list(acknowledged)
        dest = tmp_path / "backup.db"
        result = subprocess.run([sys.executable, MODULE, "backup", str(dest),
                                 "--db", running.db], capture_output=True, text=True,
                                timeout=60, cwd=str(tmp_path))
        assert result.returncode == 0, result.stderr
        assert re.match(r"backup: copied .* to .*backup\.db \(\d+ tasks, [\d.]+ MB\) in "
                        r"[\d.]+ s; integrity check ok$", result.stdout.strip())
    finally:
        stop.set()
        for thread in writers:
            thread.join(timeout=30)
    assert len(acknowledged) > len(before)  # the server kept serving meanwhile
    assert os.stat(dest).st_mode & 0o777 == 0o600
    assert not os.path.exists(str(dest) + ".partial")
    copy = sqlite3.connect(str(dest))
    assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    copied = {row[0] for row in copy.execute("SELECT id FROM genesy_tasks")}
    copy.close()
    assert set(before) <= copied  # everything acknowledged before the backup began
    assert len(copied) == 20000 + len([i for i in acknowledged if i in copied])
    assert running.stop() == 0
    # The copy is a working database: the server starts on it with every task.
    again = start_process(db=str(dest))
    status, _, found = again.request("POST", "/tasks/batch", {"ids": before})
    assert status == 200 and len(found) == len(before)
    again.stop()


def test_backup_refuses_to_overwrite_unless_asked_and_shows_progress(tmp_path, capsys):
    source, dest = str(tmp_path / "tasks.db"), str(tmp_path / "copy.db")
    with TaskStore(source) as store:
        store.create_many([{"subject": "x" * 500} for _ in range(500)])
    steps = []
    assert genesy_tasks.backup_database(source, dest, pages=10,
                                        progress=lambda *step: steps.append(step)) == 500
    assert len(steps) > 5 and steps[-1][0] == steps[-1][1]
    assert [copied for copied, _ in steps] == sorted(copied for copied, _ in steps)
    assert genesy_tasks.main(["backup", dest, "--db", source]) == 2
    assert "already exists" in capsys.readouterr().err
    assert genesy_tasks.main(["backup", dest, "--db", source, "--overwrite"]) == 0
    assert genesy_tasks.main(["backup", source, "--db", source, "--overwrite"]) == 2
    assert "cannot replace the database itself" in capsys.readouterr().err
    assert genesy_tasks.main(["backup", dest, "--db", str(tmp_path / "none.db")]) == 2
    assert "no database file" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "none.db")


# -- commit groups and checkpoints ---------------------------------------------

class _Refusing(TaskStore):
    """A store whose connections refuse the statements ``refuse(action, arg1)`` picks,
    with SQLite's own "not authorized" error: a failure at a chosen point of a write."""
    _refuse = None

    @property
    def refuse(self):
        return self._refuse

    @refuse.setter
    def refuse(self, refuse):
        self._refuse = refuse
        for conn in list(self._owners) + self._idle:  # also makes SQLite prepare statements afresh
            self._authorize(conn)

    def _authorize(self, conn):
        refuse = self._refuse
        # (Python before 3.11 takes no None here: an authorizer that allows all.)
        conn.set_authorizer(lambda action, arg1, *rest: (
            sqlite3.SQLITE_DENY if refuse is not None and refuse(action, arg1)
            else sqlite3.SQLITE_OK))

    def _connection(self):
        conn = super()._connection()
        self._authorize(conn)
        return conn


def _visible_elsewhere(db_path):
    """The subjects another connection (another process, say) can see."""
    with contextlib.closing(sqlite3.connect(db_path)) as other:
        return sorted(row[0] for row in other.execute("SELECT subject FROM genesy_tasks"))


def test_a_commit_group_commits_its_writes_once_at_its_end(db_path, closing):
    store = closing(TaskStore(db_path))
    statements = []
    store._connection().set_trace_callback(statements.append)
    group = store.start_commit_group()
    assert not group.writing
    assert store.get("task-none") is None and not group.writing  # reads begin nothing
    first = store.create({"subject": "one"})
    assert group.writing
    store.update(first["id"], {"completed": True})
    store.set_completed_many([first["id"]], False)
    store.create({"subject": "two"})
    assert store.get(first["id"])["completed"] is False  # this thread sees its writes
    assert _visible_elsewhere(db_path) == []             # nobody else does yet
    assert statements.count("COMMIT") == 0
    store.finish_commit_group()
    assert statements.count("BEGIN IMMEDIATE") == statements.count("COMMIT") == 1
    assert _visible_elsewhere(db_path) == ["one", "two"]
    store.create({"subject": "three"})  # after the group: a transaction of its own
    assert statements.count("COMMIT") == 2


def test_a_failed_write_in_a_commit_group_undoes_itself_only(db_path, closing):
    # The key is refused after the task row is written: the savepoint must take
    # that row back, and leave the writes around it to the group's COMMIT.
    store = closing(_Refusing(db_path))
    store.start_commit_group()
    store.create({"subject": "before"})
    store.refuse = lambda action, table: (action == sqlite3.SQLITE_INSERT
                                          and table == "genesy_idempotency")
    with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
        store.create_idempotent({"subject": "refused"}, "key-1")
    store.refuse = None
    store.create({"subject": "after"})
    store.finish_commit_group()
    assert _visible_elsewhere(db_path) == ["after", "before"]


def _store_with_a_crm_trigger(db_path, raise_, message):
    """A store on a file where a CRM's trigger fails every insert of the subject
    "refused", after its row went in, with ``RAISE(raise_, message)``."""
    store = TaskStore(db_path)
    store._connection().execute(
        "CREATE TRIGGER crm_refuses AFTER INSERT ON genesy_tasks "
        "WHEN new.subject = 'refused' BEGIN SELECT RAISE(%s, '%s'); END" % (raise_, message))
    return store


def test_a_failed_one_statement_write_in_a_commit_group_undoes_itself_only(db_path, closing):
    # A create is one INSERT and takes no savepoint: SQLite undoes the failed
    # statement, which the trigger's ABORT fails (a 400 with its message).
    store = closing(_store_with_a_crm_trigger(db_path, "ABORT", "the CRM refuses"))
    store.start_commit_group()
    kept = store.create({"subject": "before"})
    with pytest.raises(TaskValidationError, match="the CRM refuses"):
        store.create({"subject": "refused"})
    store.update(kept["id"], {"description": "changed after the failure"})
    store.create({"subject": "after"})
    store.finish_commit_group()
    assert _visible_elsewhere(db_path) == ["after", "before"]
    assert store.get(kept["id"])["description"] == "changed after the failure"


def test_a_write_whose_failure_rolls_back_the_group_loses_the_whole_group(db_path, closing):
    # RAISE(ROLLBACK) in a CRM's trigger ends the transaction, not just the
    # statement, with an IntegrityError: the group must not go on in a new one.
    store = closing(_store_with_a_crm_trigger(db_path, "ROLLBACK", "the CRM rolls back"))
    for one_statement in (True, False):  # a create, then an idempotent create (savepoint)
        store.start_commit_group()
        store.create({"subject": "before"})
        with pytest.raises(TaskValidationError, match="the CRM rolls back"):
            if one_statement:
                store.create({"subject": "refused"})
            else:
                store.create_idempotent({"subject": "refused"}, "key-%s" % one_statement)
        with pytest.raises(sqlite3.OperationalError, match="ended the transaction"):
            store.create({"subject": "after"})
        with pytest.raises(sqlite3.OperationalError, match="the CRM rolls back"):
            store.finish_commit_group()
        assert not store._connection().in_transaction
        assert _visible_elsewhere(db_path) == []
    store.create({"subject": "on its own"})
    assert _visible_elsewhere(db_path) == ["on its own"]


def test_a_commit_group_whose_transaction_is_lost_commits_nothing(db_path, closing):
    store = closing(_FillingDisk(db_path))
    store.start_commit_group()
    store.create({"subject": "small"})
    store.full = True
    with pytest.raises(sqlite3.OperationalError, match="full"):
        store.create({"subject": "big", "description": "x" * 20000})
    store.full = False
    # The failure took the connection and the group's transaction with it: later
    # writes of the group are refused rather than committed on their own...
    with pytest.raises(sqlite3.OperationalError, match="commit group"):
        store.create({"subject": "later"})
    # ...and finishing says the group's writes were lost.
    with pytest.raises(sqlite3.OperationalError, match="commit group"):
        store.finish_commit_group()
    assert _visible_elsewhere(db_path) == []
    store.create({"subject": "afterwards"})
    assert _visible_elsewhere(db_path) == ["afterwards"]


def test_a_failed_commit_of_a_group_rolls_it_back(db_path, closing):
    store = closing(_Refusing(db_path))
    store.start_commit_group()
    store.create({"subject": "never"})
    store.refuse = lambda action, verb: action == sqlite3.SQLITE_TRANSACTION and verb == "COMMIT"
    with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
        store.finish_commit_group()
    store.refuse = None
    assert not store._connection().in_transaction
    assert _visible_elsewhere(db_path) == []
    store.create({"subject": "next"})
    assert _visible_elsewhere(db_path) == ["next"]


class _FillingDisk(TaskStore):
    """A store whose connections see a disk with no room left while ``full`` is set."""
    full = False

    def _connection(self):
        conn = super()._connection()
        if self.full:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute("PRAGMA max_page_count = %d" % pages)
        return conn


def test_the_wal_stays_bounded_under_continuous_writes(db_path):
    # SQLite's own checkpoints, once the WAL passes DEFAULT_CHECKPOINT_PAGES, keep
    # it bounded; a checkpointer that never lets the log restart would grow it
    # without end. These writes fill the WAL more than twice over.
    with TaskStore(db_path) as store:
        for n in range(8000):
            store.create({"subject": "write %d" % n, "contactId": "contact-%d" % n})
        frames = (os.path.getsize(db_path + "-wal") - 32) // (4096 + 24)
        assert frames < genesy_tasks.DEFAULT_CHECKPOINT_PAGES + 50
        checkpointed = store._connection().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert checkpointed[1] < genesy_tasks.DEFAULT_CHECKPOINT_PAGES + 50


###############################################################################
# Application: the routes, auth, errors and the request inspector #############
###############################################################################

# -- creating tasks ------------------------------------------------------------

def test_create_returns_201_location_and_the_whole_task(api):
    response = api.post_json("/tasks", FULL_TASK, headers=HEADERS, status=201)
    task = response.json
    assert response.content_type == "application/json"
    assert response.headers["Location"] == "/tasks/" + task["id"]
    assert set(task) == TASK_KEYS
    for name, value in FULL_TASK.items():
        assert task[name] == value
    assert task["completed"] is False and task["completedAt"] is None
    assert ISO_UTC.match(task["createdAt"]) and task["updatedAt"] == task["createdAt"]
    assert re.fullmatch(r"task-[A-Za-z0-9_-]+", task["id"])
    assert api.get(response.headers["Location"], headers=HEADERS, status=200).json == task


def test_only_subject_is_required_and_unset_fields_are_null(api):
    task = api.post_json("/tasks", {"subject": "Test task"}, headers=HEADERS, status=201).json
    assert set(task) == TASK_KEYS
    for name in ("description", "type", "ownerId", "dueDate", "contactId", "companyId"):
        assert task[name] is None
    assert task["completed"] is False


def test_ids_are_unique_and_server_generated(api):
    ids = {create(api)["id"] for _ in range(50)}
    assert len(ids) == 50
    task = create(api, id="task-mine", completed=True, completedAt="2024-01-01T00:00:00Z",
                  createdAt="2000-01-01", color="red")
    assert task["id"] != "task-mine" and task["id"].startswith("task-")
    assert task["completed"] is False and task["completedAt"] is None
    assert task["createdAt"] != "2000-01-01"
    stored = api.get("/tasks/" + task["id"], headers=HEADERS).json
    assert "color" not in stored and set(stored) == TASK_KEYS


@pytest.mark.parametrize("due", [
    "2024-01-15", "2024-01-15T10:00:00Z", "2024-01-15T10:00:00.123Z", "2024-01-15T10:00",
    "2024-01-15T10:00:00+02:00", "2024-01-15T10:00:00-0530", "2024-01-15T10:00:00+02",
    "20240115", "20240115T100000Z", "2024-02-29T23:59:60Z", "2024-01-15T10:00:00,5",
])
def test_due_date_accepts_iso_8601_and_comes_back_exactly(api, due):
    assert create(api, dueDate=due)["dueDate"] == due


@pytest.mark.parametrize("due", [
    "", "tomorrow", "2024-13-01", "2023-02-29", "2024-01-15T25:00:00Z", "2024-01-15 10:00",
    "15/01/2024", "2024-01-15T10:00:00+2", "2024-1-5", "2024-01-15T10:61", "１２３４-01-01",
])
def test_due_date_that_is_not_iso_8601_is_a_400(api, store, due):
    response = api.post_json("/tasks", {"subject": "x", "dueDate": due},
                             headers=HEADERS, status=400)
    assert_error(response, 400, mentions=["dueDate"])
    assert store.count() == 0


@pytest.mark.parametrize("body, field", [
    ({}, "subject"),
    ({"subject": ""}, "subject"),
    ({"subject": "   "}, "subject"),
    ({"subject": None}, "subject"),
    ({"subject": 42}, "subject"),
    ({"subject": ["a"]}, "subject"),
    ({"subject": "ok", "description": 5}, "description"),
    ({"subject": "ok", "type": True}, "type"),
    ({"subject": "ok", "ownerId": 123}, "ownerId"),
    ({"subject": "ok", "contactId": {"id": 1}}, "contactId"),
    ({"subject": "ok", "companyId": []}, "companyId"),
    ({"subject": "ok", "dueDate": 20240115}, "dueDate"),
    ({"subject": "bad \ud800 text"}, "subject"),
])
def test_invalid_create_fields_are_400s_naming_the_field(api, store, body, field):
    response = api.post_json("/tasks", body, headers=HEADERS, status=400)
    assert_error(response, 400, mentions=[field])
    assert store.count() == 0


@pytest.mark.parametrize("raw", [
    b"", b"{", b"not json", b'{"subject": "x",}', b"[1, 2]", b'"subject"', b"null", b"42",
    b'{"subject": NaN}', b"\xff\xfe{}", b"[" * 100000, b'{"subject": "x"} trailing',
])
def test_a_body_that_is_not_a_json_object_is_a_400(api, store, raw):
    response = api.post("/tasks", raw, headers={**HEADERS, "Content-Type": "application/json"},
                        status=400)
    assert_error(response, 400)
    assert store.count() == 0


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_body_not_declared_as_json_is_a_415(api, store, content_type):
    headers = dict(HEADERS)
    if content_type:
        headers["Content-Type"] = content_type
    response = api.post("/tasks", b'{"subject": "x"}', headers=headers, status=415)
    assert_error(response, 415, mentions=["application/json"])
    assert store.count() == 0


def test_json_content_type_with_charset_is_accepted(api):
    api.post("/tasks", b'{"subject": "x"}', status=201,
             headers={**HEADERS, "Content-Type": "application/json; charset=utf-8"})


def test_unicode_fields_round_trip(api):
    task = create(api, subject="Llamar a José 📞", description="línea 1\nlínea 2\u0000end")
    again = api.get("/tasks/" + task["id"], headers=HEADERS).json
    assert again["subject"] == "Llamar a José 📞"
    assert again["description"] == "línea 1\nlínea 2\u0000end"


# -- reading and updating one task ---------------------------------------------

def test_get_unknown_task_is_a_404_in_genesys_shape(api):
    response = api.get("/tasks/task-xyz", headers=HEADERS, status=404)
    body = assert_error(response, 404, title="Task not found")
    assert body["message"] == "No task exists with ID: task-xyz"


def test_patch_completes_a_task_and_a_retry_keeps_the_first_completed_at(api):
    task = create(api)
    done = api.patch_json("/tasks/" + task["id"], {"completed": True},
                          headers=HEADERS, status=200).json
    assert set(done) == TASK_KEYS
    assert done["completed"] is True and ISO_UTC.match(done["completedAt"])
    assert done["updatedAt"] == done["completedAt"]
    _clock_passes(done["completedAt"])  # a completion rewritten now would show
    again = api.patch_json("/tasks/" + task["id"], {"completed": True},
                           headers=HEADERS, status=200).json
    assert again["completedAt"] == done["completedAt"]
    assert again == done


def test_patch_completed_false_reopens_the_task(api):
    task = create(api)
    api.patch_json("/tasks/" + task["id"], {"completed": True}, headers=HEADERS)
    reopened = api.patch_json("/tasks/" + task["id"], {"completed": False},
                              headers=HEADERS, status=200).json
    assert reopened["completed"] is False and reopened["completedAt"] is None
    assert api.get("/tasks/" + task["id"], headers=HEADERS).json == reopened


@pytest.mark.parametrize("field, value", [
    ("subject", "New subject"), ("description", "New notes"), ("description", None),
    ("type", "email"), ("ownerId", "user-9"), ("dueDate", "2025-06-01"),
    ("contactId", "contact-1"), ("companyId", None),
])
def test_patch_updates_any_documented_field_and_leaves_the_rest(api, field, value):
    task = create(api, **{k: v for k, v in FULL_TASK.items() if k != "subject"})
    _clock_passes(task["updatedAt"])
    updated = api.patch_json("/tasks/" + task["id"], {field: value, "unknown": 1},
                             headers=HEADERS, status=200).json
    expected = dict(task, **{field: value})
    assert {k: v for k, v in updated.items() if k != "updatedAt"} == \
        {k: v for k, v in expected.items() if k != "updatedAt"}
    assert updated["updatedAt"] > task["updatedAt"]
    assert api.get("/tasks/" + task["id"], headers=HEADERS).json == updated


def test_patch_can_change_fields_and_complete_together(api):
    task = create(api)
    updated = api.patch_json("/tasks/" + task["id"], {"subject": "Done call", "completed": True},
                             headers=HEADERS, status=200).json
    assert updated["subject"] == "Done call" and updated["completed"] is True


def test_patch_unknown_task_is_a_404(api):
    response = api.patch_json("/tasks/task-nope", {"completed": True}, headers=HEADERS,
                              status=404)
    assert_error(response, 404, title="Task not found", mentions=["task-nope"])


@pytest.mark.parametrize("body, mentions", [
    ({}, ["no known field"]),
    ({"completedAt": "2024-01-01T00:00:00Z"}, ["no known field"]),
    ({"id": "task-other", "createdAt": "x"}, ["no known field"]),
    ({"completed": "true"}, ["completed"]),
    ({"completed": 1}, ["completed"]),
    ({"completed": None}, ["completed"]),
    ({"subject": ""}, ["subject"]),
    ({"subject": None}, ["subject"]),
    ({"ownerId": 7}, ["ownerId"]),
    ({"dueDate": "next week"}, ["dueDate"]),
])
def test_invalid_patch_is_a_400_and_changes_nothing(api, body, mentions):
    task = create(api)
    response = api.patch_json("/tasks/" + task["id"], body, headers=HEADERS, status=400)
    assert_error(response, 400, mentions=mentions)
    assert api.get("/tasks/" + task["id"], headers=HEADERS).json == task


def test_patch_with_a_non_object_body_is_a_400(api):
    task = create(api)
    response = api.patch("/tasks/" + task["id"], b"[true]", status=400,
                         headers={**HEADERS, "Content-Type": "application/json"})
    assert_error(response, 400)


# -- batches -------------------------------------------------------------------

def test_batch_get_keeps_request_order_drops_duplicates_and_missing(api):
    a, b, c = (create(api, subject=s)["id"] for s in "abc")
    response = api.post_json("/tasks/batch", {"ids": [c, "task-missing", a, c, b, a]},
                             headers=HEADERS, status=200)
    tasks = response.json
    assert [t["id"] for t in tasks] == [c, a, b]
    assert all(set(t) == TASK_KEYS for t in tasks)
    assert [t["subject"] for t in tasks] == ["c", "a", "b"]


@pytest.mark.parametrize("ids", [[], ["task-missing", "batch", ""]])
def test_batch_get_of_nothing_found_is_an_empty_array(api, ids):
    assert api.post_json("/tasks/batch", {"ids": ids}, headers=HEADERS, status=200).json == []


@pytest.mark.parametrize("body, mentions", [
    ({}, ["ids"]), ({"ids": "task-1"}, ["ids"]), ({"ids": None}, ["ids"]),
    ({"ids": ["task-1", 2]}, ["ids[1]"]), ({"ids": [["task-1"]]}, ["ids[0]"]),
    (["task-1"], ["ids"]),
])
def test_batch_get_with_bad_ids_is_a_400(api, body, mentions):
    response = api.post_json("/tasks/batch", body, headers=HEADERS, status=400)
    assert_error(response, 400, mentions=mentions)


def test_batch_complete_completes_in_request_order_and_keeps_first_completed_at(api):
    a, b, c = (create(api)["id"] for _ in range(3))
    first = api.patch_json("/tasks/" + a, {"completed": True}, headers=HEADERS).json
    _clock_passes(first["completedAt"])  # the others' completions come later
    tasks = api.patch_json("/tasks/batch", {"ids": [b, "task-missing", a, b, c],
                                            "completed": True},
                           headers=HEADERS, status=200).json
    assert [t["id"] for t in tasks] == [b, a, c]
    assert all(t["completed"] is True and t["completedAt"] for t in tasks)
    assert tasks[1]["completedAt"] == first["completedAt"]
    assert tasks[1]["updatedAt"] == first["updatedAt"]
    assert tasks[0]["completedAt"] == tasks[2]["completedAt"] != first["completedAt"]


def test_batch_complete_false_reopens(api):
    a, b = (create(api)["id"] for _ in range(2))
    api.patch_json("/tasks/batch", {"ids": [a, b], "completed": True}, headers=HEADERS)
    tasks = api.patch_json("/tasks/batch", {"ids": [a], "completed": False},
                           headers=HEADERS, status=200).json
    assert [(t["id"], t["completed"], t["completedAt"]) for t in tasks] == [(a, False, None)]
    assert api.get("/tasks/" + b, headers=HEADERS).json["completed"] is True


@pytest.mark.parametrize("body, mentions", [
    ({"ids": ["task-1"]}, ["completed"]),
    ({"ids": ["task-1"], "completed": "yes"}, ["completed"]),
    ({"ids": ["task-1"], "completed": None}, ["completed"]),
    ({"completed": True}, ["ids"]),
    ({"ids": [1], "completed": True}, ["ids[0]"]),
])
def test_batch_complete_with_bad_body_is_a_400_and_changes_nothing(api, body, mentions):
    task = create(api)
    body = json.loads(json.dumps(body).replace("task-1", task["id"]))
    response = api.patch_json("/tasks/batch", body, headers=HEADERS, status=400)
    assert_error(response, 400, mentions=mentions)
    assert api.get("/tasks/" + task["id"], headers=HEADERS).json == task


def test_batch_complete_is_one_transaction(api, store, monkeypatch):
    a, b = (create(api)["id"] for _ in range(2))

    # The UPDATE runs, then building the answer in the same transaction fails.
    def fail(*args):
        raise RuntimeError("failure after the UPDATE ran")

    monkeypatch.setattr(genesy_tasks, "_in_request_order", fail)
    response = api.patch_json("/tasks/batch", {"ids": [a, b], "completed": True},
                              headers=HEADERS, expect_errors=True)
    assert_error(response, 500)
    assert "failure after the UPDATE ran" in response.errors
    monkeypatch.undo()
    assert [t["completed"] for t in store.get_many([a, b])] == [False, False]


def test_batch_paths_never_reach_the_single_task_handlers(api, store):
    # Genesy's own example server routes PATCH /tasks/batch to PATCH /tasks/:id.
    store.create({"subject": "x"})
    response = api.patch_json("/tasks/batch", {"completed": True}, headers=HEADERS, status=400)
    assert_error(response, 400, mentions=["ids"])
    response = api.get("/tasks/batch", headers=HEADERS, status=405)
    assert_error(response, 405, mentions=["/tasks/batch"])
    assert sorted(response.headers["Allow"].split(",")) == ["PATCH", "POST"]


def test_batches_of_10000_ids_work_beyond_sqlites_parameter_limit(api, store):
    ids = store.create_many([{"subject": "Seeded %d" % n} for n in range(10_000)])
    # Lower the bound-parameter limit far below the batch size (Python 3.11
    # and newer can; before, SQLite's own limit, 32,766 since 3.32, stands).
    if hasattr(sqlite3.Connection, "setlimit"):
        store._connection().setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 50)
    ids = ids[::-1]
    tasks = api.post_json("/tasks/batch", {"ids": ids}, headers=HEADERS, status=200).json
    assert [t["id"] for t in tasks] == ids
    tasks = api.patch_json("/tasks/batch", {"ids": ids, "completed": True},
                           headers=HEADERS, status=200).json
    assert len(tasks) == 10_000 and all(t["completed"] for t in tasks)


def test_a_batch_over_the_maximum_is_a_413(api, store):
    ids = ["task-%d" % n for n in range(10_001)]
    for method in (api.post_json, api.patch_json):
        response = method("/tasks/batch", {"ids": ids, "completed": True}, headers=HEADERS,
                          status=413)
        assert_error(response, 413, mentions=["10001", "10000"])
    small = webtest.TestApp(make_app(store, api_keys=KEY, max_batch=3))
    small.post_json("/tasks/batch", {"ids": ["a", "b", "c"]}, headers=HEADERS, status=200)
    small.post_json("/tasks/batch", {"ids": ["a", "b", "c", "d"]}, headers=HEADERS, status=413)


def test_a_body_over_the_limit_is_a_413_and_changes_nothing(store):
    small = webtest.TestApp(make_app(store, api_keys=KEY, max_body=100))
    response = small.post_json("/tasks", {"subject": "x" * 200}, headers=HEADERS, status=413)
    assert_error(response, 413, mentions=["100 bytes"])
    small.post_json("/tasks", {"subject": "x" * 50}, headers=HEADERS, status=201)
    assert store.count() == 1


def test_the_default_body_limit_fits_a_maximal_batch():
    ids = ["t" * 200] * genesy_tasks.DEFAULT_MAX_BATCH
    assert len(json.dumps({"ids": ids, "completed": True})) < genesy_tasks.DEFAULT_MAX_BODY


# -- listing, filtering, paging, deleting --------------------------------------

def _ids(page):
    return [task["id"] for task in page["tasks"]]


def test_list_is_newest_first_with_whole_tasks_and_no_next_page(api):
    first, second = create(api, subject="first"), create(api, subject="second")
    page = api.get("/tasks", headers=HEADERS, status=200).json
    assert page == {"tasks": [second, first], "nextCursor": None}
    oldest = api.get("/tasks?order=oldest", headers=HEADERS).json
    assert _ids(oldest) == [first["id"], second["id"]]


def test_list_pages_with_a_cursor_stable_while_tasks_are_added(api):
    made = [create(api, subject="task %d" % number)["id"] for number in range(7)]
    newest_first = made[::-1]
    page = api.get("/tasks?limit=3", headers=HEADERS).json
    assert _ids(page) == newest_first[:3] and page["nextCursor"]
    create(api, subject="arrives while paging")  # must not shift the next pages
    seen = _ids(page)
    for _ in range(len(made)):  # at most a page a task
        if not page["nextCursor"]:
            break
        page = api.get("/tasks", {"limit": 3, "cursor": page["nextCursor"]}, headers=HEADERS).json
        seen += _ids(page)
    assert seen == newest_first and page["nextCursor"] is None


def test_list_limit_defaults_to_50_and_is_capped_at_500(api, store):
    store.create_many([{"subject": "bulk %d" % number} for number in range(501)])
    assert len(api.get("/tasks", headers=HEADERS).json["tasks"]) == 50
    assert len(api.get("/tasks?limit=500", headers=HEADERS).json["tasks"]) == 500
    assert_error(api.get("/tasks?limit=501", headers=HEADERS, status=400), 400,
                 "Invalid request", ["limit", "500"])


@pytest.mark.parametrize("query, expected", [
    ("ownerId=user-1", {"a", "c"}),
    ("contactId=contact-2", {"b"}),
    ("companyId=company-1", {"a", "b"}),
    ("type=call", {"a"}),
    ("completed=true", {"c"}),
    ("completed=false", {"a", "b", "d"}),
    ("ownerId=user-1&completed=false", {"a"}),
    ("ownerId=nobody", set()),
    ("ownerId=", set()),  # an empty value is a value: no task has an empty ownerId
    # Instants are compared, whatever the spelling: 11:00+01:00 is 10:00Z.
    ("dueBefore=2024-01-15T10:00:00Z", {"b"}),
    ("dueAfter=2024-01-15T10:00:00Z", {"a", "c"}),
    ("dueAfter=20240115T1001Z", {"c"}),
    ("dueAfter=2024-01-15&dueBefore=2024-01-16", {"a", "b"}),
])
def test_list_filters(api, query, expected):
    names = {
        create(api, subject="a", ownerId="user-1", companyId="company-1", type="call",
               dueDate="2024-01-15T11:00:00+01:00")["id"]: "a",
        create(api, subject="b", ownerId="user-2", companyId="company-1",
               contactId="contact-2", dueDate="2024-01-15")["id"]: "b",
        create(api, subject="c", ownerId="user-1", dueDate="2024-02-01")["id"]: "c",
        create(api, subject="d")["id"]: "d",
    }
    completed = [task_id for task_id, name in names.items() if name == "c"]
    api.patch_json("/tasks/batch", {"ids": completed, "completed": True}, headers=HEADERS)
    page = api.get("/tasks?" + query, headers=HEADERS, status=200).json
    assert {names[task_id] for task_id in _ids(page)} == expected


def test_list_follows_due_date_changes(api):
    task = create(api, dueDate="2030-01-01")
    api.patch_json("/tasks/" + task["id"], {"dueDate": "2020-01-01T00:00:00-05:00"},
                   headers=HEADERS)
    assert _ids(api.get("/tasks?dueBefore=2020-01-01T05:00:01Z", headers=HEADERS).json) \
        == [task["id"]]
    api.patch_json("/tasks/" + task["id"], {"dueDate": None}, headers=HEADERS)
    assert api.get("/tasks?dueBefore=2100-01-01", headers=HEADERS).json["tasks"] == []


@pytest.mark.parametrize("query, mentions", [
    ("completed=yes", ["completed"]),
    ("limit=0", ["limit"]),
    ("limit=ten", ["limit"]),
    ("limit=", ["limit"]),
    ("completed=", ["completed"]),
    ("order=", ["order"]),
    ("limit=-5", ["limit"]),
    ("dueBefore=tomorrow", ["dueBefore", "ISO 8601"]),
    ("dueAfter=2024-02-30", ["dueAfter"]),
    ("order=random", ["order"]),
    ("cursor=not-a-cursor", ["cursor"]),
    ("ownerID=user-1", ["ownerID", "ownerId"]),  # a typo is not silently ignored
    ("ownerId=a&ownerId=b", ["ownerId", "more than once"]),
    ("ownerId=%FF", ["UTF-8"]),
])
def test_bad_list_parameters_are_400s(api, query, mentions):
    assert_error(api.get("/tasks?" + query, headers=HEADERS, status=400), 400,
                 "Invalid request", mentions)


def test_a_cursor_is_a_place_in_creation_order_for_either_order(api):
    first, middle, last = (create(api, subject=name)["id"] for name in ("1", "2", "3"))
    cursor = api.get("/tasks?limit=2", headers=HEADERS).json["nextCursor"]  # at "middle"
    assert _ids(api.get("/tasks?cursor=" + cursor, headers=HEADERS).json) == [first]
    assert _ids(api.get("/tasks?order=oldest&cursor=" + cursor, headers=HEADERS).json) == [last]


def test_list_needs_the_key(api):
    assert_error(api.get("/tasks", status=401), 401, "Unauthorized")


def test_delete_is_204_then_404_and_the_task_is_gone(api):
    task, kept = create(api), create(api)
    response = api.delete("/tasks/" + task["id"], headers=HEADERS, status=204)
    assert response.body == b"" and "Content-Type" not in response.headers
    assert_error(api.delete("/tasks/" + task["id"], headers=HEADERS, status=404), 404,
                 "Task not found", [task["id"]])
    api.get("/tasks/" + task["id"], headers=HEADERS, status=404)
    assert api.post_json("/tasks/batch", {"ids": [task["id"], kept["id"]]},
                         headers=HEADERS).json == [kept]
    assert_error(api.delete("/tasks/" + kept["id"], status=401), 401)
    api.get("/tasks/" + kept["id"], headers=HEADERS, status=200)


def test_delete_batch_is_not_a_task_id(api):
    assert_error(api.delete("/tasks/batch", headers=HEADERS, status=405), 405)


# -- idempotent create ---------------------------------------------------------

def _create_with_key(api, key, body, **kwargs):
    return api.post_json("/tasks", body, headers={**HEADERS, "Idempotency-Key": key}, **kwargs)


def test_a_retry_with_the_same_idempotency_key_returns_the_original(api, store):
    first = _create_with_key(api, "retry-1", FULL_TASK, status=201)
    assert "Idempotent-Replayed" not in first.headers
    api.patch_json("/tasks/" + first.json["id"], {"completed": True}, headers=HEADERS)
    reordered = dict(reversed(list(FULL_TASK.items())))  # same body, other key order
    retry = _create_with_key(api, "retry-1", reordered, status=201)
    assert retry.json == first.json  # the original answer, not the task as it is now
    assert retry.headers["Location"] == first.headers["Location"]
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert store.count() == 1


def test_the_quoted_form_of_the_ietf_draft_is_the_same_key(api, store):
    first = _create_with_key(api, '"retry-2"', {"subject": "x"}, status=201)
    assert _create_with_key(api, "retry-2", {"subject": "x"}, status=201).json == first.json
    assert store.count() == 1


def test_the_same_idempotency_key_with_another_body_is_a_422(api, store):
    _create_with_key(api, "retry-3", {"subject": "x"}, status=201)
    assert_error(_create_with_key(api, "retry-3", {"subject": "y"}, status=422), 422,
                 "Idempotency key reused", ["Idempotency-Key"])
    assert store.count() == 1


def test_different_idempotency_keys_and_no_key_create_separate_tasks(api, store):
    _create_with_key(api, "a", {"subject": "x"}, status=201)
    _create_with_key(api, "b", {"subject": "x"}, status=201)
    api.post_json("/tasks", {"subject": "x"}, headers=HEADERS, status=201)
    api.post_json("/tasks", {"subject": "x"}, headers=HEADERS, status=201)
    assert store.count() == 4


@pytest.mark.parametrize("key", ["", '""', "x" * 256, "has space", "caf\u00e9"])
def test_a_malformed_idempotency_key_is_a_400(api, store, key):
    response = api.post_json("/tasks", {"subject": "x"},
                             headers={**HEADERS,
                                      "Idempotency-Key": key.encode("utf-8").decode("latin-1")},
                             status=400)
    assert_error(response, 400, "Invalid request", ["Idempotency-Key"])
    assert store.count() == 0


def test_a_refused_create_does_not_spend_the_idempotency_key(api, store):
    _create_with_key(api, "retry-4", {"subject": ""}, status=400)
    _create_with_key(api, "retry-4", {"subject": "fixed"}, status=201)
    assert store.count() == 1


def test_idempotency_keys_are_kept_24_hours_then_forgotten(store, monkeypatch):
    task, replayed = store.create_idempotent({"subject": "x"}, "old")
    clock = time.time()
    monkeypatch.setattr(genesy_tasks.time, "time", lambda: clock + 24 * 3600 - 60)
    assert store.create_idempotent({"subject": "x"}, "old") == (task, True)
    monkeypatch.setattr(genesy_tasks.time, "time", lambda: clock + 24 * 3600 + 60)
    store.create_idempotent({"subject": "x"}, "another")  # purges keys past the TTL
    again, replayed = store.create_idempotent({"subject": "x"}, "old")
    assert replayed is False and again["id"] != task["id"]


def test_concurrent_retries_with_one_key_create_one_task(db_path, store):
    results, errors = [], []

    def retry():
        try:
            with TaskStore(db_path) as own:
                results.append(own.create_idempotent({"subject": "race"}, "race-key"))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=retry) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len({task["id"] for task, _ in results}) == 1
    assert sorted(replayed for _, replayed in results) == [False] + [True] * 7
    assert store.count() == 1


# -- health, routing, authentication -------------------------------------------

def test_health_is_200_ok_for_a_valid_key(api):
    response = api.get("/health", headers=HEADERS, status=200)
    assert response.json == {"status": "ok"}
    assert response.content_type == "application/json"


ROUTES = [
    ("GET", "/health", None), ("POST", "/tasks", {"subject": "x"}),
    ("GET", "/tasks/task-x", None), ("PATCH", "/tasks/task-x", {"completed": True}),
    ("POST", "/tasks/batch", {"ids": []}),
    ("PATCH", "/tasks/batch", {"ids": [], "completed": True}),
]


@pytest.mark.parametrize("method, path, body", ROUTES)
@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"X-API-Key": ""},
                                     {"X-API-Key": KEY + "x"}, {"x-api-key": KEY[:-1]},
                                     {"Authorization": KEY}, {"X-API-Key": "ключ"}])
def test_every_route_is_401_without_a_valid_key(api, store, method, path, body, headers):
    response = api.request(path, method=method, headers=headers, expect_errors=True,
                           body=json.dumps(body).encode() if body else b"",
                           content_type="application/json" if body else None)
    assert_error(response, 401, title="Unauthorized", mentions=["X-API-Key"])
    assert store.count() == 0


def test_header_names_are_case_insensitive(api):
    api.get("/health", headers={"x-api-key": KEY}, status=200)


def test_several_keys_are_accepted_for_rotation(db_path, closing):
    rotating = webtest.TestApp(closing(make_app(db_path, api_keys=" old-key , new-key,, ")))
    for key in ("old-key", "new-key"):
        rotating.get("/health", headers={"X-API-Key": key}, status=200)
    for key in ("", " old-key", "old-key,new-key", "other"):
        rotating.get("/health", headers={"X-API-Key": key}, status=401)


def test_the_key_header_is_configurable(db_path, closing):
    custom = webtest.TestApp(closing(make_app(db_path, api_keys=KEY, header="X-Genesy-Secret")))
    custom.get("/health", headers={"X-Genesy-Secret": KEY}, status=200)
    response = custom.get("/health", headers={"X-API-Key": KEY}, status=401)
    assert_error(response, 401, mentions=["X-Genesy-Secret"])


@pytest.mark.parametrize("header", ["", "X API Key", "X-Key:", "Content-Length"])
def test_an_invalid_key_header_name_is_refused(db_path, header):
    with pytest.raises(ValueError):
        make_app(db_path, api_keys=KEY, header=header)


def test_without_keys_a_strong_key_is_generated_and_kept_in_the_database(db_path, closing):
    first = closing(make_app(db_path, api_keys="  "))
    key = first.store.generated_api_key()
    first.close()
    assert re.fullmatch(r"[A-Za-z0-9_-]{40,}", key)
    second = closing(make_app(db_path, api_keys=None))
    assert second.store.generated_api_key() == key
    client = webtest.TestApp(second)
    client.get("/health", headers={"X-API-Key": key}, status=200)
    client.get("/health", status=401)
    second.close()
    other = closing(TaskStore(os.path.join(os.path.dirname(db_path), "other.db")))
    assert other.generated_api_key() != key


def test_unknown_routes_are_json_404s(api):
    for path in ("/index.html", "/task", "/tasks/", "/tasks/a/b", "/users"):
        response = api.get(path, headers=HEADERS, status=404)
        assert_error(response, 404, mentions=[path])


@pytest.mark.parametrize("method, path, allowed", [
    ("PUT", "/tasks", ["GET", "POST"]), ("PUT", "/tasks/task-1", ["DELETE", "GET", "PATCH"]),
    ("DELETE", "/tasks/batch", ["PATCH", "POST"]), ("POST", "/health", ["GET"]),
    ("POST", "/tasks/task-1", ["DELETE", "GET", "PATCH"]),
])
def test_a_wrong_method_is_a_405_with_allow(api, method, path, allowed):
    response = api.request(path, method=method, headers=HEADERS, expect_errors=True)
    assert_error(response, 405, mentions=[method, path])
    assert sorted(set(response.headers["Allow"].split(",")) - {"HEAD"}) == allowed


def test_an_unexpected_failure_is_a_json_500_and_is_logged(api, store, monkeypatch):
    def explode(task_id):
        raise ZeroDivisionError("secret internals")

    monkeypatch.setattr(store, "get_json", explode)
    response = api.get("/tasks/task-1", headers=HEADERS, expect_errors=True)
    assert_error(response, 500)
    assert "secret" not in response.text and "Traceback" not in response.text
    assert "ZeroDivisionError: secret internals" in response.errors


def test_a_locked_database_is_a_503_and_the_server_recovers(db_path, api, closing):
    quick = webtest.TestApp(closing(make_app(TaskStore(db_path, busy_timeout=0.05),
                                             api_keys=KEY)))
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        # Opening needs no write lock once the schema exists.
        TaskStore(db_path, busy_timeout=0.05).close()
        response = quick.post_json("/tasks", {"subject": "x"}, headers=HEADERS,
                                   expect_errors=True)
        assert_error(response, 503, mentions=["retry"])
        assert response.headers["Retry-After"] == "1"
        assert "storage unavailable: database is locked" in response.errors
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    quick.post_json("/tasks", {"subject": "x"}, headers=HEADERS, status=201)


def test_responses_carry_nosniff(api):
    for response in (api.get("/health", headers=HEADERS),
                     api.get("/health", status=401),
                     api.get("/nowhere", headers=HEADERS, status=404)):
        assert response.headers["X-Content-Type-Options"] == "nosniff"


# -- auth hygiene --------------------------------------------------------------

def test_every_key_is_compared_in_constant_time(db_path, monkeypatch, closing):
    compared = []
    real_compare = genesy_tasks.hmac.compare_digest

    def spy(received, key):
        compared.append((received, key))
        return real_compare(received, key)

    monkeypatch.setattr(genesy_tasks.hmac, "compare_digest", spy)
    application = closing(make_app(db_path, api_keys=["first-key", "second-key", "third-key"]))
    client = webtest.TestApp(application)
    for sent, status in (("first-key", 200), ("nearly-first", 401), ("", 401)):
        compared.clear()
        client.get("/health", headers={"X-API-Key": sent}, status=status)
        # No early exit: every key is compared, with hmac.compare_digest, whatever matched.
        assert [key for _, key in compared] == [b"first-key", b"second-key", b"third-key"]
        assert {given for given, _ in compared} == {sent.encode()}


def test_refused_requests_leave_no_key_header_or_body_in_the_log(start_process):
    running = start_process("--max-body", "2000")
    secret = "s3cr3t-%s" % os.urandom(4).hex()
    sent = [
        ("GET", "/health", None, {"X-API-Key": "wrong-" + secret}),
        ("POST", "/tasks", {"subject": secret}, {"X-API-Key": "wrong-" + secret}),
        ("POST", "/tasks", {"subject": secret, "x": "y" * 3000}, HEADERS),  # 413
        ("POST", "/tasks", {"subject": 5, "description": secret}, HEADERS),  # 400
        ("GET", "/tasks/" + "x", None, {**HEADERS, "X-Secret": secret}),  # 404
    ]
    for method, path, body, headers in sent:
        status = running.request(method, path, body, headers=headers)[0]
        assert status in (400, 401, 404, 413)
    # Malformed HTTP, refused by the server itself.
    running.raw(("GET /health HTTP/1.1\r\nX-API-Key: %s\r\nBad Header\r\n\r\n"
                 % secret).encode())
    running.raw(("POST /tasks HTTP/1.1\r\nX-API-Key: %s\r\nContent-Length: 99999999"
                 "\r\n\r\n" % secret).encode())
    assert running.stop() == 0
    log = running.log()
    assert re.search(r"GET /health 401 ", log) and " 413 " in log
    assert secret not in log and KEY not in log


def test_no_response_carries_a_server_banner_and_all_carry_nosniff(start_process):
    running = start_process()
    answers = [
        running.raw(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        running.raw(("GET /health HTTP/1.1\r\nX-API-Key: %s\r\nConnection: close"
                     "\r\n\r\n" % KEY).encode()),
        running.raw(b"GET /nowhere HTTP/1.1\r\nConnection: close\r\n\r\n"),
        running.raw(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"),
        running.raw(b"GET /openapi.json HTTP/1.1\r\nConnection: close\r\n\r\n"),
        running.raw(b"BREW /pot HTCPCP/1.0\r\n\r\n"),  # refused by the server itself
        running.raw(b"POST /tasks HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
    ]
    running.stop()
    for answer in answers:
        head = answer.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
        assert head.startswith("http/1.1 "), answer
        assert "\r\nserver:" not in head and "x-powered-by" not in head
        assert "\r\nx-content-type-options: nosniff" in head, head


# -- storage errors ------------------------------------------------------------

def _make_read_only(path):
    """Make a file unwritable even for root (chattr +i); return the undo."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", path], check=True)
        return lambda: subprocess.run(["chattr", "-i", path], check=True)
    os.chmod(path, 0o444)
    return lambda: os.chmod(path, 0o600)


def test_a_read_only_database_is_a_503_until_it_is_writable_again(db_path, closing):
    with TaskStore(db_path) as store:
        kept = store.create({"subject": "before"})
    undo = _make_read_only(db_path)
    try:
        application = closing(make_app(TaskStore(db_path), api_keys=KEY))
        client = webtest.TestApp(application)
        assert client.get("/tasks/" + kept["id"], headers=HEADERS).json == kept  # reads go on
        response = client.post_json("/tasks", {"subject": "refused"}, headers=HEADERS,
                                    expect_errors=True)
        assert_error(response, 503, "Service unavailable", ["read-only", "retry"])
        assert response.headers["Retry-After"] == "1"
        assert "storage unavailable: attempt to write a readonly database" in response.errors
    finally:
        undo()
    # Fixed: the next request opens the file afresh and succeeds, with no restart.
    client.post_json("/tasks", {"subject": "after"}, headers=HEADERS, status=201)
    assert [t["subject"] for t in application.store.list()["tasks"]] == ["after", "before"]


def test_a_full_disk_is_a_503_that_writes_nothing_and_passes_by_itself(db_path, closing):
    store = closing(_FillingDisk(db_path))
    application = closing(make_app(store, api_keys=KEY))
    client = webtest.TestApp(application)
    store.full = True
    big = {"subject": "big", "description": "x" * 20000}
    response = client.post_json("/tasks", big, headers=HEADERS, expect_errors=True)
    assert_error(response, 503, "Service unavailable", ["disk full"])
    assert "storage unavailable: database or disk is full" in response.errors
    # A batch that fails half-way at the disk leaves nothing behind either.
    with pytest.raises(sqlite3.OperationalError, match="full"):
        store.create_many([{"subject": "small"}] * 5 + [big] * 5)
    store.full = False
    assert store.count() == 0
    client.post_json("/tasks", big, headers=HEADERS, status=201)
    assert store.count() == 1


# -- fuzzing: no request fails the app -----------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)


# Bodies shaped like the API's, so that fuzzing gets past the first checks.
_task_like = st.fixed_dictionaries({}, optional={
    name: _json_values for name in genesy_tasks.TASK_FIELDS + ("ids",)})


_example_ids = st.sampled_from(["task-01a2244cab3fc2c1aeaf91dc280a15eb",
                                "task-01a2244cab3f2148621ff8c008eb0faf", "task-missing"])


_nearly_valid = st.fixed_dictionaries(
    {"subject": st.text(min_size=1, max_size=20)},
    optional={"ids": st.lists(_example_ids | st.text(max_size=5), max_size=4),
              "completed": st.booleans(), "dueDate": st.sampled_from(
                  ["2024-01-15", "2024-02-30", "20240115T1000Z", "soon", None]),
              **{name: st.none() | st.text(max_size=10) for name in ("description", "type",
                                                                      "ownerId")}})


_bodies = st.one_of(st.none(), st.binary(max_size=64), _json_values.map(json.dumps),
                    st.lists(_json_values, max_size=3).map(json.dumps),  # not an object
                    _task_like.map(json.dumps), _nearly_valid.map(json.dumps),
                    _nearly_valid.map(json.dumps))


_segments = st.one_of(st.sampled_from(["tasks", "batch", "health", "openapi.json", "", "..",
                                       "task-01a2244cab3fc2c1aeaf91dc280a15eb"]),
                      st.text(max_size=12))


_paths = st.lists(_segments, max_size=3).map(
    lambda parts: "/" + "/".join(quote(part, safe="") for part in parts))


_queries = st.lists(st.tuples(st.sampled_from(list(genesy_tasks._LIST_PARAMETERS) + ["x"]),
                              st.text(max_size=12)), max_size=3).map(urlencode)


_header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30)


def _database_state(store):
    conn = store._connection()
    return (conn.execute("SELECT * FROM genesy_tasks ORDER BY seq").fetchall(),
            conn.execute("SELECT key, fingerprint FROM genesy_idempotency ORDER BY key").fetchall())


def _assert_documented_answer(method, path, response):
    """Every answer is JSON: Genesy's error shape, or a task, tasks, a page, health."""
    assert response.status_int < 500, (method, path, response.status, response.body[:300])
    if method == "HEAD" or response.status_int == 204:
        assert response.body == b""
        return
    if response.status_int == 200 and path == "/" and method == "GET":
        assert response.content_type == "text/html"
        return
    assert response.content_type == "application/json", (method, path, response.status)
    body = json.loads(response.body)
    if response.status_int >= 400:
        assert set(body) == {"error", "message"}
        assert isinstance(body["error"], str) and isinstance(body["message"], str)
        return
    if isinstance(body, list):
        assert all(set(task) == TASK_KEYS for task in body)
    elif "tasks" in body:
        assert set(body) == {"tasks", "nextCursor"}
        assert all(set(task) == TASK_KEYS for task in body["tasks"])
    elif "openapi" not in body and body != {"status": "ok"}:
        assert set(body) == TASK_KEYS, body


def test_fuzzed_requests_never_fail_the_server_and_refusals_change_nothing(tmp_path, closing):
    shutil.copyfile(os.path.join(HERE, "tasks.db.example"), str(tmp_path / "fuzz.db"))
    application = closing(make_app(str(tmp_path / "fuzz.db"), api_keys=KEY))
    client = webtest.TestApp(application)

    # Mostly the API's own routes, key and media type, so that most requests
    # reach the routes' own checks; the rest anything at all.
    example = "/tasks/task-01a2244cab3fc2c1aeaf91dc280a15eb"
    routes = st.sampled_from([("POST", "/tasks"), ("GET", "/tasks"), ("POST", "/tasks/batch"),
                              ("PATCH", "/tasks/batch"), ("GET", example), ("PATCH", example),
                              ("DELETE", "/tasks/task-01a2244cab40852edf7c9c65e4b1df97"),
                              ("GET", "/health"), ("GET", "/")])
    anything = st.tuples(st.sampled_from(["GET", "POST", "PATCH", "DELETE", "PUT", "HEAD",
                                          "OPTIONS"]), _paths)

    @FUZZ
    @given(route=st.one_of(routes, routes, anything),
           query=_queries, body=_bodies,
           content_type=st.one_of(st.just("application/json"), st.just("application/json"),
                                  st.sampled_from(["application/json; charset=utf-8",
                                                   "text/plain", "application/merge-patch+json",
                                                   "multipart/form-data"]), _header_text),
           key=st.sampled_from([KEY, KEY, KEY, "", "wrong-key"]),
           idempotency_key=st.one_of(st.none(), st.none(), _header_text))
    def request(route, query, body, content_type, key, idempotency_key):
        method, path = route
        headers = {"X-API-Key": key, "Content-Type": content_type}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        before = _database_state(application.store)
        response = client.request(path + ("?" + query if query else ""), method=method,
                                  body=body.encode() if isinstance(body, str) else body,
                                  headers=headers, expect_errors=True)
        _assert_documented_answer(method, path, response)
        if response.status_int >= 400:
            assert _database_state(application.store) == before, (method, path, response.body)

    request()


@pytest.mark.skipif(sys.version_info < (3, 10), reason="needs Schemathesis 4.5 or newer "
                    "([auth.openapi]), which needs Python 3.10")
def test_schemathesis_finds_no_fault_against_the_openapi_document(tmp_path, closing):
    import schemathesis
    application = closing(make_app(str(tmp_path / "schemathesis.db"), api_keys=KEY,
                           users=[{"id": "user-1", "name": "Ana", "email": "ana@example.com"}]))
    application.store.create_many([{"subject": "seed %d" % n} for n in range(3)])
    # Refusals are the statuses the API documents; 413 is an oversized batch.
    # The key is given as the document's security scheme, so that Schemathesis
    # also tries requests without it.
    config = schemathesis.config.SchemathesisConfig.from_dict({
        "auth": {"openapi": {"apiKey": {"api_key": KEY}}},
        "checks": {"negative_data_rejection": {
            "expected-statuses": [400, 401, 404, 405, 410, 413, 415, 422]},
            # Any digits are a valid cursor, but one beyond the feed's end is a 410.
            "positive_data_acceptance": {
                "expected-statuses": ["2XX", 401, 403, 404, 410]}}})
    schema = schemathesis.openapi.from_wsgi("/openapi.json", application, config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 12  # every route but /openapi.json, which it reads instead

    failures = []
    for operation, mode in itertools.product(operations, list(schemathesis.GenerationMode)):
        @settings(FUZZ, max_examples=int(os.environ.get("FUZZ_EXAMPLES", 8)))
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case):
            # The positive-data check cannot know that a key already used with
            # another body is rightly a 422, so each case gets its own key.
            if case.headers and "Idempotency-Key" in case.headers:
                case.headers["Idempotency-Key"] = os.urandom(16).hex()
            # All of Schemathesis's default checks: no server error, status
            # codes, content types and headers documented, responses conform
            # to the schema, valid data accepted and invalid data refused, 401
            # without the key, 405 for methods not documented.
            case.call_and_validate()

        try:
            call()
        except Unsatisfiable:
            # The dashboard page takes no input at all: nothing can be made invalid.
            assert mode == schemathesis.GenerationMode.NEGATIVE and operation.label == "GET /"
        except Exception as failure:  # collect every operation's, then report them all
            failures.append("%s (%s data): %s" % (operation.label, mode.value, failure))
    assert failures == [], "\n\n".join(failures)


# -- embedding -----------------------------------------------------------------

def _bottle_crm():
    """A Bottle CRM with what hurt under the old mount: a login hook and HTML errors."""
    crm = bottle.Bottle()
    seen = []

    @crm.hook("before_request")
    def login():
        seen.append(bottle.request.path)
        if not bottle.request.path.startswith("/login"):
            bottle.redirect("/login")

    @crm.get("/login")
    def login_page():
        return "<form>log in</form>"

    @crm.error(404)
    def not_found(error):
        return "<h1>The CRM's own 404</h1>"

    return crm, seen


def _flask_crm():
    import flask
    crm = flask.Flask("crm")
    seen = []

    @crm.before_request
    def login():
        seen.append(flask.request.path)
        if flask.request.path != "/login":
            return flask.redirect("/login")

    @crm.route("/login")
    def login_page():
        return "<form>log in</form>"

    return crm, seen


def _plain_wsgi_crm():
    seen = []

    def crm(environ, start_response):
        seen.append(environ["PATH_INFO"])
        start_response("302 Found", [("Location", "/login"), ("Content-Length", "0")])
        return [b""]
    return crm, seen


def _werkzeug_dispatcher(crm, tasks):
    from werkzeug.middleware.dispatcher import DispatcherMiddleware
    crm.wsgi_app = DispatcherMiddleware(crm.wsgi_app, {"/genesy": tasks})
    return crm


# The README's recipes, each the way it is written there.
MOUNT_RECIPES = {
    "bottle": (_bottle_crm, lambda crm, tasks: genesy_tasks.mount(crm, "/genesy", tasks)),
    "flask": (_flask_crm, lambda crm, tasks: setattr(
        crm, "wsgi_app", genesy_tasks.mount(crm.wsgi_app, "/genesy", tasks)) or crm),
    "flask-dispatcher-middleware": (_flask_crm, _werkzeug_dispatcher),
    "any-wsgi": (_plain_wsgi_crm, lambda crm, tasks: genesy_tasks.mount(crm, "/genesy/", tasks)),
}


@pytest.mark.parametrize("recipe", sorted(MOUNT_RECIPES))
def test_mounted_under_a_prefix_every_answer_is_the_apis_own(db_path, recipe, closing):
    build_crm, mount = MOUNT_RECIPES[recipe]
    crm, seen = build_crm()
    tasks = closing(make_app(db_path, api_keys=KEY))
    client = webtest.TestApp(mount(crm, tasks))
    # The CRM's own pages keep their hook.
    assert client.get("/contacts", status=302).headers["Location"].endswith("/login")
    assert seen == ["/contacts"]
    client.get("/genesy/health", headers=HEADERS, status=200)
    response = client.post_json("/genesy/tasks", {"subject": "x"}, headers=HEADERS, status=201)
    task = response.json
    assert response.headers["Location"] == "/genesy/tasks/" + task["id"]
    assert client.get(response.headers["Location"], headers=HEADERS).json == task
    client.post_json("/genesy/tasks/batch", {"ids": [task["id"]]}, headers=HEADERS, status=200)
    assert_error(client.get("/genesy/health", status=401), 401)
    # 404 and 405 are the API's JSON, naming the path as the client sent it.
    body = assert_error(client.get("/genesy/nope", headers=HEADERS, status=404), 404)
    assert body["message"] == "No route for GET /genesy/nope"
    response = client.get("/genesy/tasks/batch", headers=HEADERS, status=405)
    assert assert_error(response, 405)["message"] == (
        "GET is not allowed on /genesy/tasks/batch; allowed: PATCH, POST")
    assert_error(client.delete("/genesy/tasks/batch", status=405), 405)
    # The dashboard and the OpenAPI document know where they are.
    assert client.get("/genesy/openapi.json").json["servers"] == [{"url": "/genesy"}]
    assert seen == ["/contacts"]  # no request below the prefix reached the CRM


def test_the_readmes_mount_recipes_are_the_tested_ones():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as readme:
        text = readme.read()
    for line in ('application = mount(crm, "/genesy", api)',
                 'crm.wsgi_app = mount(crm.wsgi_app, "/genesy", api)',
                 'application = mount(wsgi_application, "/genesy", api)',
                 'DispatcherMiddleware(crm.wsgi_app, {"/genesy": api})'):
        assert line in text, line
    assert 'crm.mount("/genesy/", make_app' not in text  # the merge that answers in HTML


def test_mount_refuses_the_root_prefix(tasks_app):
    with pytest.raises(ValueError, match="prefix"):
        genesy_tasks.mount(bottle.Bottle(), "/", tasks_app)


def test_the_app_answers_a_dispatchers_prefix_in_its_messages(tasks_app):
    # Under any dispatcher that sets SCRIPT_NAME (a WSGI server's mount
    # point too), messages carry the prefix.
    client = webtest.TestApp(tasks_app, extra_environ={"SCRIPT_NAME": "/crm/genesy"})
    body = assert_error(client.get("/nope", headers=HEADERS, status=404), 404)
    assert body["message"] == "No route for GET /crm/genesy/nope"


def _open_files():
    return len(os.listdir("/proc/self/fd"))


def test_a_thread_per_request_server_keeps_open_files_bounded(db_path, closing, serve):
    # Flask's own development server starts a thread per connection; closing
    # each connection makes it a thread per request.
    from werkzeug.serving import make_server
    crm, _ = _flask_crm()
    tasks = closing(make_app(db_path, api_keys=KEY))
    task = tasks.store.create({"subject": "read a thousand times"})
    crm.wsgi_app = genesy_tasks.mount(crm.wsgi_app, "/genesy", tasks)
    server = serve(crm, via=lambda app: make_server("127.0.0.1", 0, app, threaded=True))

    def get():
        conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
        conn.request("GET", "/genesy/tasks/" + task["id"],
                     headers={**HEADERS, "Connection": "close"})
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())["id"]) == (200, task["id"])
        conn.close()

    for _ in range(20):  # warm up: the first connections, imports, caches
        get()
    before = _open_files()
    for _ in range(1000):
        get()
    # Without taking over finished threads' connections: 3 files each.
    assert _open_files() <= before + 12


# -- users ---------------------------------------------------------------------

USERS = [{"id": "user-1", "name": "Ana", "email": "ana@example.com"},
         {"id": "user-2", "name": "Bo"}]


def test_get_users_from_a_list_or_a_function(db_path):
    for users in (USERS, lambda: USERS):
        with contextlib.closing(make_app(db_path, api_keys=KEY, users=users)) as application:
            api = webtest.TestApp(application)
            response = api.get("/users", headers=HEADERS, status=200)
            assert (response.content_type, response.json) == ("application/json", USERS)
            assert_error(api.get("/users", status=401), 401)
            assert "/users" in api.get("/openapi.json").json["paths"]


def test_without_users_get_users_is_a_json_404(api):
    assert_error(api.get("/users", headers=HEADERS, status=404), 404, "Not found")
    assert "/users" not in api.get("/openapi.json").json["paths"]


@pytest.mark.parametrize("users, mentions", [
    ({"id": "u"}, "array"),
    (["user-1"], "users[0] must be an object"),
    ([{"id": "u"}], "users[0].name"),
    ([{"id": "", "name": "A"}], "users[0].id"),
    ([{"id": 1, "name": "A"}], "users[0].id"),
    ([{"id": "u", "name": "A", "email": None}], "users[0].email"),
    ([{"id": "u", "name": "A", "mail": "a@b"}], "unknown field 'mail'"),
    ([{"id": "u", "name": "A"}, {"id": "u", "name": "B"}], "given twice"),
])
def test_users_are_validated(db_path, users, mentions):
    with pytest.raises(ValueError, match=re.escape(mentions)):
        make_app(db_path, api_keys=KEY, users=users)


def test_a_users_function_returning_nonsense_is_a_logged_500(db_path, closing):
    application = closing(make_app(db_path, api_keys=KEY, users=lambda: [{"id": "u"}]))
    response = webtest.TestApp(application).get("/users", headers=HEADERS, status=500,
                                                expect_errors=True)
    assert_error(response, 500)
    assert "name must be a non-empty string" in response.errors


def test_users_from_a_file_on_the_command_line(tmp_path, start_process):
    users = tmp_path / "users.json"
    users.write_text(json.dumps(USERS))
    running = start_process("--users", str(users))
    assert running.request("GET", "/users")[::2] == (200, USERS)
    status, lines = _check("http://%s:%d" % (running.host, running.port), "--api-key", KEY)
    assert status == 0, lines
    assert "PASS  users (optional): GET /users -> 200, 2 users, each with an id and a " \
           "name; tasks go to the first, user-1" in lines


@pytest.mark.parametrize("content, message", [
    (None, r"--users: cannot read \S+missing.json: No such file"),
    ("[{", r"--users: \S+users.json is not valid JSON"),
    ('[{"id": "u"}]', r"--users: \S+users.json\[0\].name must be a non-empty string"),
])
def test_a_bad_users_file_stops_the_start_with_one_line(tmp_path, capsys, content, message):
    path = tmp_path / ("missing.json" if content is None else "users.json")
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as stopped:
        genesy_tasks.main(["--users", str(path), "--db", str(tmp_path / "t.db")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "t.db").exists()


def test_check_reports_users_that_break_the_contract(db_path, closing, serve):
    application = closing(make_app(db_path, api_keys=KEY, users=lambda: [{"id": "u", "nom": "A"}]))
    server = serve(application)
    status, lines = _check("http://127.0.0.1:%d" % server.port, "--api-key", KEY)
    server.stop()
    assert status == 1
    assert [line for line in lines if line.startswith("FAIL")] == [
        "FAIL  users (optional): GET /users -> 500 {\"error\":\"Internal server error\","
        "\"message\":\"the server failed to handle the request; the error was logged\"} "
        "(expected 200)"]


# -- the request inspector and the recording -----------------------------------

def _inspected_app(closing, db_path, **options):
    application = closing(make_app(db_path, api_keys=KEY, **options))
    return application, webtest.TestApp(application)


def _kept(client, **query):
    path = "/requests" + ("?" + urlencode(query) if query else "")
    return client.get(path, headers=HEADERS).json["requests"]


def test_the_inspector_keeps_every_request_and_its_answer_newest_first(db_path, closing):
    application, client = _inspected_app(closing, db_path)
    task = client.post_json("/tasks", {"subject": "Call"}, headers=HEADERS).json
    client.get("/nope?x=1", headers=HEADERS, status=404)
    client.get("/health", status=401)
    client.get("/health", headers={"X-API-Key": "a-wrong-key"}, status=401)
    client.post("/tasks", "not json", headers={**HEADERS, "Content-Type": "application/json"},
                status=400)
    kept = _kept(client)
    assert [(entry["method"], entry["path"], entry["response"]["status"]) for entry in kept] == [
        ("POST", "/tasks", 400), ("GET", "/health", 401), ("GET", "/health", 401),
        ("GET", "/nope?x=1", 404), ("POST", "/tasks", 201)]
    created = kept[-1]
    assert created["request"]["body"] == '{"subject": "Call"}'
    assert created["request"]["bytes"] == 19 and created["request"]["truncated"] is False
    assert json.loads(created["response"]["body"]) == task
    assert created["response"]["headers"]["Location"] == "/tasks/" + task["id"]
    assert ISO_UTC.match(created["time"]) and created["durationMs"] >= 0
    ids = [entry["id"] for entry in kept]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 5  # numbered as kept
    assert ids[-1] >= (time.time() - 60) * 1_000_000  # from the clock: a restart follows on
    assert kept[1]["request"]["headers"]["X-Api-Key"] == "[redacted]"  # even a wrong key
    assert "X-Api-Key" not in kept[2]["request"]["headers"]
    assert [entry["id"] for entry in _kept(client, limit=2)] == ids[:2]
    # With after, the ones right after it: a script paging forward misses none.
    assert [entry["id"] for entry in _kept(client, after=ids[3])] == ids[:3]
    assert [entry["id"] for entry in _kept(client, after=ids[3], limit=1)] == [ids[2]]
    assert_error(client.get("/requests?after=x", headers=HEADERS, status=400), 400)
    assert_error(client.get("/requests", status=401), 401)
    assert_error(client.get("/requests?limit=0", headers=HEADERS, status=400), 400)


def test_the_inspector_leaves_out_the_dashboard_and_itself(db_path, closing):
    application, client = _inspected_app(closing, db_path)
    client.get("/")
    client.get("/tasks", headers={**HEADERS, "X-Genesy-Dashboard": "1"})
    client.get("/requests", headers=HEADERS)
    client.get("/openapi.json")
    # Saying so without the key hides nothing.
    client.get("/tasks?probe=1", headers={"X-Genesy-Dashboard": "1"}, status=401)
    assert [entry["path"] for entry in _kept(client)] == ["/tasks?probe=1", "/openapi.json"]


def test_a_key_is_redacted_wherever_it_is_sent(db_path, tmp_path, closing):
    record = tmp_path / "rec.jsonl"
    application, client = _inspected_app(closing, db_path, header="X-Secret", record=str(record))
    client.get("/health", headers={"X-API-Key": KEY}, status=401)  # the wrong header
    client.get("/nope?key=" + KEY, headers={"X-Secret": KEY}, status=404)
    client.post_json("/contacts", {"apiKey": KEY}, headers={"X-Secret": KEY}, status=404)
    kept = client.get("/requests", headers={"X-Secret": KEY}).json["requests"]
    assert kept[2]["request"]["headers"]["X-Api-Key"] == "[redacted]"
    assert kept[1]["path"] == "/nope?key=[redacted]"
    assert json.loads(kept[0]["request"]["body"]) == {"apiKey": "[redacted]"}
    application.close()
    assert KEY not in json.dumps(kept) and KEY not in record.read_text()


def test_the_inspector_is_bounded_and_redacts_secrets(db_path, closing):
    application, client = _inspected_app(closing, db_path, inspect=3)
    for n in range(5):
        client.get("/health?n=%d" % n, headers={**HEADERS, "Authorization": "Bearer secret",
                                                "Cookie": "session=secret"})
    kept = _kept(client)
    assert [entry["path"] for entry in kept] == ["/health?n=4", "/health?n=3", "/health?n=2"]
    headers = kept[0]["request"]["headers"]
    assert headers["Authorization"] == headers["Cookie"] == "[redacted]"
    assert KEY not in json.dumps(kept) and "secret" not in json.dumps(kept)
    # Bodies past 64 KiB and answers past 4 KiB are cut, and say so.
    big = {"subject": "x" * 70_000}
    client.post_json("/tasks", big, headers=HEADERS, status=201)
    client.get("/tasks?limit=50", headers=HEADERS)
    answer, request = (entry for entry in _kept(client, limit=2))
    assert len(request["request"]["body"]) == 64 * 1024 and request["request"]["truncated"]
    assert request["request"]["bytes"] == len(json.dumps(big))
    assert len(answer["response"]["body"]) == 4096 and answer["response"]["truncated"]
    assert answer["response"]["bytes"] > 70_000


def test_with_the_inspector_off_get_requests_is_a_json_404(db_path, closing):
    application, client = _inspected_app(closing, db_path, inspect=0)
    client.get("/health", headers=HEADERS)
    assert_error(client.get("/requests", headers=HEADERS, status=404), 404,
                 mentions=["--inspect 0"])
    assert application.inspector is None
    assert "/requests" not in client.get("/openapi.json").json["paths"]
    for wrong in (-1, genesy_tasks.DEFAULT_MAX_INSPECT + 1, True):
        with pytest.raises(ValueError, match="inspect"):
            make_app(db_path, api_keys=KEY, inspect=wrong)


def test_a_request_that_waited_for_a_lock_is_kept_once(db_path, closing, serve):
    # The built-in server runs a write that met another writer's lock again
    # later; only the run that answered is kept.
    application = closing(make_app(db_path, api_keys=KEY, inspect=5))
    server = serve(application)
    with _locked_by_another_process(db_path) as release:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/tasks", body=json.dumps({"subject": "waits"}),
                     headers={**HEADERS, "Content-Type": "application/json"})
        _wait_for(lambda: server._parked)
        release()
        response = conn.getresponse()
        assert response.status == 201
        response.read()
        conn.close()
    server.stop()
    assert [(entry["method"], entry["response"]["status"])
            for entry in application.inspector.requests(10)] == [("POST", 201)]


def test_get_requests_over_http(start_process):
    running = start_process("--inspect", "2")
    for n in range(3):
        running.request("GET", "/tasks?limit=%d" % (n + 1))
    status, _, body = running.request("GET", "/requests")
    assert status == 200
    assert [entry["path"] for entry in body["requests"]] == ["/tasks?limit=3",
                                                             "/tasks?limit=2"]


def test_an_app_that_cannot_start_leaves_no_recording_thread_behind(tmp_path):
    before = threading.active_count()
    for _ in range(5):
        with pytest.raises(genesy_tasks.StorageError):
            make_app(str(tmp_path / "missing" / "x.db"), record=str(tmp_path / "rec.jsonl"))
    assert threading.active_count() == before


def test_an_odd_content_length_never_fails_the_inspector(db_path, closing):
    application = closing(make_app(db_path, api_keys=KEY))
    answers = []
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/tasks", "SERVER_NAME": "x",
               "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
               "wsgi.input": io.BytesIO(b"{}"), "wsgi.errors": io.StringIO(),
               "CONTENT_LENGTH": "\u00b2", "CONTENT_TYPE": "application/json"}
    body = b"".join(application(environ, lambda status, headers, exc_info=None:
                                answers.append(status)))
    assert answers == ["401 Unauthorized"] and json.loads(body)["error"] == "Unauthorized"


def test_requests_kept_by_several_threads_are_numbered_in_the_order_kept(db_path, closing):
    application, client = _inspected_app(closing, db_path, inspect=2000)

    def knock():
        for _ in range(200):
            client.get("/health", headers=HEADERS)

    threads = [threading.Thread(target=knock) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = [entry["id"] for entry in application.inspector.kept]
    assert len(ids) == 800 and ids == sorted(set(ids))


def test_a_write_that_timed_out_waiting_for_a_lock_is_kept_with_its_503(db_path, closing, serve):
    store = closing(TaskStore(db_path, busy_timeout=0.3))
    application = closing(make_app(store, api_keys=KEY))
    server = serve(application)
    with _locked_by_another_process(db_path):
        [(status, _, _)] = _pipelined(server.port, _request_bytes(
            "POST", "/tasks", {"subject": "waits"}, headers={"Connection": "close"}))
    server.stop()
    assert status == 503
    kept = application.inspector.requests(10)
    assert [(entry["method"], entry["response"]["status"]) for entry in kept] == [
        ("POST", 503)]


def test_the_recording_keeps_a_stranger_s_bodies_cut_and_paths_from_the_mount(db_path,
                                                                             tmp_path, closing):
    record = tmp_path / "rec.jsonl"
    api = closing(make_app(db_path, api_keys=KEY, record=str(record)))
    client = webtest.TestApp(genesy_tasks.mount(bottle.Bottle(), "/genesy", api))
    client.post("/genesy/contacts", b"x" * 100_000, status=404,
                headers={"Content-Type": "application/json"})
    client.post("/genesy/contacts", b"y" * 100_000, status=404,
                headers={**HEADERS, "Content-Type": "application/json"})
    api.close()
    stranger, known = (json.loads(line) for line in record.read_text().splitlines())
    assert len(stranger["request"]["body"]) == 64 * 1024 and stranger["request"]["truncated"]
    assert len(known["request"]["body"]) == 100_000 and not known["request"]["truncated"]
    assert stranger["path"] == known["path"] == "/contacts"  # replayable under any base URL


def test_sigterm_writes_the_recording_to_its_last_request(tmp_path, start_process):
    record = tmp_path / "rec.jsonl"
    running = start_process("--record", str(record))
    for n in range(30):
        running.request("GET", "/tasks/task-%d" % n)
    assert running.stop() == 0
    assert len(record.read_text().splitlines()) == 30


def _genesy_session(running):
    """What Genesy sends while connecting and working: the recording replay plays."""
    _, _, task = running.request("POST", "/tasks", {"subject": "Call", "contactId": "c-1"})
    other = running.request("POST", "/tasks", {"subject": "Email"})[2]
    running.request("GET", "/tasks/" + task["id"])
    running.request("PATCH", "/tasks/" + task["id"], {"completed": True})
    running.request("POST", "/tasks/batch", {"ids": [task["id"], "task-missing", other["id"]]})
    running.request("PATCH", "/tasks/batch", {"ids": [task["id"], other["id"]],
                                              "completed": True})
    running.request("GET", "/health", headers={})
    running.request("POST", "/contacts", {"name": "Ann"})
    running.request("DELETE", "/tasks/" + other["id"])
    return 9


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """One recording for the replay tests, which only read it."""
    directory = tmp_path_factory.mktemp("recording")
    path = directory / "genesy.jsonl"
    with contextlib.closing(Server(directory, "--record", str(path))) as running:
        count = _genesy_session(running)
        _wait_for(lambda: path.exists() and len(path.read_text().splitlines()) == count)
    return path


def test_a_recording_holds_each_request_and_answer_whole_with_the_key_redacted(recording):
    assert oct(os.stat(str(recording)).st_mode & 0o777) == "0o600"
    lines = [json.loads(line) for line in recording.read_text().splitlines()]
    assert [(line["method"], line["response"]["status"]) for line in lines] == [
        ("POST", 201), ("POST", 201), ("GET", 200), ("PATCH", 200), ("POST", 200),
        ("PATCH", 200), ("GET", 401), ("POST", 404), ("DELETE", 204)]
    ids = [line["id"] for line in lines]
    assert ids == sorted(set(ids))  # oldest first, as kept
    assert all(line["request"]["headers"]["X-Api-Key"] == "[redacted]"
               for line in lines if line["response"]["status"] != 401)
    assert KEY not in recording.read_text()
    assert json.loads(lines[4]["response"]["body"])[0]["completed"] is True
    assert set(lines[0]) == {"id", "time", "method", "path", "request", "response",
                             "durationMs"}


# -- options for the WSGI app --------------------------------------------------

def test_importing_the_module_creates_no_file(tmp_path):
    subprocess.run([sys.executable, "-c", "import genesy_tasks; genesy_tasks.app"],
                   cwd=tmp_path, env={**os.environ, "PYTHONPATH": HERE}, check=True)
    assert os.listdir(tmp_path) == []


def test_the_module_level_app_is_built_from_the_environment(tmp_path, monkeypatch,
                                                             lazy_app):
    monkeypatch.setenv("GENESY_TASKS_DB", str(tmp_path / "env.db"))
    monkeypatch.setenv("GENESY_API_KEY", "k1, k2")
    monkeypatch.setenv("GENESY_API_KEY_HEADER", "X-Secret")
    assert not (tmp_path / "env.db").exists()
    client = webtest.TestApp(lazy_app)
    client.get("/health", headers={"X-Secret": "k2"}, status=200)
    client.get("/health", headers={"X-API-Key": "k1"}, status=401)
    assert (tmp_path / "env.db").exists()


def test_every_app_option_applies_to_the_wsgi_app_as_under_gunicorn(tmp_path, monkeypatch,
                                                                    lazy_app):
    users = tmp_path / "users.json"
    users.write_text(json.dumps(USERS))
    monkeypatch.setenv("GENESY_TASKS_DB", str(tmp_path / "env.db"))
    monkeypatch.setenv("GENESY_API_KEY", KEY)
    monkeypatch.setenv("GENESY_TASKS_MAX_BATCH", "5")
    monkeypatch.setenv("GENESY_TASKS_MAX_BODY", "300")
    monkeypatch.setenv("GENESY_TASKS_BUSY_TIMEOUT", "0.25")
    monkeypatch.setenv("GENESY_TASKS_USERS", str(users))
    client = webtest.TestApp(lazy_app)
    assert_error(client.post_json("/tasks/batch", {"ids": ["t"] * 6}, headers=HEADERS,
                                  status=413), 413, "Batch too large")
    assert_error(client.post_json("/tasks", {"subject": "x" * 300}, headers=HEADERS,
                                  status=413), 413, "Payload too large")
    assert client.get("/users", headers=HEADERS).json == USERS
    assert lazy_app._app.store.busy_timeout == 0.25
    # Every option the table gives the app is one of make_app's arguments.
    accepted = set(inspect.signature(make_app).parameters)
    assert {name for name, option in genesy_tasks._OPTIONS.items() if option.app} == {
        "db", "max_batch", "max_body", "busy_timeout", "users", "inspect", "record"}
    assert {"max_batch", "max_body", "busy_timeout", "users"} <= accepted


def test_a_bad_variable_under_gunicorn_is_a_json_500_and_one_logged_line(tmp_path,
                                                                         monkeypatch, lazy_app):
    monkeypatch.setenv("GENESY_TASKS_DB", str(tmp_path / "env.db"))
    monkeypatch.setenv("GENESY_TASKS_MAX_BATCH", "lots")
    client = webtest.TestApp(lazy_app)
    logged = []
    for _ in range(2):
        response = client.get("/health", headers=HEADERS, status=500, expect_errors=True)
        assert_error(response, 500, mentions=["misconfigured"])
        logged.append(response.errors)
    assert logged == ["genesy-tasks: cannot start: GENESY_TASKS_MAX_BATCH: 'lots' is not a "
                      "whole number\n", ""]  # once
    monkeypatch.setenv("GENESY_TASKS_MAX_BATCH", "5")
    client.get("/health", headers=HEADERS, status=401)  # fixed: built on the next request


def test_make_app_takes_the_busy_timeout(db_path, closing):
    application = closing(make_app(db_path, api_keys=KEY, busy_timeout=0.5))
    assert application.store.busy_timeout == 0.5
    with application.store._connection() as conn:
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 500


def test_the_wsgi_app_ignores_the_built_in_servers_variables(tmp_path, monkeypatch, lazy_app):
    monkeypatch.setenv("GENESY_TASKS_DB", str(tmp_path / "env.db"))
    monkeypatch.setenv("GENESY_API_KEY", KEY)
    monkeypatch.setenv("GENESY_TASKS_PORT", "${PORT}")  # a platform's, for another server
    webtest.TestApp(lazy_app).get("/health", headers=HEADERS, status=200)


###############################################################################
# Server: HTTP/1.1 on an event loop, one thread ###############################
###############################################################################

# -- strict HTTP/1.1 -----------------------------------------------------------
# What RFC 9112 and RFC 9110 section 5 require a server to refuse, each item of
# the strict-HTTP issue pinned over a real socket; then the request reader fed
# through a connection, against h11 as an oracle and in every split.

def _ask(server, data, read_timeout=5):
    """Send ``data`` on one connection: its answers, and whether the server then closed it."""
    with socket.create_connection((server.host, server.port), timeout=read_timeout) as sock:
        sock.sendall(data)
        chunks, closed, deadline = [], False, time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
    return _answers(b"".join(chunks)), closed


def _create(subject, extra=b""):
    body = json.dumps({"subject": subject}).encode()
    return (b"POST /tasks HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
            + extra + b"\r\n" + body)


def _chunked(body, extra=b"", version=b"HTTP/1.1", coding=b"chunked", size=None):
    size = size or len(body) or 1
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                      for i in range(0, len(body), size))
    return (b"POST /tasks " + version + b"\r\nHost: x\r\nX-API-Key: " + KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: " + coding + b"\r\n" + extra
            + b"\r\n" + chunks + b"0\r\n\r\n")


def _refused(answers, closed, status=400):
    assert answers and answers[-1][0] == status, answers
    assert answers[-1][1]["Connection"] == "close" and closed
    assert set(json.loads(answers[-1][2])) == {"error", "message"}


def test_field_names_with_an_underscore_are_dropped_and_alias_nothing(server, closing):
    store = closing(TaskStore(server.db))
    # Content_Length is not Content-Length: what follows is the next request.
    answers, _ = _ask(server, _health(b"Content_Length: %d\r\n" % len(_create("second")))
                      + _create("second") + _health(b"Connection: close\r\n"))
    assert [status for status, _, _ in answers] == [200, 201, 200]
    # Transfer_Encoding is not Transfer-Encoding: the "chunked body" is no body,
    # so a request hidden in it is never run.
    smuggled = _create("smuggled")
    answers, closed = _ask(server, b"POST /tasks HTTP/1.1\r\nHost: x\r\nX-API-Key: "
                           + KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                           b"Transfer_Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled)
    assert [status for status, _, _ in answers] == [400, 400] and closed
    assert "smuggled" not in _subjects(store)
    # Nor is X_API_Key the key header.
    answers, _ = _ask(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX_API_Key: " + KEY.encode()
                      + b"\r\nConnection: close\r\n\r\n")
    assert answers[0][0] == 401


@pytest.mark.parametrize("byte", [b"\x0b", b"\x0c", b"\x1c", b"\x1f", b"\x85", b"\xa0", b"\x00"])
def test_a_framing_value_padded_with_anything_but_space_or_tab_is_refused(shared_server, byte):
    # str.strip() would take "chunked\x0b" for chunked; RFC 9110 5.6.3 trims SP and HTAB only.
    answers, closed = _ask(shared_server, _chunked(b'{"subject":"padded"}',
                                                   coding=b"chunked" + byte) + _health())
    _refused(answers, closed)
    assert len(answers) == 1


@pytest.mark.parametrize("digits, status", [(b"9" * 5000, 413), (b"0" * 4990 + b"15", 201)])
def test_a_content_length_of_thousands_of_digits_is_answered(shared_server, digits, status):
    body = b'{"subject":"x"}'
    assert len(body) == 15
    answers, _ = _ask(shared_server, _health() + b"POST /tasks HTTP/1.1\r\nHost: x\r\nX-API-Key: "
                      + KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                      b"Connection: close\r\nContent-Length: " + digits + b"\r\n\r\n" + body)
    # The answer held for the earlier request is not lost either.
    assert [answer[0] for answer in answers] == [200, status]
    assert "Fatal error" not in shared_server.log() and "Traceback" not in shared_server.log()


def test_a_body_of_one_byte_chunks_slows_nobody_else(server):
    # Each piece of a long upload sent in 1-byte chunks is followed by a round
    # trip of /health on another connection, which the server reads after the
    # piece. Decoding is linear, so the last round trips cost what the first did.
    body = json.dumps({"subject": "x" * 150_000}).encode()
    wire = _chunked(body, size=1)
    pieces = [wire[start:start + 6000] for start in range(0, len(wire), 6000)]
    conn, round_trips = server.connect(timeout=30), []
    with socket.create_connection((server.host, server.port), timeout=30) as uploader:
        for piece in pieces:
            uploader.sendall(piece)
            started = time.perf_counter()
            assert server.request("GET", "/health", conn=conn)[0] == 200
            round_trips.append(time.perf_counter() - started)
        assert _read_all_until(uploader, b'"subject"').startswith(b"HTTP/1.1 201 ")
    quarter = len(round_trips) // 4
    early, late = round_trips[:quarter], round_trips[-quarter:]
    assert statistics.median(late) < 4 * statistics.median(early), (early, late)


@pytest.mark.parametrize("body_part, status", [
    (b"1;" + b"e" * 20_000, 400),                       # chunk extensions
    (b"1\r\nx\r\n0\r\n" + b"Trailer-Field: value\r\n" * 1000, 431),  # trailer section
])
def test_chunk_extensions_and_trailers_are_bounded(shared_server, body_part, status):
    head = (b"POST /tasks HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    # Refused as soon as the limit is passed, not held while more arrives.
    answers, closed = _ask(shared_server, head + body_part, read_timeout=3)
    _refused(answers, closed, status)


def test_bytes_held_for_a_chunked_body_count_against_the_budget():
    reader = genesy_tasks._RequestReader({}, max_body=1000)
    reader.feed(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"64\r\n" + b"a" * 100 + b"\r\n64\r\n" + b"b" * 50)
    assert reader.next_request() is None
    assert reader.held == 150  # decoded so far, and not yet decoded
    reader.feed(b"b" * 50 + b"\r\n" + b"%x\r\n" % 801)
    with pytest.raises(genesy_tasks._RequestError) as refused:
        reader.next_request()  # the chunk would take the body past max_body
    assert refused.value.status == 413


@pytest.mark.parametrize("head", [
    b"Content-Length:\r\n",                          # empty (RFC 9112 6.3)
    b"Content-Length: 5, 5\r\n",
    b"Content-Length: +5\r\n",
    b"Content-Length: 5\r\nContent-Length: 6\r\n",
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
])
def test_a_doubtful_content_length_is_a_400_and_a_close(shared_server, head, closing):
    store = closing(TaskStore(shared_server.db))
    request = (b"POST /tasks HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode()
               + b"\r\nContent-Type: application/json\r\n" + head + b"\r\n")
    answers, closed = _ask(shared_server, request + _create("pipelined"))
    _refused(answers, closed)
    assert len(answers) == 1 and "pipelined" not in _subjects(store)


def test_transfer_encoding_on_http_1_0_is_answered_then_the_connection_closes(server):
    answers, closed = _ask(server, _chunked(b'{"subject":"from 1.0"}', version=b"HTTP/1.0",
                                            extra=b"Connection: keep-alive\r\n") + _health())
    assert [answer[0] for answer in answers] == [201]
    assert answers[0][1]["Connection"] == "close" and closed


@pytest.mark.parametrize("host", [None, b"Host: x\r\nHost: y\r\n", b"Host: a b\r\n",
                                  b"Host: x/y\r\n", b"Host: x\r\nhost: x\r\n"])
def test_an_http_1_1_request_needs_exactly_one_valid_host(shared_server, host):
    request = b"GET /health HTTP/1.1\r\nX-API-Key: " + KEY.encode() + b"\r\n" + (host or b"")
    answers, closed = _ask(shared_server, request + b"\r\n")
    _refused(answers, closed)


def test_http_1_0_needs_no_host_and_hosts_may_have_ports_and_brackets(server):
    answers, _ = _ask(server, b"GET /health HTTP/1.0\r\nX-API-Key: " + KEY.encode()
                      + b"\r\n\r\n")
    assert answers[0][0] == 200
    for host in (b"127.0.0.1:8080", b"[::1]:8080", b"crm.example.com", b""):
        request = b"GET /health HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n"
        answers, _ = _ask(server, request + b"X-API-Key: " + KEY.encode() + b"\r\n\r\n")
        assert answers[0][0] == 200, host


@pytest.mark.parametrize("field", [
    b"Content-Type: application/json\x00", b"Content-Type: application/json\x01",
    b"Content-Type: application/\rjson", b"X-Note: a\x00b", b"X-Note: a\rb", b"X-Note: a\x7fb",
    b"X(Note): a", b"X Note: a", b"X-Note : a", b": a", b"X-Note", b" X-Folded: a",
])
def test_control_bytes_in_values_and_names_that_are_not_tokens_are_refused(shared_server, field):
    content_type = b"" if field.startswith(b"Content-Type") else b"Content-Type: text/x\r\n"
    request = (b"POST /tasks HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode() + b"\r\n"
               + content_type + field + b"\r\nContent-Length: 15\r\n\r\n{\"subject\":\"x\"}")
    # Refused as malformed (400), never passed on to be refused as a media type (415).
    answers, closed = _ask(shared_server, request)
    _refused(answers, closed)


def test_http_1_0_gets_no_100_continue_and_http_1_1_does(server):
    for version, interim in ((b"HTTP/1.0", False), (b"HTTP/1.1", True)):
        with socket.create_connection((server.host, server.port), timeout=5) as sock:
            sock.sendall(b"POST /tasks " + version + b"\r\nHost: x\r\nX-API-Key: "
                         + KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                         b"Expect: 100-continue\r\nContent-Length: 15\r\n\r\n")
            if interim:
                assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
            else:  # the answer must not start before the body is sent
                sock.settimeout(0.3)
                with pytest.raises(socket.timeout):
                    sock.recv(100)
                sock.settimeout(5)
            sock.sendall(b'{"subject":"x"}')
            head = sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 201 "), head


@pytest.mark.parametrize("coding, status", [
    (b"chunked, identity", 400), (b"identity", 400), (b"xchunked", 400), (b"chunked, chunked", 400),
    (b"", 400), (b"chunked,", 400), (b"gzip, chunked", 501),
])
def test_a_transfer_coding_that_does_not_end_in_one_chunked_is_refused(shared_server, coding,
                                                                       status):
    answers, closed = _ask(shared_server, _chunked(b'{"subject":"x"}', coding=coding) + _health())
    _refused(answers, closed, status)
    assert len(answers) == 1


def test_the_chunked_coding_is_case_insensitive_and_may_repeat_its_header_never_its_use(server):
    answers, _ = _ask(server, _chunked(b'{"subject":"case"}', coding=b"Chunked",
                                       extra=b"Connection: close\r\n"))
    assert answers[0][0] == 201
    answers, closed = _ask(server, _chunked(b'{"subject":"twice"}',
                                            extra=b"Transfer-Encoding: chunked\r\n"))
    _refused(answers, closed)


def test_a_request_line_too_long_is_a_414_and_a_head_too_large_a_431(server):
    answers, closed = _ask(server, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    _refused(answers, closed, 414)
    # Refused before the line ends: a client cannot make the server wait for it.
    answers, closed = _ask(server, b"GET /" + b"a" * 9000)
    _refused(answers, closed, 414)
    answers, closed = _ask(server, b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: aaaa\r\n" * 6000)
    _refused(answers, closed, 431)


def test_bare_lf_is_refused_at_once_and_leading_empty_lines_are_ignored(server):
    started = time.monotonic()
    answers, closed = _ask(server, b"GET /health HTTP/1.1\nHost: x\n", read_timeout=3)
    _refused(answers, closed)
    assert time.monotonic() - started < 3  # not after the 10 s request timeout
    answers, _ = _ask(server, b"\r\n\r\n" + _health(b"Connection: close\r\n"))
    assert [answer[0] for answer in answers] == [200]


def test_over_tls_an_early_error_is_read_by_a_client_still_uploading(certificate, start_process):
    cert, key, client = certificate
    running = start_process("--tls-cert", cert, "--tls-key", key, "--max-body", "1000")
    framings = {413: b"Content-Length: 5000000\r\n\r\n",  # refused before the body
                400: b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"}  # refused within it
    for status, framing in framings.items():
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as raw:
            with client.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                sock.sendall(b"POST /tasks HTTP/1.1\r\nHost: x\r\nX-API-Key: "
                             + KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                             + framing)
                # As requests does: the whole body first, then the answer. A
                # close right after the answer would reset this upload.
                sock.sendall(b" " * 5_000_000)
                answers = _answers(_read_all_until(sock, b"}"))
        assert answers[0][0] == status and answers[0][1]["Connection"] == "close"
    assert running.stop() == 0
    assert "Fatal error" not in running.log()


def _read_one(data, max_body=4096):
    """The first request the reader makes of ``data``, or the _RequestError it raises."""
    reader = genesy_tasks._RequestReader({}, max_body)
    reader.feed(data)
    try:
        return reader.next_request()
    except genesy_tasks._RequestError as error:
        return error


@pytest.mark.parametrize("target, path, query, host", [
    ("http://crm.example/tasks?limit=1", "/tasks", "limit=1", "crm.example"),
    ("http://crm.example:8080", "/", "", "crm.example:8080"),
    ("http://x?/admin", "/", "/admin", "x"),        # the query, not the path
    ("HTTPS://x/a/b", "/a/b", "", "x"),
])
def test_an_absolute_form_target_is_split_as_rfc_3986_says(target, path, query, host):
    environ, _ = _read_one(b"GET %s HTTP/1.1\r\nHost: other\r\n\r\n" % target.encode())
    assert (environ["PATH_INFO"], environ["QUERY_STRING"]) == (path, query)
    assert environ["HTTP_HOST"] == host  # RFC 9112 3.2.2: the target's authority wins


@pytest.mark.parametrize("target", [b"http://x#/admin", b"/tasks#x", b"ftp://x/", b"*"])
def test_fragments_and_other_target_forms_are_refused(target):
    assert _read_one(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target).status == 400


def test_empty_lines_before_a_head_count_towards_its_limit_however_they_arrive():
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: "
    head += b"a" * (65536 - len(head) - 4) + b"\r\n\r\n"
    assert len(head) == 65536  # exactly the limit: accepted alone
    assert isinstance(_read_one(head, max_body=0), tuple)
    stream = b"\r\n" + head
    for pieces in ([stream], [stream[:2], stream[2:]]):
        reader = genesy_tasks._RequestReader({}, 0)
        with pytest.raises(genesy_tasks._RequestError) as refused:
            for piece in pieces:
                reader.feed(piece)
                reader.next_request()
        assert refused.value.status == 431


@pytest.mark.parametrize("field", [b"Content-Length: 5", b"Transfer-Encoding: chunked",
                                   b"Host: elsewhere"])
def test_framing_fields_in_a_trailer_section_are_refused(field):
    error = _read_one(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"1\r\na\r\n0\r\n" + field + b"\r\n\r\n")
    assert error.status == 400 and "trailer" in error.message


# The reader through a real connection: a fake transport collects what the
# server writes, and an app echoes each request it is given.

class _FakeTransport:
    def __init__(self):
        self.written, self.closed = bytearray(), False

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data):
        assert not self.closed
        self.written += data

    def can_write_eof(self):
        return True

    def write_eof(self):
        pass

    def close(self):
        self.closed = True

    abort = close

    def is_closing(self):
        return self.closed

    def pause_reading(self):
        pass

    resume_reading = pause_reading

    def get_write_buffer_size(self):
        return 0


def _echo_app(environ, start_response):
    body = environ["wsgi.input"].read()
    fields = {key: value for key, value in environ.items()
              if key.startswith("HTTP_") or key in ("CONTENT_LENGTH", "CONTENT_TYPE")}
    answer = json.dumps({"method": environ["REQUEST_METHOD"], "target": environ["RAW_URI"],
                         "fields": fields, "body": body.decode("latin-1")}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [answer]


def _through_a_connection(pieces):
    """The answers of the server's connection to ``pieces``, and its log."""
    log = io.StringIO()
    server = genesy_tasks.TaskServer(_echo_app, "127.0.0.1", 0, max_body=4096, log=log)
    try:
        transport = _FakeTransport()
        conn = genesy_tasks._Connection(server)
        conn.connection_made(transport)
        for piece in pieces:
            if transport.closed or conn.linger_until is not None:
                break
            conn.data_received(piece)
        return _answers(bytes(transport.written)), server._log_lines + [log.getvalue()]
    finally:
        server._socket.close()
        server._loop.close()


def _h11_requests(stream):
    """What h11 reads from ``stream``: the requests, and None if it refused one."""
    import h11
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(stream)
    requests, current = [], None
    try:
        for _ in range(3 * len(stream) + 3):  # every event but an end takes bytes
            event = conn.next_event()
            if isinstance(event, h11.Request):
                current = {"method": event.method.decode(), "body": b"",
                           "target": event.target.decode("latin-1"),
                           "fields": [(n.decode(), v.decode("latin-1")) for n, v in event.headers]}
            elif isinstance(event, h11.Data):
                current["body"] += event.data
            elif isinstance(event, h11.EndOfMessage):
                requests.append(current)
                conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                conn.send(h11.EndOfMessage())
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return requests, "closed"
                conn.start_next_cycle()
            else:
                return requests, "incomplete"
    except h11.RemoteProtocolError as error:
        return requests, str(error)
    raise AssertionError("h11 made more events of %r than it has bytes" % stream)


def _as_environ(fields):
    """h11's fields as this server puts them in a WSGI environ."""
    environ = {}
    for name, value in fields:
        if "_" in name or name == "transfer-encoding":
            continue
        key = name.upper().replace("-", "_")
        if key == "CONTENT_LENGTH":
            value = value.lstrip("0") or "0"  # passed on without leading zeros
        if key in ("CONTENT_LENGTH", "CONTENT_TYPE"):
            environ[key] = value  # duplicates are accepted only when identical
            continue
        key = "HTTP_" + key
        environ[key] = environ[key] + "," + value if key in environ else value
    return environ


# Bounded for CI like the fuzzing above (FUZZ_EXAMPLES runs both longer).
HTTP_FUZZ = settings(FUZZ, max_examples=int(os.environ.get("FUZZ_EXAMPLES", 80)))


_FIELD_CHOICES = [
    b"Host: x", b"Host: 127.0.0.1:8080", b"Content-Type: application/json",
    b"X-API-Key: " + KEY.encode(), b"X_API_Key: " + KEY.encode(), b"Connection: close",
    b"Connection: keep-alive", b"Expect: 100-continue",
    b"Accept: */*", b"X-Empty:", b"X-Tab:\tv\t", b"X-Obs: caf\xe9"]


_FRAMINGS = ["none", "length", "length+1", "length-1", "chunked", "both", "underscore-length",
             "underscore-chunked", "empty-length", "twice-length", "gzip-chunked",
             "chunked-identity", "Chunked", "chunked-ext", "chunked-trailer"]


_MUTATIONS = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b"\x0b", b"_", b",", b":", b"0",
              b"\xa0", b"\x7f", b"a"]


@st.composite
def _request_streams(draw):
    stream = b""
    for _ in range(draw(st.integers(1, 3))):
        method = draw(st.sampled_from([b"GET", b"POST", b"PATCH"]))
        target = draw(st.sampled_from([b"/health", b"/tasks/x?y=1", b"/%41b", b"http://h/p"]))
        version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
        fields = draw(st.lists(st.sampled_from(_FIELD_CHOICES), max_size=4))
        body = draw(st.binary(max_size=24))
        framing = draw(st.sampled_from(_FRAMINGS))
        size = draw(st.integers(1, 8))
        chunks = b"".join(b"%x%s\r\n%s\r\n" % (len(body[i:i + size]),
                                                b";n=v" if framing == "chunked-ext" else b"",
                                                body[i:i + size])
                          for i in range(0, len(body), size))
        chunks += b"0\r\n" + (b"T: v\r\n" if framing == "chunked-trailer" else b"") + b"\r\n"
        framing_fields, payload = {
            "none": ([], b""),
            "length": ([b"Content-Length: %d" % len(body)], body),
            "length+1": ([b"Content-Length: %d" % (len(body) + 1)], body),
            "length-1": ([b"Content-Length: %d" % max(0, len(body) - 1)], body),
            "chunked": ([b"Transfer-Encoding: chunked"], chunks),
            "chunked-ext": ([b"Transfer-Encoding: chunked"], chunks),
            "chunked-trailer": ([b"Transfer-Encoding: chunked"], chunks),
            "Chunked": ([b"Transfer-Encoding: Chunked"], chunks),
            "both": ([b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked"], chunks),
            "underscore-length": ([b"Content_Length: %d" % len(body)], body),
            "underscore-chunked": ([b"Transfer_Encoding: chunked"], chunks),
            "empty-length": ([b"Content-Length:"], body),
            "twice-length": ([b"Content-Length: %d" % len(body)] * 2, body),
            "gzip-chunked": ([b"Transfer-Encoding: gzip, chunked"], chunks),
            "chunked-identity": ([b"Transfer-Encoding: chunked, identity"], chunks),
        }[framing]
        lines = [method + b" " + target + b" " + version] + fields + framing_fields
        order = draw(st.permutations(range(1, len(lines))))
        lines = lines[:1] + [lines[i] for i in order]
        stream += b"\r\n".join(lines) + b"\r\n\r\n" + payload
    for _ in range(draw(st.integers(0, 3))):  # mutations: insert, drop or double a byte
        at = draw(st.integers(0, len(stream) - 1))
        operation = draw(st.sampled_from(["insert", "drop", "double"]))
        if operation == "insert":
            stream = stream[:at] + draw(st.sampled_from(_MUTATIONS)) + stream[at:]
        elif operation == "drop":
            stream = stream[:at] + stream[at + 1:]
        else:
            stream = stream[:at] + stream[at:at + 1] + stream[at:]
    return stream


@HTTP_FUZZ
@given(stream=_request_streams())
def test_every_request_the_server_accepts_h11_reads_the_same(stream):
    answers, log = _through_a_connection([stream])
    assert "Traceback" not in "".join(log)
    accepted = [json.loads(body) for status, _, body in answers if status == 200]
    assert all(status != 200 for status, _, _ in answers[len(accepted):])  # refusals end it
    assert all(400 <= status < 500 or status == 501 or status == 505
               for status, _, _ in answers[len(accepted):])
    oracle, ending = _h11_requests(stream)
    for index, request in enumerate(accepted):
        if index == len(oracle):
            # h11 ended first: where it must close the connection (HTTP/1.0),
            # or before empty lines that RFC 9112 2.2 lets a server ignore.
            assert ending in ("closed", "no request line received"), (ending, stream)
            break
        expected = oracle[index]
        assert request["method"] == expected["method"]
        assert request["target"] == expected["target"]
        assert request["body"] == expected["body"].decode("latin-1")
        fields = request["fields"]
        if any(name == "transfer-encoding" for name, _ in expected["fields"]):
            fields.pop("CONTENT_LENGTH")  # the decoded length, set for WSGI apps
        expected_fields = _as_environ(expected["fields"])
        if expected["target"].startswith("http"):  # RFC 9112 3.2.2: its authority is the host
            expected_fields["HTTP_HOST"] = re.match(r"https?://([^/?]*)",
                                                    expected["target"]).group(1)
        assert fields == expected_fields, stream


def test_hostile_byte_streams_get_json_answers_never_a_5xx_or_a_crash(server):
    @HTTP_FUZZ
    @given(stream=_request_streams())
    def hostile(stream):
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(stream)
            sock.shutdown(socket.SHUT_WR)  # the server answers what has arrived, then closes
            answers = _answers(_read_all(sock))
        for status, _, body in answers:
            assert status < 500 or status in (501, 505), (stream, status, body)
            if status >= 400:
                assert set(json.loads(body)) == {"error", "message"}

    hostile()
    assert server.request("GET", "/health")[0] == 200
    assert "Fatal error" not in server.log() and "Traceback" not in server.log()


@HTTP_FUZZ
@given(stream=_request_streams(), cuts=st.lists(st.integers(1, 400), max_size=6))
def test_the_answers_do_not_depend_on_how_the_bytes_arrive(stream, cuts):
    whole, _ = _through_a_connection([stream])
    bounds = sorted({0, len(stream), *(cut for cut in cuts if cut < len(stream))})
    pieces = [stream[start:end] for start, end in zip(bounds, bounds[1:])]
    assert _through_a_connection(pieces)[0] == whole
    assert _through_a_connection([stream[i:i + 1] for i in range(len(stream))])[0] == whole


# -- the built-in server -------------------------------------------------------

def test_the_server_keeps_connections_alive(server):
    conn = server.connect()
    for _ in range(3):
        status, headers, _ = server.request("GET", "/health", conn=conn)
        assert status == 200 and headers.get("Connection") != "close"
    sock = conn.sock
    server.request("POST", "/tasks", {"subject": "same connection"}, conn=conn)
    assert conn.sock is sock


def test_a_204_has_no_body_and_keeps_the_connection_usable(server):
    _, _, task = server.request("POST", "/tasks", {"subject": "to delete"})
    reply = server.raw(("DELETE /tasks/%s HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\n\r\n"
                        "GET /health HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\n"
                        "Connection: close\r\n\r\n" % (task["id"], KEY, KEY)).encode())
    deleted, _, health = reply.partition(b"HTTP/1.1 200")
    assert deleted.startswith(b"HTTP/1.1 204 ") and deleted.endswith(b"\r\n\r\n")
    assert b"content-length" not in deleted.lower()
    assert health.endswith(b'{"status":"ok"}')


def test_a_stalled_client_blocks_nobody(server):
    stalled = socket.create_connection((server.host, server.port))
    stalled.sendall(b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"X-API-Key: " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"sub")
    half_head = socket.create_connection((server.host, server.port))
    half_head.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    for _ in range(5):
        assert server.request("GET", "/health")[0] == 200
    assert time.monotonic() - started < 2
    stalled.close()
    half_head.close()


def test_a_body_over_the_limit_is_a_readable_413_and_the_server_keeps_serving(start_process):
    running = start_process("--max-body", "1000")
    reply = running.raw(b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"X-API-Key: " + KEY.encode() + b"\r\nContent-Length: 5000000\r\n\r\n"
                        + b"x" * 20000)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in head
    assert json.loads(body)["error"] == "Payload too large"
    assert running.request("POST", "/tasks", {"subject": "fits"})[0] == 201
    assert running.stop() == 0


def test_chunked_and_pipelined_requests_are_understood(server):
    body = json.dumps({"subject": "chunked"}).encode()
    chunked = (b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"X-API-Key: " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"%x\r\n" % 5 + body[:5] + b"\r\n" + b"%x\r\n" % (len(body) - 5) + body[5:]
               + b"\r\n0\r\n\r\n")
    health = b"GET /health HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode() + b"\r\n\r\n"
    last = (b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-API-Key: "
            + KEY.encode() + b"\r\n\r\n")
    reply = server.raw(chunked + health + last)
    assert reply.count(b"HTTP/1.1 201 Created") == 1
    assert reply.count(b"HTTP/1.1 200 OK") == 2
    assert b'"subject":"chunked"' in reply


@pytest.mark.parametrize("request_bytes, status", [
    (b"NONSENSE\r\n\r\n", b"400"),
    (b"GET /health HTTP/1.1\r\nBad header line\r\n\r\n", b"400"),
    (b"GET /health HTTP/2.0\r\n\r\n", b"505"),
    (b"POST /tasks HTTP/1.1\r\nContent-Length: abc\r\n\r\n", b"400"),
    (b"POST /tasks HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
    (b"GET /health HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
])
def test_malformed_http_gets_a_json_error_not_a_crash(shared_server, request_bytes, status):
    reply = shared_server.raw(request_bytes)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status)
    assert set(json.loads(body)) == {"error", "message"}
    assert shared_server.request("GET", "/health")[0] == 200


def test_an_acknowledged_task_survives_kill_9(start_process):
    running = start_process()
    acknowledged = []
    conn = running.connect()
    for n in range(50):
        status, _, task = running.request("POST", "/tasks", {"subject": "durable %d" % n},
                                          conn=conn)
        assert status == 201
        acknowledged.append(task["id"])
    status, _, done = running.request("PATCH", "/tasks/batch",
                                      {"ids": acknowledged[:10], "completed": True}, conn=conn)
    assert status == 200 and len(done) == 10
    running.process.kill()
    running.process.wait(timeout=10)
    running.stderr.close()
    again = start_process(db=running.db)
    status, _, tasks = again.request("POST", "/tasks/batch", {"ids": acknowledged})
    assert [t["id"] for t in tasks] == acknowledged
    assert [t["completed"] for t in tasks] == [True] * 10 + [False] * 40
    assert again.stop() == 0


def test_sigterm_lets_an_in_flight_request_finish(start_process):
    running = start_process()
    body = json.dumps({"subject": "in flight"}).encode()
    # An idle kept-alive connection, which the server closes when it begins to stop.
    idle = running.connect(timeout=10)
    assert running.request("GET", "/health", conn=idle)[0] == 200
    with socket.create_connection((running.host, running.port), timeout=10) as sock:
        sock.sendall(b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"X-API-Key: " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + body[:5])
        _wait_for(lambda: _read_by_the_server(sock))  # the request is in flight
        running.process.send_signal(signal.SIGTERM)
        assert idle.sock.recv(1) == b""  # the server is stopping...
        idle.close()
        assert running.process.poll() is None  # ...and waits for the request in flight
        sock.sendall(body[5:])
        reply = _read_all(sock)
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 201 ") and b"Connection: close" in head
    assert running.stop() == 0
    with TaskStore(running.db) as store:
        assert store.get(json.loads(payload)["id"])["subject"] == "in flight"


def test_expect_100_continue_is_answered(server):
    body = json.dumps({"subject": "large upload"}).encode()
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"X-API-Key: " + KEY.encode() + b"\r\nExpect: 100-continue\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 201 ")


def test_head_requests_get_headers_only(server):
    reply = server.raw(b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-API-Key: "
                       + KEY.encode() + b"\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 15" in head
    assert body == b""


# -- stalled clients and slow uploads ------------------------------------------

def _stalled_connection(server):
    sock = socket.create_connection((server.host, server.port), timeout=30)
    sock.sendall(b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n")  # never ends
    return sock


def test_more_stalled_clients_than_the_cap_delay_but_never_stop_good_ones(start_process):
    running = start_process("--max-connections", "4", "--request-timeout", "0.5")
    # The event loop and the WAL checkpointer, which starts with serving.
    _wait_for(lambda: running.status()[1] == 2)
    rss_before, threads_before, fds_before = running.status()
    stalled = [_stalled_connection(running) for _ in range(5)]
    # The server takes in as many as its cap, and reads what they sent.
    _wait_for(lambda: sum(_read_by_the_server(sock) for sock in stalled) >= 4)
    rss, threads, fds = running.status()
    assert threads == threads_before == 2  # no thread per client
    assert fds <= fds_before + 4  # the rest wait in the kernel's queue
    started = time.monotonic()
    # A good client queued behind more stalled ones than the cap is served
    # once they time out: late, but served, and every stalled one got its 408.
    status, _, body = running.request("GET", "/health", conn=running.connect(timeout=30))
    assert (status, body) == (200, {"status": "ok"})
    assert 0.5 <= time.monotonic() - started < 15
    # (The 408's head is enough: the server lingers a while before closing.)
    answers = [_read_all_until(sock, b"\r\n\r\n") for sock in stalled]
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers), answers
    rss_after, threads_after, fds_after = running.status()
    assert threads_after == 2 and fds_after <= fds_before + 1
    assert rss_after - rss_before < 10_000  # kB
    for sock in stalled:
        sock.close()
    assert running.stop() == 0


def test_a_silent_new_connection_is_closed_after_the_request_timeout(start_process):
    running = start_process("--request-timeout", "1")
    with socket.create_connection((running.host, running.port), timeout=10) as sock:
        started = time.monotonic()
        assert _read_all(sock) == b""  # closed, nothing said: it asked nothing
        assert time.monotonic() - started < 5


def test_at_the_cap_an_idle_kept_alive_connection_makes_room(start_process):
    running = start_process("--max-connections", "2")
    idle = [running.connect() for _ in range(2)]
    for conn in idle:
        assert running.request("GET", "/health", conn=conn)[0] == 200
    # A third client is served at once (within the client's 5-second
    # timeout), not after the idle ones' 75-second keep-alive.
    assert running.request("GET", "/health", conn=running.connect(timeout=5))[0] == 200


@pytest.mark.parametrize("flag, value", [("--max-connections", "0"),
                                         ("--request-timeout", "0"),
                                         ("--request-timeout", "soon")])
def test_bad_limits_are_refused_at_start(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        genesy_tasks.main([flag, value])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_slow_uploads_cannot_make_the_server_hold_more_than_its_buffer_budget(tasks_app,
                                                                            serve):
    budget, body, clients = 256 * 1024, 128 * 1024, 16
    server = serve(tasks_app, max_body=body, max_buffered=budget, request_timeout=1)
    assert server.max_buffered == budget

    def stall():  # three quarters of a body, then nothing
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(b"POST /tasks HTTP/1.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % body + b" " * (body * 3 // 4))
        _wait_for(lambda: _accepted(server, sock))  # one after another, as the server sees them
        return sock

    ahead = [stall() for _ in range(6)]
    # A well-behaved client arrives seventh, with its whole request...
    good = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    good.request("POST", "/tasks", body=json.dumps({"subject": "patient"}),
                 headers={**HEADERS, "Content-Type": "application/json"})
    _wait_for(lambda: _accepted(server, good.sock))
    behind = [stall() for _ in range(clients - 6)]
    # What the server holds, sampled every 2 ms for 1.5 s: a measurement, not a wait.
    peak, deadline = 0, time.monotonic() + 1.5
    while time.monotonic() < deadline:
        peak = max(peak, server._buffered)
        time.sleep(0.002)
    # Unbounded, the server would hold all 16 x 96 KiB; it holds at most the
    # budget, one read and one request.
    assert peak <= budget + 256 * 1024 + body + 64 * 1024 < clients * body * 3 // 4
    # ...and is served once the stalled ones ahead of it have timed out.
    assert good.getresponse().status == 201
    good.close()
    for sock in ahead + behind:
        sock.close()


def test_uploads_larger_together_than_the_budget_all_finish(tasks_app, store, serve):
    ids = store.create_many([{"subject": "batched %d" % n} for n in range(3000)])
    payload = json.dumps({"ids": ids, "padding": "x" * 100_000}).encode()
    server = serve(tasks_app, max_body=len(payload), max_buffered=0)
    # The budget is one whole request: four sent at once must take turns.
    assert server.max_buffered == len(payload) + 64 * 1024
    results = []

    def upload():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/tasks/batch", body=payload,
                     headers={**HEADERS, "Content-Type": "application/json"})
        response = conn.getresponse()
        results.append((response.status, len(json.loads(response.read()))))
        conn.close()

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    server.stop()
    assert results == [(200, 3000)] * 4


# -- TLS -----------------------------------------------------------------------

@pytest.fixture
def certificate(tmp_path):
    """A certificate for 127.0.0.1 from a throwaway CA made now, and a client that trusts it."""
    import ssl

    import trustme
    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    for blob in issued.cert_chain_pems:
        blob.write_to_path(str(cert), append=True)
    issued.private_key_pem.write_to_path(str(key))
    client = ssl.create_default_context()
    authority.configure_trust(client)
    return str(cert), str(key), client


def test_tls_serves_https_with_the_given_certificate(certificate, start_process):
    cert, key, client = certificate
    running = start_process("--tls-cert", cert, "--tls-key", key)
    running.tls_client = client
    assert "serving https://127.0.0.1:" in running.banner[0]
    status, headers, task = running.request("POST", "/tasks", {"subject": "over TLS"})
    assert status == 201 and headers["Location"] == "/tasks/" + task["id"]
    conn = running.connect()
    for _ in range(3):  # kept alive over TLS too
        assert running.request("GET", "/health", conn=conn)[0] == 200
    # Plain HTTP on the HTTPS port is dropped, and harms nobody.
    answer = running.raw(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" not in answer
    assert running.request("GET", "/tasks/" + task["id"])[0] == 200
    # The contract check speaks HTTPS as well.
    status, lines = _check("https://127.0.0.1:%d" % running.port, "--api-key", KEY,
                           "--insecure")
    assert status == 0, lines
    assert running.stop() == 0
    assert "TLS handshake" in running.log()


def test_a_bad_certificate_fails_at_start_with_one_clear_line(tmp_path, certificate):
    cert, key, _ = certificate
    for args, words in ((["--tls-cert", str(tmp_path / "missing.pem")], ["missing.pem"]),
                        (["--tls-cert", key, "--tls-key", key], ["certificate"]),
                        (["--tls-key", key], ["--tls-cert"])):
        line = _refused_at_start("--db", str(tmp_path / "t.db"), *args)
        assert all(word in line for word in words), line


# -- group commits -------------------------------------------------------------

def test_requests_that_arrive_together_commit_together(db_path, closing, serve):
    store = closing(TaskStore(db_path))
    application = closing(make_app(store, api_keys=KEY))
    statements = []
    server = serve(application)
    _on_server_thread(server, lambda: store._connection().set_trace_callback(
        statements.append))
    creates = [_request_bytes("POST", "/tasks", {"subject": "burst %02d" % n})
               for n in range(20)]
    responses = _pipelined(server.port, *creates,
                           _request_bytes("GET", "/health", headers={"Connection": "close"}))
    server.stop()
    assert [status for status, _, _ in responses] == [201] * 20 + [200]
    assert [body["subject"] for _, _, body in responses[:20]] == ["burst %02d" % n
                                                                  for n in range(20)]
    # Twenty creates, one request head each: one transaction, not twenty (two
    # should TCP split the burst).
    assert 1 <= statements.count("COMMIT") <= 2
    # (Set: Python traces a statement again for each step of the change feed's triggers.)
    assert len({sql for sql in statements if sql.startswith("INSERT INTO genesy_tasks ")}) == 20
    assert "SAVEPOINT genesy_write" not in statements  # one INSERT each needs none
    assert _subjects(store) == ["burst %02d" % n for n in range(20)]


def test_when_a_group_commit_fails_its_answers_become_503s_and_nothing_is_kept(db_path,
                                                                               closing, serve):
    store = closing(_Refusing(db_path))
    application = closing(make_app(store, api_keys=KEY))
    existing = store.create({"subject": "existing"})
    log_stream = io.StringIO()
    server = serve(application, log=log_stream)

    def refuse_commits():
        store._connection()  # open the server thread's connection, so it refuses too
        store.refuse = lambda action, verb: (action == sqlite3.SQLITE_TRANSACTION
                                             and verb == "COMMIT")

    _on_server_thread(server, refuse_commits)
    responses = _pipelined(
        server.port,
        # Before the group's first write: an answer that depends on nothing.
        _request_bytes("GET", "/tasks/" + existing["id"]),
        _request_bytes("POST", "/tasks", {"subject": "lost 1"}),
        _request_bytes("PATCH", "/tasks/" + existing["id"], {"completed": True}),
        # After it: even a read may have seen what the group wrote.
        _request_bytes("GET", "/tasks/" + existing["id"], headers={"Connection": "close"}))
    statuses = [status for status, _, _ in responses]
    assert statuses == [200, 503, 503, 503]
    for _, headers, body in responses[1:]:
        assert body == {"error": "Service unavailable",
                        "message": "the task database is unavailable (storage error); "
                                   "retry later"}
        assert headers["Retry-After"] == "1"
        assert headers["X-Content-Type-Options"] == "nosniff"
    assert responses[0][2] == existing
    _on_server_thread(server, lambda: setattr(store, "refuse", None))
    assert _subjects(store) == ["existing"]
    assert store.get(existing["id"])["completed"] is False
    # The server goes on: the next group commits.
    again = _pipelined(server.port, _request_bytes("POST", "/tasks", {"subject": "kept"},
                                                   headers={"Connection": "close"}))
    assert [status for status, _, _ in again] == [201]
    log = log_stream.getvalue()
    server.stop()
    assert _subjects(store) == ["existing", "kept"]
    assert "the commit of a group of writes failed: not authorized" in log
    assert re.search(r"POST /tasks 503 ", log)


def test_held_answers_keep_their_order_before_errors_and_closes(tasks_app, store, serve):
    server = serve(tasks_app)
    responses = _pipelined(server.port,
                           _request_bytes("POST", "/tasks", {"subject": "first"}),
                           _request_bytes("POST", "/tasks", {"subject": 7}),
                           _request_bytes("POST", "/tasks", {"subject": "third"}),
                           b"NONSENSE\r\n\r\n")
    server.stop()
    assert [status for status, _, _ in responses] == [201, 400, 201, 400]
    assert [body["subject"] for _, _, body in (responses[0], responses[2])] == ["first",
                                                                               "third"]
    assert responses[3][2]["message"] == "malformed request line"
    assert _subjects(store) == ["first", "third"]


# -- group commits are invisible: a burst on the server equals the same requests one by one --

_SEEDED = 4  # tasks in the database before each burst, the ones requests can name


# Requests of a burst, as (method, path, body, headers); "{n}" names seeded task n.
_burst_operations = st.one_of(
    st.builds(lambda subject: ("POST", "/tasks", {"subject": subject}, {}),
              st.sampled_from(["call", "  ", 7, "email"])),
    st.builds(lambda subject, key: ("POST", "/tasks", {"subject": subject},
                                    {"Idempotency-Key": key}),
              st.sampled_from(["once", "twice"]), st.sampled_from(["k1", "k2"])),
    st.builds(lambda n, change: ("PATCH", "/tasks/{%d}" % n, change, {}),
              st.integers(0, _SEEDED), st.sampled_from([
                  {"completed": True}, {"completed": False}, {"description": "edited"},
                  {"dueDate": "not a date"}])),
    st.builds(lambda picks, completed: ("PATCH", "/tasks/batch",
                                        {"ids": ["{%d}" % n for n in picks],
                                         "completed": completed}, {}),
              st.lists(st.integers(0, _SEEDED), min_size=1, max_size=4),
              st.sampled_from([True, False, "yes"])),
    st.builds(lambda n: ("GET", "/tasks/{%d}" % n, None, {}), st.integers(0, _SEEDED)),
    st.builds(lambda n: ("DELETE", "/tasks/{%d}" % n, None, {}), st.integers(0, _SEEDED)),
    st.builds(lambda picks: ("POST", "/tasks/batch", {"ids": ["{%d}" % n for n in picks]}, {}),
              st.lists(st.integers(0, _SEEDED), max_size=4)),
)


def _fill_ids(value, ids):
    """``value`` with each "{n}" made the id of seeded task n (n == _SEEDED: a missing id)."""
    if isinstance(value, str):
        return re.sub(r"\{(\d)\}", lambda m: (ids + ["task-missing"])[int(m.group(1))], value)
    if isinstance(value, list):
        return [_fill_ids(item, ids) for item in value]
    if isinstance(value, dict):
        return {key: _fill_ids(item, ids) for key, item in value.items()}
    return value


def _comparable(value, ids):
    """Answers and rows with what differs between two databases taken out: times
    become whether they are set, and the ids of tasks made in the burst "new"."""
    if isinstance(value, list):
        return [_comparable(item, ids) for item in value]
    if isinstance(value, dict):
        return {key: (item is not None if key in ("createdAt", "updatedAt", "completedAt")
                      else (item if key != "id" or item in ids else "new")
                      if not isinstance(item, (dict, list)) else _comparable(item, ids))
                for key, item in value.items()}
    return value


def test_a_burst_through_group_commits_equals_the_same_requests_one_by_one(tmp_path, closing,
                                                                          serve):
    server_db, model_db = str(tmp_path / "server.db"), str(tmp_path / "model.db")
    server_app = closing(make_app(server_db, api_keys=KEY))
    server = serve(server_app)

    @settings(FUZZ, max_examples=int(os.environ.get("FUZZ_EXAMPLES", 40)))
    @given(st.lists(_burst_operations, min_size=1, max_size=12))
    def check(burst):
        # The same starting point on both sides: seeded tasks, then a copy.
        with TaskStore(server_db) as seed:
            with seed._write() as conn:
                conn.execute("DELETE FROM genesy_tasks")
                conn.execute("DELETE FROM genesy_idempotency")
            ids = seed.create_many([{"subject": "seeded %d" % n} for n in range(_SEEDED)])
            seed.set_completed_many(ids[:1], True)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(model_db + suffix)
            with contextlib.closing(sqlite3.connect(model_db)) as copy:
                seed._connection().backup(copy)
        requests = [(method, _fill_ids(path, ids), _fill_ids(body, ids), headers)
                    for method, path, body, headers in burst]

        # All at once on one connection: handled in one turn, one group.
        answers = _pipelined(server.port, *[
            _request_bytes(method, path, body, headers)
            for method, path, body, headers in requests],
            _request_bytes("GET", "/health", headers={"Connection": "close"}))[:-1]
        # One by one, each in a transaction of its own.
        expected = []
        with contextlib.closing(make_app(model_db, api_keys=KEY)) as model_app:
            model = webtest.TestApp(model_app)
            for method, path, body, headers in requests:
                response = model.request(
                    path, method=method, headers={**HEADERS, **headers,
                                                  "Content-Type": "application/json"},
                    body=json.dumps(body).encode() if body is not None else b"",
                    expect_errors=True)
                expected.append((response.status_int,
                                 response.json if response.body else None))

        assert [(status, _comparable(body, ids)) for status, _, body in answers] == \
            [(status, _comparable(body, ids)) for status, body in expected]
        states = []
        for path in (server_db, model_db):
            with TaskStore(path) as store:
                states.append(_comparable(store.list(order="oldest", limit=500), ids))
        assert states[0] == states[1]

    check()


# -- storage failures and crashes ----------------------------------------------

def test_a_database_locked_by_another_process_is_a_503_until_released(start_process):
    running = start_process("--busy-timeout", "0.2")
    _, _, kept = running.request("POST", "/tasks", {"subject": "before the lock"})
    with _locked_by_another_process(running.db):
        status, headers, body = running.request("POST", "/tasks", {"subject": "waits"})
        assert status == 503 and headers["Retry-After"] == "1"
        assert body["error"] == "Service unavailable" and "busy" in body["message"]
        assert running.request("GET", "/tasks/" + kept["id"])[0] == 200  # WAL: reads go on
    status, _, task = running.request("POST", "/tasks", {"subject": "after the lock"})
    assert status == 201
    assert running.stop() == 0
    assert "storage unavailable: database is locked" in running.log()
    with TaskStore(running.db) as store:
        assert [t["subject"] for t in store.list()["tasks"]] == ["after the lock",
                                                                 "before the lock"]


def _timed(function, *args):
    started = time.monotonic()
    result = function(*args)
    return result, time.monotonic() - started


def test_another_writers_lock_holds_up_no_read_and_each_write_only_its_own_timeout(start_process):
    running = start_process("--busy-timeout", "1")
    _, _, kept = running.request("POST", "/tasks", {"subject": "before the lock"})
    with _locked_by_another_process(running.db):
        results = {}

        def create(name, delay):
            # Not a wait for anything: the second write is to arrive this much after
            # the first, to show that each waits its own timeout from its own arrival.
            time.sleep(delay)
            results[name] = _timed(running.request, "POST", "/tasks", {"subject": name})

        writers = [threading.Thread(target=create, args=("first", 0)),
                   threading.Thread(target=create, args=("second", 0.4))]
        for writer in writers:
            writer.start()
        # Meanwhile reads are answered at once, the writes' waits notwithstanding.
        for _ in range(5):
            (status, _, _), seconds = _timed(running.request, "GET", "/health")
            assert status == 200 and seconds < 0.3
            (status, _, _), seconds = _timed(running.request, "GET", "/tasks/" + kept["id"])
            assert status == 200 and seconds < 0.3
            time.sleep(0.05)  # not a wait: the reads are spread over the writes' waits
        for writer in writers:
            writer.join(timeout=10)
        # Each write waited its own busy timeout from its own arrival: the
        # second did not wait for the first's wait to end first.
        for name in ("first", "second"):
            (status, headers, body), seconds = results[name]
            assert status == 503 and headers["Retry-After"] == "1", body
            assert 0.9 < seconds < 1.5, (name, seconds)
        # A write that arrives while the lock is held goes through once it is released.
        released = running.connect(timeout=10)
        started = time.monotonic()
        released.request("POST", "/tasks", body=json.dumps({"subject": "released"}).encode(),
                         headers={**HEADERS, "Content-Type": "application/json"})
        _wait_for(lambda: _read_by_the_server(released.sock))  # it waits for the lock
    response = released.getresponse()
    response.read()
    status, seconds = response.status, time.monotonic() - started
    released.close()
    assert status == 201 and seconds < 0.9
    assert running.request("POST", "/tasks", {"subject": "after"})[0] == 201
    assert running.stop() == 0
    with TaskStore(running.db) as store:
        assert sorted(_subjects(store)) == ["after", "before the lock", "released"]


def test_requests_pipelined_behind_a_waiting_write_are_answered_after_a_half_close(start_process):
    running = start_process()
    with _locked_by_another_process(running.db) as release:
        with socket.create_connection((running.host, running.port), timeout=10) as sock:
            sock.sendall(_request_bytes("POST", "/tasks", {"subject": "first"})
                         + _health() + _health())
            sock.shutdown(socket.SHUT_WR)  # all it will send: answer it all, then close
            _wait_for(lambda: _read_by_the_server(sock))  # the write waits for the lock
            release()
            answers = _answers(_read_all(sock))
    assert [answer[0] for answer in answers] == [201, 200, 200]
    assert running.stop() == 0


def test_at_shutdown_a_write_waiting_for_a_lock_gets_its_503_not_a_reset(db_path, closing,
                                                                         serve):
    store = closing(TaskStore(db_path, busy_timeout=60))
    application = closing(make_app(store, api_keys=KEY))
    holder = closing(sqlite3.connect(db_path, isolation_level=None))  # closing rolls back
    holder.execute("BEGIN IMMEDIATE")
    server = serve(application, shutdown_timeout=1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(_request_bytes("POST", "/tasks", {"subject": "waits"}))
        _wait_for(lambda: server._parked)  # it is waiting for the lock
        started = time.monotonic()
        server.shutdown()
        answers = _answers(_read_all(sock))
        assert time.monotonic() - started < 1
    server.stop()
    assert [answer[0] for answer in answers] == [503]
    assert answers[0][1]["Connection"] == "close" and answers[0][1]["Retry-After"] == "1"


_READER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN")
conn.execute("SELECT count(*) FROM genesy_tasks").fetchone()  # a snapshot, held
print("reading", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""


@contextlib.contextmanager
def _read_by_another_process(db):
    """Another process holds a read transaction on ``db`` (a snapshot) until the block ends."""
    reader = subprocess.Popen([sys.executable, "-c", _READER, db], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert reader.stdout.readline() == "reading\n"
        yield
    finally:
        reader.communicate("\n", timeout=10)


def _wal_size(db):
    try:
        return os.path.getsize(db + "-wal")
    except FileNotFoundError:
        return 0


def _create_many_over_http(running, count):
    conn = running.connect()
    for n in range(count):
        assert running.request("POST", "/tasks", {"subject": "wal %d" % n, "description":
                                                  "x" * 500}, conn=conn)[0] == 201
    conn.close()


def test_a_wal_pinned_by_a_long_reader_is_reported_and_given_back_when_it_ends(start_process):
    pages = 100  # a 400 KB checkpoint size, so the test is quick
    running = start_process("--checkpoint-pages", str(pages))
    bound = pages * 4096
    _create_many_over_http(running, 600)
    # Without a long reader the WAL stays about the checkpoint size.
    _wait_for(lambda: _wal_size(running.db) <= 4 * bound)
    with _read_by_another_process(running.db):
        _create_many_over_http(running, 1500)
        assert _wal_size(running.db) > 4 * bound  # pinned: it cannot be checkpointed
        _wait_for(lambda: "long read transaction" in running.log())
    # Once the reader ends, the WAL is checkpointed and truncated within moments.
    _wait_for(lambda: _wal_size(running.db) <= bound, timeout=5)
    _wait_for(lambda: "checkpointed and started over again" in running.log())
    assert running.log().count("long read transaction") == 1, running.log()
    assert running.request("GET", "/health")[0] == 200
    assert running.stop() == 0


_OPEN_AND_CLOSE = """
import sqlite3, sys
for _ in range(40):  # each time this process's last connection closes
    conn = sqlite3.connect(sys.argv[1])
    conn.execute("SELECT count(*) FROM genesy_tasks").fetchone()
    conn.close()
"""


def test_checkpoints_survive_other_processes_opening_and_closing_the_file(start_process):
    # The checkpointer reads SQLite's files itself; were it to close a
    # descriptor of one, this process's locks on it would go, and another
    # process closing its last connection could reset the shared memory
    # under the server (a SIGBUS, seen with a backup during writes).
    running = start_process("--checkpoint-pages", "50")
    stop, statuses = threading.Event(), []

    def writer():
        conn, deadline = running.connect(), time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            statuses.append(running.request("POST", "/tasks", {"subject": "w" * 300},
                                            conn=conn)[0])

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(3):
            subprocess.run([sys.executable, "-c", _OPEN_AND_CLOSE, running.db], check=True,
                           timeout=30)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert statuses and set(statuses) == {201}
    assert running.stop() == 0


def test_the_event_loop_never_waits_on_sqlite_nor_runs_checkpoints(tasks_app, store, serve):
    server = serve(tasks_app)
    settings = _on_server_thread(server, lambda: [
        store._connection().execute("PRAGMA %s" % name).fetchone()[0]
        for name in ("busy_timeout", "wal_autocheckpoint")])
    assert settings == [0, 0]
    server.stop()
    # Elsewhere (a CRM's threads), the store still waits and checkpoints as before.
    conn = store._connection()
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == int(store.busy_timeout * 1000)
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == \
        genesy_tasks.DEFAULT_CHECKPOINT_PAGES


def test_every_task_acknowledged_before_sigkill_mid_load_survives(start_process):
    running = start_process()
    created, completed, stop = [], [], threading.Event()

    def client(number):
        conn, deadline = running.connect(), time.monotonic() + 120
        mine = []
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                status, _, task = running.request(
                    "POST", "/tasks", {"subject": "load %d" % number}, conn=conn)
                assert status == 201
                created.append(task["id"])  # acknowledged
                mine.append(task["id"])
                if len(mine) % 10 == 0:
                    status, _, done = running.request(
                        "PATCH", "/tasks/batch", {"ids": mine[-10:], "completed": True},
                        conn=conn)
                    assert status == 200
                    completed.extend(mine[-10:])
        except (OSError, http.client.HTTPException):
            pass  # the server was killed under us

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    _wait_while_alive(lambda: len(created) >= 300, threads)
    running.process.kill()  # SIGKILL, mid-load
    running.process.wait(timeout=10)
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    running.stderr.close()
    again = start_process(db=running.db)
    found = {}
    for start in range(0, len(created), 5000):
        status, _, tasks = again.request("POST", "/tasks/batch",
                                         {"ids": created[start:start + 5000]})
        found.update((task["id"], task) for task in tasks)
    assert set(found) == set(created)
    assert all(found[task_id]["completed"] for task_id in completed)
    assert again.stop() == 0
    conn = sqlite3.connect(running.db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


# -- workers -------------------------------------------------------------------

def _workers_of(running):
    """The pids of a server's workers (its child processes)."""
    pid = running.process.pid
    with open("/proc/%d/task/%d/children" % (pid, pid)) as children:
        return sorted(int(child) for child in children.read().split())


def _health_on_new_connections(running, count):
    statuses = []
    for _ in range(count):
        conn = running.connect()
        statuses.append(running.request("GET", "/health", conn=conn)[0])
        conn.close()
    return statuses


_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \[w[12]\] 127\.0\.0\.1 [A-Z]+ \S+ "
                       r"\d{3} [\d.]+ms")


def test_two_workers_share_the_port_and_each_logs_whole_lines(start_process):
    running = start_process("--workers", "2")
    assert running.banner[0].rstrip().endswith("(database %s, 2 workers)" % running.db)
    assert len(running.banner) == 2 and "not shown" in running.banner[1]  # printed once
    _wait_for(lambda: len(_workers_of(running)) == 2)

    def knock():  # many connections at once: both workers accept some
        assert _health_on_new_connections(running, 30) == [200] * 30

    threads = [threading.Thread(target=knock) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    # How we know that requests landed on both: each worker tags its log lines.
    log = _wait_for(lambda: running.log().count(" GET /health ") == 120 and running.log())
    lines = [line for line in log.splitlines() if " GET /health " in line]
    assert all(_LOG_LINE.fullmatch(line) for line in lines), lines  # never mixed
    assert {line.split()[1] for line in lines} == {"[w1]", "[w2]"}
    assert running.stop() == 0
    assert "genesy-tasks: stopped" in running.log()


def test_a_killed_worker_is_replaced_and_the_port_keeps_answering(start_process):
    running = start_process("--workers", "2")
    first, second = _wait_for(lambda: len(_workers_of(running)) == 2 and _workers_of(running))
    os.kill(first, signal.SIGKILL)
    assert _health_on_new_connections(running, 20) == [200] * 20
    # (Until the parent reaps it, the killed one is still its child.)
    workers = _wait_for(lambda: first not in _workers_of(running)
                        and len(_workers_of(running)) == 2 and _workers_of(running))
    assert second in workers
    assert re.search(r"genesy-tasks: worker \d \(pid %d\) was killed by signal 9; "
                     r"starting another" % first, running.log())
    assert _health_on_new_connections(running, 5) == [200] * 5
    assert running.stop() == 0
    assert _wait_for(lambda: not any(os.path.exists("/proc/%d" % pid) for pid in workers))


def test_sigterm_stops_every_worker_and_loses_nothing_acknowledged(start_process):
    running = start_process("--workers", "2")
    acknowledged, stop = [], threading.Event()

    def client(number):
        conn = running.connect()
        try:
            for n in range(2000):
                if stop.is_set():
                    break
                status, _, task = running.request("POST", "/tasks",
                                                  {"subject": "%d-%d" % (number, n)}, conn=conn)
                if status != 201:
                    break
                acknowledged.append(task["id"])
        except (OSError, http.client.HTTPException):
            pass  # the server stopped under us: nothing unanswered counts

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    _wait_for(lambda: len(acknowledged) >= 100)
    workers = _wait_for(lambda: len(_workers_of(running)) == 2 and _workers_of(running))
    assert running.stop() == 0
    stop.set()
    for thread in threads:
        thread.join(timeout=20)
    assert not any(os.path.exists("/proc/%d" % pid) for pid in workers)
    with TaskStore(running.db) as store:
        found = store.get_many(acknowledged)
    assert len(found) == len(acknowledged)


def test_an_idempotency_key_sent_to_two_workers_at_once_creates_one_task(start_process):
    running = start_process("--workers", "2")
    results = {}

    def send(key, barrier):
        conn = running.connect()
        barrier.wait(10)
        status, headers, task = running.request(
            "POST", "/tasks", {"subject": key},
            headers={**HEADERS, "Idempotency-Key": key}, conn=conn)
        conn.close()
        results.setdefault(key, []).append((status, task["id"]))

    for n in range(16):
        barrier = threading.Barrier(2)
        pair = [threading.Thread(target=send, args=("key-%d" % n, barrier))
                for _ in range(2)]
        for thread in pair:
            thread.start()
        for thread in pair:
            thread.join(timeout=20)
    assert all(len({task_id for _, task_id in answers}) == 1
               and [status for status, _ in answers] == [201, 201]
               for answers in results.values()) and len(results) == 16
    log = running.log()
    assert "[w1]" in log and "[w2]" in log
    assert running.stop() == 0
    with TaskStore(running.db) as store:
        assert store.count() == 16


def test_log_lines_go_out_whole_in_writes_a_pipe_takes_in_one_piece(monkeypatch):
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(bytes(data)) or len(data))
    read_end, write_end = os.pipe()
    try:
        stream = os.fdopen(write_end, "w", closefd=False)
        lines = ["GET /%s %d\n" % ("\u00ff" * 400, n) for n in range(40)]  # 2 bytes a char
        genesy_tasks._write_lines(stream, lines)
    finally:
        monkeypatch.setattr(os, "write", real_write)
        os.close(read_end)
        os.close(write_end)
    assert b"".join(writes).decode("utf-8") == "".join(lines)
    assert all(len(data) <= 4096 and data.endswith(b"\n") for data in writes)
    assert len(writes) > 1


def test_a_long_path_is_cut_in_the_log_and_the_line_keeps_its_status(tasks_app, serve):
    log = io.StringIO()
    server = serve(tasks_app, log=log)
    [(status, _, _)] = _pipelined(server.port, _request_bytes(
        "GET", "/" + "x" * 3000, headers={"Connection": "close"}))
    assert status == 404
    _wait_for(lambda: " 404 " in log.getvalue())
    server.stop()
    line = [line for line in log.getvalue().splitlines() if " 404 " in line][0]
    assert re.search(r" GET /x{499}\.\.\. 404 [\d.]+ms$", line), line


def test_workers_warn_once_about_a_key_others_can_read(tmp_path, start_process):
    db = tmp_path / "crm.db"
    sqlite3.connect(str(db)).close()
    os.chmod(str(db), 0o644)
    running = start_process("--workers", "2", env={}, db=str(db))
    _wait_for(lambda: len(_workers_of(running)) == 2)
    assert running.request("GET", "/health", headers={
        "X-API-Key": running.banner[2].split()[2]})[0] == 200
    assert running.stop() == 0
    assert running.log().count("other users can read the generated API key") == 1


def test_workers_need_fork(monkeypatch, tmp_path, capsys):
    monkeypatch.delattr(os, "fork")
    assert genesy_tasks.main(["--workers", "2", "--db", str(tmp_path / "x.db")]) == 2
    assert capsys.readouterr().err == ("genesy-tasks: --workers needs os.fork (Linux, macOS, "
                                       "BSD); run one worker here\n")
    assert not (tmp_path / "x.db").exists()


###############################################################################
# Check: Genesy's calls against any server, and replay ########################
###############################################################################

# -- the contract check --------------------------------------------------------

def test_check_passes_against_this_server_and_cleans_up(server):
    status, lines = _check("http://%s:%d" % (server.host, server.port), "--api-key", KEY)
    assert status == 0, "\n".join(lines)
    results = [line for line in lines if line.startswith(("PASS", "FAIL"))]
    assert len(results) == 12 and all(line.startswith("PASS  ") for line in results)
    assert "cleanup: deleted the 3 tasks the check created" in lines
    assert lines[-1] == "12 checks: 12 passed, 0 failed"
    with TaskStore(server.db) as store:
        assert store.count() == 0


def test_check_as_a_command_finds_a_fresh_servers_generated_key(tmp_path, start_process):
    running = start_process(env={}, db=str(tmp_path / "tasks.db"))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GENESY_")}
    done = subprocess.run(
        [sys.executable, MODULE, "check", "http://%s:%d" % (running.host, running.port)],
        cwd=str(tmp_path), env=environment, capture_output=True, text=True, timeout=60)
    running.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "12 checks: 12 passed, 0 failed"


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def broken_server(db_path, closing, serve):
    """``broken_server(fault)``: this module's app with one fault added in front of it,
    served on a thread by wsgiref's server: (its URL, the app)."""
    def start(fault):
        real = closing(make_app(db_path, api_keys=KEY))
        httpd = serve(_broken(real, fault), via=lambda app: wsgiref.simple_server.make_server(
            "127.0.0.1", 0, app, handler_class=_QuietHandler))
        return "http://127.0.0.1:%d" % httpd.server_port, real
    return start


def _broken(real, fault):
    """The app ``real`` with one fault added in front of it."""
    broken = bottle.Bottle()

    def json_reply(status, body):
        bottle.response.status = status
        bottle.response.content_type = "application/json"
        return json.dumps(body)

    if fault == "express-route-order":
        # Genesy's example server: PATCH /tasks/:id registered before /tasks/batch.
        @broken.route("/tasks/<task_id>", method="PATCH")
        def update(task_id):
            if bottle.request.get_header("X-API-Key") != KEY:
                return json_reply(401, {"error": "Unauthorized", "message": "bad key"})
            task = real.store.update(task_id, bottle.request.json)
            if task is None:
                return json_reply(404, {"error": "Task not found",
                                        "message": "No task exists with ID: %s" % task_id})
            return json_reply(200, task)
    elif fault == "batch-get-fails-on-missing-ids":
        @broken.post("/tasks/batch")
        def batch_get():
            tasks = real.store.get_many(bottle.request.json["ids"])
            if len(tasks) < len(bottle.request.json["ids"]):
                return json_reply(404, {"error": "Task not found", "message": "some ids"})
            return json_reply(200, tasks)
    elif fault == "health-without-auth":
        @broken.get("/health")
        def health():
            return json_reply(200, {"status": "ok"})
    elif fault == "html-404":
        @broken.get("/tasks/<task_id>")
        def get_task(task_id):
            if bottle.request.get_header("X-API-Key") != KEY:
                return json_reply(401, {"error": "Unauthorized", "message": "bad key"})
            task = real.store.get(task_id)
            if task is None:
                bottle.response.status = 404
                return "<h1>Not Found</h1>"
            return json_reply(200, task)
    elif fault == "complete-is-ignored":
        @broken.route("/tasks/<task_id:re:(?!batch$)[^/]+>", method="PATCH")
        def update(task_id):
            return json_reply(200, real.store.get(task_id))
    elif fault == "create-answers-200":
        @broken.post("/tasks")
        def create_task():
            return json_reply(200, real.store.create(bottle.request.json))
    elif fault == "task-without-description":
        @broken.get("/tasks/<task_id:re:(?!batch$)[^/]+>")
        def get_task(task_id):
            task = real.store.get(task_id)
            task.pop("description")
            return json_reply(200, task)
    elif fault == "no-delete":
        @broken.route("/tasks/<task_id:re:(?!batch$)[^/]+>", method="DELETE")
        def delete(task_id):
            return json_reply(405, {"error": "Method not allowed", "message": "no"})

    def dispatch(environ, start_response):
        try:
            broken.router.match(environ)
        except bottle.HTTPError:
            return real(environ, start_response)
        return broken(environ, start_response)

    return dispatch


@pytest.mark.parametrize("fault, failed, line", [
    ("express-route-order", ["batch complete", "batch paths are not task ids"],
     r'FAIL  batch paths are not task ids: PATCH /tasks/batch was handled as the task id '
     r'"batch": 404 .*No task exists with ID: batch"\}'),
    ("batch-get-fails-on-missing-ids", ["batch get omits missing ids",
                                        "batch paths are not task ids"],
     r"FAIL  batch get omits missing ids: POST /tasks/batch with 2 ids and a missing one "
     r"-> 404 .*\(expected 200\)"),
    ("health-without-auth", ["health refuses a wrong key"],
     r"FAIL  health refuses a wrong key: GET /health with a wrong key -> 200 .*"
     r"\(expected 401\)"),
    ("html-404", ["missing task is a 404"],
     r"FAIL  missing task is a 404: GET /tasks/genesy-check-missing-\w+ -> 404 "
     r"<h1>Not Found</h1>: not Genesy's error body .*"),
    ("complete-is-ignored", ["complete"],
     r"FAIL  complete: PATCH /tasks/\S+ \{\"completed\": true\}: completed is false, "
     r"expected true"),
])
def test_check_catches_a_broken_server_with_a_precise_line(broken_server, fault, failed, line):
    status, lines = _check(broken_server(fault)[0], "--api-key", KEY)
    output = "\n".join(lines)
    assert status == 1, output
    assert sorted(re.findall(r"^FAIL  ([^:]+):", output, re.M)) == sorted(failed), output
    assert re.search("^" + line + "$", output, re.M), output
    assert lines[-1] == "12 checks: %d passed, %d failed" % (12 - len(failed), len(failed))


def test_check_says_what_it_left_behind_when_delete_is_not_supported(broken_server):
    url, real = broken_server("no-delete")
    status, lines = _check(url, "--api-key", KEY)
    assert status == 0
    assert any(re.match(r"cleanup: left 3 tasks with the subject 'genesy-tasks check: "
                        r"safe to delete \w+' \(DELETE answered 405\)", line)
               for line in lines), lines
    assert real.store.count() == 3


def test_check_against_nothing_fails_fast_with_the_reason():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    status, lines = _check("http://127.0.0.1:%d" % port, "--api-key", KEY, "--timeout", "2")
    assert status == 1
    assert re.match(r"FAIL  health: cannot talk to .*refused", lines[1])
    assert lines[-1] == "12 checks: 0 passed, 12 failed"


def test_check_needs_a_key_and_an_http_url(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("GENESY_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    assert genesy_tasks.main(["check", "http://127.0.0.1:9"]) == 2
    assert "no API key" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "tasks.db")  # looking for a key created nothing
    assert genesy_tasks.main(["check", "ftp://example.com", "--api-key", "k"]) == 2
    assert "http://" in capsys.readouterr().err


# -- replay --------------------------------------------------------------------

def _replay(path, url, *args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = genesy_tasks.main(["replay", str(path), url, *args])
    return status, out.getvalue().splitlines()


def test_a_recording_replays_against_a_fresh_server_and_every_request_passes(recording,
                                                                            tmp_path,
                                                                            start_process):
    fresh = start_process(env={"GENESY_API_KEY": "another-key"}, db=str(tmp_path / "fresh.db"))
    status, lines = _replay(recording, "http://%s:%d" % (fresh.host, fresh.port),
                            "--api-key", "another-key")
    with TaskStore(fresh.db) as store:
        assert store.count() == 0  # what it created is deleted again
    fresh.stop()
    assert status == 0, lines
    assert lines[-1] == "9 requests: 9 passed, 0 failed"
    assert re.match(r"PASS  #3 GET /tasks/task-\w+ -> 200$", lines[3])  # the new server's id
    assert "cleanup: deleted the 1 tasks the replay created" in lines


@pytest.mark.parametrize("fault, line", [
    ("create-answers-200", r"FAIL  #1 POST /tasks -> 200: status 200, recorded 201"),
    ("task-without-description",
     r"FAIL  #3 GET /tasks/task-\w+ -> 200: body: no 'description'"),
    ("express-route-order",
     r"FAIL  #6 PATCH /tasks/batch -> 404: status 404, recorded 200; body: object, "
     r"recorded array"),
])
def test_replay_reports_how_a_wrong_server_differs(recording, broken_server, fault, line):
    status, lines = _replay(recording, broken_server(fault)[0], "--api-key", KEY)
    output = "\n".join(lines)
    assert status == 1, output
    assert re.search("^" + line + "$", output, re.M), output
    assert re.search(r"^9 requests: \d passed, [1-9] failed$", output, re.M), output


def test_replay_finds_the_key_header_and_sends_bytes_that_are_not_utf_8(tmp_path, closing,
                                                                        serve):
    record = tmp_path / "secret.jsonl"
    application = closing(make_app(str(tmp_path / "a.db"), api_keys=KEY, header="X-Secret",
                                   record=str(record)))
    client = webtest.TestApp(application)
    client.post("/tasks", b'{"subject": "caf\xe9"}',
                headers={"X-Secret": KEY, "Content-Type": "application/json"}, status=400)
    client.post_json("/tasks", {"subject": "Call"}, headers={"X-Secret": KEY}, status=201)
    application.close()
    line = json.loads(record.read_text().splitlines()[0])
    assert line["request"]["encoding"] == "base64"
    other = closing(make_app(str(tmp_path / "b.db"), api_keys="other-key", header="X-Secret"))
    server = serve(other)
    status, lines = _replay(record, "http://127.0.0.1:%d" % server.port,
                            "--api-key", "other-key")
    assert status == 0, lines  # the 400 again: the same bytes, not a UTF-8 guess


def test_replaying_twice_against_one_server_passes_twice(tmp_path, closing, serve):
    record = tmp_path / "rec.jsonl"
    application = closing(make_app(str(tmp_path / "a.db"), api_keys=KEY, record=str(record)))
    client = webtest.TestApp(application)
    for _ in range(2):  # Genesy retried the create
        task = client.post_json("/tasks", {"subject": "Once"},
                                headers={**HEADERS, "Idempotency-Key": "k-1"}).json
    client.get("/tasks/" + task["id"], headers=HEADERS)
    client.get("/tasks/" + task["id"], headers={**HEADERS, "X-Note": "\u65e5\u672c"
                                                .encode("utf-8").decode("latin-1")})
    application.close()
    target = closing(make_app(str(tmp_path / "b.db"), api_keys=KEY))
    server = serve(target)
    for _ in range(2):
        status, lines = _replay(record, "http://127.0.0.1:%d" % server.port, "--api-key", KEY)
        assert status == 0, lines
        assert "cleanup: deleted the 1 tasks the replay created" in lines
    server.stop()
    assert target.store.count() == 0


def test_replay_against_nothing_or_with_a_bad_file(recording, tmp_path, capsys):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    status, lines = _replay(recording, "http://127.0.0.1:%d" % port, "--api-key", KEY,
                            "--timeout", "2")
    assert status == 1 and lines[-1] == "9 requests: 0 passed, 9 failed"
    assert re.match(r"FAIL  #1 POST /tasks: cannot talk to .*refused", lines[1])
    assert lines[2] == "      (the 8 requests after it were not sent)"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert _replay(empty, "http://127.0.0.1:9", "--api-key", KEY)[0] == 2
    assert "holds no recorded request" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"method": "GET"}\n')
    assert _replay(bad, "http://127.0.0.1:9", "--api-key", KEY)[0] == 2
    assert "bad.jsonl line 1 is not a recorded request" in capsys.readouterr().err
    assert _replay(tmp_path / "missing.jsonl", "http://127.0.0.1:9", "--api-key", KEY)[0] == 2
    bad.write_text(json.dumps({"method": "GET", "path": "/", "request": {"headers": []},
                               "response": {"status": "200"}}) + "\n")
    assert _replay(bad, "http://127.0.0.1:9", "--api-key", KEY)[0] == 2


###############################################################################
# Command line ################################################################
###############################################################################

# -- the command line ----------------------------------------------------------

def test_the_command_line_serves_and_stops_cleanly_on_sigterm(start_process):
    running = start_process()
    assert "API key header: X-API-Key" in running.banner[1]
    assert KEY not in "".join(running.banner)
    status, headers, body = running.request("POST", "/tasks", {"subject": "over the wire"})
    assert status == 201 and headers["Location"] == "/tasks/" + body["id"]
    assert running.request("GET", "/health")[:1] == (200,)
    assert running.stop(signal.SIGTERM) == 0
    # The database was closed: the last connection checkpointed and removed the WAL.
    assert not os.path.exists(running.db + "-wal")
    log = running.log()
    assert re.search(r"POST /tasks 201 [\d.]+ms", log)
    assert re.search(r"GET /health 200 [\d.]+ms", log)
    assert KEY not in log and "over the wire" not in log
    with TaskStore(running.db) as store:
        assert store.get(body["id"])["subject"] == "over the wire"


def test_sigint_also_stops_cleanly(start_process):
    running = start_process()
    assert running.request("GET", "/health")[0] == 200
    assert running.stop(signal.SIGINT) == 0


def test_a_generated_key_is_printed_at_every_start_and_reused(start_process):
    first = start_process(env={})
    key = re.search(r"API key: (\S+)", first.banner[2]).group(1)
    assert first.request("GET", "/health", headers={"X-API-Key": key})[0] == 200
    assert first.stop() == 0
    assert key not in first.log()
    second = start_process(env={"GENESY_API_KEY": "  "}, db=first.db)
    assert re.search(r"API key: (\S+)", second.banner[2]).group(1) == key
    second.stop()


@pytest.mark.parametrize("make_bad_path, words", [
    (lambda tmp: str(tmp / "missing" / "tasks.db"), ["does not exist"]),
    (lambda tmp: (tmp / "junk.db").write_bytes(b"not a database at all" * 100) and
     str(tmp / "junk.db"), ["not a database"]),
    (lambda tmp: str(tmp), ["unable to open"]),
    (lambda tmp: "/proc/genesy-tasks.db", ["cannot create"]),
])
def test_a_bad_db_path_fails_at_start_with_one_clear_line(tmp_path, make_bad_path, words):
    line = _refused_at_start("--db", make_bad_path(tmp_path))
    for word in words:
        assert word in line


def _file_state(path):
    """The bytes of ``path`` and which of its -wal and -shm files exist."""
    return (open(path, "rb").read(),
            [suffix for suffix in ("-wal", "-shm") if os.path.exists(path + suffix)])


def test_a_file_that_is_refused_is_left_exactly_as_it_was(tmp_path):
    # Another application's file with its own genesy_tasks table, in its own journal mode.
    other = str(tmp_path / "other.db")
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE genesy_tasks (anything)")
    conn.execute("INSERT INTO genesy_tasks VALUES ('theirs')")
    conn.commit()
    conn.close()
    before = _file_state(other)
    line = _refused_at_start("--db", other)
    assert "did not create" in line
    assert _file_state(other) == before
    conn = sqlite3.connect(other)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()


def test_an_unreadable_schema_version_is_one_line_and_changes_nothing(tmp_path):
    db = str(tmp_path / "tasks.db")
    TaskStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE genesy_meta SET value = 'two' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    before = _file_state(db)
    assert "'two'" in _refused_at_start("--db", db)
    assert _file_state(db) == before


def test_a_start_that_fails_leaves_no_new_database_file(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        db = str(tmp_path / "new.db")
        result = subprocess.run(
            [sys.executable, MODULE, "--port", str(taken.getsockname()[1]), "--db", db],
            capture_output=True, text=True, timeout=30, env={**os.environ, "GENESY_API_KEY": KEY})
    assert result.returncode == 2 and "cannot listen" in result.stderr
    assert not [name for name in os.listdir(tmp_path) if name.startswith("new.db")]


@pytest.mark.parametrize("args, env", [
    (["--port", "70000"], {}), ([], {"GENESY_TASKS_PORT": "70000"}),
    (["--port", "-1"], {}), (["--busy-timeout", "soon"], {}),
    ([], {"GENESY_TASKS_MAX_BODY": "big"}), (["--no-such-option"], {}),
])
def test_every_bad_option_or_environment_value_is_one_line_and_exit_2(args, env):
    result = subprocess.run([sys.executable, MODULE, *args], capture_output=True, text=True,
                            timeout=30, env={**os.environ, "GENESY_API_KEY": KEY, **env})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genesy-tasks: "), result.stderr


def test_a_log_on_a_full_disk_fails_nothing_and_sigterm_still_exits_0(tmp_path, spawn):
    # stderr on /dev/full: every log write fails with ENOSPC.
    with open("/dev/full", "w") as full:
        process = spawn(
            [sys.executable, MODULE, "--port", "0", "--db", str(tmp_path / "t.db")],
            stdout=subprocess.PIPE, stderr=full, text=True,
            env={**os.environ, "GENESY_API_KEY": KEY})
    port = int(re.search(r":(\d+) ", process.stdout.readline()).group(1))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(3):
        for method, path, status in (("POST", "/tasks", 201), ("GET", "/nowhere", 404)):
            conn.request(method, path, body=b'{"subject": "logged nowhere"}',
                         headers={**HEADERS, "Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == status
            response.read()
    conn.close()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0


def test_flags_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("GENESY_TASKS_HOST", "0.0.0.0")
    monkeypatch.setenv("GENESY_TASKS_PORT", "9000")
    monkeypatch.setenv("GENESY_TASKS_DB", "env.db")
    args = genesy_tasks._parse_arguments([])
    assert (args.host, args.port, args.db) == ("0.0.0.0", 9000, "env.db")
    args = genesy_tasks._parse_arguments(["--port", "9100", "--db", "flag.db"])
    assert (args.host, args.port, args.db) == ("0.0.0.0", 9100, "flag.db")
    monkeypatch.setenv("GENESY_TASKS_PORT", "eighty")
    with pytest.raises(SystemExit):
        genesy_tasks._parse_arguments([])


@pytest.mark.parametrize("env, value, attribute, parsed", [
    ("GENESY_TASKS_MAX_CONNECTIONS", "12", "max_connections", 12),
    ("GENESY_TASKS_REQUEST_TIMEOUT", "2.5", "request_timeout", 2.5),
    ("GENESY_TASKS_BUSY_TIMEOUT", "0.5", "busy_timeout", 0.5),
    ("GENESY_TASKS_TLS_CERT", "/etc/cert.pem", "tls_cert", "/etc/cert.pem"),
    ("GENESY_TASKS_TLS_KEY", "/etc/key.pem", "tls_key", "/etc/key.pem"),
])
def test_every_server_option_has_its_environment_variable(monkeypatch, env, value,
                                                          attribute, parsed):
    monkeypatch.setenv(env, value)
    assert getattr(genesy_tasks._parse_arguments([]), attribute) == parsed


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        genesy_tasks.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("--host", "--port", "--db", "--max-batch", "--max-body",
                 "GENESY_TASKS_HOST", "GENESY_TASKS_PORT", "GENESY_TASKS_DB",
                 "GENESY_API_KEY", "GENESY_API_KEY_HEADER", "127.0.0.1", "8080", "tasks.db"):
        assert word in text


def test_options_before_a_command_apply_to_it(tmp_path, capsys):
    crm = str(tmp_path / "crm.db")
    with TaskStore(crm) as store:
        store.create({"subject": "in the CRM's file"})
    dest = str(tmp_path / "backup.db")
    assert genesy_tasks.main(["--db", crm, "backup", dest]) == 0
    with TaskStore(dest) as copy:
        assert copy.count() == 1
    for argv, flag in ((["--port", "9", "check", "http://x"], "--port"),
                       (["--max-batch", "5", "backup", dest], "--max-batch")):
        with pytest.raises(SystemExit) as stopped:
            genesy_tasks.main(argv)
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert err.strip().endswith("%s does not apply to the %s command (see --help)"
                                    % (flag, argv[2])), err


# -- secrets -------------------------------------------------------------------

def test_a_generated_key_in_a_file_others_can_read_gets_one_warning(tmp_path, monkeypatch,
                                                                   capsys, closing):
    monkeypatch.delenv("GENESY_API_KEY", raising=False)
    crm = tmp_path / "crm.db"
    sqlite3.connect(str(crm)).close()  # made by the CRM, with the umask's mode
    os.chmod(str(crm), 0o644)
    application = closing(make_app(str(crm)))
    err = capsys.readouterr().err.splitlines()
    # The WAL file holds recent pages, the key's among them: it is named too.
    assert err == ["genesy-tasks: warning: other users can read the generated API key in "
                   "%s (mode 0644), %s-wal (mode 0644); run chmod 600 %s %s-wal %s-shm, or "
                   "set GENESY_API_KEY" % (crm, crm, crm, crm, crm)] or err == [
        "genesy-tasks: warning: other users can read the generated API key in "
        "%s (mode 0644), %s-wal (mode 0644), %s-shm (mode 0644); run chmod 600 %s %s-wal "
        "%s-shm, or set GENESY_API_KEY" % (crm, crm, crm, crm, crm, crm)]
    application.close()
    make_app(str(crm), api_keys=KEY).close()  # a key of one's own: nothing to say
    os.chmod(str(crm), 0o600)
    make_app(str(crm)).close()
    assert capsys.readouterr().err == ""


###############################################################################
# Assets: the dashboard page and the OpenAPI document #########################
###############################################################################

# -- the dashboard -------------------------------------------------------------

def test_the_dashboard_is_one_self_contained_page_that_needs_no_key(api):
    response = api.get("/", status=200)
    assert response.content_type == "text/html"
    page = response.text
    assert 'data-key-header="X-API-Key"' in page
    # Nothing is fetched from elsewhere: no external URL, and a policy that forbids it.
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert response.headers["X-Frame-Options"] == "DENY"
    assert ".innerHTML" not in page and "insertAdjacentHTML" not in page
    # The key input has no name, so even a form submitted without the script
    # could never put the key in a URL.
    assert re.search(r'<input id="key" type="password"(?![^>]*name=)', page)


def test_the_dashboard_escapes_the_configured_header_and_knows_its_mount_point(db_path,
                                                                              closing):
    crm = bottle.Bottle()
    crm.mount("/genesy/", closing(make_app(db_path, api_keys=KEY, header="X-Key&'")))
    page = webtest.TestApp(crm).get("/genesy/").text
    assert 'data-base="/genesy"' in page and 'data-key-header="X-Key&amp;&#x27;"' in page


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


HOSTILE_SUBJECT = '<img src=x onerror="document.title=1">Call <b>Ann</b> & co'


@pytest.fixture
def browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("GENESY_TASKS_REQUIRE_CHROMIUM"):  # set by .ci/run
            pytest.fail("Chromium is required here but %s or %s is missing"
                        % (CHROMIUM, CHROMEDRIVER))
        pytest.skip("Chromium is not installed here (Debian packages chromium and "
                    "chromium-driver; .ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                     "--window-size=1280,640", "--user-data-dir=%s" % (tmp_path / "chromium")):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def _eventually(check, timeout=15):
    """Poll ``check`` until it returns something true; the page refreshes every 2 s."""
    from selenium.common.exceptions import StaleElementReferenceException
    return _wait_for(check, timeout, step=0.1,
                     ignoring=(StaleElementReferenceException, LookupError))


def _row(driver, task_id):
    from selenium.webdriver.common.by import By
    rows = driver.find_elements(By.CSS_SELECTOR, "#rows tr")
    for row in rows:
        if row.get_attribute("data-task-id") == task_id:
            return row
    return None


def test_the_dashboard_in_chromium_shows_tasks_arrive_and_completes_them(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    url = "http://%s:%d/" % (server.host, server.port)
    browser.get(url)
    key_input = _eventually(lambda: browser.find_element(By.ID, "key").is_displayed()
                            and browser.find_element(By.ID, "key"))
    key_input.send_keys("wrong-key")
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    _eventually(lambda: "refused" in browser.find_element(By.ID, "login-error").text)
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    _eventually(lambda: browser.find_element(By.ID, "tasks-view").is_displayed())
    assert KEY not in browser.current_url
    assert browser.execute_script(
        "return sessionStorage.getItem('genesy-tasks-api-key')") == KEY

    # A task Genesy creates appears by itself, its untrusted fields shown as text.
    _, _, task = server.request("POST", "/tasks", {
        "subject": HOSTILE_SUBJECT, "ownerId": "user-<script>", "type": "call",
        "description": "line one\nline two"})
    row = _eventually(lambda: _row(browser, task["id"]))
    assert row.find_element(By.CSS_SELECTOR, ".subject").text == HOSTILE_SUBJECT
    assert row.find_element(By.CSS_SELECTOR, ".ownerId").text == "user-<script>"
    assert browser.find_elements(By.CSS_SELECTOR, "#rows img, #rows b, #rows script") == []
    assert browser.title == "genesy-tasks"

    if os.environ.get("GENESY_DASHBOARD_SCREENSHOT"):  # how docs/dashboard.png is made
        for subject, owner in (("Send proposal", "user-123"),
                               ("Book a demo with Acme", "user-321")):
            made = server.request("POST", "/tasks", {"subject": subject, "ownerId": owner,
                                                     "type": "email", "dueDate": "2024-01-16",
                                                     "contactId": "contact-456"})[2]
        server.request("PATCH", "/tasks/" + made["id"], {"completed": True})
        _eventually(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#rows tr")) == 3)
        browser.save_screenshot(os.environ["GENESY_DASHBOARD_SCREENSHOT"])

    # Complete it from the page; the API agrees.
    _row(browser, task["id"]).find_element(By.CSS_SELECTOR, "button.toggle").click()
    _eventually(lambda: server.request("GET", "/tasks/" + task["id"])[2]["completed"])
    _eventually(lambda: _row(browser, task["id"]).find_element(
        By.CSS_SELECTOR, "button.toggle").text == "Reopen")

    # Filtering: open tasks only hides it; completed shows it again; then reopen it.
    Select(browser.find_element(By.ID, "state")).select_by_value("open")
    _eventually(lambda: _row(browser, task["id"]) is None)
    Select(browser.find_element(By.ID, "state")).select_by_value("completed")
    _eventually(lambda: _row(browser, task["id"]))
    _row(browser, task["id"]).find_element(By.CSS_SELECTOR, "button.toggle").click()
    _eventually(lambda: not server.request("GET", "/tasks/" + task["id"])[2]["completed"])

    # The owner filter.
    Select(browser.find_element(By.ID, "state")).select_by_value("all")
    owner = browser.find_element(By.ID, "owner")
    owner.send_keys("someone-else")
    browser.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    _eventually(lambda: _row(browser, task["id"]) is None)
    owner.clear()
    owner.send_keys("user-<script>")
    browser.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    _eventually(lambda: _row(browser, task["id"]))

    # The page broke no rule of its Content-Security-Policy and threw nothing
    # (the wrong key's 401 is the one network error expected).
    problems = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"
                and not (entry["source"] == "network" and "401" in entry["message"])]
    assert problems == []
    # Forgetting the key clears it from the browser.
    browser.find_element(By.ID, "forget").click()
    assert browser.execute_script("return sessionStorage.getItem('genesy-tasks-api-key')") is None


def _request_items(driver):
    from selenium.webdriver.common.by import By
    return driver.find_elements(By.CSS_SELECTOR, "#request-list details")


def test_the_dashboards_requests_view_shows_what_was_sent_as_text(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    browser.get("http://%s:%d/" % (server.host, server.port))
    _eventually(lambda: browser.find_element(By.ID, "key").is_displayed())
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    _eventually(lambda: browser.find_element(By.ID, "tasks-view").is_displayed())
    browser.find_element(By.ID, "show-requests").click()
    _eventually(lambda: browser.find_element(By.ID, "requests-view").is_displayed())

    # What Genesy (or anyone) sends appears by itself, newest first; the
    # dashboard's own requests do not.
    server.request("POST", "/tasks", {"subject": HOSTILE_SUBJECT, "contactId": "c-1"})
    server.request("POST", "/contacts", {"name": "<b>Ann</b>"})
    server.request("GET", "/health", headers={})
    items = _eventually(lambda: len(_request_items(browser)) == 3 and _request_items(browser))
    summaries = [[item.find_element(By.CSS_SELECTOR, name).text
                  for name in (".method", ".target", ".status")] for item in items]
    assert summaries == [
        ["GET", "/health", "401"], ["POST", "/contacts", "404"], ["POST", "/tasks", "201"]]

    # Expanded: headers with the key redacted, bodies pretty-printed, as text.
    items[2].find_element(By.TAG_NAME, "summary").click()
    request, answer = items[2].find_elements(By.CSS_SELECTOR, ".exchange pre")
    assert json.loads(request.text) == {"subject": HOSTILE_SUBJECT, "contactId": "c-1"}
    assert request.text.startswith('{\n  "subject"')
    assert json.loads(answer.text)["subject"] == HOSTILE_SUBJECT
    assert "X-Api-Key [redacted]" in items[2].find_element(By.CSS_SELECTOR, "table").text
    assert KEY not in browser.find_element(By.ID, "requests-view").text
    assert browser.find_elements(By.CSS_SELECTOR, "#request-list img, #request-list b") == []
    assert browser.title == "genesy-tasks"
    # It stays open as new requests arrive (the view looks every second).
    server.request("GET", "/tasks/task-none")
    _eventually(lambda: len(_request_items(browser)) == 4)
    assert _request_items(browser)[3].get_attribute("open") == "true"

    if os.environ.get("GENESY_REQUESTS_SCREENSHOT"):  # how docs/requests.png is made
        browser.set_window_size(1280, 900)
        browser.save_screenshot(os.environ["GENESY_REQUESTS_SCREENSHOT"])

    # Filters: by status class, then by path.
    Select(browser.find_element(By.ID, "status-class")).select_by_value("4")
    _eventually(lambda: [item.find_element(By.CSS_SELECTOR, ".target").text
                         for item in _request_items(browser)] == [
                             "/tasks/task-none", "/health", "/contacts"])
    browser.find_element(By.ID, "path-filter").send_keys("contacts")
    _eventually(lambda: len(_request_items(browser)) == 1)
    problems = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert problems == []


# -- the OpenAPI document ------------------------------------------------------

def _openapi_path(rule):
    """A Bottle route rule as an OpenAPI path template."""
    return re.sub(r"<task_id[^>]*>", "{taskId}", rule)


def test_the_openapi_document_is_valid_openapi_3_1_and_needs_no_key(api):
    from openapi_spec_validator import validate
    response = api.get("/openapi.json", status=200)
    assert response.content_type == "application/json"
    document = response.json
    assert document["openapi"].startswith("3.1")
    assert document["info"]["version"] == genesy_tasks.__version__
    validate(document)


def test_the_openapi_document_lists_exactly_the_routes_the_app_serves(tasks_app, api):
    document = api.get("/openapi.json").json
    served = {(route.method.lower(), _openapi_path(route.rule)) for route in tasks_app.routes}
    described = {(method, path) for path, item in document["paths"].items()
                 for method in item if method != "parameters"}
    assert served == described


def test_the_openapi_security_scheme_names_the_configured_header(db_path, closing):
    custom = closing(make_app(db_path, api_keys=KEY, header="Authorization-Token"))
    document = webtest.TestApp(custom).get("/openapi.json").json
    assert document["components"]["securitySchemes"]["apiKey"] == {
        "type": "apiKey", "in": "header", "name": "Authorization-Token"}


def test_the_openapi_servers_entry_follows_the_mount_point(db_path, closing):
    crm = bottle.Bottle()
    crm.mount("/genesy/", closing(make_app(db_path, api_keys=KEY)))
    document = webtest.TestApp(crm).get("/genesy/openapi.json").json
    assert document["servers"] == [{"url": "/genesy"}]


def _response_schema(document, method, path, status):
    """The JSON schema the document gives for one response, resolvable on its own."""
    response = document["paths"][path][method]["responses"][str(status)]
    if "$ref" in response:
        response = document["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    schema = response["content"]["application/json"]["schema"]
    return dict(schema, components=document["components"])


def test_real_responses_conform_to_the_openapi_document(api):
    from openapi_schema_validator import OAS31Validator
    document = api.get("/openapi.json").json
    task = create(api, **FULL_TASK)
    missing = "/tasks/task-missing"
    exchanges = [
        ("get", "/health", api.get("/health", headers=HEADERS)),
        ("get", "/health", api.get("/health", status=401)),
        ("get", "/tasks", api.get("/tasks?limit=1", headers=HEADERS)),
        ("get", "/tasks", api.get("/tasks?limit=x", headers=HEADERS, status=400)),
        ("post", "/tasks", api.post_json("/tasks", FULL_TASK, headers=HEADERS)),
        ("post", "/tasks", api.post_json("/tasks", {}, headers=HEADERS, status=400)),
        ("post", "/tasks", api.post("/tasks", "x", headers=HEADERS, status=415)),
        ("post", "/tasks/batch", api.post_json("/tasks/batch", {"ids": [task["id"], "x"]},
                                               headers=HEADERS)),
        ("patch", "/tasks/batch", api.patch_json("/tasks/batch", {"ids": [task["id"]],
                                                 "completed": True}, headers=HEADERS)),
        ("get", "/tasks/{taskId}", api.get("/tasks/" + task["id"], headers=HEADERS)),
        ("get", "/tasks/{taskId}", api.get(missing, headers=HEADERS, status=404)),
        ("patch", "/tasks/{taskId}", api.patch_json("/tasks/" + task["id"],
                                                    {"completed": False}, headers=HEADERS)),
        ("delete", "/tasks/{taskId}", api.delete(missing, headers=HEADERS, status=404)),
        ("delete", "/tasks/{taskId}", api.delete("/tasks/" + create(api)["id"],
                                                 headers=HEADERS, status=204)),
        ("get", "/changes", api.get("/changes?limit=500", headers=HEADERS)),
        ("get", "/changes", api.get("/changes?limit=x", headers=HEADERS, status=400)),
    ]
    exchanges = [exchange for exchange in exchanges if exchange[2].status_int != 204]
    for method, path, response in exchanges:
        operation = document["paths"][path][method]
        assert str(response.status_int) in operation["responses"], (method, path)
        OAS31Validator(_response_schema(document, method, path, response.status_int)
                       ).validate(response.json)
    deleted = api.delete("/tasks/" + task["id"], headers=HEADERS, status=204)
    assert "204" in document["paths"]["/tasks/{taskId}"]["delete"]["responses"]
    assert deleted.body == b""


def test_the_openapi_request_schemas_match_the_validation(api):
    from openapi_schema_validator import OAS31Validator
    document = api.get("/openapi.json").json
    schemas = document["components"]["schemas"]

    def accepts(name, body):
        return OAS31Validator(dict(schemas[name], components=document["components"])
                              ).is_valid(body)

    assert accepts("NewTask", FULL_TASK) and accepts("NewTask", {"subject": "x"})
    for refused in ({}, {"subject": " "}, {"subject": 5}, {"subject": "x", "dueDate": "soon"}):
        assert not accepts("NewTask", refused)
        api.post_json("/tasks", refused, headers=HEADERS, status=400)
    assert not accepts("TaskChanges", {}) and not accepts("TaskChanges", {"other": 1})
    assert accepts("TaskChanges", {"completed": True})
    assert not accepts("BatchComplete", {"ids": []})
    assert accepts("BatchGet", {"ids": ["a"]}) and not accepts("BatchGet", {"ids": [1]})


###############################################################################
# Examples: the example CRM and the example database ##########################
###############################################################################

# -- the example CRM -----------------------------------------------------------

def _example_crm():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "example_crm", os.path.join(HERE, "examples", "crm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def example_crm(tmp_path):
    module = _example_crm()
    crm = module.CRM(str(tmp_path / "crm.db"), api_keys=KEY)
    for contact in module.EXAMPLE_CONTACTS:
        crm.add_contact(*contact)
    yield crm
    crm.close()


def test_the_example_crm_refuses_unknown_contacts_and_records_completions(example_crm):
    client = webtest.TestApp(example_crm.application)
    body = assert_error(client.post_json("/genesy/tasks", {"subject": "x", "contactId": "c-9"},
                                         headers=HEADERS, status=400), 400)
    assert body["message"] == "contactId 'c-9' is not a contact of this CRM"
    task = client.post_json("/genesy/tasks", {"subject": "<b>Call</b>", "contactId": "contact-1"},
                            headers=HEADERS, status=201).json
    client.patch_json("/genesy/tasks/" + task["id"], {"completed": True}, headers=HEADERS)
    _wait_for(lambda: example_crm.activities("contact-1"))
    [(text, _)] = example_crm.activities("contact-1")
    assert text == "Completed: <b>Call</b>"
    page = client.get("/contacts/contact-1").text
    # The task, through TaskStore, and the activity, both escaped.
    assert page.count("&lt;b&gt;Call&lt;/b&gt;") == 2 and "<b>Call" not in page
    assert "done" in page
    client.get("/contacts/contact-9", status=404)
    assert_error(client.get("/genesy/nope", headers=HEADERS, status=404), 404)


def test_python_examples_crm_py_runs_and_passes_the_check(tmp_path, spawn):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GENESY_")}
    spawn([sys.executable, os.path.join(HERE, "examples", "crm.py")], cwd=str(tmp_path),
          env={**environment, "CRM_PORT": str(port), "GENESY_API_KEY": KEY},
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def up():
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True

    _wait_for(up, timeout=20)
    url = "http://127.0.0.1:%d/genesy" % port
    status, lines = _check(url, "--api-key", KEY, "--contact-id", "contact-1")
    assert status == 0, lines
    assert lines[-1] == "12 checks: 12 passed, 0 failed"
    # Without a contact it knows, the CRM refuses the check's tasks, as it should.
    status, lines = _check(url, "--api-key", KEY)
    assert status == 1 and "is not a contact of this CRM" in "\n".join(lines)


# -- the example database ------------------------------------------------------

EXAMPLE_IDS = {  # as listed in the README
    "task-01a2244cab3fc2c1aeaf91dc280a15eb": False,  # Follow up with John
    "task-01a2244cab3f2148621ff8c008eb0faf": True,   # Send proposal
    "task-01a2244cab40852edf7c9c65e4b1df97": False,  # Book a demo with Acme
}


def test_the_example_database_holds_the_readme_tasks(tmp_path):
    copy = tmp_path / "tasks.db"
    with open(os.path.join(HERE, "tasks.db.example"), "rb") as example:
        copy.write_bytes(example.read())
    with TaskStore(str(copy)) as store:
        assert store.count() == len(EXAMPLE_IDS)
        tasks = store.get_many(list(EXAMPLE_IDS))
        assert {t["id"]: t["completed"] for t in tasks} == EXAMPLE_IDS
        assert tasks[0]["subject"] == "Follow up with John"
        # A copied example must never share a known API key.
        with contextlib.closing(sqlite3.connect(str(copy))) as conn:
            assert conn.execute("SELECT count(*) FROM genesy_meta WHERE key = 'api_key'"
                                ).fetchone()[0] == 0
