"""The web service: one static page and a small JSON API over ``Predictor.predict`` (FastAPI + uvicorn).

Routes: ``GET /`` (the page), ``POST /api/v1/predict`` (a ``Prediction``), ``GET /api/v1/health``,
``GET /api/v1/model``, ``GET /api/v1/samples`` and ``/samples/<name>`` (the bundled examples), ``/docs``
(Swagger UI, served offline) and ``/openapi.json``. The model is loaded once, when the app is created;
predictions run in a thread pool so requests never block the event loop. Every error is JSON
``{"error": "<sentence>"}``. The limits (workers, queue,
timeouts, trusted hosts, security headers) are applied by ``serve.guard``, who may call the API (tokens, same
origin, HTTPS) by ``serve.auth``; ``GET /api/v1/worklist`` lists the DICOM node's worklist when the app is given
its ``--store`` folder.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from cxr_triage._version import __version__
from cxr_triage.core.decode import image_kind
from cxr_triage.core.preprocess import DICOM_SUFFIXES, ImageReadError
from cxr_triage.runtime.advice import NOTICE
from cxr_triage.runtime.prediction import ModelInfo, Prediction
from cxr_triage.runtime.predictor import Predictor
from cxr_triage.runtime.worklist import read_worklist
from cxr_triage.serve.auth import Access, AccessGate, access_for, document_tokens, env_access, tls_options
from cxr_triage.serve.guard import (
    LOOPBACK_HOSTS,
    Guard,
    ServiceLimits,
    UploadLimit,
    WorkGate,
    too_large,
    uvicorn_options,
)
from cxr_triage.serve.pages import STATIC_DIR, add_page_routes

log = logging.getLogger("cxr_triage.service")  # one logger for the service (guard and auth log to it too)
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class Health(BaseModel):
    """Liveness and the loaded model."""

    status: Literal["ok"] = "ok"
    model: ModelInfo
    max_upload_mb: float


class ResultStatus(BaseModel):
    """One result object on its way to the PACS."""

    kind: str = Field(description="SR (the report) or SC (the heatmap picture)")
    status: Literal["sent", "queued", "failed"]
    attempts: int
    retry_at: float | None = None
    reason: str = ""


class WorklistEntry(BaseModel):
    """One image the DICOM node triaged (no patient name): find the study by accession number or study UID."""

    accession_number: str
    study_instance_uid: str
    received_at: float = Field(description="seconds since the epoch")
    label: str
    confidence: float | None
    decision: Literal["accept", "uncertain", "rejected", "error"]
    error: str = ""
    urgency: int = Field(description="4 urgent (COVID-19), 3 high (Lung Opacity, Viral Pneumonia), 2 review, 1 routine")
    urgency_name: Literal["urgent", "high", "review", "routine"]
    results_sent: bool = Field(description="the SR and picture reached the PACS")
    results_status: Literal["sent", "queued", "failed"] = Field(
        description="sent: the PACS has every result; queued: waiting for a retry; failed: will not be sent"
    )
    retry_at: float | None = Field(None, description="next try of a queued result, seconds since the epoch")
    results_reason: str = Field("", description="why the last try failed (for queued or failed results)")
    results: list[ResultStatus] = Field(default_factory=list, description="each result object (SR, SC)")


class ErrorBody(BaseModel):
    """Every error response."""

    error: str = Field(description="a human sentence saying what went wrong")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (408, "the upload arrived too slowly"),
        (413, "upload too large"),
        (415, "not an image or DICOM file"),
        (422, "corrupt image or invalid request"),
        (500, "internal error"),
        (503, "busy: retry after the seconds in the Retry-After header"),
    )
}


def safe_name(name: str | None) -> str:
    """The base name of an uploaded file, without directories or odd characters (at most 100 characters)."""
    base = PurePosixPath((name or "").replace("\\", "/")).name
    base = re.sub(r"[^\w.\- ()+]+", "_", base).strip(" .")
    return base[-100:] or "upload"


def predict_upload(
    predictor: Predictor, data: bytes, name: str, kind: str, lang: str, heatmap: bool, image: bool
) -> Prediction:
    """Blocking work for one upload (run in a worker thread): the prediction, named as uploaded."""
    dicom_name = Path(name).suffix.lower() in DICOM_SUFFIXES
    decode_name = name if (kind == "dicom") == dicom_name else f"{name}.{kind}"  # decode by content, not name
    pred = predictor.predict(data, decode_name, decode_name, lang=lang, heatmap=heatmap, image=image)
    return pred.model_copy(update={"path": name})


def validation_sentence(exc: RequestValidationError) -> str:
    """FastAPI's validation errors as one sentence, e.g. "form field 'file': field required"."""
    where = {"body": "form field", "query": "query parameter", "path": "path parameter", "header": "header"}
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ())]
        place = where.get(loc[0], loc[0]) if loc else "request"
        field = ".".join(loc[1:]) or "body"
        parts.append(f"{place} '{field}': {str(err.get('msg', 'invalid')).lower()}")
    file_missing = any("'file'" in p for p in parts)
    hint = " Upload the image as the multipart form field 'file'." if file_missing else ""
    return "Invalid request: " + "; ".join(parts) + "." + hint


