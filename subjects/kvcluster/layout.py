"""Where the three members live: names, loopback ports, data dirs and flags.

One Layout is the whole contract between the launcher, the process manager,
the chaos hooks and the tests. The embedded subject derives its ports from one
base port (the config's url); tests pick free ports.
"""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

MEMBER_NAMES = ("m1", "m2", "m3")
# Small on purpose: the "fill" fault reaches NOSPACE in a few 1 MiB puts.
QUOTA_BYTES = 8 * 1024 * 1024
# A snapshot every 100 applied entries: a member whose data dir vanished fails
# its next snapshot within seconds under the load generator, as it would in hours
# under production defaults (100 000).
SNAPSHOT_COUNT = 100
CLUSTER_TOKEN = "menders-kvcluster"
LAYOUT_FILE = "cluster.json"
LOADGEN_PORT_OFFSET = 6  # the embedded load generator's /metrics: after the members' ports


@dataclass(frozen=True)
class Member:
    name: str
    client_port: int
    peer_port: int
    host: str = "127.0.0.1"

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"


@dataclass(frozen=True)
class Layout:
    home: Path  # data dirs, pid files and member logs live below it
    members: tuple[Member, ...]
    quota_bytes: int = QUOTA_BYTES
    token: str = CLUSTER_TOKEN

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(f"no member {name!r}; members: {', '.join(self.names)}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    @property
    def endpoints(self) -> dict[str, str]:
        return {m.name: m.client_url for m in self.members}

    def data_dir(self, name: str) -> Path:
        return self.home / "data" / name

    def log_file(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.home / "run" / f"{name}.pid"

    def initial_cluster(self, names: tuple[str, ...] | None = None) -> str:
        chosen = self.names if names is None else names
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members if m.name in chosen)

    def etcd_argv(self, name: str, state: str, initial: str | None = None) -> list[str]:
        """The etcd command line of one member; `initial` overrides --initial-cluster."""
        m = self.member(name)
        return [
            "etcd", "--name", m.name, "--data-dir", str(self.data_dir(name)),
            "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial or self.initial_cluster(),
            "--initial-cluster-state", state, "--initial-cluster-token", self.token,
            "--quota-backend-bytes", str(self.quota_bytes),
            "--snapshot-count", str(SNAPSHOT_COUNT),
            "--logger", "zap", "--log-outputs", "stderr",
        ]

    def save(self) -> Path:
        path = self.home / LAYOUT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"quota_bytes": self.quota_bytes, "token": self.token,
                                    "members": [asdict(m) for m in self.members]}))
        return path

    @classmethod
    def load(cls, home: Path) -> Layout:
        raw = json.loads((home / LAYOUT_FILE).read_text())
        return cls(home, tuple(Member(**m) for m in raw["members"]),
                   int(raw["quota_bytes"]), str(raw["token"]))


def from_base_port(home: Path, base: int, host: str = "127.0.0.1") -> Layout:
    """Member k listens on base+2k (client) and base+2k+1 (peer): 2379/2380, 2381/2382, ..."""
    return Layout(home, tuple(Member(n, base + 2 * k, base + 2 * k + 1, host)
                              for k, n in enumerate(MEMBER_NAMES)))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def with_free_ports(home: Path) -> Layout:
    return Layout(home, tuple(Member(n, free_port(), free_port()) for n in MEMBER_NAMES))
