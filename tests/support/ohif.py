"""OHIF v3 over a real Orthanc, behind one origin, for browser tests.

- :func:`orthanc_dicomweb_config`: the extra Orthanc configuration that loads the Debian
  ``orthanc-dicomweb`` (root ``/dicom-web/``), ``orthanc-gdcm`` (JPEG 2000 decoding) and
  ``orthanc-webviewer`` (the Orthanc Web Viewer, ``/web-viewer/``) plugins.
- :func:`ohif_app`: a Starlette app that serves OHIF's prebuilt ``dist/`` (``make ohif`` unpacks the npm
  package ``@ohif/app`` into ``.cache/ohif-VERSION``; unknown paths get ``index.html``, the viewer routes
  are client-side), answers ``/app-config.js`` with a configuration whose only data source is the
  DICOMweb root of this same origin, and forwards ``/dicom-web/...`` to Orthanc (Orthanc 1.10 sends no
  CORS headers, so viewer and DICOMweb must share an origin).
- :class:`ServedApp`: any ASGI app served by uvicorn in a thread on 127.0.0.1 (free port), started and
  stopped with bounded waits.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from support.common import free_port

REPO = Path(__file__).resolve().parents[2]
OHIF_VERSION = "3.13.2"
OHIF_DIST = REPO / ".cache" / f"ohif-{OHIF_VERSION}" / "dist"
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")
DICOMWEB_PLUGIN = ORTHANC_PLUGINS / "libOrthancDicomWeb.so"
GDCM_PLUGIN = ORTHANC_PLUGINS / "libOrthancGdcm.so"
WEBVIEWER_PLUGIN = ORTHANC_PLUGINS / "libOrthancWebViewer.so"
START_TIMEOUT_S = 20.0

__all__ = [
    "DICOMWEB_PLUGIN",
    "WEBVIEWER_PLUGIN",
    "OHIF_DIST",
    "OHIF_VERSION",
    "ServedApp",
    "app_config_js",
    "ohif_app",
    "ohif_unavailable",
    "orthanc_dicomweb_config",
]


def ohif_unavailable() -> str | None:
    """Why OHIF over Orthanc DICOMweb cannot run here, or None when it can."""
    if not (OHIF_DIST / "index.html").is_file():
        return f"{OHIF_DIST} not found (make ohif: npm pack @ohif/app@{OHIF_VERSION})"
    if not DICOMWEB_PLUGIN.is_file():
        return f"{DICOMWEB_PLUGIN} not found (Debian package orthanc-dicomweb)"
    try:
        import httpx  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install -e '.[test]')"
    return None


def orthanc_dicomweb_config() -> dict[str, Any]:
    """Extra Orthanc configuration: the DICOMweb plugin at /dicom-web/, and the GDCM and Web Viewer
    (/web-viewer/) plugins when installed (Debian ``orthanc-gdcm``, ``orthanc-webviewer``)."""
    plugins = [str(DICOMWEB_PLUGIN)] + [str(p) for p in (GDCM_PLUGIN, WEBVIEWER_PLUGIN) if p.is_file()]
    return {"Plugins": plugins, "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full"}}


def app_config_js() -> str:
    """OHIF's ``window.config``: one DICOMweb data source on this origin's ``/dicom-web``, no study list
    tricks, no service worker, no telemetry or remote resources."""
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "defaultDataSourceName": "orthanc",
        "investigationalUseDialog": {"option": "never"},
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "orthanc",
                "configuration": {
                    "friendlyName": "Orthanc (pacs-ai test)",
                    "name": "orthanc",
                    "wadoUriRoot": "/dicom-web",
                    "qidoRoot": "/dicom-web",
                    "wadoRoot": "/dicom-web",
                    "qidoSupportsIncludeField": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "dicomUploadEnabled": False,
                    "bulkDataURI": {"enabled": True},
                    "omitQuotationForMultipartRequest": True,
                },
            }
        ],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


def ohif_app(orthanc_url: str, dist: Path = OHIF_DIST) -> Any:
    """The one-origin Starlette app: OHIF's dist/, its app-config.js, and /dicom-web/ forwarded to Orthanc."""
    import httpx
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    class SinglePageApp(StaticFiles):
        """Static files; a path that is no file gets index.html (OHIF's routes are client-side)."""

        async def get_response(self, path: str, scope: Any) -> Response:
            try:
                return await super().get_response(path, scope)
            except HTTPException as exc:
                if exc.status_code != 404:
                    raise
                return await super().get_response("index.html", scope)

    client = httpx.AsyncClient(base_url=orthanc_url.rstrip("/"), timeout=60.0)
    forwarded_headers = ("accept", "content-type", "range")

    async def dicomweb(request: Request) -> Response:
        url = "/dicom-web/" + request.path_params["path"]
        headers = {k: v for k, v in request.headers.items() if k.lower() in forwarded_headers}
        upstream = await client.request(
            request.method, url, params=request.query_params, headers=headers, content=await request.body()
        )
        keep = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "content-range")}
        return Response(upstream.content, status_code=upstream.status_code, headers=keep)

    async def config(_: Request) -> Response:
        return Response(app_config_js(), media_type="application/javascript")

    async def no_service_worker(_: Request) -> Response:
        return Response("/* no service worker in tests */\n", media_type="application/javascript")

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        await client.aclose()

    return Starlette(
        routes=[
            Route("/app-config.js", config),
            Route("/init-service-worker.js", no_service_worker),
            Route("/dicom-web/{path:path}", dicomweb, methods=["GET", "POST", "HEAD"]),
            Mount("/", SinglePageApp(directory=str(dist), html=True)),
        ],
        lifespan=lifespan,
    )


class ServedApp:
    """An ASGI app served by uvicorn in a daemon thread on 127.0.0.1 (context manager)."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        import uvicorn

        self.port = port or free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        )
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServedApp:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{self.port}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(START_TIMEOUT_S)
