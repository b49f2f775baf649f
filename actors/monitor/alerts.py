"""Alertmanager as an incident source: the monitor's webhook receiver and its alert book.

Why in the monitor, not a role of its own: an alert is one more observation of a
subject, by a watcher that is not ours. The monitor already owns the subject's
observations (and the bus permission to publish them), so an alert is folded into
them as the metric `alert:<alertname>` (how many of its fingerprints fire) and the
detector judges it like any other: an invariant that claims the alert
(`InvariantSpec.alerts`) is broken while it fires, so the alert and the metric it
fires on are one incident; an alert nobody claims is its own invariant,
`alert:<alertname>`, opened and resolved by the alert (subjects.invariants.judged).

Identity is the alert's fingerprint: a repeated notification of a firing alert
changes nothing, and a resolved one reads 0 for `keep_resolved_s` (so the detector
sees it clear) before it is dropped. The book is written to
`<home>/monitor/alerts.json` on every change, so a restarted monitor neither forgets
a firing alert nor loses its resolution. Alerts whose labels match no route (nor a
`menders_subject` label naming a configured subject) are counted and dropped with a
log line; a body that is not a v4 payload is refused with HTTP 400 and counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import time
from collections.abc import Callable, Collection
from pathlib import Path

import msgspec
from aiohttp import web

from actors.runtime.config import AlertmanagerConfig
from actors.runtime.logs import get_logger
from subjects.invariants import ALERT_NAME, ALERT_PREFIX

log = get_logger("menders.monitor.alerts")

SUBJECT_LABEL = "menders_subject"
ALERTNAME = re.compile(ALERT_NAME)
MAX_NOTE_CHARS = 500


class WebhookAlert(msgspec.Struct, kw_only=True):
    """One alert of Alertmanager's webhook payload (version 4); unknown keys ignored."""

    status: str
    labels: dict[str, str]
    annotations: dict[str, str] = {}
    fingerprint: str = ""


class WebhookPayload(msgspec.Struct, kw_only=True):
    version: str = "4"
    alerts: list[WebhookAlert]


class Alert(msgspec.Struct, kw_only=True):
    subject: str
    alertname: str
    firing: bool
    since: float  # when it last started firing or resolved (our clock)
    labels: dict[str, str] = {}
    note: str = ""  # its summary/description annotation, for the diagnoser to read


