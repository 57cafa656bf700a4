"""Way in: the web page and JSON API (FastAPI + uvicorn, ``cxr-triage serve``): the app and its routers, its limits,
who may call it, the page, the bundled samples and ``static/``. Importing this package loads no web framework."""
