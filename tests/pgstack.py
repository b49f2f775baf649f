"""Real PostgreSQL + postgres_exporter + Prometheus + Alertmanager for tests, in one temp dir.

A support module, not a test (pytest collects only test_*.py). Everything listens on free
127.0.0.1 ports and is stopped by the PIDs started here, never by name. Configs are written
as JSON, which YAML parsers read, so no YAML library is needed. `python -m tests.pgstack`
smoke-runs the stack and the IdleInTransaction fault.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from actors.stack.natsserver import free_port
from tests.harness import require_binary

MAX_CONNECTIONS = 20
RESERVED = 3  # superuser_reserved_connections: room for the fix when clients fill the rest
PG_OS_USER = "postgres"  # PostgreSQL refuses to run as root; Debian's package creates this user
REFUSED = ("too many clients", "remaining connection slots are reserved")


class PgStackError(RuntimeError):
    pass


def find_pg_bin(name: str) -> str | None:
    """`name` from PATH, else from /usr/lib/postgresql/<version>/bin, newest version first
    (Debian keeps initdb and postgres off PATH)."""
    def version(d: str) -> list[int]:
        return [int(p) for p in Path(d).parent.name.split(".") if p.isdigit()]

    for d in ["", *sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)]:
        if found := shutil.which(name, path=d or None):
            return found
    return None


def tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return bytes(resp.read())


def _reap(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Wait for `proc` (already signalled) to exit, SIGKILLing it after `timeout`; close
    its pipes."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe:
            pipe.close()


def _as_pg_user() -> dict[str, Any]:
    """Popen arguments that drop root to PG_OS_USER (none when not root)."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam(PG_OS_USER)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


