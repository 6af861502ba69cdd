"""``/docs``: Swagger UI served by the daemon itself, never from a CDN.

An edge box often has no route to the internet, and FastAPI's default page
loads Swagger UI's script and stylesheet from a CDN, so it stayed blank there.
The assets come from the ``swagger-ui-bundle-v2`` package (Swagger UI's own
distribution files, Apache-2.0, its licence in the package's metadata), pinned in
pyproject.toml. Not the older ``swagger-ui-bundle``: it ships Swagger UI 4, which
cannot render the OpenAPI 3.1 document FastAPI writes.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

DOCS = "/docs"
ASSETS = "/docs/assets"


def install(app: FastAPI) -> None:
    """Serve ``/docs`` and its assets (the app must be made with ``docs_url=None``)."""
    app.mount(ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui")

    @app.get(DOCS, include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        )
