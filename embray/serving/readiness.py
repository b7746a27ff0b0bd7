"""``GET /readyz`` that answers within 2 s in every state: the small application ``embray-readyz``.

Serve's proxy routes a request to an application's ingress replica and, while there is none running (the
replicas wait to be scheduled, or are still loading), holds it until ``request_timeout_s``: a probe of the
ingress's own ``/readyz`` then hangs. This application, mounted at ``/readyz`` in front of the main one
(its route prefix is longer, so the proxy picks it), reserves no CPU, so it runs wherever Serve does. While
the application is not RUNNING it answers 503 with what Serve says about it (its status, each deployment's
replicas and Serve's own message, e.g. replicas "taken more than 30s to be scheduled"); once it runs, it asks
the ingress (:meth:`EmbrayServer.readiness`: is a version loaded?) and passes its answer on, or answers 503
when no ingress replica answers within :data:`ASK_S`.
"""

# No `from __future__ import annotations`: Serve inspects the deployment's signatures.
import asyncio
import logging
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from embray.errors import ConfigError

log = logging.getLogger("embray.serve")

APP = "embray"  # the main application's name (`embray serve`, serve/config.yaml)
INGRESS = "EmbrayServer"  # its ingress deployment
READYZ_APP = "embray-readyz"
ROUTE = "/readyz"
ASK_S = 1.0  # how long the ingress may take to say whether it is ready
STATUS_S = 0.7  # how long Serve's controller may take to say why it is not


@serve.deployment(name="EmbrayReadiness", num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
class EmbrayReadiness:
    def __init__(self, app: str = APP, ingress: str = INGRESS):
        self.app, self.ingress = app, ingress
        self._handle = None

    async def __call__(self, request: Request) -> JSONResponse:
        why = await self._no_ingress()
        if why is None:  # an ingress replica runs: it says whether it has a version loaded
            try:
                code, doc = await asyncio.wait_for(self._ask(), ASK_S)
                return JSONResponse(doc, status_code=code)
            except Exception as e:  # noqa: BLE001 - no answer is an answer: not ready, and why
                why = f"application {self.app!r} runs, but its ingress did not answer within {ASK_S:g}s ({e!r})"
        return JSONResponse({"ready": False, "reason": why}, status_code=503)

    async def _ask(self) -> tuple[int, dict[str, Any]]:
        if self._handle is None:
            self._handle = await asyncio.to_thread(serve.get_app_handle, self.app)
        return await self._handle.readiness.remote()

    async def _no_ingress(self) -> str | None:
        """None while a replica of the application's ingress runs (also during a rolling update, when the old
        ones still answer); else what Serve says the application waits for."""
        try:
            st = await asyncio.wait_for(asyncio.to_thread(serve.status), STATUS_S)
        except Exception as e:  # noqa: BLE001 - the controller is busy or gone: say so
            return f"Serve's status of application {self.app!r} is unavailable ({e!r})"
        app = st.applications.get(self.app)
        if app is None:
            self._handle = None
            return f"application {self.app!r} is not deployed"
        ingress = app.deployments.get(self.ingress)
        if ingress is not None and any(_name(s) == "RUNNING" and n > 0 for s, n in ingress.replica_states.items()):
            return None
        return why_not_running(self.app, app) or f"no replica of {self.ingress} runs"


def _name(status) -> str:
    return str(getattr(status, "value", status))


def why_not_running(name: str, app) -> str | None:
    """What an application that is not RUNNING waits for, from its Serve status (None when it runs)."""
    if _name(app.status) == "RUNNING":
        return None
    parts = []
    for dep_name, d in app.deployments.items():
        if _name(d.status) == "HEALTHY":
            continue
        states = ", ".join(f"{n} {_name(s)}" for s, n in sorted(d.replica_states.items(), key=lambda x: _name(x[0])))
        line = f"{dep_name} {_name(d.status)} ({states or 'no replicas yet'})"
        msg = " ".join((d.message or "").split())
        parts.append(f"{line}: {msg[:400]}" if msg else line)
    head = f"application {name!r} is {_name(app.status)}"
    if app.message and not parts:
        head += f": {' '.join(app.message.split())[:400]}"
    return head + (": " + "; ".join(parts) if parts else "")


def readyz(args: dict[str, Any] | None = None):
    """Application builder for `serve deploy` (serve/config.yaml: ``embray.serving:readyz``, route prefix
    ``/readyz``): ``args: {app: embray}`` names the application it reports on (default ``embray``)."""
    args = args or {}
    app = args.get("app", APP)
    if not isinstance(app, str) or not app:
        raise ConfigError("the embray-readyz application needs `args: {app: <name of the embray application>}`")
    return EmbrayReadiness.bind(app, INGRESS)
