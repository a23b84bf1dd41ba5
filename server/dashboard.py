"""`fedsilo dashboard`: a read-only web page over a run directory or a site's ledger.

`make_app(source, token=...)` is a Starlette app with four routes, all GET:

  /                 the page (fedsilo/server/static/dashboard.html)
  /static/NAME      the page's script and style and the vendored uPlot chart library
                    (NAME from a fixed list: nothing else is served, so no path reaches
                    outside the package, let alone the run directory)
  /api/view         the view as JSON: `run_view(run_dir)` or `ledger_view(ledger)`
  /healthz          "ok"

The page polls /api/view (with the ETag of the files it reads, so an unchanged run costs
a stat per file) and redraws when the run or the ledger changes: a running federation
updates without reload. Everything shown is read from the files the run directory (or
the ledger) already holds, with fedsilo's own readers (fedsilo.server.run_dir,
fedsilo.privacy.audit): the dashboard writes nothing and shows nothing they do not hold.

Who can reach it: it binds 127.0.0.1 unless told otherwise (fedsilo.exporter's rule:
never every address); with `token`, every request must carry it (`?token=` once, which
sets a same-site cookie, or `Authorization: Bearer`); and it answers only requests whose
Host header names the address it serves, so a web page elsewhere cannot read it through
a DNS name rebound to 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsilo.errors import ConfigError, FedsiloError
from fedsilo.server.records import OUTCOMES, RoundRecord, Summary, site_events
from fedsilo.server.replies import reason_kind
from fedsilo.server.run_dir import (
    CONFIG_FILE,
    METRICS_FILE,
    ONLINE_FILE,
    PROGRESS_FILE,
    SUMMARY_FILE,
    read_config,
    read_metrics,
    read_online,
    read_progress,
    read_summary,
)

STATIC = Path(__file__).with_name("static")
# Everything /static/ serves: name -> media type.
ASSETS = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
    "uPlot.iife.min.js": "text/javascript",
    "uPlot.min.css": "text/css",
}
COOKIE = "fedsilo_dashboard_token"
# A run whose files have not changed for this long, with no summary.json, is shown as
# quiet: its server may have died (a deployed round can take minutes, so only a hint).
QUIET_S = 300.0


@dataclass(frozen=True)
class Source:
    """What a dashboard shows: a run directory, or one site's ledger."""

    run_dir: Path | None = None
    ledger: Path | None = None

    def __post_init__(self) -> None:
        if (self.run_dir is None) == (self.ledger is None):
            raise ConfigError("A dashboard shows a run directory or a ledger (--ledger), one.")

    @property
    def files(self) -> list[Path]:
        """The files the view is read from (what the ETag covers)."""
        if self.ledger is not None:
            return [self.ledger]
        assert self.run_dir is not None
        names = (METRICS_FILE, PROGRESS_FILE, SUMMARY_FILE, CONFIG_FILE, ONLINE_FILE)
        return [self.run_dir / name for name in names]

    def check(self) -> None:
        """Refuse a source that is not there, naming the fix.

        Raises:
            ConfigError: no such run directory or ledger.
        """
        if self.ledger is not None:
            if not self.ledger.is_file():
                raise ConfigError(
                    f"No ledger at {self.ledger}. A site's ledger is its kit's ledger.jsonl "
                    "(fed/sites/NAME/ledger.jsonl), or RUN_DIR/ledgers/NAME.jsonl in a "
                    "simulation."
                )
            return
        assert self.run_dir is not None
        if not self.run_dir.is_dir():
            raise ConfigError(
                f"No run directory at {self.run_dir}. Give the --out of a `fedsilo simulate` "
                "or `fedsilo server start` (or use --ledger PATH for a site's ledger)."
            )
        if not any(p.exists() for p in self.files):
            raise ConfigError(
                f"{self.run_dir} holds no run (no config.json, metrics.jsonl or "
                "summary.json). Give the --out of a `fedsilo simulate` or `fedsilo server "
                "start`; a run that has not started yet shows once it writes config.json."
            )

    def etag(self) -> str:
        """A tag that changes whenever a file the view reads changes."""
        parts = []
        for path in self.files:
            try:
                st = path.stat()
                parts.append(f"{path.name}:{st.st_mtime_ns}:{st.st_size}")
            except OSError:
                parts.append(f"{path.name}:-")
        return '"' + hashlib.sha256("|".join(parts).encode()).hexdigest()[:24] + '"'

    def view(self) -> dict[str, Any]:
        if self.ledger is not None:
            return ledger_view(self.ledger)
        assert self.run_dir is not None
        return run_view(self.run_dir)