def install_error_handlers(app: FastAPI) -> None:
    """JSON ``{"error": ...}`` for HTTP errors, validation errors and anything unexpected."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404 and exc.detail == "Not Found":
            text = f"Not found: {request.url.path} does not exist; the page is at /, the API under /api/v1."
        elif exc.status_code == 405:
            text = f"Method {request.method} is not allowed on {request.url.path}."
        else:
            text = str(exc.detail)
        return JSONResponse({"error": text}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": validation_sentence(exc)}, status_code=422)

    # anything unexpected is logged once and answered with a JSON 500 by serve.guard.Guard


async def predictor_of(request: Request) -> Predictor:
    """The app's predictor, loaded once by ``create_app``."""
    return request.app.state.predictor


async def max_bytes_of(request: Request) -> int:
    """The app's upload limit in bytes."""
    return request.app.state.max_bytes


async def gate_of(request: Request) -> WorkGate:
    """The app's gate on uploads held, decoded and scored at once."""
    return request.app.state.gate


async def store_of(request: Request) -> Path | None:
    """The DICOM node's ``--store`` folder whose worklist the app shows (None: no worklist)."""
    return request.app.state.store


PredictorDep = Annotated[Predictor, Depends(predictor_of)]
MaxBytesDep = Annotated[int, Depends(max_bytes_of)]
GateDep = Annotated[WorkGate, Depends(gate_of)]
StoreDep = Annotated[Path | None, Depends(store_of)]

router = APIRouter()  # the /api/v1 routes; shared state comes from ``app.state`` by the dependencies above


@router.get("/api/v1/health", response_model=Health, tags=["service"])
async def health(predictor: PredictorDep, max_bytes: MaxBytesDep) -> dict[str, Any]:
    """The service is up and which model it serves."""
    return {"status": "ok", "model": predictor.info, "max_upload_mb": round(max_bytes / 2**20, 3)}


@router.get("/api/v1/model", response_model=dict[str, Any], tags=["service"])
async def model(predictor: PredictorDep) -> dict[str, Any]:
    """The bundle's model.json: classes, preprocessing, calibration, thresholds and metrics."""
    return predictor.bundle.raw


@router.post("/api/v1/predict", response_model=Prediction, responses=ERRORS, tags=["predict"])
async def predict(
    request: Request,
    file: Annotated[UploadFile, File(description="a chest X-ray: PNG, JPEG or DICOM (BMP, TIFF, WebP)")],
    predictor: PredictorDep,
    max_bytes: MaxBytesDep,
    gate: GateDep,
    lang: Annotated[Literal["en", "ko"], Query(description="language of the advice and reasons")] = "en",
    heatmap: Annotated[bool, Query(description="add `heatmap`, a base64 PNG overlay")] = False,
    image: Annotated[bool, Query(description="add `image`, a base64 PNG of the grey input")] = False,
) -> Prediction:
    """Classify one uploaded chest X-ray and say what to do next. Decision support, not a diagnosis."""
    name = safe_name(file.filename)
    kind = image_kind(await file.read(132), name)
    if kind is None:
        await file.close()
        raise HTTPException(415, f"{name} is not an image: upload a PNG, JPEG or DICOM chest X-ray.")
    async with gate.slot():  # at most `workers` uploads held in memory, decoded and scored at once
        await file.seek(0)
        data = await file.read(max_bytes + 1)
        await file.close()
        if len(data) > max_bytes:
            raise HTTPException(413, too_large(max_bytes))
        start = time.perf_counter()
        try:
            pred = await run_in_threadpool(predict_upload, predictor, data, name, kind, lang, heatmap, image)
        except ImageReadError as exc:
            raise HTTPException(422, f"The image could not be read: {exc}") from None
    if pred.decision == "error":  # e.g. non-finite probabilities: no label, no advice
        raise HTTPException(422, f"The image could not be scored: {pred.error}")
    log.info(
        "%s predicted %s (%d bytes): %s, %s in %.0f ms",
        request.state.request_id,
        kind,
        len(data),
        pred.label,
        pred.decision,
        1000 * (time.perf_counter() - start),
    )
    return pred