class PgStack:
    """start() then stop(), or `with PgStack(...) as s:` (which also waits ready). stop()
    deletes the temp dir: start failures carry their log tails instead.

    scrape_interval_s: the exporter needs just over 1s to answer while postgres is down
    (it sleeps 1s before retrying), so at 1s Prometheus times out and pg_up goes absent
    with up{job="postgres"} 0; pass 2 for a pg_up 0 instead."""

    def __init__(self, rules: str = "", webhook_url: str | None = None,
                 scrape_interval_s: float = 1.0) -> None:
        # Every binary first: a missing one skips (or, under CI, fails) before anything starts.
        self.bins = {
            "initdb": require_binary("initdb", "postgresql", find=find_pg_bin),
            "postgres": require_binary("postgres", "postgresql", find=find_pg_bin),
            "psql": require_binary("psql", "postgresql-client", find=find_pg_bin),
            "exporter": require_binary("prometheus-postgres-exporter",
                                       "prometheus-postgres-exporter"),
            "prometheus": require_binary("prometheus", "prometheus"),
        } | ({"alertmanager": require_binary("prometheus-alertmanager",
                                             "prometheus-alertmanager")} if webhook_url else {})
        self.rules, self.webhook_url, self.scrape_s = rules, webhook_url, scrape_interval_s
        self.tmp = Path(tempfile.mkdtemp(prefix="pgstack-"))
        self.tmp.chmod(0o755)  # mkdtemp's 0700 would keep the postgres user out
        self.data_dir, self.sock_dir = self.tmp / "pgdata", self.tmp / "sock"
        self.pg_log = self.tmp / "postgres.log"
        self.pg_port = free_port()
        self.dsn = self.dsn_for("postgres")
        self.addr = {n: f"127.0.0.1:{free_port()}" for n in self.bins if n in (
            "exporter", "prometheus", "alertmanager")}
        self.exporter_url = f"http://{self.addr['exporter']}"
        self.prometheus_url = f"http://{self.addr['prometheus']}"
        self.alertmanager_url = f"http://{self.addr['alertmanager']}" if webhook_url else None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def dsn_for(self, user: str, **params: str) -> str:
        query = urllib.parse.urlencode({"sslmode": "disable", **params})
        return f"postgresql://{user}@127.0.0.1:{self.pg_port}/postgres?{query}"

    def __enter__(self) -> PgStack:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def log(self, name: str) -> Path:
        return self.pg_log if name == "postgres" else self.tmp / f"{name}.log"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
               as_pg: bool = False) -> None:
        with open(self.log(name), "ab") as out:  # append: a restarted postgres keeps one log
            self.procs[name] = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.tmp, env={**os.environ, **(env or {})},
                start_new_session=True,  # a terminal's ^C reaches only us; stop() ends them
                **(_as_pg_user() if as_pg else {}))

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise PgStackError(f"{name} (pid {proc.pid}) exited with {proc.returncode}:\n"
                                   f"{tail(self.log(name))}")

    def _end(self, name: str, sig: int) -> None:
        proc = self.procs.pop(name, None)
        if proc and proc.poll() is None:
            proc.send_signal(sig)
            _reap(proc)

    def pids(self) -> list[int]:
        """PIDs started here, plus the postmaster's children (its backends) from /proc."""
        found = [p.pid for p in self.procs.values()]
        if pg := self.procs.get("postgres"):
            for f in glob.glob(f"/proc/{pg.pid}/task/*/children"):
                found += [int(p) for p in Path(f).read_text().split()]
        return found

    def _initdb(self) -> None:
        pw = pwd.getpwnam(PG_OS_USER) if os.geteuid() == 0 else None
        for d in (self.data_dir, self.sock_dir):
            d.mkdir(mode=0o700)
            if pw:
                os.chown(d, pw.pw_uid, pw.pw_gid)
        with open(self.tmp / "initdb.log", "wb") as out:
            rc = subprocess.call([self.bins["initdb"], "-D", str(self.data_dir), "-U", "postgres",
                                  "--auth=trust", "--no-locale", "-E", "UTF8", "--no-sync"],
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=self.tmp, **_as_pg_user())
        if rc:
            raise PgStackError(f"initdb failed ({rc}):\n{tail(self.tmp / 'initdb.log')}")
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write(f"""
listen_addresses = '127.0.0.1'
port = {self.pg_port}
unix_socket_directories = '{self.sock_dir}'
max_connections = {MAX_CONNECTIONS}
superuser_reserved_connections = {RESERVED}
fsync = off  # a throwaway cluster: speed over durability
log_line_prefix = '%m [%p] %u@%d '
""")

    def start_postgres(self, timeout_s: float = 30.0) -> None:
        """Start the postmaster (output to pg_log) and wait until it accepts connections;
        raise with the log tail if it exits instead (as after break_config())."""
        self._spawn("postgres", [self.bins["postgres"], "-D", str(self.data_dir)], as_pg=True)
        deadline = time.monotonic() + timeout_s
        while self.try_connect("postgres") is not None:
            self._check_alive()
            if time.monotonic() > deadline:
                raise PgStackError(f"postgres not accepting connections:\n{tail(self.pg_log)}")
            time.sleep(0.1)

    def stop_postgres(self) -> None:
        # SIGINT is the fast shutdown; SIGTERM ("smart") would wait for idle sessions forever.
        self._end("postgres", signal.SIGINT)

    BROKEN_LINE = "this is not a setting\n"

    def break_config(self) -> None:
        """An unfixable fault: the next postgres start fails on this line."""
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write(self.BROKEN_LINE)

    def repair_config(self) -> None:
        conf = self.data_dir / "postgresql.conf"
        conf.write_text(conf.read_text().replace(self.BROKEN_LINE, ""))

    def psql_argv(self, sql: str, user: str = "postgres") -> list[str]:
        return [self.bins["psql"], "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-d", self.dsn_for(user), "-c", sql]

    def psql(self, sql: str, user: str = "postgres") -> str:
        r = subprocess.run(self.psql_argv(sql, user), capture_output=True, text=True, timeout=30,
                           env={**os.environ, "PGCONNECT_TIMEOUT": "5"})
        if r.returncode:
            raise PgStackError(f"psql {sql!r} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout.strip()

    def try_connect(self, user: str = "app") -> str | None:
        """None if `user` can connect now, else psql's error (e.g. 'too many clients')."""
        try:
            self.psql("SELECT 1", user)
            return None
        except PgStackError as e:
            return str(e)

    def start(self) -> None:
        self._initdb()
        self.start_postgres()
        self.psql("CREATE ROLE app LOGIN")  # a non-superuser: refused once slots run out
        self._spawn("exporter", [self.bins["exporter"],
                                 f"--web.listen-address={self.addr['exporter']}"],
                    env={"DATA_SOURCE_NAME": self.dsn})
        every = f"{round(self.scrape_s * 1000)}ms"  # Prometheus rejects "1.0s"
        prom: dict[str, Any] = {
            "global": {"scrape_interval": every, "scrape_timeout": every,  # default 10s > 1s
                       "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "postgres",
                                "static_configs": [{"targets": [self.addr["exporter"]]}]}]}
        if self.rules:
            (self.tmp / "rules.yml").write_text(self.rules)
            prom["rule_files"] = [str(self.tmp / "rules.yml")]
        if self.webhook_url:
            am = {"route": {"receiver": "hook", "group_by": ["alertname"], "group_wait": "1s",
                            "group_interval": "1s", "repeat_interval": "5s"},
                  "receivers": [{"name": "hook", "webhook_configs": [{"url": self.webhook_url}]}]}
            (self.tmp / "alertmanager.yml").write_text(json.dumps(am))
            self._spawn("alertmanager", [
                self.bins["alertmanager"], f"--config.file={self.tmp / 'alertmanager.yml'}",
                f"--storage.path={self.tmp / 'am-data'}",
                f"--web.listen-address={self.addr['alertmanager']}",
                "--cluster.listen-address="])  # empty: no gossip port, no peers
            prom["alerting"] = {"alertmanagers": [
                {"static_configs": [{"targets": [self.addr["alertmanager"]]}]}]}
        (self.tmp / "prometheus.yml").write_text(json.dumps(prom))
        self._spawn("prometheus", [
            self.bins["prometheus"], f"--config.file={self.tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.tmp / 'prom-data'}",
            f"--web.listen-address={self.addr['prometheus']}"])

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """An instant PromQL query through Prometheus's HTTP API: (labels, value) pairs."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        data = json.loads(_get(url))["data"]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def value(self, promql: str) -> float | None:
        """The first sample's value, None when the query returns nothing."""
        result = self.query(promql)
        return result[0][1] if result else None

    def _ready(self) -> bool:
        try:
            return (self.try_connect("postgres") is None
                    and b"\npg_up 1" in _get(f"{self.exporter_url}/metrics", 5)
                    and bool(_get(f"{self.prometheus_url}/-/ready"))
                    and (not self.alertmanager_url
                         or bool(_get(f"{self.alertmanager_url}/-/ready")))
                    and self.value("pg_up") == 1.0)
        except OSError:  # refused, timed out, or an HTTP error (503 while starting)
            return False

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            self._check_alive()
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}:\n{tail(self.log(n), 10)}" for n in self.procs)
                raise PgStackError(f"stack not ready within {timeout_s}s\n{logs}")
            time.sleep(0.2)

    def stop(self) -> None:
        for name in [n for n in self.procs if n != "postgres"]:
            self._end(name, signal.SIGTERM)
        self.stop_postgres()
        shutil.rmtree(self.tmp, ignore_errors=True)