def run_view(run_dir: Path) -> dict[str, Any]:
    """What the page shows for a run directory, from its files alone."""
    try:
        rounds = read_metrics(run_dir)
        progress = read_progress(run_dir)
        summary = read_summary(run_dir)
        problem = None
    except (FedsiloError, OSError) as exc:
        rounds, progress, summary, problem = [], None, None, str(exc)
    config = read_config(run_dir)
    planned = _int(config.get("rounds"))
    started = progress.started if progress is not None else 0
    if summary is not None:
        status = "stopped" if summary.stopped else "finished"
    elif rounds or started:
        status = "running"
    else:
        status = "waiting"
    updated = _last_write(run_dir)
    online = read_online(run_dir)
    quiet = status in ("running", "waiting") and time.time() - updated > QUIET_S
    return {
        "kind": "run",
        "name": run_dir.resolve().name,
        "status": status,
        "stopped": summary.stopped if summary is not None else None,
        "problem": problem,
        "quiet": quiet,
        "updated": updated,
        "planned": planned,
        "started": started,
        "completed": len(rounds),
        "lost": list(progress.lost) if progress is not None else [],
        "online": online[0] if online is not None and status != "finished" else None,
        "config": {
            key: config.get(key)
            for key in ("task", "dataset", "dp", "aggregation", "target-epsilon", "run-id")
            if key in config
        },
        "rounds": [_round(r) for r in rounds],
        "sites": _sites(rounds),
        "events": _events(rounds, summary),
        "final": _final(summary),
    }


def _round(record: RoundRecord) -> dict[str, Any]:
    return {
        "round": record.round,
        "accuracy": _finite(record.accuracy),
        "loss": _finite(record.loss),
        "max_epsilon": _finite(record.max_epsilon),
        "seconds": _finite(record.seconds),
        "stage_seconds": record.stage_seconds,
        "sites": list(record.sites),
        "failed": list(record.failed),
        "refused": list(record.refused),
        "flagged": sorted(record.flagged),
        "epsilon": {site: _finite(r.epsilon) for site, r in sorted(record.reports.items())},
    }


def _sites(rounds: list[RoundRecord]) -> list[dict[str, Any]]:
    """Each site's latest reported epsilon for this run against the run's target, and
    how its replies went."""
    out: dict[str, dict[str, Any]] = {}

    def site(name: str) -> dict[str, Any]:
        return out.setdefault(
            name,
            {
                "site": name,
                "epsilon": None,
                "target_epsilon": None,
                "accepted": 0,
                "failed": 0,
                "refused": 0,
                "flagged": 0,
            },
        )

    for record in rounds:
        for name, report in record.reports.items():
            row = site(name)
            row["epsilon"] = _finite(report.epsilon)
            row["target_epsilon"] = _finite(report.target_epsilon)
        for outcome in ("failed", "refused", "flagged"):
            for name in getattr(record, outcome):
                site(name)[outcome] += 1
        for name in record.sites:
            site(name)["accepted"] += 1
    return [out[name] for name in sorted(out)]


def _events(rounds: list[RoundRecord], summary: Summary | None) -> list[dict[str, Any]]:
    """Every failure, refusal and flag, with its reason and kind, in round order."""
    out = []
    for event in site_events(rounds, summary):
        kind = OUTCOMES[type(event)]
        why, stage = reason_kind(kind, event.reason) if kind != "flagged" else ("rule", "")
        out.append(
            {"round": event.round, "site": event.site, "kind": kind, "why": why,
             "stage": stage, "reason": event.reason}
        )  # fmt: skip
    return sorted(out, key=lambda e: (e["round"], e["kind"], e["site"]))