@router.get("/api/v1/worklist", response_model=list[WorklistEntry], tags=["dicom"])
async def worklist(store: StoreDep, limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> list[dict[str, Any]]:
    """Images the DICOM node triaged, most urgent first, then oldest first. No patient names."""
    return [] if store is None else await run_in_threadpool(read_worklist, store, limit)


def create_app(
    bundle_dir: Path | None = None,
    max_upload_mb: float = 20,
    limits: ServiceLimits | None = None,
    store: Path | None = None,
    access: Access | None = None,
) -> FastAPI:
    """The FastAPI app over the bundle in ``bundle_dir`` (None: the shipped default), loaded once, now.
    ``limits`` (default: ``ServiceLimits(max_upload_mb=...)``) bounds workers, queue, timeouts and hosts;
    ``store`` is the DICOM node's ``--store`` folder, whose worklist the page shows; ``access`` says who may call
    the API (default: the hashes in CXR_TRIAGE_TOKEN_FILE, else anyone, same-origin)."""
    limits = limits or ServiceLimits(max_upload_mb=max_upload_mb)
    access = access or env_access()
    predictor = Predictor(bundle_dir)
    max_bytes = int(limits.max_upload_mb * 2**20)
    about = "Chest X-ray triage (COVID-19, Lung Opacity, Normal, Viral Pneumonia) with heatmaps and advice. "
    app = FastAPI(
        title="cxr-triage", version=__version__, description=about + NOTICE["en"], docs_url=None, redoc_url=None
    )
    app.state.predictor, app.state.limits, app.state.access = predictor, limits, access
    app.state.max_bytes, app.state.gate, app.state.store = max_bytes, WorkGate(limits), store
    app.add_middleware(UploadLimit, max_upload=max_bytes)
    app.add_middleware(AccessGate, access=access)  # tokens or same origin, before any body is read
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(limits.allowed_hosts))  # DNS rebinding
    app.add_middleware(Guard, limits=limits, headers=access.headers())  # outermost: id, headers, deadlines, log
    install_error_handlers(app)
    app.include_router(router)
    add_page_routes(app, PAGE_HEADERS)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if access.tokens_required:
        document_tokens(app)
    who = f"{len(access.token_hashes)} token(s)" if access.tokens_required else "no token"
    log.info("serving %s %s from %s (API: %s)", predictor.info["name"], predictor.info["version"], predictor.dir, who)
    return app


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(
    host: str = "127.0.0.1",
    port: int = 8000,
    bundle_dir: Path | None = None,
    max_upload_mb: float = 20,
    limits: ServiceLimits | None = None,
    store: Path | None = None,
    token_file: Path | None = None,
    no_auth: bool = False,
    ssl_certfile: Path | None = None,
    ssl_keyfile: Path | None = None,
) -> None:
    """Serve the app with uvicorn (blocks until stopped). Beyond loopback it needs ``token_file`` (or ``no_auth``);
    ``ssl_certfile`` (and ``ssl_keyfile`` unless the key is in it) turn on HTTPS. ValueError for options that do not
    go together or files that cannot be read, before the model is loaded."""
    import uvicorn

    limits = limits or ServiceLimits(max_upload_mb=max_upload_mb)
    tls = tls_options(ssl_certfile, ssl_keyfile)
    access = access_for(is_loopback(host), token_file, no_auth, https=bool(tls))
    if not is_loopback(host):
        log.warning("binding to %s exposes the service to the network; use 127.0.0.1 to keep it local", host)
        if set(limits.allowed_hosts) <= set(LOOPBACK_HOSTS):
            log.warning("only requests addressed to localhost are answered; name this host with --allowed-host")
        if not tls:
            log.warning("without --ssl-certfile, tokens and images cross the network unencrypted")
    app = create_app(bundle_dir, limits=limits, store=store, access=access)
    uvicorn.run(app, host=host, port=port, **uvicorn_options(limits), **tls)
