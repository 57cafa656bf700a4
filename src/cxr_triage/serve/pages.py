"""What the service serves besides the API: the page, its favicon, the bundled samples and offline API docs.

The page gets its result strings (class and decision names in every language) from ``runtime.i18n`` and its
file picker's formats from ``core.preprocess.IMAGE_SUFFIXES``, filled in here, so it cannot drift from the CLI.
``/docs`` is Swagger UI from the ``fastapi-offline`` package's copy (no CDN), started by ``static/docs.js``.
"""

from __future__ import annotations

import html
import importlib.util
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from cxr_triage.core.preprocess import IMAGE_SUFFIXES
from cxr_triage.runtime.advice import NOTICE
from cxr_triage.runtime.i18n import page_strings
from cxr_triage.runtime.prediction import ClassId
from cxr_triage.serve.samples import Sample, list_samples

STATIC_DIR = Path(str(resources.files("cxr_triage.serve") / "static"))
DOCS_ASSETS = "/docs-assets"
ACCEPT_MIME = ("image/png", "image/jpeg", "image/bmp", "image/tiff", "image/webp", "application/dicom")


class SampleInfo(BaseModel):
    """A bundled example X-ray the page offers to click."""

    name: str
    label: ClassId
    url: str


def accept_attribute() -> str:
    """The file picker's ``accept``: every suffix the decoder reads, and their MIME types."""
    return ",".join([*sorted(IMAGE_SUFFIXES), *ACCEPT_MIME])


def page_html() -> str:
    """index.html with the notice (``advice.NOTICE``), the result strings (``i18n``) and the picker's formats."""
    text = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    for lang, notice in NOTICE.items():
        text = text.replace(f"{{{{notice_{lang}}}}}", html.escape(notice))
    strings = json.dumps(page_strings(), ensure_ascii=False).replace("<", "\\u003c")
    return text.replace("{{strings}}", strings).replace("{{accept}}", html.escape(accept_attribute()))


def swagger_assets() -> Path | None:
    """The folder holding swagger-ui-bundle.js and swagger-ui.css (package ``fastapi-offline``), if installed."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def docs_html(assets_found: bool) -> str:
    """The Swagger UI page, or a sentence saying what to install for it."""
    if not assets_found:
        return (
            "<!doctype html><title>cxr-triage API</title><p>The API documentation page needs the Swagger UI files "
            "of the <code>fastapi-offline</code> package: <code>pip install 'cxr-triage[serve]'</code>. "
            'The schema itself is at <a href="/openapi.json">/openapi.json</a>.</p>'
        )
    return (STATIC_DIR / "docs.html").read_text(encoding="utf-8").replace("{{assets}}", DOCS_ASSETS)


@dataclass(frozen=True)
class Pages:
    """What the page routes serve, read once when the app is created."""

    page: str
    headers: dict[str, str]
    samples: dict[str, Sample]
    docs: str


async def pages_of(request: Request) -> Pages:
    """The app's pages (set by ``add_page_routes``)."""
    return request.app.state.pages


PagesDep = Annotated[Pages, Depends(pages_of)]

router = APIRouter()  # ``/``, ``/favicon.ico``, ``/docs``, ``/api/v1/samples``, ``/samples/<name>``


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index(pages: PagesDep) -> HTMLResponse:
    return HTMLResponse(pages.page, headers=pages.headers)


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> FileResponse:
    return FileResponse(STATIC_DIR / "favicon.ico", media_type="image/x-icon")


@router.get("/docs", response_class=HTMLResponse, include_in_schema=False)
async def api_docs(pages: PagesDep) -> HTMLResponse:
    return HTMLResponse(pages.docs, headers={"Cache-Control": "no-cache"})


@router.get("/api/v1/samples", response_model=list[SampleInfo], tags=["service"])
async def sample_list(pages: PagesDep) -> list[SampleInfo]:
    """The example chest X-rays shipped with the package (from the public dataset's test split)."""
    return [SampleInfo(name=s.name, label=s.label, url=f"/samples/{s.name}") for s in pages.samples.values()]


@router.get("/samples/{name}", include_in_schema=False)
async def sample_file(name: str, pages: PagesDep) -> FileResponse:
    if name not in pages.samples:
        raise HTTPException(404, f"No sample named {name!r}; GET /api/v1/samples lists them.")
    return FileResponse(pages.samples[name].path)


def add_page_routes(app: FastAPI, headers: dict[str, str]) -> None:
    """``/``, ``/favicon.ico``, ``/api/v1/samples``, ``/samples/<name>`` and ``/docs`` (with its assets)."""
    assets = swagger_assets()
    app.state.pages = Pages(page_html(), headers, {s.name: s for s in list_samples()}, docs_html(assets is not None))
    if assets is not None:
        app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="docs-assets")
    app.include_router(router)
