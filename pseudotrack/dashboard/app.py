"""`pseudotrack dashboard`'s server: a read-only web page over a workspace's catalog, shards and training runs.

Why a page of our own beside Prefect's UI: Prefect shows flow runs, but the
questions a person asks while 100,000 videos are labelled are about the data:
how far each round is, how fast, which teachers labelled what, why videos fail,
what the caption filter drops, how big shards are, whether the student's loss
goes down, and whether the pseudo-tracks look right. All of that is in the
workspace already; the dashboard only reads it. This module serves; views.py
computes the figures, charts.py draws them, templates/ lays them out.

Why the standard library's `http.server`: no web framework to install or keep
patched, and the page is a few server-rendered views. It binds 127.0.0.1 by
default, answers GET and HEAD only (every other method gets 405), and no
endpoint writes anything. Everything that comes from data (captions, keys,
reasons, round ids) is HTML-escaped by the templates' autoescaping, and a
Content-Security-Policy allows only our own script, so a caption with markup is
shown as text. URIs are shown without user:password@ or query strings, and no
environment value is shown.

Each request re-reads the catalog: `Catalog` caches the Parquet files it has
read (they never change), so a refresh costs one listing plus the new files,
and the views are pyarrow compute over the cached table (bench/bench_catalog.py
measures them at 100,000 videos).
"""

from __future__ import annotations

import errno
import html
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from functools import cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import Any
from urllib.parse import urlsplit

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from ..errors import ConfigError
from ..storage.catalog import Catalog
from ..storage.layout import RUNS, is_sample_key
from ..storage.uri import open_store
from . import charts
from .previews import render_preview
from .views import METRICS_FILE, VIDEOS_PER_HOUR, FileCache, collect, metric_value

log = logging.getLogger(__name__)

PREVIEW_CACHE = 64
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|API_KEY|PRIVATE", re.IGNORECASE)
CSP = (
    "default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self'; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


# --------------------------------------------------------------------------- hiding credentials


def display_uri(uri: str) -> str:
    """The URI without user:password@ and without ?query or #fragment (presigned tokens live there)."""
    text = os.fspath(uri)
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)$", text, re.DOTALL)
    if not match:
        return re.split(r"[?#]", text, maxsplit=1)[0]
    scheme, authority, rest = match.groups()
    return f"{scheme}://{authority.rpartition('@')[2]}{re.split(r'[?#]', rest, maxsplit=1)[0]}"


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names say they hold a secret (long enough to be one)."""
    environ = os.environ if environ is None else environ
    return sorted({v for k, v in environ.items() if SECRET_ENV.search(k) and len(v) >= 6}, key=len, reverse=True)


def redact(text: str, raw_uri: str | None = None) -> str:
    """Scrub a message (an exception's text, say) of credentials before a browser sees it."""
    if raw_uri:
        text = text.replace(raw_uri, display_uri(raw_uri))
        userinfo = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)@", raw_uri)
        if userinfo:  # libraries quote pieces of the URI (boto: the "bucket" name) in their messages
            for piece in sorted({userinfo.group(1), *userinfo.group(1).split(":")}, key=len, reverse=True):
                if piece:
                    text = text.replace(piece + "@", "").replace(piece, "***")
    text = re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]*@", r"\1", text)
    text = re.sub(r"(://[^\s'\"]*?)\?[^\s'\"]*", r"\1", text)
    for value in secret_values():
        text = text.replace(value, "***")
    return text


# --------------------------------------------------------------------------- the page


def escape_html(value: Any) -> Markup:
    """Escape as html.escape does (&quot;, &#x27;) before autoescaping's own (&#34;) would, and show None as nothing.

    The same text in a browser either way; these are the entities the security tests look for.
    """
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


