"""A kiosk's maintenance endpoint (SEC-KI-4): maintenance staff only, and a password.

Two gates. The network one is the kiosk's `admin:` rules: only the maintenance principal's
certificate, from the store console, on the kiosk's `admin_port` (anyone else, store staff
included, is refused before this app sees a request). Then the password, as the annex asks:
stored only as an scrypt hash (memory-hard, stdlib `hashlib.scrypt`, no new dependency), checked
off the event loop, and attempts rate-limited per (principal, address): after `MAX_FAILURES`
wrong ones within `WINDOW` s every attempt, right or wrong, is refused for `LOCKOUT` s. Every
attempt is counted by outcome. A login gives a short-lived token for the other endpoints.

  POST /maintenance/login   {"password"}  -> 200 {"token", "expires_in"} | 401 bad-credentials | 429 rate-limited
  GET  /maintenance/status  (authorization: Bearer <token>) -> counters, never personal data
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import trio

from gateway.node.server import App, NodeContext, Peer
from gateway.protocol.driver import Stream
from gateway.protocol.http import method_path, refuse, send_json
from gateway.protocol.streams import header

log = logging.getLogger("konbini.kiosk-maintenance")

SCRYPT = {"n": 2**14, "r": 8, "p": 1}  # 16 MiB per check: memory-hard, ~50 ms here
MAX_FAILURES, WINDOW, LOCKOUT = 5, 60.0, 60.0
TOKEN_TTL = 600.0


@dataclass(frozen=True)
class MaintenanceCredentials:
    """The maintenance password's scrypt hash, one per state directory (the emulation's "handed to
    the maintenance company"): `maintenance/credentials.json` holds the hash, `maintenance/password`
    (0600) the password itself, for the maintenance staff of this emulation and the policy check."""

    salt: bytes
    digest: bytes
    n: int = SCRYPT["n"]
    r: int = SCRYPT["r"]
    p: int = SCRYPT["p"]

    @classmethod
    def ensure(cls, state_dir: Path) -> MaintenanceCredentials:
        """This state directory's credentials, made if missing. Read once per process, and again
        only if the file changed: a national node process has 4,000 kiosks, and reading the file
        for each was a tenth of its start."""
        known = _READ.get(state_dir)
        if known is not None:  # unless the file changed
            path, stamp, creds = known
            try:
                st = os.stat(path)
            except FileNotFoundError:
                pass
            else:
                if (st.st_ino, st.st_mtime_ns) == stamp:
                    return creds
        d = Path(state_dir) / "maintenance"
        path = d / "credentials.json"
        if not path.exists():
            d.mkdir(parents=True, exist_ok=True)
            with open(d / ".lock", "w") as lock:  # netns mode: one nodehost per namespace starts at once
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not path.exists():
                    cls._create(d, path)
        st = os.stat(path)
        data = json.loads(path.read_text())
        creds = cls(bytes.fromhex(data["salt"]), bytes.fromhex(data["digest"]), data["n"], data["r"], data["p"])
        _READ[state_dir] = (path, (st.st_ino, st.st_mtime_ns), creds)
        return creds

    @classmethod
    def _create(cls, d: Path, path: Path) -> None:
        password = secrets.token_urlsafe(18)
        creds = cls.of(password)
        fd = os.open(d / "password", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "kdf": "scrypt",
                    "salt": creds.salt.hex(),
                    "digest": creds.digest.hex(),
                    "n": creds.n,
                    "r": creds.r,
                    "p": creds.p,
                }
            )
        )
        tmp.replace(path)

    @classmethod
    def of(cls, password: str) -> MaintenanceCredentials:
        salt = secrets.token_bytes(16)
        return cls(salt, _scrypt(password, salt, **SCRYPT), **SCRYPT)

    def matches(self, password: str) -> bool:
        return hmac.compare_digest(_scrypt(password, self.salt, self.n, self.r, self.p), self.digest)


# state dir -> its credentials.json, (inode, mtime) when read, what it held
_READ: dict[Path, tuple[Path, tuple[int, int], MaintenanceCredentials]] = {}


def password_path(state_dir: Path) -> Path:
    return Path(state_dir) / "maintenance" / "password"


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r, dklen=32)


@dataclass
class LoginLimiter:
    """Failed logins per key over a sliding window; past the limit, a lockout. Pure (time passed in)."""

    max_failures: int = MAX_FAILURES
    window: float = WINDOW
    lockout: float = LOCKOUT
    failures: dict[str, list[float]] = field(default_factory=dict)
    locked_until: dict[str, float] = field(default_factory=dict)

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until `key` may try again; 0 when it may now."""
        return max(0.0, self.locked_until.get(key, 0.0) - now)

    def failed(self, key: str, now: float) -> None:
        recent = [t for t in self.failures.get(key, ()) if now - t < self.window] + [now]
        self.failures[key] = recent
        if len(recent) >= self.max_failures:
            self.locked_until[key] = now + self.lockout
            self.failures[key] = []

    def succeeded(self, key: str) -> None:
        self.failures.pop(key, None)


