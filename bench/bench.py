"""Benchmark genesy-tasks against its stack's ceiling, in one run.

    python bench/bench.py            # the full run (about 8 minutes)
    python bench/bench.py --quick    # a reduced set, under a minute
    python bench/bench.py --ab OLD/genesy_tasks.py   # this checkout against another, A/B

It seeds databases of 1,000 and 1,000,000 tasks through TaskStore (kept in
bench/data/ and reused), starts a bare Bottle route on the standard library's
single-threaded WSGI server as the ceiling, then starts the real server as
users do (``python genesy_tasks.py``) and drives each endpoint with wrk
(Debian package ``wrk``) at 1, 8 and 64 connections. It prints a table and the
targets of the performance issue, and writes the same figures as JSON.
"""

import argparse
import contextlib
import json
import os
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import genesy_tasks  # noqa: E402  (the module under test, from this checkout)

DATA = os.path.join(HERE, "data")
KEY = "bench-key"
SEED_CHUNK = 20_000
ID_SAMPLE = 20_000

CEILING = r"""
import sys, bottle
app = bottle.Bottle()

@app.get("/health")
def health():
    return {"status": "ok"}

bottle.run(app, server="wsgiref", host="127.0.0.1", port=int(sys.argv[1]), quiet=True)
"""

# wrk scripts. Each gets `ids` (existing task ids) from a generated prelude;
# done() prints one JSON line with the figures the table needs.
LUA_COMMON = r"""
local headers = {["X-API-Key"] = "%s", ["Content-Type"] = "application/json"}
local counter = 0
math.randomseed(os.time())

local function pick() return ids[math.random(#ids)] end

-- Writes that really write: each wrk thread (two at most) cycles through its
-- own half of tasks that were open, completing them on one pass through and
-- reopening them on the next, so that no request finds its work done.
local mine, pass, at = nil, 0, 0
local threads_made = 0
function setup(thread)
  thread:set("tid", threads_made)
  threads_made = threads_made + 1
end

local function next_open(room)
  if mine == nil then
    mine = {}
    for i = (tid or 0) + 1, #open_ids, 2 do mine[#mine + 1] = open_ids[i] end
  end
  if at + room > #mine then at = 0; pass = pass + 1 end  -- a batch never spans two passes
  at = at + 1
  return mine[at], (pass %% 2 == 0 and "true" or "false")
end

local function mixed_ids(n)
  -- a realistic batch: mostly existing tasks, some missing (deleted in the CRM)
  local out = {}
  for i = 1, n do
    if i %% 5 == 0 then out[i] = '"task-missing-' .. math.random(1e9) .. '"'
    else out[i] = '"' .. pick() .. '"' end
  end
  return "[" .. table.concat(out, ",") .. "]"
end

local function rotating(method, path, bodies)
  -- a request function that cycles through prepared bodies
  return function()
    counter = counter + 1
    return wrk.format(method, path, headers, bodies[counter %% #bodies + 1])
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nRESULT {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,' ..
    '"connect_errors":%%d,"read_errors":%%d,"write_errors":%%d,"status_errors":%%d,' ..
    '"timeouts":%%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
""" % KEY

