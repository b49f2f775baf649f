"""The whole stack as `menders up` and `menders demo` run it.

NATS (the embedded server, or an existing one given by URL), provisioning,
every embedded subject of the config (any mix of kinds: each its own supervised
`python -m subjects.<kind> serve`, never given up on; a subject with
`embedded = false` is someone else's to run, and only the monitor watches it),
and one supervised process per actor, each with only its own credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import nats
import nats.errors
from nats.aio.msg import Msg

from actors.runtime import credentials
from actors.runtime.config import Config
from actors.runtime.logs import get_logger
from actors.runtime.partitions import INSTANCE_ENV
from actors.stack import provision
from actors.stack.natsserver import EmbeddedNats, free_port
from actors.stack.supervisor import ChildSpec, Supervisor, child_env, python_argv
from bus_schemas import catalog, codec
from bus_schemas import messages as m
from bus_schemas.errors import MendersError
from bus_schemas.natsconf import inbox_prefix, password_env, servers

log = get_logger("menders.stack")

CHAOS_FILE = "chaos.json"  # read by `menders demo` only; no actor is given it


class StackError(MendersError, RuntimeError):
    pass


class Stack:
    def __init__(self, config: Config, config_path: str | None, *, nats_url: str | None = None,
                 actors: tuple[str, ...] = catalog.ACTORS, embedded_subjects: bool = True,
                 child_logs: bool = False) -> None:
        self.config = config
        self.config_path = config_path
        self.home = config.home_dir
        self.nats_url = nats_url or config.nats.url or None
        self.actors = actors
        self.embedded_subjects = embedded_subjects
        self.child_logs = child_logs
        self.server: EmbeddedNats | None = None
        self.supervisor: Supervisor | None = None
        self.passwords: dict[str, str] = {}
        self.url = ""
        self.chaos: dict[str, str] = {}

    async def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if self.nats_url:
            self.url = self.nats_url
            self.passwords = _passwords_from_env()
        else:
            self.passwords = credentials.generate()
            self.server = EmbeddedNats(
                Path(self.config.nats.store_dir or self.home / "nats"),
                self.passwords,
                host=self.config.nats.host,
                port=self.config.nats.port,
                binary=self.config.nats.binary,
                sync_always=self.config.nats.sync_always,
            )
            await self.server.start()
            self.url = self.server.url
        credentials.write(self.home, self.passwords, self.url)
        await self._provision()
        # The embedded server is kept alive beside the children: restarted, never given up.
        self.supervisor = Supervisor(self._specs(), self.config.supervisor, broker=self.server)
        await self.supervisor.start()

    async def _provision(self) -> None:
        nc = await nats.connect(servers(self.url), user=catalog.ADMIN,
                                password=self.passwords[catalog.ADMIN], connect_timeout=3)
        try:
            await provision.provision(nc.jetstream(timeout=10))
        finally:
            await nc.close()

    def _specs(self) -> list[ChildSpec]:
        specs: list[ChildSpec] = []
        base = {"MENDERS_NATS_URL": self.url, "MENDERS_HOME": str(self.home),
                "MENDERS_SUPERVISED": "1"}
        if self.config_path:
            base["MENDERS_CONFIG"] = str(Path(self.config_path).resolve())
        logs = self.home / "logs"
        logs.mkdir(exist_ok=True)
        if self.embedded_subjects:
            specs += self._subject_specs(base, logs)
        # Consumers before producers: the auditor first, the monitor last.
        order = ("auditor", "governor", "executor", "verifier", "planner", "diagnoser",
                 "detector", "monitor")
        for actor in sorted(self.actors, key=order.index):
            env = child_env(**base, **{password_env(actor): self.passwords[actor]})
            # A stable name among the actor's members: a restarted child takes its own
            # partition leases back at once (actors.runtime.partitions).
            env.setdefault(INSTANCE_ENV, f"{socket.gethostname()}-{actor}")
            specs.append(ChildSpec(actor, python_argv("-m", "actors", "run", actor), env,
                                   str(logs / f"{actor}.log") if self.child_logs else None))
        return specs

    def _subject_specs(self, base: dict[str, str], logs: Path) -> list[ChildSpec]:
        specs = []
        chaos: dict[str, str] = {}
        for name, sc in self.config.subjects.items():
            if not sc.embedded:
                continue
            parsed = urlparse(sc.url)
            chaos_port = free_port()
            data_dir = self.home / "subjects" / name
            argv = python_argv("-m", f"subjects.{sc.kind}", "serve",
                               "--host", parsed.hostname or "127.0.0.1",
                               "--port", str(parsed.port or 80),
                               "--chaos-port", str(chaos_port),
                               "--data-dir", str(data_dir))
            if sc.options:  # the kind validated them at config load; its serve takes JSON
                argv += ["--options", json.dumps(sc.options)]
            chaos[name] = f"http://127.0.0.1:{chaos_port}"
            # Supervised apart from the crew: never given up on (a crash loop of the
            # subject is an incident for the crew, not a reason to stop it).
            specs.append(ChildSpec(f"subject:{name}", argv, child_env(**base),
                                   str(logs / f"subject-{name}.log"),
                                   keep_trying=True, role="subject"))
        self.chaos = chaos
        (self.home / CHAOS_FILE).write_text(json.dumps(chaos))
        return specs

    async def wait_ready(self, timeout: float = 30.0) -> float:
        """Seconds until every actor has sent a heartbeat."""
        started = time.monotonic()
        nc = await nats.connect(servers(self.url), user=catalog.OPERATOR,
                                password=self.passwords[catalog.OPERATOR],
                                inbox_prefix=inbox_prefix(catalog.OPERATOR))
        seen: set[str] = set()
        done = asyncio.Event()

        async def on_beat(msg: Msg) -> None:
            with contextlib.suppress(codec.DecodeError):
                beat = codec.decode(msg.data, (m.Heartbeat,))
                if isinstance(beat, m.Heartbeat) and beat.ts > time.time() - 5:
                    seen.add(beat.actor)
                    if seen >= set(self.actors):
                        done.set()

        sub = await nc.subscribe(catalog.under("heartbeat"), cb=on_beat)
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            missing = sorted(set(self.actors) - seen)
            raise StackError(f"not ready after {timeout:g}s: no heartbeat from {missing}") from None
        finally:
            await sub.unsubscribe()
            await nc.close()
        return time.monotonic() - started

    async def wait_observed(self, names: tuple[str, ...] | None = None,
                            timeout: float = 60.0) -> dict[str, float]:
        """Seconds until each subject (default: every configured one) was observed up.

        Needs the monitor among the actors; a subject that is never seen up raises
        StackError naming it and what its last observation said."""
        wanted = set(self.config.subjects if names is None else names)
        if "monitor" not in self.actors:
            raise StackError("no monitor among the actors: nothing observes the subjects")
        started = time.monotonic()
        nc = await nats.connect(servers(self.url), user=catalog.OPERATOR,
                                password=self.passwords[catalog.OPERATOR],
                                inbox_prefix=inbox_prefix(catalog.OPERATOR))
        seen: dict[str, float] = {}
        last: dict[str, str] = {}
        done = asyncio.Event()

        async def on_obs(msg: Msg) -> None:
            with contextlib.suppress(codec.DecodeError):
                obs = codec.decode(msg.data, (m.Observation,))
                if not isinstance(obs, m.Observation) or obs.subject not in wanted:
                    return
                last[obs.subject] = "up" if obs.up else f"down: {obs.error[:200]}"
                if obs.up:
                    seen.setdefault(obs.subject, time.monotonic() - started)
                    if seen.keys() >= wanted:
                        done.set()

        sub = await nc.subscribe(catalog.under("obs"), cb=on_obs)
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            missing = {n: last.get(n, "no observation") for n in sorted(wanted - seen.keys())}
            raise StackError(f"not observed up after {timeout:g}s: {missing}") from None
        finally:
            await sub.unsubscribe()
            await nc.close()
        return seen

    async def stop(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self.server is not None:
            self.server.stop()
            with contextlib.suppress(OSError):
                (self.home / credentials.FILE_NAME).unlink()


def _passwords_from_env() -> dict[str, str]:
    users = [*catalog.ACTORS, catalog.OPERATOR, catalog.ADMIN]
    missing = [password_env(u) for u in users if not os.environ.get(password_env(u))]
    if missing:
        raise StackError(
            "with --nats-url, every user's password must come from the environment; "
            f"missing: {', '.join(missing)}"
        )
    return {u: os.environ[password_env(u)] for u in users}