@cache
def templates() -> Environment:
    """The page's templates, autoescaped: every value from data is shown as text, never as markup."""
    env = Environment(
        loader=PackageLoader("pseudotrack.dashboard", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html",), default=True),
        undefined=StrictUndefined,  # a misspelt field fails the tests instead of rendering empty
        finalize=escape_html,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(
        fmt_count=charts.fmt_count,
        fmt_bytes=charts.fmt_bytes,
        stacked_bar=charts.stacked_bar,
        metric_value=metric_value,
        grid_color=charts.GRID,
        colors=charts.STATUS_COLORS,
    )
    return env


@cache
def script() -> bytes:
    return files("pseudotrack.dashboard").joinpath("static/dashboard.js").read_bytes()


def ago(iso: str | None, now: datetime) -> str:
    if not iso:
        return "–"
    seconds = (now - datetime.fromisoformat(iso)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


def page_charts(data: dict) -> dict:
    """Every chart on the page, as inline SVG (None where there is nothing to draw yet)."""
    rate = data["throughput"]
    return {
        "rate": charts.rate_chart(rate["start"], rate["bucket_seconds"], rate["series"], "labelling throughput")
        if rate["start"] is not None
        else None,
        "teachers": charts.hbar_chart(data["teachers"], "teachers", charts.BLUE, width=540),
        "filter_rules": charts.hbar_chart(data["filter_rules"], "filtered videos", charts.AMBER, width=540),
        "reasons": charts.hbar_chart(data["reasons"], "failures", charts.RED, width=1120, label_chars=80),
        "shards": charts.histogram_chart(data["shards"]["edges"], data["shards"]["histogram"], "shard sizes"),
        "runs": [charts.line_chart(r["steps"], r["loss"], f"loss of {r['run']}") for r in data["training"]],
        "quality": quality_charts(data.get("quality") or {}),
    }


def quality_charts(quality: dict) -> dict[str, dict[str, object]]:
    """round -> teacher -> histogram of the per-sample mean label quality score (0 to 1)."""
    edges = quality.get("edges") or []
    return {
        r["round_id"]: {
            teacher: charts.histogram_chart(
                edges,
                t["histogram"],
                f"label quality of {teacher} in {r['round_id']}",
                fmt=lambda v: f"{v:.1f}",
                width=360,
                height=180,
                color=charts.GREEN,
                title=f"{teacher}: mean score per sample",
            )
            for teacher, t in r.get("teachers", {}).items()
        }
        for r in quality.get("rounds", [])
    }


def render_page(data: dict, workspace: str, refresh_s: float, drawn: dict | None = None) -> str:
    """The whole page as one HTML string; `workspace` must already be display_uri()'d.

    `drawn`: page_charts(data), when the caller kept them from an earlier render of the same data.
    """
    now = datetime.fromisoformat(data["generated_at"])
    width = data["throughput"]["bucket_seconds"]
    bucket = f", {width // 3600} h buckets" if width >= 3600 else f", {width // 60} min buckets" if width else ""
    return (
        templates()
        .get_template("page.html")
        .render(
            data=data,
            workspace=workspace,
            refresh_s=refresh_s,
            now_text=now.strftime("%Y-%m-%d %H:%M:%S UTC"),
            by_status=data["totals"]["by_status"],
            bucket_text=bucket,
            charts=drawn if drawn is not None else page_charts(data),
            speed_definition=VIDEOS_PER_HOUR,
            ago=lambda iso: ago(iso, now),
            runs_folder=RUNS,
            metrics_file=METRICS_FILE,
        )
    )


# --------------------------------------------------------------------------- state shared by requests


class Dashboard:
    """The workspace, its catalog and the caches, shared by all requests of one server."""

    def __init__(self, workspace: str, refresh_s: float = 10.0):
        self._raw_uri = os.fspath(workspace)
        self.workspace = display_uri(self._raw_uri)
        self.refresh_s = refresh_s
        self.store = open_store(self._raw_uri)
        self.catalog = Catalog(self.store)
        self._files = FileCache()
        self._lock = threading.Lock()  # Catalog and FileCache are not thread-safe
        self._render_lock = threading.Lock()  # decoding clips is CPU-heavy: one at a time
        self._pngs: OrderedDict[str, bytes] = OrderedDict()
        self._samples: dict[str, tuple[str, str | None]] = {}  # sample key -> (shard, teacher) of shown previews
        self._drawn: tuple[str, dict] | None = None  # (fingerprint, page_charts) of the last page

    def redact(self, text: str) -> str:
        return redact(text, self._raw_uri)

    def summary(self) -> dict:
        with self._lock:
            data = collect(self.store, self.catalog, self._files)
            data["errors"] = [self.redact(m) for m in data["errors"]]
            self._samples = {
                p["sample_key"]: (p["shard_id"], (p["teachers"] or [None])[0])
                for p in data["previews"]
                if p.get("shard_id")
            }
        data["workspace"] = self.workspace
        data["refresh_seconds"] = self.refresh_s
        return data

    def page(self) -> str:
        data = self.summary()
        with self._lock:  # drawing is most of a page's time; the same data draws the same charts
            if self._drawn is None or self._drawn[0] != data["fingerprint"]:
                self._drawn = (data["fingerprint"], page_charts(data))
            drawn = self._drawn[1]
        return render_page(data, self.workspace, self.refresh_s, drawn)

    def _locate(self, sample_key: str) -> tuple[str, str | None] | None:
        found = self._samples.get(sample_key)
        if found is not None:
            return found
        with self._lock:
            row = self.catalog.labelled_sample(sample_key)
        if row is None or not row.get("shard_id"):
            return None
        return row["shard_id"], (row.get("teachers") or [None])[0]

    def preview(self, sample_key: str) -> bytes | None:
        """PNG bytes, or None when no labelled sample has this key. Cached: sample keys name fixed content."""
        if not is_sample_key(sample_key):
            return None
        located = self._locate(sample_key)
        if located is None:
            return None
        shard_id, teacher = located
        cache_key = f"{shard_id}#{sample_key}#{teacher}"
        with self._render_lock:
            png = self._pngs.get(cache_key)
            if png is None:
                png = render_preview(self.store, shard_id, sample_key, teacher)
                self._pngs[cache_key] = png
                while len(self._pngs) > PREVIEW_CACHE:
                    self._pngs.popitem(last=False)
            else:
                self._pngs.move_to_end(cache_key)
        return png


# --------------------------------------------------------------------------- HTTP


class DashboardHandler(BaseHTTPRequestHandler):
    """GET and HEAD only; every route reads, none writes."""

    dashboard: Dashboard  # set on the subclass make_server builds
    allowed_hosts: frozenset[str] | None = None  # None: any Host header (bound to a non-loopback address)
    server_version = "pseudotrack-dashboard"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._serve(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def __getattr__(self, name: str) -> Any:
        # http.server looks up do_<METHOD>; any method but GET/HEAD is refused the same way
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self) -> None:
        self.close_connection = True  # the request's body (if any) is left unread
        self._send(
            HTTPStatus.METHOD_NOT_ALLOWED,
            b"method not allowed: this dashboard is read-only\n",
            "text/plain; charset=utf-8",
            head=False,
            extra={"Allow": "GET, HEAD"},
        )

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s %s", self.address_string(), format % args)

    def _host_ok(self) -> bool:
        """Refuse foreign Host headers on a loopback server: a DNS-rebinding page cannot read the catalog."""
        if self.allowed_hosts is None:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] or host
        return name in self.allowed_hosts

    def _serve(self, head: bool) -> None:
        if not self._host_ok():
            self._send(HTTPStatus.FORBIDDEN, b"unexpected Host header\n", "text/plain; charset=utf-8", head)
            return
        path = urlsplit(self.path).path
        try:
            if path in ("/", "/index.html"):
                self._send_text(HTTPStatus.OK, self.dashboard.page(), "text/html; charset=utf-8", head)
            elif path == "/api/summary":
                body = json.dumps(self.dashboard.summary(), default=str, allow_nan=False)
                self._send_text(HTTPStatus.OK, body, "application/json", head)
            elif path == "/dashboard.js":
                self._send(
                    HTTPStatus.OK,
                    script(),
                    "text/javascript; charset=utf-8",
                    head,
                    extra={"Cache-Control": "max-age=60"},
                )
            elif path.startswith("/preview/") and path.endswith(".png"):
                try:
                    png = self.dashboard.preview(path[len("/preview/") : -len(".png")])
                except (LookupError, FileNotFoundError):  # the catalog names a sample its shard lacks
                    png = None
                if png is None:
                    self._send(
                        HTTPStatus.NOT_FOUND, b"no labelled sample with this key\n", "text/plain; charset=utf-8", head
                    )
                else:
                    self._send(HTTPStatus.OK, png, "image/png", head, extra={"Cache-Control": "max-age=3600"})
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8", head)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # a workspace that cannot be read: say why, without credentials
            message = self.dashboard.redact(f"{type(exc).__name__}: {exc}")
            log.warning("dashboard request %s failed: %s", path, message)
            self._send_text(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"the dashboard cannot read the workspace: {message}\n",
                "text/plain; charset=utf-8",
                head,
            )

    def _send_text(self, status: HTTPStatus, text: str, content_type: str, head: bool) -> None:
        for value in secret_values():  # a last line of defence; data never holds environment values
            text = text.replace(value, "***")
        self._send(status, text.encode("utf-8"), content_type, head)

    def _send(
        self, status: HTTPStatus, body: bytes, content_type: str, head: bool, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        headers = {
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY",
            "Cache-Control": "no-store",
            **(extra or {}),
        }
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


def make_server(dashboard: Dashboard, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A threaded server bound to host:port (port 0: a free one; read it from server.server_address)."""
    loopback = is_loopback(host)
    handler = type(
        "Handler",
        (DashboardHandler,),
        {
            "dashboard": dashboard,
            "allowed_hosts": frozenset(LOOPBACK | {host}) if loopback else None,
        },
    )
    server_class = ThreadingHTTPServer
    if ":" in host:
        import socket

        server_class = type("Server6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    server = server_class((host, port), handler)
    server.daemon_threads = True
    return server


def start_in_thread(
    dashboard: Dashboard, host: str = "127.0.0.1", port: int = 0
) -> tuple[ThreadingHTTPServer, threading.Thread, str]:
    """Serve in a daemon thread (tests, notebooks); returns (server, thread, base URL). Stop with shutdown()."""
    server = make_server(dashboard, host, port)
    thread = threading.Thread(target=server.serve_forever, name="pseudotrack-dashboard", daemon=True)
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    return server, thread, f"http://{shown}:{bound_port}/"


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def bind(dashboard: Dashboard, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """make_server, with a busy port turned into a ConfigError that names it and says what to do."""
    try:
        return make_server(dashboard, host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is already in use (another dashboard?): pick another with --port, "
                "or --port 0 for any free one"
            ) from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(
    workspace: str,
    host: str = "127.0.0.1",
    port: int = 8765,
    refresh: float = 10.0,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve the dashboard of `workspace` until interrupted (Ctrl-C returns normally).

    Raises ConfigError (credentials redacted) when the workspace cannot be read or the
    address cannot be bound. `announce(message)` is told where the page is, and warned when
    it is reachable beyond this machine; by default both go to the log.
    """
    say = announce or log.warning
    try:
        dashboard = Dashboard(workspace, refresh_s=max(0.0, refresh))
        dashboard.store.check_readable()
    except (ConfigError, OSError) as exc:
        raise ConfigError(redact(str(exc), workspace)) from None
    server = bind(dashboard, host, port)
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    say(f"dashboard of {dashboard.workspace} at http://{shown}:{bound_port}/ (Ctrl-C stops it)")
    if not is_loopback(host):
        say(f"warning: bound to {host}: anyone who can reach this port can read the catalog")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