LUA_ENDPOINTS = {
    "GET /health": r"""
request = function() return wrk.format("GET", "/health", headers) end
""",
    "GET /tasks/<id>": r"""
request = function() return wrk.format("GET", "/tasks/" .. pick(), headers) end
""",
    "POST /tasks": r"""
request = function()
  counter = counter + 1
  return wrk.format("POST", "/tasks", headers, '{"subject":"Follow up ' .. counter ..
    '","description":"Discuss pricing proposal","type":"call","ownerId":"user-' ..
    (counter % 50) .. '","dueDate":"2024-01-15T10:00:00Z","contactId":"contact-' ..
    counter .. '","companyId":"company-' .. (counter % 500) .. '"}')
end
""",
    "PATCH /tasks/<id>": r"""
request = function()
  local id, completed = next_open(1)
  return wrk.format("PATCH", "/tasks/" .. id, headers, '{"completed":' .. completed .. '}')
end
""",
    "POST /tasks/batch 100": r"""
local bodies = {}
for i = 1, 32 do bodies[i] = '{"ids":' .. mixed_ids(100) .. '}' end
request = rotating("POST", "/tasks/batch", bodies)
""",
    "POST /tasks/batch 1000": r"""
local bodies = {}
for i = 1, 16 do bodies[i] = '{"ids":' .. mixed_ids(1000) .. '}' end
request = rotating("POST", "/tasks/batch", bodies)
""",
    "PATCH /tasks/batch 100": r"""
request = function()
  -- 80 of this thread's tasks, all completed or all reopened, and 20 missing ids
  local out, completed = {}, nil
  local first, state = next_open(80)
  out[1], completed = '"' .. first .. '"', state
  for i = 2, 100 do
    if i % 5 == 0 then out[i] = '"task-missing-' .. math.random(1e9) .. '"'
    else out[i] = '"' .. next_open(0) .. '"' end
  end
  return wrk.format("PATCH", "/tasks/batch", headers,
    '{"ids":[' .. table.concat(out, ",") .. '],"completed":' .. completed .. '}')
end
""",
}
SINGLE_TASK_ENDPOINTS = ("GET /tasks/<id>", "POST /tasks", "PATCH /tasks/<id>")


# -- databases ---------------------------------------------------------------------

def _read_only(path):
    return sqlite3.connect("file:%s?mode=ro" % path, uri=True)


def seed_database(size):
    """A database of ``size`` tasks made through TaskStore, reused when it exists.

    A database made by an earlier release is reused as it is (read here without
    upgrading it): the servers upgrade their own copies, so an A/B run can give
    an earlier release a file it can open.
    """
    os.makedirs(DATA, exist_ok=True)
    path = os.path.join(DATA, "tasks-%d.db" % size)
    if os.path.exists(path):
        with contextlib.closing(_read_only(path)) as conn:
            if conn.execute("SELECT count(*) FROM genesy_tasks").fetchone()[0] >= size:
                return path
        os.remove(path)
    partial = path + ".partial"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(partial + suffix):
            os.remove(partial + suffix)
    started = time.monotonic()
    rng = random.Random(size)
    with genesy_tasks.TaskStore(partial) as store:
        made = 0
        while made < size:
            count = min(SEED_CHUNK, size - made)
            store.create_many(_sample_task(rng, made + n) for n in range(count))
            made += count
            print("\r  seeding %s: %d / %d tasks (%.0f s)"
                  % (os.path.basename(path), made, size, time.monotonic() - started),
                  end="", flush=True)
        # A realistic share of tasks is already completed.
        conn = store._connection()
        with store._write():
            conn.execute("UPDATE genesy_tasks SET completed_at = updated_at WHERE seq % 3 = 0")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    print()
    os.rename(partial, path)
    return path


def _sample_task(rng, n):
    return {
        "subject": "Follow up with contact %d" % n,
        "description": "Discuss the pricing proposal from the last meeting" if n % 2 else None,
        "type": ("call", "email", "meeting")[n % 3],
        "ownerId": "user-%d" % rng.randrange(50),
        "dueDate": "2024-%02d-%02dT10:00:00Z" % (rng.randrange(1, 13), rng.randrange(1, 29)),
        "contactId": "contact-%d" % rng.randrange(1_000_000),
        "companyId": "company-%d" % rng.randrange(20_000),
    }


def sample_ids(path, count=ID_SAMPLE, open_only=False):
    """Existing task ids spread over the whole table, in random order (with
    ``open_only``, of tasks not completed)."""
    with contextlib.closing(_read_only(path)) as conn:
        top = conn.execute("SELECT max(seq) FROM genesy_tasks").fetchone()[0]
        rng = random.Random(42)
        seqs = sorted({rng.randrange(1, top + 1) for _ in range(count)})
        found = []
        for start in range(0, len(seqs), 500):
            chunk = seqs[start:start + 500]
            found += [row[0] for row in conn.execute(
                "SELECT id FROM genesy_tasks WHERE seq IN (%s)%s" % (
                    ",".join("?" * len(chunk)),
                    " AND completed_at IS NULL" if open_only else ""), chunk)]
    rng.shuffle(found)
    return found