def _final(summary: Summary | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    return {
        "accuracy": _finite(summary.final.accuracy),
        "loss": _finite(summary.final.loss),
        "completed_rounds": summary.completed_rounds,
    }


def ledger_view(path: Path) -> dict[str, Any]:
    """What the page shows for one site's ledger: its audit and its spend over time."""
    from fedsilo.privacy import ledger
    from fedsilo.privacy.audit import audit, epsilon_curve

    found = audit(path)
    contents = ledger.read(path)
    try:
        curve = epsilon_curve(path)
    except (ValueError, ArithmeticError, RuntimeError):
        curve = []  # a spend the accountant cannot compose: the audit names it
    spends = [
        {
            "n": i + 1,
            "run": s.run,
            "round": s.round,
            "time": s.time,
            "mode": s.mode,
            "steps": s.event.steps,
            "epsilon_total": _finite(curve[i]) if i < len(curve) else None,
        }
        for i, s in enumerate(contents.spends)
    ]
    return {
        "kind": "ledger",
        "name": found.site or path.name,
        "ledger": str(path),
        "status": found.status,
        "problems": found.problems,
        "epsilon": _finite(found.epsilon),
        "epsilon_rdp": _finite(found.epsilon_rdp),
        "delta": found.delta,
        "budget": found.budget,
        "remaining": _finite(found.remaining) if found.remaining is not None else None,
        "events": found.events,
        "steps": found.steps,
        "runs": sorted({s.run for s in contents.spends}),
        "spends": spends,
        "updated": _mtime(path),
    }


def _last_write(run_dir: Path) -> float:
    names = (METRICS_FILE, PROGRESS_FILE, SUMMARY_FILE, CONFIG_FILE)
    return max((_mtime(run_dir / name) for name in names), default=0.0)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _finite(value: float | None) -> float | None:
    """JSON has no inf or NaN: those are shown as missing."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def make_app(source: Source, *, token: str | None = None, hosts: list[str] | None = None) -> Any:
    """The dashboard's Starlette app (see the module docstring).

    `hosts` are the names the Host header may carry (default: 127.0.0.1, localhost, ::1).
    """
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    headers = {
        "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }

    def authorised(request: Request) -> bool:
        if token is None:
            return True
        given = (
            request.query_params.get("token")
            or _bearer(request.headers.get("authorization", ""))
            or request.cookies.get(COOKIE, "")
        )
        return hmac.compare_digest(given.encode(), token.encode())

    def guard(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            if not authorised(request):
                return PlainTextResponse(
                    "This dashboard needs its access token: open the address "
                    "`fedsilo dashboard` printed (it ends in ?token=...).",
                    status_code=401,
                    headers=headers,
                )
            response: Response = handler(request)
            response.headers.update(headers)
            if token is not None and request.query_params.get("token"):
                response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return response

        return endpoint

    def page(request: Request) -> Response:
        return FileResponse(STATIC / "dashboard.html", media_type="text/html")

    def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            return PlainTextResponse("Not found.", status_code=404)
        return FileResponse(STATIC / name, media_type=ASSETS[name])

    def view(request: Request) -> Response:
        etag = source.etag()
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        try:
            body = source.view()
        except (FedsiloError, OSError) as exc:
            body = {"kind": "error", "problem": str(exc)}
        return JSONResponse(body, headers={"ETag": etag})

    def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    allowed = hosts or ["127.0.0.1", "localhost", "::1", "[::1]"]
    return Starlette(
        routes=[
            Route("/", guard(page)),
            Route("/static/{name}", guard(asset)),
            Route("/api/view", guard(view)),
            Route("/healthz", guard(health)),
        ],
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed)],
    )


def _bearer(header: str) -> str:
    kind, _, value = header.partition(" ")
    return value.strip() if kind.lower() == "bearer" else ""


def check_token(token: str | None) -> None:
    """Refuse a token too short to guard anything.

    Raises:
        ConfigError: fewer than 16 characters.
    """
    if token is not None and len(token) < 16:
        raise ConfigError(
            "--token is shorter than 16 characters: anyone who can reach the port could "
            "guess it. Give a longer one (e.g. `openssl rand -hex 16`), or leave it out to "
            "have one generated."
        )