class KioskMaintenance(App):
    def __init__(self, ctx: NodeContext, state_dir: Path | None, limiter: LoginLimiter | None = None) -> None:
        self.ctx = ctx
        self.credentials = MaintenanceCredentials.ensure(state_dir or Path(".konbini"))
        self.limiter = limiter or LoginLimiter()
        self.attempts: Counter[str] = Counter()  # "ok", "bad-credentials", "rate-limited"
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (principal, expiry)

    async def handle(self, stream: Stream, peer: Peer) -> None:
        method, path = method_path(stream.headers)
        body = await stream.read_body(4096)
        if (method, path) == ("POST", "/maintenance/login"):
            await self._login(stream, peer, body)
        elif (method, path) == ("GET", "/maintenance/status"):
            if not self._authorized(stream, peer):
                await refuse(stream, 401, "login-required", "Log in to the maintenance endpoint first.")
                return
            await send_json(
                stream,
                200,
                {
                    "kiosk": self.ctx.node.id,
                    "logins": dict(self.attempts),
                    "limit": {
                        "max_failures": self.limiter.max_failures,
                        "window_s": self.limiter.window,
                        "lockout_s": self.limiter.lockout,
                    },
                },
            )
        else:
            await refuse(stream, 404, "bad-request", "unknown endpoint")

    async def _login(self, stream: Stream, peer: Peer, body: bytes) -> None:
        key = f"{peer.identity}@{peer.address}"
        now = trio.current_time()
        wait = self.limiter.retry_after(key, now)
        if wait > 0:  # refused before the hash is even computed: a locked-out guesser costs nothing
            self.attempts["rate-limited"] += 1
            log.warning("maintenance login rate-limited kiosk=%s principal=%s", self.ctx.node.id, peer.identity)
            await refuse(
                stream,
                429,
                "rate-limited",
                "Too many failed logins; try again later.",
                [(b"retry-after", str(int(wait) + 1).encode())],
            )
            return
        try:
            password = json.loads(body or b"{}").get("password", "")
        except (ValueError, AttributeError):
            password = ""
        ok = (
            isinstance(password, str)
            and bool(password)
            and await trio.to_thread.run_sync(self.credentials.matches, password)
        )
        if not ok:
            self.attempts["bad-credentials"] += 1
            self.limiter.failed(key, now)
            log.warning("maintenance login failed kiosk=%s principal=%s", self.ctx.node.id, peer.identity)
            await refuse(stream, 401, "bad-credentials", "Wrong maintenance credentials.")
            return
        self.attempts["ok"] += 1
        self.limiter.succeeded(key)
        token = secrets.token_urlsafe(24)
        self._tokens[token] = (peer.identity, now + TOKEN_TTL)
        log.info("maintenance login kiosk=%s principal=%s", self.ctx.node.id, peer.identity)
        await send_json(stream, 200, {"token": token, "expires_in": TOKEN_TTL})

    def _authorized(self, stream: Stream, peer: Peer) -> bool:
        auth = (header(stream.headers, b"authorization") or b"").decode("ascii", "replace")
        entry = self._tokens.get(auth.removeprefix("Bearer ").strip())
        return entry is not None and entry[0] == peer.identity and entry[1] > trio.current_time()