# -- processes -------------------------------------------------------------------------

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(port, process, timeout=120.0):
    """Seconds until a TCP connection and an HTTP answer succeed."""
    started = time.monotonic()
    request = ("GET /health HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nConnection: close\r\n\r\n"
               % KEY).encode()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError("the server exited with %s" % process.returncode)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(request)
                if sock.recv(16).startswith(b"HTTP/1."):
                    return time.monotonic() - started
        except OSError:
            time.sleep(0.005)
    raise RuntimeError("the server did not answer within %g s" % timeout)


class Process:
    def __init__(self, argv, log_path, env=None):
        self.log = open(log_path, "w")
        started = time.monotonic()
        self.popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log,
                                      env=env, cwd=ROOT)
        self.port = int(argv[argv.index("--port") + 1]) if "--port" in argv else int(argv[-1])
        self.startup = wait_until_serving(self.port, self.popen)
        self.startup_from_launch = time.monotonic() - started

    def peak_rss_mb(self):
        with open("/proc/%d/status" % self.popen.pid) as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        self.popen.terminate()
        try:
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
        self.log.close()


def run_wrk(port, script, connections, seconds):
    threads = min(connections, 2)
    args = ["wrk", "-t%d" % threads, "-c%d" % connections, "-d%ds" % seconds,
            "--timeout", "5s", "-s", script, "http://127.0.0.1:%d" % port]
    output = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60).stdout
    for line in output.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            break
    else:
        raise RuntimeError("wrk printed no result:\n" + output)
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["errors"] = sum(result[k] for k in ("connect_errors", "read_errors", "write_errors",
                                               "status_errors", "timeouts"))
    return result


def write_scripts(directory, ids, open_ids=()):
    prelude = "ids = {%s}\nopen_ids = {%s}\n" % (",".join('"%s"' % i for i in ids),
                                                 ",".join('"%s"' % i for i in open_ids))
    paths = {}
    for name, body in LUA_ENDPOINTS.items():
        path = os.path.join(directory, name.replace(" ", "_").replace("/", "_")
                            .replace("<", "").replace(">", "") + ".lua")
        with open(path, "w") as script:
            script.write(prelude + LUA_COMMON + body)
        paths[name] = path
    return paths


def in_process_batch_limit(path, ids, seconds):
    """Batches per second of TaskStore.get_many_json(1,000 ids): the tasks found and
    encoded as JSON, by the call the route makes."""
    rng = random.Random(7)
    batches = []
    for _ in range(16):
        batch = [rng.choice(ids) if n % 5 else "task-missing-%d" % rng.randrange(10**9)
                 for n in range(1, 1001)]
        batches.append(batch)
    with genesy_tasks.TaskStore(path) as store:
        for batch in batches:  # warm the page cache as the server's would be
            store.get_many_json(batch)
        done = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            store.get_many_json(batches[done % len(batches)])
            done += 1
        return done / (time.perf_counter() - started)


LOCK_HOLDER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


def health_during_a_write_lock(port, db, script, seconds):
    """GET /health at 8 connections while another process holds SQLite's write lock."""
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, db, str(seconds + 2)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        return run_wrk(port, script, 8, seconds)
    finally:
        holder.kill()
        holder.wait()


