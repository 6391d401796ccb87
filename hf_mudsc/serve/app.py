"""The FastAPI app of `hf-mudsc serve`: the HTTP API (JSON everywhere) and a server-rendered page.

    POST   /api/jobs               recipe keys (JSON, or YAML with a YAML content type) -> 201 {"id", "status",
                                   "warnings"} (what the request's checks warned about: an option with no effect,
                                   a dry run of a target an active job claims); 400 {"error"} naming the key (or a
                                   local path outside every --local-root); 409 when the output/repo is claimed by an
                                   active job; 429 (with Retry-After) while --max-queued jobs wait for a worker; 413
                                   over 1 MiB (a YAML body over 64 KiB: slow to parse), 408 when the body takes over
                                   BODY_TIMEOUT_S to arrive; 503 (with Retry-After) when the job store cannot take
                                   it (its disk full)
    GET    /api/jobs               {"jobs": [job, ...], "next"} newest first, a page of `?limit=N` (default 100, at
                                   most 1000); `next`: the id to pass as `?before=` for the following page, or null.
                                   Each job as below, with a `summary` of its recipe in place of the recipe
                                   (`summary`: a job may name thousands of parents)
    GET    /api/jobs/{id}          {"id", "status", "progress", "phase", "error", "result", "created", "updated",
                                   "dry_run", "warnings", "recipe"}; a merge's `result` says what ran (`method`,
                                   `alpha`, ... as its card records them, `auto`'s choice included) and `warnings`
    DELETE /api/jobs/{id}          cancel (a running job stops at its next cancel point) -> 202; 409 once it finished or
                                   its push began (one commit, never stopped halfway)
    GET    /api/jobs/{id}/log      {"id", "lines", "next"}; `?since=N` returns lines N.. (poll with `next` to follow;
                                   a long log keeps its first and last lines, one line saying how many were dropped:
                                   store.LOG_CAP)
    GET    /                       the page: jobs, a form to submit a recipe (merge or dry run)
    GET    /jobs/{id}              one job: result, links, recipe, log
    GET    /jobs/{id}/files/{name} a file of a job's output folder (card, plots, recipe)

`Authorization: Bearer <hf token>` on POST is the job's Hub token: kept in memory only (scheduler.py); the header
in another form answers 400. With an
API key configured, POST and DELETE need `X-API-Key: <key>`. POST takes only a JSON or YAML content type (415
otherwise): a form or text/plain body is what a page on another site can send without a CORS preflight.
Every error is one line of JSON, `{"error": ...}` (bad query values 400, unknown routes 404, wrong methods 405
with `Allow` naming every method of the path); HEAD answers as GET, without the body (`HeadAsGet`); /openapi.json
says the same (`ServiceApp.openapi`). A job whose field holds the API key or the request's own token is refused (400,
neither shown: `jobs.refuse_secrets`), since reading the jobs needs no key.
Without an API key (so bound to loopback) only requests whose Host header names this machine are answered: a
page elsewhere whose name is re-pointed at 127.0.0.1 (DNS rebinding) gets 400. GET /jobs/{id}/files serves the
card, the recipe and plots, never the weights (reading needs no key), sandboxed (`FILE_HEADERS`: an SVG opened from
the page runs no script); every answer says `nosniff` (`NoSniffing`, around the whole app: a route that fails answers
a one-line JSON 500 saying it too; uvicorn's own refusals before the app, `serve.protocol`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import json
import logging
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path, PurePath
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from hf_mudsc._version import __version__
from hf_mudsc.errors import RecipeError, shown
from hf_mudsc.load.references import clean_token
from hf_mudsc.publish.folder import weights_fingerprint
from hf_mudsc.publish.recipe import INFO_KEYS, RecipeLoader, repeated_key, yaml_error_line
from hf_mudsc.serve import (
    HEADER_MAX_BYTES,
    TOKEN_MIN_LENGTH,
    clean_api_key,
    host_name,
    is_long_secret,
    is_loopback,
    mask_token,
)
from hf_mudsc.serve.jobs import (
    JobRequest,
    accepted_keys,
    hide_output_root,
    integer_too_long,
    parse_job,
    refuse_secrets,
    resolve_local_paths,
    service_advice,
)
from hf_mudsc.serve.scheduler import PushUnderway, Scheduler
from hf_mudsc.serve.store import (
    ACTIVE,
    MAX_JOBS,
    MAX_QUEUED,
    PHASES,
    JobStore,
    QueueFullError,
    StoreWriteError,
    TargetClaimedError,
    new_job_id,
)
from hf_mudsc.solve.diagnostics import PLOTS_FOLDER

logger = logging.getLogger(__name__)

EXAMPLE_RECIPE = """models:
  - org/vit-task-a
  - org/vit-task-b