class Applied(msgspec.Struct, kw_only=True):
    """What one notification did, by outcome: firing (new), resolved, repeated (no change),
    unrouted, invalid (a bad alert name or status)."""

    counts: dict[str, int] = {}
    subjects: list[str] = []  # whose alerts changed

    def add(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1


class AlertBook:
    def __init__(self, cfg: AlertmanagerConfig, subjects: Collection[str],
                 path: Path | None) -> None:
        self.cfg = cfg
        self.subjects = set(subjects)
        self.path = path
        self.alerts: dict[str, Alert] = {}  # fingerprint -> alert
        self.notes: dict[str, list[str]] = {}  # subject -> lines for its next observation
        self.routes = [(r.subject, r.match, {k: re.compile(v) for k, v in r.match_re.items()})
                       for r in cfg.routes]
        self._load()

    def route(self, labels: dict[str, str]) -> str | None:
        for subject, match, match_re in self.routes:
            if all(labels.get(k) == v for k, v in match.items()) and all(
                    p.fullmatch(labels.get(k, "")) for k, p in match_re.items()):
                return subject if subject in self.subjects else None
        named = labels.get(SUBJECT_LABEL)
        return named if named in self.subjects else None

    def apply(self, body: bytes, now: float) -> Applied:
        """One webhook notification; msgspec.DecodeError/ValidationError for a bad body."""
        payload = msgspec.json.decode(body, type=WebhookPayload)
        applied = Applied()
        for alert in payload.alerts:
            self._apply_one(alert, now, applied)
        if applied.subjects:
            self._save()
        return applied

    def _apply_one(self, alert: WebhookAlert, now: float, applied: Applied) -> None:
        name = alert.labels.get("alertname", "")
        if not ALERTNAME.fullmatch(name) or alert.status not in ("firing", "resolved"):
            applied.add("invalid")
            log.warning("alert dropped: bad alertname or status",
                        extra={"alertname": name[:100], "status": alert.status[:20]})
            return
        subject = self.route(alert.labels)
        if subject is None:
            applied.add("unrouted")
            log.warning("alert dropped: no route matches its labels",
                        extra={"alertname": name, "labels": dict(list(alert.labels.items())
                                                                 [:20])})
            return
        key = alert.fingerprint or _fingerprint(alert.labels)
        firing = alert.status == "firing"
        known = self.alerts.get(key)
        if known is not None and known.firing == firing and known.subject == subject:
            applied.add("repeated")
            return
        if known is None and not firing:
            applied.add("repeated")  # resolved before we ever saw it fire: nothing to undo
            return
        note = alert.annotations.get("summary") or alert.annotations.get("description", "")
        self.alerts[key] = Alert(subject=subject, alertname=name, firing=firing, since=now,
                                 labels=alert.labels, note=note[:MAX_NOTE_CHARS])
        applied.add(alert.status)
        applied.subjects.append(subject)
        line = msgspec.json.encode({"source": "alertmanager", "alert": name,
                                    "status": alert.status, "fingerprint": key,
                                    "note": note[:MAX_NOTE_CHARS]}).decode()
        self.notes.setdefault(subject, []).append(line)
        log.info("alert", extra={"subject": subject, "alertname": name,
                                 "status": alert.status, "fingerprint": key})

    def metrics(self, subject: str, now: float) -> dict[str, float]:
        """`alert:<alertname>` -> how many of its fingerprints fire, for every alert of the
        subject firing or resolved within keep_resolved_s (older resolved ones dropped)."""
        out: dict[str, float] = {}
        stale = []
        for key, alert in self.alerts.items():
            if alert.subject != subject:
                continue
            if not alert.firing and now - alert.since > self.cfg.keep_resolved_s:
                stale.append(key)
                continue
            metric = ALERT_PREFIX + alert.alertname
            out[metric] = out.get(metric, 0.0) + (1.0 if alert.firing else 0.0)
        for key in stale:
            del self.alerts[key]
        if stale:
            self._save()
        return out

    def take_notes(self, subject: str) -> list[str]:
        return self.notes.pop(subject, [])

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(self.alerts))
        os.replace(tmp, self.path)  # atomic: a crash leaves the old book or the new one

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            alerts = msgspec.json.decode(self.path.read_bytes(), type=dict[str, Alert])
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("alert book unreadable, starting empty",
                      extra={"path": str(self.path), "err": str(exc)[:300]})
            return
        self.alerts = {k: a for k, a in alerts.items() if a.subject in self.subjects}


def _fingerprint(labels: dict[str, str]) -> str:
    """Alertmanager always sends one; this is for a sender that does not."""
    return hashlib.sha256(msgspec.json.encode(sorted(labels.items()))).hexdigest()[:16]


def receiver(book: AlertBook, count: Callable[[str, int], None]) -> web.Application:
    """The webhook endpoint: POST <path> with the v4 JSON payload."""
    cfg = book.cfg
    token = os.environ.get(cfg.token_env, "") if cfg.token_env else ""
    if cfg.token_env and not token:
        raise RuntimeError(f"alertmanager.token_env: {cfg.token_env} is not set")

    async def notify(request: web.Request) -> web.Response:
        if token and not hmac.compare_digest(request.headers.get("Authorization", ""),
                                             f"Bearer {token}"):
            count("unauthorized", 1)
            return web.json_response({"error": "unauthorized"}, status=401)
        body = await request.content.read(cfg.max_body + 1)
        if len(body) > cfg.max_body:
            count("too_large", 1)
            return web.json_response({"error": f"body over {cfg.max_body} bytes"},
                                     status=413)
        try:
            applied = book.apply(body, time.time())
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            count("bad_payload", 1)
            log.warning("alertmanager payload refused", extra={"err": str(exc)[:300]})
            return web.json_response({"error": f"not an Alertmanager v4 payload: {exc}"},
                                     status=400)
        for outcome, n in applied.counts.items():
            count(outcome, n)
        # 200 even when some alerts were dropped: a retry would drop them again.
        return web.json_response({"ok": True, **applied.counts})

    app = web.Application()
    app.router.add_post(cfg.path, notify)
    return app


async def serve(app: web.Application, listen: str) -> web.AppRunner:
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host.strip("[]"), int(port)).start()
    except OSError:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        raise
    return runner