class IdleInTransaction:
    """The fault: psql clients as `app` that BEGIN, SELECT 1, then hold the session (stdin
    kept open, nothing more written). psql notices a terminated backend only at its next
    command, so alive() asks the server, by application_name."""

    APP = "pgstack-idle"

    def __init__(self, stack: PgStack) -> None:
        self.stack = stack
        self.procs: list[subprocess.Popen[bytes]] = []
        self.refusal: str | None = None  # the server's answer to the one client too many

    def start(self, count: int | None = None, timeout_s: float = 10.0) -> int:
        """Open `count` sessions, or (None) until the server refuses `app`; return how many
        are open. Raise, having closed them, if a client fails for any other reason."""
        while count is None or len(self.procs) < count:
            p = subprocess.Popen(
                [self.stack.bins["psql"], "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
                 "-d", self.stack.dsn_for("app", application_name=self.APP)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True)
            assert p.stdin and p.stdout and p.stderr
            try:
                p.stdin.write(b"BEGIN; SELECT 1;\n")
                p.stdin.flush()
            except BrokenPipeError:
                pass  # it exited already: its stderr says why
            if select.select([p.stdout], [], [], timeout_s)[0] and p.stdout.readline() == b"1\n":
                self.procs.append(p)
                continue
            p.kill()
            err = p.stderr.read().decode(errors="replace").strip()  # EOF once it is dead
            _reap(p, 5)
            if count is None and any(r in err for r in REFUSED):
                self.refusal = err
                break
            n = len(self.procs)
            self.stop()  # a half-made fault would outlive the error
            raise PgStackError(f"idle client {n + 1} failed: {err or 'timeout'}")
        return len(self.procs)

    def alive(self) -> int:
        """How many of these sessions the server still has."""
        return int(self.stack.psql("SELECT count(*) FROM pg_stat_activity "
                                   f"WHERE application_name = '{self.APP}'"))

    def stop(self) -> None:
        for p in self.procs:  # EOF on stdin: psql ends its session (rolled back) and exits
            assert p.stdin
            p.stdin.close()
        for p in self.procs:
            _reap(p, 5)
        self.procs.clear()


RULES = """groups:
- name: pgstack
  rules:
  - alert: PgIdleInTransaction
    expr: sum(pg_stat_activity_count{state="idle in transaction"}) > 5
    for: 1s
"""
IDLE = 'sum(pg_stat_activity_count{state="idle in transaction"})'
QUERIES = ("pg_up", "sum(pg_stat_activity_count)", IDLE, "pg_settings_max_connections",
           'max(pg_stat_activity_max_tx_duration{state="idle in transaction"})')
TERMINATE = ("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE state = "
             "'idle in transaction' AND now() - state_change > make_interval(secs => 2)")


def main() -> None:
    """The smoke: stack up, fault in, alert out, fix, alert resolved, no child left."""
    got: list[tuple[float, dict[str, Any]]] = []  # (arrival, payload) at the webhook

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((time.monotonic(), json.loads(body)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:  # keep the smoke's output readable
            pass

    def until(ok: Callable[[], Any], since: float) -> Any:
        while not (result := ok()):
            assert time.monotonic() - since < 60, "timed out"
            time.sleep(0.1)
        return result

    def arrival(status: str) -> float | None:
        return next((at for at, p in got if p["status"] == status), None)

    def show(when: str) -> None:
        print(f"-- {when}: " + "; ".join(f"{q} = {stack.value(q)}" for q in QUERIES))

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    t0 = time.monotonic()
    stack = PgStack(rules=RULES, webhook_url=f"http://127.0.0.1:{hook.server_port}/hook")
    chaos, pids = IdleInTransaction(stack), list[int]()
    try:
        with stack:
            print(f"ready in {time.monotonic() - t0:.1f}s: {stack.dsn} {stack.exporter_url} "
                  f"{stack.prometheus_url} {stack.alertmanager_url}")
            t = time.monotonic()
            _get(f"{stack.exporter_url}/metrics", 10)
            print(f"one exporter scrape: {1000 * (time.monotonic() - t):.0f}ms")
            show("before")
            t_fault = time.monotonic()
            n = chaos.start()
            print(f"opened {n} idle sessions in {time.monotonic() - t_fault:.1f}s; refused: "
                  f"{chaos.refusal!r}; app now: {stack.try_connect('app')!r}; superuser now: "
                  f"{stack.try_connect('postgres')!r}")
            until(lambda: stack.value(IDLE) == n, t_fault)
            print(f"Prometheus shows them {time.monotonic() - t_fault:.1f}s after the fault")
            time.sleep(max(0.0, 5 - (time.monotonic() - t_fault)))
            show("after the fault (+5s)")
            fired = until(lambda: arrival("firing"), t_fault)
            payload = next(p for _, p in got if p["status"] == "firing")
            print(f"webhook got the alert {fired - t_fault:.1f}s after the fault:\n"
                  f"{json.dumps(payload)}")
            pids = stack.pids() + [p.pid for p in chaos.procs]
            t_fix = time.monotonic()
            print(f"terminated: {stack.psql(TERMINATE)}; sessions left: {chaos.alive()}")
            until(lambda: stack.value(IDLE) == 0, t_fix)
            print(f"Prometheus shows 0 {time.monotonic() - t_fix:.1f}s after the fix")
            time.sleep(max(0.0, 3 - (time.monotonic() - t_fix)))
            show("after the fix (+3s)")
            resolved = until(lambda: arrival("resolved"), t_fix)
            print(f"resolved reached the webhook {resolved - t_fix:.1f}s after the fix; "
                  f"app connects again: {stack.try_connect('app') is None}")
    finally:
        chaos.stop()
        hook.shutdown()
        hook.server_close()
    left = [p for p in pids if os.path.exists(f"/proc/{p}")]
    print(f"checked {len(pids)} pids, left alive: {left}; tmp removed: {not stack.tmp.exists()}")
    assert not left and not stack.tmp.exists()


if __name__ == "__main__":
    main()