method: weight_matching
push_to_hub: me/merged-vit
private: true
"""
MAX_BODY = 1 << 20  # a recipe is a few hundred bytes
# A YAML body's cap: PyYAML (pure Python) spends seconds of the web process's CPU per 100 KB (8-15 s for 1 MiB),
# against milliseconds for the same JSON. A recipe file is a few hundred bytes; a job of thousands of parents is JSON.
MAX_YAML_BODY = 64 << 10
# Seconds a POST's whole body may take to arrive: uvicorn has no body timeout, so a client trickling (or stalling)
# its body held the connection and the route open forever. 1 MiB in 30 s is 35 kB/s; a recipe takes milliseconds.
BODY_TIMEOUT_S = 30.0
# The body's media types: JSON, or YAML (a recipe file). Not text/plain or forms, which need no CORS preflight.
JSON_TYPES = ("application/json",)
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
# What GET /jobs/{id}/files serves of an output folder: the card, the recipe, plots (what the page links to).
SERVED_FILES = ("README.md", "mudsc_recipe.yaml")
SERVED_SUFFIXES = (".png", ".svg")
# How a served file may be shown. An SVG (or any file a browser renders as a document) opened from the page's link is
# a document of the service's origin, whose scripts could call the API: sandboxed (an opaque origin, no script),
# nothing loaded from elsewhere (a plot's raster parts are data: URIs, its styles inline), and never sniffed as
# another type (`NoSniffing` says so on every answer). The page shows plots through <img>, where an SVG runs no
# script anyway.
FILE_HEADERS = {"Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox"}
SQLITE_MAX = (1 << 63) - 1  # the largest integer SQLite binds; larger query values are clamped to it
PAGE_DEFAULT, PAGE_MAX = 100, 1000  # GET /api/jobs: jobs per page when `limit` is not given, and at most
RETRY_AFTER_S = 60  # a 429's Retry-After: a merge takes minutes, so a place in the queue frees in about that
PARENTS_SHOWN = 3  # parents a job list (`recipe_summary`) and the page's rows name; the rest are counted
NOT_RECIPE = ("dry_run", "warnings", "base_from_cards")  # what a stored request holds besides the recipe's keys


NOSNIFF = ("X-Content-Type-Options", "nosniff")


class NoSniffing:
    """The outermost ASGI layer (`ServiceApp`): every answer says `X-Content-Type-Options: nosniff`, so a browser
    reads it as the type it declares (JSON, HTML, a file's), never sniffs it into another (nothing buffered). An app
    that fails or returns before it starts an answer gets the service's one-line JSON 500 from here, not uvicorn's
    plain-text one (the exception is re-raised once answered, so the server still logs its traceback)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def marked(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[NOSNIFF[0]] = NOSNIFF[1]
            await send(message)

        try:
            await self.app(scope, receive, marked)
        except Exception:
            if not started:
                await internal_error(scope)(scope, receive, marked)
            raise
        if not started:
            logger.error("%s %s: the app returned without answering", scope.get("method"), scope.get("path"))
            await internal_error(scope)(scope, receive, marked)


class HeaderCap:
    """ASGI layer: a request whose request line and headers are larger than `HEADER_MAX_BYTES` is refused (431,
    connection closed) before the app reads it. h11 caps only a head still arriving (uvicorn's
    `h11_max_incomplete_event_size`); one that arrived in a single piece reached the app whatever its size."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            line = (scope.get("method", ""), scope.get("raw_path") or b"", scope.get("query_string", b""))
            size = sum(len(part) for part in line)
            size += sum(len(name) + len(value) + 4 for name, value in scope.get("headers", ()))
            if size > HEADER_MAX_BYTES:
                answer = error(431, f"the request line and headers hold {size} bytes, more than {HEADER_MAX_BYTES}; "
                               "send smaller headers")
                answer.headers["Connection"] = "close"
                return await answer(scope, receive, send)
        return await self.app(scope, receive, send)


class HeadAsGet:
    """ASGI layer: a HEAD request is answered as its GET (status, headers, Content-Length) without the body. HTTP
    requires HEAD wherever GET is answered (RFC 9110 §9.3.2: monitors and `curl -I` send it); FastAPI's GET routes
    answered it 405. A GET run for a HEAD does what that GET does (reads the store, and marks a record it cannot
    read unreadable, as the GET would); a route that answers HEAD itself (`answers_head`: the files route, whose
    `FileResponse` sends only the headers) gets the HEAD as it is, so a file is not read to be thrown away."""

    def __init__(self, app: Any, answers_head: Callable[[Any], bool] = lambda scope: False) -> None:
        self.app = app
        self.answers_head = answers_head

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message: Any) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}  # an error's JSON too
            await send(message)

        as_get = scope if self.answers_head(scope) else {**scope, "method": "GET"}
        await self.app(as_get, receive, headers_only)


class ServiceApp(FastAPI):
    """The service's FastAPI app, with `NoSniffing`, `HeaderCap` and `HeadAsGet` around its whole middleware stack:
    outside the layer that answers an exception escaping a route (Starlette's `ServerErrorMiddleware`, outside any
    middleware an app adds), so that answer says `nosniff` too. Its OpenAPI schema says what the handlers take and
    answer (`openapi`)."""

    def build_middleware_stack(self) -> Any:
        return NoSniffing(HeaderCap(HeadAsGet(super().build_middleware_stack(), self.answers_head)))

    def answers_head(self, scope: Any) -> bool:
        """Whether a route of its own answers the HEAD request `scope` (one declared with HEAD among its methods)."""
        return any("HEAD" in (getattr(route, "methods", None) or ()) and route.matches(scope)[0] == Match.FULL
                   for route in self.router.routes)

    def allowed_methods(self, scope: Any) -> list[str]:
        """Every method some route answers at the request's path (HEAD wherever GET is: `HeadAsGet`), for a 405's
        `Allow`: Starlette names only the methods of the first route matching the path (`Allow: POST` for
        /api/jobs, which GET answers too)."""
        methods: set[str] = set()
        for route in self.router.routes:
            match, _ = route.matches({**scope, "type": "http"})
            if match != Match.NONE:
                methods |= set(getattr(route, "methods", None) or ())
        if "GET" in methods:
            methods.add("HEAD")
        return sorted(methods)

    def openapi(self) -> dict[str, Any]:
        """FastAPI's schema, corrected where it cannot see the handlers: no route answers 422 (a bad query value
        answers 400, `bad_parameter`), and every error is `{"error": "..."}` (`ERROR_SCHEMA`)."""
        if self.openapi_schema is not None:
            return self.openapi_schema
        schema = super().openapi()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses.setdefault("400", error_response("a query or path value is not valid"))
        schemas = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        if not schemas:
            schema.get("components", {}).pop("schemas", None)
        if not schema.get("components"):
            schema.pop("components", None)
        self.openapi_schema = schema
        return schema


ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}


def error_response(description: str) -> dict[str, Any]:
    """An OpenAPI response of the service's one-line JSON error."""
    return {"description": description, "content": {"application/json": {"schema": ERROR_SCHEMA}}}


def job_body_schema() -> dict[str, Any]:
    """POST /api/jobs's request body as OpenAPI says it: a mapping of recipe keys, as JSON or YAML (the handler reads
    the body itself, so FastAPI cannot see it)."""
    recipe = {"type": "object", "description": "recipe keys (at least `models`), the destination and `dry_run`",
              "properties": {key: {} for key in (*accepted_keys(), *INFO_KEYS)}, "required": ["models"],
              "additionalProperties": False}
    return {"required": True, "content": {media: {"schema": recipe} for media in (*JSON_TYPES, *YAML_TYPES)}}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def internal_error(scope: Any) -> JSONResponse:
    """The 500 for a request the service failed to answer: one line naming the request, never the exception (its
    text may hold server paths; the server's log has the traceback)."""
    return error(500, f"{scope.get('method')} {scope.get('path')}: the service failed to answer (an internal error, "
                 "logged on the server); try again, or report it to the service's operator")


def public(job: dict[str, Any], outputs: Path, *, full: bool = True) -> dict[str, Any]:
    """A job as the API answers it: the contract's fields, plus `dry_run`, the request's `warnings` and the submitted
    `recipe` — or, `full=False` (the listing, the page), its `summary` (`recipe_summary`). Every value names the
    output as the client did, relative to the output root (`hide_output_root`): the store and the worker's result
    hold the folder's absolute path, and a worker's refusal repeats the writer's message with it. The error and the
    warnings are in the service's words (`service_advice`): they repeat the library's, which name CLI flags."""
    view = {k: job[k] for k in ("id", "status", "progress", "phase", "error", "result", "created", "updated")}
    view["dry_run"] = job["dry_run"]
    request = job["request"]
    view["warnings"] = [service_advice(w) for w in request.get("warnings") or []]
    recipe = {k: v for k, v in request.items() if k not in NOT_RECIPE}
    if full:
        view["recipe"] = recipe
    else:
        view["summary"] = recipe_summary(recipe)
    if view["error"]:
        view["error"] = service_advice(view["error"])
    if isinstance(view["result"], dict):
        view["result"] = advised_result(view["result"])
    output = request.get("output")
    if isinstance(output, str) and PurePath(output).is_absolute() and not inside_output_root(output, outputs):
        # accepted under another --output-root (before a restart): that root is not shown either, only the name
        view = without_path(view, output, PurePath(output).name)
    return without_output_root(view, outputs)


def inside_output_root(output: str, outputs: Path) -> bool:
    """Whether a stored (absolute, resolved) output lies inside the output root `outputs`."""
    return any(PurePath(output).is_relative_to(root) for root in {outputs.absolute(), outputs.resolve()})


def without_path(value: Any, path: str, shown_as: str) -> Any:
    """`value` (a job's view) with `path` written as `shown_as` in every string."""
    if isinstance(value, str):
        return value.replace(repr(path), repr(shown_as)).replace(path, shown_as)
    if isinstance(value, dict):
        return {key: without_path(item, path, shown_as) for key, item in value.items()}
    if isinstance(value, list):
        return [without_path(item, path, shown_as) for item in value]
    return value


def recipe_summary(recipe: dict[str, Any]) -> dict[str, Any]:
    """What a job list shows of a recipe: the method, the target, how many parents and the first `PARENTS_SHOWN`.
    The whole recipe (a list of 20,000 parents is 680 KB) is `GET /api/jobs/{id}`'s: a listing of many such jobs
    took seconds and most of a megabyte."""
    models = recipe.get("models") or []
    return {"method": recipe.get("method"), "parents": len(models), "models": models[:PARENTS_SHOWN],
            "output": recipe.get("output"), "push_to_hub": recipe.get("push_to_hub")}


def advised_result(result: dict[str, Any]) -> dict[str, Any]:
    """A job's result with its warnings (a merge's, a dry run's plan's) in the service's words (`service_advice`)."""
    result = dict(result)
    if isinstance(result.get("warnings"), list):
        result["warnings"] = [service_advice(str(w)) for w in result["warnings"]]
    plan = result.get("plan")
    if isinstance(plan, dict) and isinstance(plan.get("warnings"), list):
        result["plan"] = {**plan, "warnings": [service_advice(str(w)) for w in plan["warnings"]]}
    if isinstance(result.get("plan_text"), str):
        result["plan_text"] = service_advice(result["plan_text"])
    return result


def without_output_root(value: Any, outputs: Path) -> Any:
    """`value` (a job's view, a log line, a list of them) with the output root's path taken out of every string."""
    if isinstance(value, str):
        return hide_output_root(value, outputs)
    if isinstance(value, dict):
        return {key: without_output_root(item, outputs) for key, item in value.items()}
    if isinstance(value, list):
        return [without_output_root(item, outputs) for item in value]
    return value


def create_app(state_dir: str | Path, *, workers: int = 1, api_key: str | None = None,
               output_root: str | Path | None = None, max_queued: int = MAX_QUEUED, max_jobs: int = MAX_JOBS,
               local_roots: Sequence[str | Path] = ()) -> FastAPI:
    """The app; its scheduler starts (and recovers the store after a restart) when the server starts.

    `local_roots`: the folders a job may name local paths in (`--local-root`); none: Hub references only.
    `api_key`: as `clean_api_key` makes it (an empty one is no key; one no client can send: ValueError)."""
    api_key = clean_api_key(api_key)
    if api_key is not None and not is_long_secret(api_key):
        logger.warning("the API key is under %d characters: weak (easy to guess), and a job's field is refused for "
                       "holding it only when a whole string value or key is it; use a longer one", TOKEN_MIN_LENGTH)
    state_dir = Path(state_dir).expanduser().absolute()
    roots = tuple(Path(root).expanduser().resolve() for root in local_roots)
    store = JobStore(state_dir)
    outputs = Path(output_root).expanduser().absolute() if output_root else state_dir / "outputs"
    outputs.mkdir(parents=True, exist_ok=True)

    def admit(request: dict[str, Any]) -> dict[str, Any]:
        """A queued job is checked again when it starts (it may have been accepted before a restart with other
        roots): its output inside the current output root, its local paths inside the current local roots. Its
        worker is handed the paths that check resolved, not the client's strings."""
        if unknown := JobRequest.unknown_stored_keys(request):
            raise RecipeError(f"it holds key(s) {unknown} this hf-mudsc ({__version__}) does not know (a key from a "
                              "newer or an older version, queued before the service was changed) and would run "
                              "without them: resubmit the job without them, or run the version that queued it")
        job = JobRequest.from_stored(request)
        if job.output and not inside_output_root(job.output, outputs):
            raise RecipeError("its `output` was accepted under another output root (the service has restarted "
                              "with another --output-root since), where it is not written: resubmit the job")
        return resolve_local_paths(job, roots).to_dict()

    scheduler = Scheduler(store, workers=workers, admit=admit)
    templates = Environment(loader=PackageLoader("hf_mudsc.serve", "templates"),
                            autoescape=select_autoescape(["html", "jinja"]))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()
        store.close()

    app = ServiceApp(title="hf-mudsc serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.store, app.state.scheduler, app.state.outputs = store, scheduler, outputs
    app.state.max_queued, app.state.max_jobs = max_queued, max_jobs
    app.state.local_roots = roots

    if api_key is None:  # then bound to loopback (cli/serve.py): answer only requests addressed to this machine
        @app.middleware("http")
        async def loopback_only(request: Request, call_next: Any) -> Any:
            host = request.headers.get("host", "")
            if not is_loopback(host_name(host)):
                return error(400, f"the Host header {host!r} does not name this machine: without --api-key the "
                             "service answers only requests to localhost or a loopback address (a guard against "
                             "DNS rebinding); to serve under another name, pass --api-key")
            return await call_next(request)


    @app.exception_handler(Exception)
    async def failed(request: Request, problem: Exception) -> JSONResponse:
        return internal_error(request.scope)  # Starlette re-raises `problem` after it: uvicorn logs the traceback

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, problem: RequestValidationError) -> JSONResponse:
        first = problem.errors()[0]
        name = first["loc"][-1] if first.get("loc") else "request"
        return error(400, f"`{name}`: {first['msg']} (got {first.get('input')!r})")

    @app.exception_handler(HTTPException)
    async def no_route(request: Request, problem: HTTPException) -> JSONResponse:
        answer = error(problem.status_code, f"{request.method} {request.url.path}: {problem.detail}; the API is "
                       "/api/jobs (GET, POST), /api/jobs/{id} (GET, DELETE), /api/jobs/{id}/log (GET)")
        answer.headers.update(problem.headers or {})
        if problem.status_code == 405:
            answer.headers["Allow"] = ", ".join(app.allowed_methods(request.scope))
        return answer

    # The key is compared as SHA-256 digests: `hmac.compare_digest` returns at once on inputs of different lengths,
    # so comparing the keys themselves told a client the key's length by the answer's time.
    key_digest = hashlib.sha256(api_key.encode()).digest() if api_key is not None else b""

    def refused(request: Request) -> JSONResponse | None:
        if api_key is None:
            return None
        given = request.headers.get("x-api-key", "").encode("latin-1")  # the bytes sent (Starlette reads Latin-1)
        if not hmac.compare_digest(hashlib.sha256(given).digest(), key_digest):
            return error(401, "this service needs its API key for POST and DELETE: send the header `X-API-Key`")
        return None

    # ------------------------------------------------------------------ API
    @app.post("/api/jobs", status_code=201, openapi_extra={"requestBody": job_body_schema()}, responses={
        201: {"description": "queued: `{\"id\", \"status\", \"warnings\"}`"},
        400: error_response("the body is not a valid job (the message names the key)"),
        401: error_response("the API key is missing or wrong"), 408: error_response("the body arrived too slowly"),
        409: error_response("an active job claims the output or the Hub repo"),
        413: error_response("the body is too large"), 415: error_response("not a JSON or YAML content type"),
        429: error_response("the queue is full (`Retry-After`)"),
        503: error_response("the job store cannot take the job (`Retry-After`)")})
    async def submit(request: Request, dry_run: bool = False) -> JSONResponse:
        if (denied := refused(request)) is not None:
            return denied
        content_type = request.headers.get("content-type", "")
        if _media_type(content_type) not in JSON_TYPES + YAML_TYPES:
            return error(415, f"send the recipe with `Content-Type: application/json` or `application/yaml`, "
                         f"got {content_type or 'none'!r}")
        if _media_type(content_type) in YAML_TYPES:
            cap = MAX_YAML_BODY
            too_big = error(413, f"the YAML body is larger than {cap} bytes (reading YAML is slow; a recipe is a "
                            f"few hundred bytes); send a larger job as JSON (`Content-Type: application/json`, up to "
                            f"{MAX_BODY} bytes)")
        else:
            cap = MAX_BODY
            too_big = error(413, f"the body is larger than {cap} bytes; a recipe is a few hundred")
        too_big.headers["Connection"] = "close"  # the rest of the body is never read
        if int(request.headers.get("content-length") or 0) > cap:
            return too_big  # declared too big: refused before a byte of it is read
        raw = bytearray()

        async def read() -> bool:
            """Read the body into `raw`; False once it is larger than `cap` (the rest is never read)."""
            async for chunk in request.stream():
                raw.extend(chunk)
                if len(raw) > cap:
                    return False
            return True

        try:
            if not await asyncio.wait_for(read(), BODY_TIMEOUT_S):
                return too_big
        except asyncio.TimeoutError:  # answered (408), and the connection closed: the rest is never read
            logger.info("POST /api/jobs: the body did not arrive within %s s", BODY_TIMEOUT_S)
            late = error(408, f"the body did not arrive within {BODY_TIMEOUT_S:g} s (it has {len(raw)} bytes so "
                         "far); send the whole recipe at once")
            late.headers["Connection"] = "close"
            return late
        except ClientDisconnect:  # the client hung up before its body ended: no one to answer, nothing stored
            logger.info("POST /api/jobs: the client disconnected before sending its whole body")
            return error(400, "the body ended early: the client disconnected")
        try:
            token = _bearer(request)
        except ValueError as problem:
            return error(400, str(problem))
        if token is not None and api_key is not None and hmac.compare_digest(token.encode(), api_key.encode()):
            # the job would send the service's key to the Hub as its token
            return error(400, "the `Authorization: Bearer` token is this service's API key (not shown), which "
                              "belongs in `X-API-Key` only: send your Hugging Face token as `Authorization: Bearer "
                              "hf_...`, or leave that header out to use the service's own Hub login")
        # Store and scheduler calls take locks: run them off the event loop, so GETs are never held up.
        return await run_in_threadpool(enqueue, bytes(raw), content_type, dry_run, token)

    def enqueue(raw: bytes, content_type: str, dry_run: bool, token: str | None) -> JSONResponse:
        try:
            try:
                body = _parse_body(raw, content_type)
            except RecipeError as problem:  # its message quotes the body (a repeated key, a YAML tag): no secret
                said = str(problem)
                for secret in (api_key, token):
                    said = mask_token(said, secret) if secret else said
                raise RecipeError(said) from None
            refuse_secrets(body, api_key=api_key, token=token)
            text = raw.decode("utf-8") if _media_type(content_type) in YAML_TYPES else None  # its comments too
            job = parse_job(body, outputs, dry_run=dry_run, local_roots=roots, text=text,
                            being_written=store.active_outputs())
        except RecipeError as problem:  # the token's advice as a service client follows it (`service_advice`)
            return error(400, hide_output_root(service_advice(str(problem)), outputs))
        if job.dry_run and (taken := claimed_by_active_job(job)) is not None:  # said, not refused: see there
            job = replace(job, warnings=(*job.warnings, taken))
        # The token is held before the row exists (`Scheduler.holding`): a queued row may start at once.
        job_id = new_job_id()
        try:
            claims = (None, None) if job.dry_run else (job.output, job.repo_id)  # a dry run writes nothing
            with scheduler.holding(job_id, token):
                store.add(job.to_dict(), output=claims[0], repo_id=claims[1], dry_run=job.dry_run,
                          has_token=token is not None, max_queued=max_queued, max_jobs=max_jobs,
                          inputs=() if job.dry_run else job.inputs, job_id=job_id)
        except QueueFullError as problem:
            answer = error(429, str(problem))
            answer.headers["Retry-After"] = str(RETRY_AFTER_S)
            return answer
        except TargetClaimedError as problem:  # it names the claimed folders as the store holds them: absolute
            return error(409, hide_output_root(str(problem), outputs))
        except StoreWriteError as problem:  # the operator's to fix; the client may retry later
            logger.error("POST /api/jobs: the job store refused the new job: %s", problem)
            answer = error(503, f"the service cannot record the job ({problem}), so it was not queued: retry later, "
                                "or tell the service's operator (the disk of its --state-dir may be full)")
            answer.headers["Retry-After"] = str(RETRY_AFTER_S)
            return answer
        return JSONResponse({"id": job_id, "status": "queued",
                             "warnings": [hide_output_root(w, outputs) for w in job.warnings]}, status_code=201)

    def claimed_by_active_job(job: JobRequest) -> str | None:
        """The warning a dry run gets when a queued or running merge claims its `output` (or a folder in or around
        it) or its `push_to_hub`, as a real POST's 409 says it — or None. Said in the plan, not refused: a dry run
        writes nothing and the plan is still worth having, but it must not pass silently what the merge would be
        refused now. Best effort (the store's claim is the real check): the queued jobs, then the running ones."""
        active = [*store.queued(), *tuple(scheduler.running)]
        for other_id in dict.fromkeys(active):
            other = store.get(other_id)
            if other is None or other["dry_run"] or other["status"] not in ACTIVE:
                continue
            request = other["request"]
            what = None
            if job.output and request.get("output") and overlapping(job.output, request["output"]):
                what = f"the output folder {job.output!r}"
            elif job.repo_id and (request.get("push_to_hub") or "").lower() == job.repo_id.lower():
                what = f"the Hub repo {job.repo_id!r}"
            if what is not None:
                return (f"{what} is claimed by job {other_id} ({other['status']}): this merge, submitted now, would "
                        "be refused (409); wait for that job to finish or cancel it (DELETE /api/jobs/{id}), or "
                        "choose another destination")
        return None

    @app.get("/api/jobs", responses={404: error_response("no job to page from (`before`)")})
    def list_jobs(limit: int | None = None, before: str | None = None) -> JSONResponse:
        # A page of at most `limit` jobs (none, 0 or negative: the default), newest first; `next` is the cursor of
        # the following page (pass it as `before`), null on the last.
        size = min(limit, PAGE_MAX) if limit and limit > 0 else PAGE_DEFAULT
        try:
            jobs = store.list(size + 1, before=before)
        except KeyError:
            return error(404, f"no job {before!r} to page from (`before`); pass the `next` id of the previous page")
        page = jobs[:size]
        return JSONResponse({"jobs": [public(j, outputs, full=False) for j in page],
                             "next": page[-1]["id"] if len(jobs) > size else None})

    @app.get("/api/jobs/{job_id}", responses={404: error_response("no such job")})
    def get_job(job_id: str) -> JSONResponse:
        job = store.get(job_id)
        return JSONResponse(public(job, outputs)) if job else error(404, f"no job {job_id!r}; GET /api/jobs lists them")

    @app.delete("/api/jobs/{job_id}", status_code=202, responses={
        202: {"description": "cancelled, or to stop at its next cancel point"},
        401: error_response("the API key is missing or wrong"), 404: error_response("no such job"),
        409: error_response("the job has already finished, or its push has begun")})
    def cancel_job(job_id: str, request: Request) -> JSONResponse:
        if (denied := refused(request)) is not None:
            return denied
        job = store.get(job_id)
        if job is None:
            return error(404, f"no job {job_id!r}; GET /api/jobs lists them")
        try:
            cancelled = job["status"] in ACTIVE and scheduler.cancel(job_id)
        except PushUnderway:
            repo = job["request"].get("push_to_hub") or "its Hub repo"
            return error(409, f"job {job_id} has begun pushing its model to {repo!r}, one commit that is never stopped "
                              "halfway: it cannot be cancelled now; once it has finished, delete the repo (or revert "
                              "the commit) if the model is not wanted")
        if not cancelled:
            # read again (it finished meanwhile); a finished record a POST pruned since (--max-jobs) is as it was read
            return error(409, f"job {job_id} has already finished ({status_now(job)}); nothing to cancel")
        return JSONResponse({"id": job_id, "status": status_now(job)}, status_code=202)

    def status_now(job: dict[str, Any]) -> str:
        """The job's status as the store holds it now; its record pruned since: as it was read, if final then."""
        current = store.get(job["id"])
        if current is not None:
            return current["status"]
        return job["status"] if job["status"] not in ACTIVE else "finished"

    @app.get("/api/jobs/{job_id}/log", responses={404: error_response("no such job")})
    def job_log(job_id: str, since: int = 0) -> JSONResponse:
        if store.get(job_id) is None:
            return error(404, f"no job {job_id!r}; GET /api/jobs lists them")
        since = max(0, since)
        lines, following = store.log_page(job_id, since=min(since, SQLITE_MAX))
        # nothing new: the `since` asked for (not the clamped one the store read from)
        return JSONResponse({"id": job_id, "lines": without_output_root(lines, outputs),
                             "next": following if lines else since})

    # ------------------------------------------------------------------ page
    def render(name: str, **context: Any) -> HTMLResponse:
        return HTMLResponse(templates.get_template(name).render(
            version=__version__, needs_key=api_key is not None, phases=PHASES, **context))

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return render("index.html.jinja", jobs=[_page_job(j, outputs, full=False) for j in store.list(200)],
                      example=EXAMPLE_RECIPE, keys=accepted_keys())

    @app.get("/partials/jobs", response_class=HTMLResponse)
    def jobs_rows() -> HTMLResponse:
        return render("rows.html.jinja", jobs=[_page_job(j, outputs, full=False) for j in store.list(200)])

    @app.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(job_id: str) -> HTMLResponse:
        job = store.get(job_id)
        if job is None:
            return HTMLResponse(f"no job {html.escape(job_id)}", status_code=404)
        recipe = yaml.safe_dump(public(job, outputs)["recipe"], sort_keys=False)
        return render("job.html.jinja", job=_page_job(job, outputs), recipe=recipe,
                      log=without_output_root(store.log(job_id), outputs))

    @app.get("/jobs/{job_id}/files/{name:path}", response_class=FileResponse, responses={
        200: {"description": "the file: the card, the recipe or a plot",
              "content": {media: {} for media in ("text/markdown", "application/yaml", "image/png", "image/svg+xml")}},
        404: error_response("no such job, or no such file of its output")})
    def job_file(job_id: str, name: str):
        job = store.get(job_id)
        folder = _output_folder(job, outputs) if job else None
        if job and folder is None and _replaced(job, outputs):
            return error(404, f"job {job_id}'s output folder was replaced by a later job (`\"overwrite\": true`): "
                              "its files are that job's now, not this one's")
        if folder is None or name not in _files(folder):
            return error(404, f"job {job_id} has no output file {name!r}")
        return FileResponse(folder / name, headers=FILE_HEADERS)

    # HEAD of a file as its own route (`HeadAsGet` passes it through): `FileResponse` sends the headers only.
    app.add_api_route("/jobs/{job_id}/files/{name:path}", job_file, methods=["HEAD"], include_in_schema=False)

    return app


def overlapping(one: str, other: str) -> bool:
    """Whether two output folders (absolute, resolved, as the store keeps them) are the same or one holds the other."""
    a, b = PurePath(one), PurePath(other)
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


class JobLoader(RecipeLoader):
    """A recipe file's YAML (a key given twice refused) without aliases: a few hundred bytes of nested aliases
    expand to gigabytes ("billion laughs"), and a job needs none."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise RecipeError("YAML anchors and aliases (`&name`, `*name`) are refused in a job: write the values out")
        return super().compose_node(parent, index)


def _json_mapping(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice as a recipe file does (JSON keeps the last silently)."""
    index = repeated_key([key for key, _ in pairs])
    if index is not None:
        raise RecipeError(f"the key {shown(pairs[index][0])} is given twice; give each key once")
    return dict(pairs)


def _parse_body(raw: bytes, content_type: str) -> Any:
    try:  # refused, not repaired: a replaced byte would name a folder or a parent the client never sent
        text = raw.decode("utf-8-sig")  # a leading byte order mark dropped, as a recipe file's (RFC 8259 allows)
    except UnicodeDecodeError as problem:
        raise RecipeError(f"the body is not UTF-8 text (byte {problem.start}: {problem.reason}); send it as "
                          "UTF-8") from None
    if not text.strip():
        raise RecipeError("the body is empty; send the recipe keys (at least `models`) as JSON or YAML")
    kind = "YAML" if _media_type(content_type) in YAML_TYPES else "JSON"
    try:
        if kind == "YAML" and text.lstrip().startswith("{"):  # the page sends its "YAML or JSON" textarea as YAML
            with contextlib.suppress(json.JSONDecodeError):  # JSON indented with tabs is no YAML (a tab starts no
                try:  # token); a YAML flow mapping: below
                    return json.loads(text, object_pairs_hook=_json_mapping)
                except ValueError as problem:  # JSON syntax json cannot hold (an integer of thousands of digits)
                    if integer_too_long(problem):
                        kind = "JSON"
                    raise
        return yaml.load(text, Loader=JobLoader) if kind == "YAML" else json.loads(
            text, object_pairs_hook=_json_mapping)
    except RecipeError:
        raise
    except RecursionError:
        raise RecipeError(f"the body's {kind} is nested too deeply; a recipe is a flat mapping") from None
    except yaml.MarkedYAMLError as problem:  # PyYAML's message spans lines (context, the source line, a caret)
        raise RecipeError(f"the body is not valid YAML: {yaml_error_line(problem)}") from None
    except ValueError as problem:
        if integer_too_long(problem):  # Python's advice (`sys.set_int_max_str_digits()`) is the server's to follow
            raise RecipeError(f"the body's {kind} holds an integer too large (thousands of digits); no recipe "
                              "value is one: send a number of a few digits") from None
        raise RecipeError(f"the body is not valid {kind}: {' '.join(str(problem).split())}") from None
    except yaml.YAMLError as problem:
        raise RecipeError(f"the body is not valid {kind}: {' '.join(str(problem).split())}") from None


def _bearer(request: Request) -> str | None:
    """The job's Hub token from `Authorization: Bearer <token>`; None without the header. A header in another form
    (`token hf_...`, the bare token, no token) is refused (ValueError): ignored, the job would run with the
    server's own Hub login instead of the client's. The message never repeats the header."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise ValueError("the Authorization header is not `Bearer <token>`: send the Hugging Face token as "
                         "`Authorization: Bearer hf_...`, or leave the header out to use the service's own Hub login")
    return clean_token(value, "`Authorization: Bearer`")  # a space or tab inside: refused, never shown


def _output_folder(job: dict[str, Any], outputs: Path) -> Path | None:
    """The job's output folder, if it finished writing one inside the output root that still holds what it wrote
    (not `replaced_by_later_job`)."""
    output = (job.get("result") or {}).get("output")
    if not output:
        return None
    folder = Path(output)
    if not folder.is_dir() or not folder.resolve().is_relative_to(outputs.resolve()):
        return None
    return None if replaced_by_later_job(job, folder) else folder


def replaced_by_later_job(job: dict[str, Any], folder: Path) -> bool:
    """Whether the job's output `folder` now holds another model than the one the job wrote (a later job's
    `"overwrite": true`): its card and plots are that job's, never to be served under this one. A job recorded
    before its result said what it wrote (`output_fingerprint`) is taken as still holding it."""
    written = (job.get("result") or {}).get("output_fingerprint")
    return bool(written) and weights_fingerprint(folder) != written


def _files(folder: Path) -> list[str]:
    """The files of an output folder the service serves, as paths relative to it: the card, the recipe and plots
    (at the top or in `plots/`, where the writer puts them) — never the weights. A request names one exactly."""
    found = [p for p in (*folder.iterdir(), *(folder / PLOTS_FOLDER).glob("*")) if p.is_file()]
    names = [p.relative_to(folder).as_posix() for p in found if not p.name.startswith(".")]
    return sorted(n for n in names if n in SERVED_FILES or n.endswith(SERVED_SUFFIXES))


def _page_job(job: dict[str, Any], outputs: Path, *, full: bool = True) -> dict[str, Any]:
    """A job with what the page links to: the pushed repo, the card, the plots, the recipe (its `summary` in the
    job list, `full=False`); `target` and `parents` as the page shows them."""
    view = public(job, outputs, full=full)
    result = job.get("result") or {}
    folder = _output_folder(job, outputs)
    files = _files(folder) if folder else []
    view["links"] = {
        "repo": result.get("url"),
        "card": f"/jobs/{job['id']}/files/README.md" if "README.md" in files else (
            f"{result['url']}/blob/main/README.md" if result.get("url") else None),
        "plots": [(name, f"/jobs/{job['id']}/files/{name}") for name in files
                  if name.endswith((".png", ".svg"))],
    }
    summary = view["summary"] if not full else recipe_summary(view["recipe"])
    # the output as the client named it (`sub/x`, relative to the output root: `public`), not its last part
    view["target"] = summary["push_to_hub"] or summary["output"]
    view["parents"], view["more_parents"] = summary["models"], summary["parents"] - len(summary["models"])
    ran = view["result"] or {}
    # what ran: the method (and α) the merge recorded, `auto`'s choice said as one ("auto → mudsc"); a dry run's
    # plan says what it would run in its own words (the page shows the plan)
    method = ran.get("method")
    view["method"] = summary["method"] if not method or method == summary["method"] else (
        f"{summary['method']} → {method}")
    view["alpha"] = ran.get("alpha")
    view["all_warnings"] = list(dict.fromkeys([*view["warnings"], *(ran.get("warnings") or [])]))
    view["replaced"] = _replaced(job, outputs)
    return view


def _replaced(job: dict[str, Any], outputs: Path) -> bool:
    """Whether the job's output folder (inside the output root) was replaced by a later job's
    (`replaced_by_later_job`)."""
    output = (job.get("result") or {}).get("output")
    folder = Path(output) if output else None
    return (folder is not None and folder.is_dir() and folder.resolve().is_relative_to(outputs.resolve())
            and replaced_by_later_job(job, folder))