def stalled_client(port):
    """A client that sends half a request and stops: it must block nobody."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
    return sock


# -- the run -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a reduced set (1,000 and 100,000 tasks, 8 and 64 connections, "
                             "1 s each), under a minute")
    parser.add_argument("--seconds", type=int, default=None,
                        help="seconds per wrk run (default 5, or 1 with --quick)")
    parser.add_argument("--json", default=os.path.join(HERE, "results.json"),
                        help="where to write the figures (default: %(default)s)")
    parser.add_argument("--ab", metavar="MODULE",
                        help="instead of the table: run this checkout's server and the one in "
                             "MODULE (another genesy_tasks.py) side by side, alternating wrk "
                             "runs at 8 connections, and print each endpoint's ratio")
    parser.add_argument("--endpoints", nargs="+", metavar="ENDPOINT",
                        default=["GET /health", "GET /tasks/<id>"],
                        help="with --ab: the endpoints to compare (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="with --ab: runs of each server per endpoint (default: %(default)s)")
    args = parser.parse_args(argv)

    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is missing. Install it with: sudo apt-get install wrk "
                 "(Debian/Ubuntu) or brew install wrk (macOS)")
    seconds = args.seconds or (1 if args.quick else 5)
    if args.ab:
        return compare(args.ab, args.endpoints, args.rounds, seconds,
                       100_000 if args.quick else 1_000_000)
    sizes = (1_000, 100_000) if args.quick else (1_000, 1_000_000)
    levels = (8, 64) if args.quick else (1, 8, 64)
    endpoints = list(LUA_ENDPOINTS)

    print("genesy-tasks %s benchmark: %d cores, Python %s, SQLite %s, wrk runs of %d s"
          % (genesy_tasks.__version__, os.cpu_count(), sys.version.split()[0],
             genesy_tasks.sqlite3.sqlite_version, seconds))
    paths = {size: seed_database(size) for size in sizes}
    results = {"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0],
                           "sqlite": genesy_tasks.sqlite3.sqlite_version,
                           "uname": " ".join(os.uname())},
               "seconds": seconds, "runs": [], "ceiling": {}, "servers": {}}
    workdir = tempfile.mkdtemp(prefix="genesy-bench-")
    try:
        # The stack's ceiling: a bare Bottle route on wsgiref, single-threaded.
        ceiling_script = os.path.join(workdir, "ceiling.py")
        with open(ceiling_script, "w") as script:
            script.write(CEILING)
        port = free_port()
        ceiling = Process([sys.executable, ceiling_script, str(port)],
                          os.path.join(workdir, "ceiling.log"))
        health_script = write_scripts(workdir, ["unused"])["GET /health"]
        try:
            for connections in levels:
                result = run_wrk(port, health_script, connections, seconds)
                results["ceiling"][str(connections)] = result
                print("  ceiling (bare Bottle on wsgiref) at %2d connections: %8.0f req/s"
                      % (connections, result["rps"]))
        finally:
            ceiling.stop()

        for size in sizes:
            # Each size gets a fresh copy, so the write runs start from the same state.
            db = os.path.join(workdir, "run-%d.db" % size)
            shutil.copyfile(paths[size], db)
            genesy_tasks.TaskStore(db).close()  # an upgrade, if any, is not a start
            ids = sample_ids(db)
            scripts = write_scripts(workdir, ids, sample_ids(db, open_only=True))
            # The in-process limit is measured three times around the server's
            # runs and the median kept: one measurement on a shared machine
            # moved by a third between runs.
            limits = [in_process_batch_limit(db, ids, seconds)]
            results["servers"][str(size)] = {}
            print("  %d tasks: in-process get_many_json(1,000 ids): %.1f batches/s"
                  % (size, limits[0]))
            port = free_port()
            env = dict(os.environ, GENESY_API_KEY=KEY)
            server = Process([sys.executable, os.path.join(ROOT, "genesy_tasks.py"),
                              "--db", db, "--port", str(port)],
                             os.path.join(workdir, "server-%d.log" % size), env=env)
            results["servers"][str(size)]["startup_s"] = server.startup_from_launch
            stalled = None
            try:
                for endpoint in endpoints:
                    for connections in levels:
                        if connections == 64 and stalled is None:
                            stalled = stalled_client(port)
                        result = run_wrk(port, scripts[endpoint], connections, seconds)
                        result.update(size=size, endpoint=endpoint, connections=connections)
                        results["runs"].append(result)
                        if endpoint == "POST /tasks/batch 1000" and connections == 8:
                            limits.append(in_process_batch_limit(db, ids, seconds))
                        print("  %-7d %-24s c=%-3d %9.0f req/s  p50 %7.2f ms  p99 %7.2f ms"
                              "  errors %d" % (size, endpoint, connections, result["rps"],
                                               result["p50_us"] / 1000, result["p99_us"] / 1000,
                                               result["errors"]))
                if size == sizes[-1]:
                    result = health_during_a_write_lock(port, db, scripts["GET /health"],
                                                        seconds)
                    results["lock_hold"] = result
                    print("  %-7d GET /health while another process holds the write lock: "
                          "%9.0f req/s  p50 %7.2f ms  p99 %7.2f ms  errors %d"
                          % (size, result["rps"], result["p50_us"] / 1000,
                             result["p99_us"] / 1000, result["errors"]))
                results["servers"][str(size)]["peak_rss_mb"] = server.peak_rss_mb()
            finally:
                if stalled is not None:
                    stalled.close()
                server.stop()
            limits.append(in_process_batch_limit(db, ids, seconds))
            if size == sizes[-1]:
                results["workers"] = run_workers(paths[size], workdir, scripts, seconds, size)
            results["servers"][str(size)].update(
                in_process_batch_1000_per_s=statistics.median(limits),
                in_process_batch_1000_samples=limits)
            print("  %d tasks: in-process limit, median of %s: %.1f batches/s"
                  % (size, ", ".join("%.1f" % limit for limit in limits),
                     statistics.median(limits)))
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(db + suffix):
                    os.remove(db + suffix)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    report(results, sizes, levels)
    with open(args.json, "w") as out:
        json.dump(results, out, indent=2)
    print("\nfigures written to %s" % os.path.relpath(args.json))


def run_workers(seeded, workdir, scripts, seconds, size):
    """Each endpoint at 8 and 64 connections against --workers 2, on a fresh copy."""
    db = os.path.join(workdir, "workers-%d.db" % size)
    shutil.copyfile(seeded, db)
    genesy_tasks.TaskStore(db).close()
    port = free_port()
    server = Process([sys.executable, os.path.join(ROOT, "genesy_tasks.py"), "--db", db,
                      "--port", str(port), "--workers", "2"],
                     os.path.join(workdir, "workers-%d.log" % size),
                     env=dict(os.environ, GENESY_API_KEY=KEY))
    runs = []
    try:
        for endpoint in LUA_ENDPOINTS:
            for connections in (8, 64):
                result = run_wrk(port, scripts[endpoint], connections, seconds)
                result.update(size=size, endpoint=endpoint, connections=connections, workers=2)
                runs.append(result)
                print("  %-7d %-24s c=%-3d %9.0f req/s  p50 %7.2f ms  p99 %7.2f ms"
                      "  errors %d  (--workers 2)"
                      % (size, endpoint, connections, result["rps"], result["p50_us"] / 1000,
                         result["p99_us"] / 1000, result["errors"]))
    finally:
        server.stop()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.remove(db + suffix)
    return runs


def compare(other_module, endpoints, rounds, seconds, size):
    """A/B: this checkout's server (B) against ``other_module`` (A) on copies of one
    database, both running, their wrk runs alternating so that drift on a shared
    machine falls on both alike. Prints the median of each and B / A."""
    unknown = [name for name in endpoints if name not in LUA_ENDPOINTS]
    if unknown:
        sys.exit("bench: unknown endpoints %s; known: %s" % (unknown, ", ".join(LUA_ENDPOINTS)))
    print("A/B at 8 connections, %d tasks, %d rounds of %d s: A = %s, B = this checkout"
          % (size, rounds, seconds, other_module))
    seeded = seed_database(size)
    workdir = tempfile.mkdtemp(prefix="genesy-ab-")
    servers = {}
    try:
        for label, module in (("A", os.path.abspath(other_module)),
                              ("B", os.path.join(ROOT, "genesy_tasks.py"))):
            db = os.path.join(workdir, "%s.db" % label)
            shutil.copyfile(seeded, db)
            port = free_port()
            servers[label] = Process(
                [sys.executable, module, "--db", db, "--port", str(port)],
                os.path.join(workdir, "%s.log" % label), env=dict(os.environ, GENESY_API_KEY=KEY))
        scripts = write_scripts(workdir, sample_ids(seeded), sample_ids(seeded, open_only=True))
        runs = {(label, name): [] for label in servers for name in endpoints}
        for round_ in range(rounds):
            for name in endpoints:
                for label in ("AB" if round_ % 2 == 0 else "BA"):
                    result = run_wrk(servers[label].port, scripts[name], 8, seconds)
                    runs[label, name].append(result)
                    print("  round %d  %s  %-18s %8.0f req/s" % (round_ + 1, label, name,
                                                              result["rps"]), flush=True)
        print("\n| endpoint | A req/s | B req/s | B / A | A p99 | B p99 | errors |")
        print("|---|---|---|---|---|---|---|")
        for name in endpoints:
            a = statistics.median(r["rps"] for r in runs["A", name])
            b = statistics.median(r["rps"] for r in runs["B", name])
            p99 = [statistics.median(r["p99_us"] for r in runs[label, name]) / 1000
                   for label in "AB"]
            errors = sum(r["errors"] for label in "AB" for r in runs[label, name])
            print("| %s | %.0f | %.0f | %.3f | %.2f ms | %.2f ms | %d |"
                  % (name, a, b, b / a, p99[0], p99[1], errors))
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def report(results, sizes, levels):
    runs = results["runs"]

    def rps(size, endpoint, connections):
        for run in runs:
            if (run["size"], run["endpoint"], run["connections"]) == (size, endpoint, connections):
                return run["rps"]
        return float("nan")

    big, small = sizes[-1], sizes[0]
    ceiling = results["ceiling"]["8"]["rps"]
    print("\n## Requests per second (ratio to GET /health at the same size and connections), "
          "and p99 latency\n")
    header = "| endpoint | tasks | " + " | ".join("c=%d" % c for c in levels) + \
        " | p50 / p99 at c=8 | errors |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for size in sizes:
        for endpoint in LUA_ENDPOINTS:
            cells = []
            for connections in levels:
                value = rps(size, endpoint, connections)
                health = rps(size, "GET /health", connections)
                p99 = next(r["p99_us"] for r in runs if (r["size"], r["endpoint"],
                                                         r["connections"])
                           == (size, endpoint, connections)) / 1000
                cells.append("%.0f (%.2f), p99 %.1f ms" % (value, value / health, p99))
            at8 = next(r for r in runs if (r["size"], r["endpoint"], r["connections"])
                       == (size, endpoint, 8))
            errors = sum(r["errors"] for r in runs
                         if (r["size"], r["endpoint"]) == (size, endpoint))
            print("| %s | %s | %s | %.2f / %.2f ms | %d |" % (
                endpoint, "{:,}".format(size), " | ".join(cells),
                at8["p50_us"] / 1000, at8["p99_us"] / 1000, errors))
    hold = results.get("lock_hold")
    if hold:
        print("| GET /health while another process holds the write lock | %s | %s | "
              "%.2f / %.2f ms | %d |" % ("{:,}".format(big), " | ".join(
                  "%.0f, p99 %.1f ms" % (hold["rps"], hold["p99_us"] / 1000) if c == 8 else "-"
                  for c in levels), hold["p50_us"] / 1000, hold["p99_us"] / 1000,
                  hold["errors"]))
    print("\nCeiling (bare Bottle route, wsgiref, single-threaded): " + ", ".join(
        "c=%s %.0f req/s" % (c, results["ceiling"][str(c)]["rps"]) for c in levels))

    workers = results.get("workers") or []
    if workers:
        def with_two(endpoint, connections):
            return next(r for r in workers
                        if (r["endpoint"], r["connections"]) == (endpoint, connections))

        print("\n## --workers 2 beside --workers 1, %s tasks (requests per second, ratio)\n"
              % "{:,}".format(big))
        print("| endpoint | c=8, 1 worker | c=8, 2 workers | c=64, 1 worker | "
              "c=64, 2 workers | errors with 2 |")
        print("|---|---|---|---|---|---|")
        for endpoint in LUA_ENDPOINTS:
            cells = []
            for connections in (8, 64):
                one, two = rps(big, endpoint, connections), with_two(endpoint, connections)
                cells += ["%.0f" % one, "%.0f (%.2f)" % (two["rps"], two["rps"] / one)]
            errors = sum(r["errors"] for r in workers if r["endpoint"] == endpoint)
            print("| %s | %s | %d |" % (endpoint, " | ".join(cells), errors))

    print("\n## Targets\n")
    targets = []

    def target(name, value, goal, ok):
        targets.append({"target": name, "measured": value, "goal": goal, "met": bool(ok)})
        print("- [%s] %s: %s (goal %s)" % ("x" if ok else " ", name, value, goal))

    health8 = rps(big, "GET /health", 8)
    target("GET /health vs bare Bottle on wsgiref, c=8", "%.2f x" % (health8 / ceiling),
           ">= 0.9 x", health8 >= 0.9 * ceiling)
    for endpoint, goal in (("GET /tasks/<id>", 0.85), ("POST /tasks", 0.75),
                           ("PATCH /tasks/<id>", 0.75)):
        value = rps(big, endpoint, 8)
        target("%s vs /health, c=8, %s tasks" % (endpoint, "{:,}".format(big)),
               "%.2f x (%.2f x the bare-Bottle ceiling)" % (value / health8, value / ceiling),
               ">= %.2f x" % goal, value >= goal * health8)
    limit = results["servers"][str(big)]["in_process_batch_1000_per_s"]
    value = rps(big, "POST /tasks/batch 1000", 8)
    target("POST /tasks/batch 1,000 ids vs in-process get_many_json",
           "%.2f x (%.1f vs %.1f per s)" % (value / limit, value, limit), ">= 0.8 x",
           value >= 0.8 * limit)
    value = rps(big, "PATCH /tasks/batch 100", 8)
    target("PATCH /tasks/batch 100 ids vs /health, c=8", "%.2f x" % (value / health8),
           ">= 0.5 x", value >= 0.5 * health8)
    for endpoint in SINGLE_TASK_ENDPOINTS:
        a, b = rps(big, endpoint, 8), rps(small, endpoint, 8)
        target("%s at %s vs %s tasks, c=8" % (endpoint, "{:,}".format(big),
                                              "{:,}".format(small)),
               "%.2f x" % (a / b), ">= 0.85 x", a >= 0.85 * b)
    if workers:
        one = rps(big, "POST /tasks/batch 1000", 8)
        two = with_two("POST /tasks/batch 1000", 8)["rps"]
        target("POST /tasks/batch 1000 at c=8, --workers 2 vs 1", "%.2f x" % (two / one),
               ">= 1.6 x", two >= 1.6 * one)
        ratios = {(r["endpoint"], r["connections"]): r["rps"] / rps(big, r["endpoint"],
                                                                      r["connections"])
                  for r in workers}
        slowest = min(ratios, key=ratios.get)
        target("slowest endpoint with --workers 2 vs 1 (%s, c=%d)" % slowest,
               "%.2f x" % ratios[slowest], ">= 1.0 x", ratios[slowest] >= 1.0)
        errors = sum(r["errors"] for r in workers)
        target("errors with --workers 2", str(errors), "0", errors == 0)
    if 64 in levels:
        for endpoint in LUA_ENDPOINTS:
            a, b = rps(big, endpoint, 64), rps(big, endpoint, 8)
            errors = sum(r["errors"] for r in runs if r["endpoint"] == endpoint
                         and r["connections"] == 64)
            target("%s at c=64 vs c=8 (with a stalled client connected)" % endpoint,
                   "%.2f x, %d errors" % (a / b, errors), ">= 0.9 x, 0 errors",
                   a >= 0.9 * b and errors == 0)
    for endpoint in ("POST /tasks", "PATCH /tasks/<id>"):
        run = next(r for r in runs if (r["size"], r["endpoint"], r["connections"])
                   == (big, endpoint, 8))
        target("%s p99 at c=8, %s tasks" % (endpoint, "{:,}".format(big)),
               "%.2f ms" % (run["p99_us"] / 1000), "<= 10 ms", run["p99_us"] <= 10_000)
    if hold:
        target("GET /health p99 at c=8 while another process holds the write lock",
               "%.2f ms (%.2f x its p99 without)" % (
                   hold["p99_us"] / 1000, hold["p99_us"] / next(
                       r["p99_us"] for r in runs if (r["size"], r["endpoint"], r["connections"])
                       == (big, "GET /health", 8))),
               "<= 10 ms", hold["p99_us"] <= 10_000)
    rss = max(s["peak_rss_mb"] for s in results["servers"].values())
    target("server peak RSS", "%.1f MB" % rss, "<= 50 MB", rss <= 50)
    startup = max(s["startup_s"] for s in results["servers"].values())
    target("start-up to first answered request", "%.3f s" % startup, "<= 0.5 s", startup <= 0.5)
    results["targets"] = targets


if __name__ == "__main__":
    main()
