"""The HTTP routes: ``/v1`` detection, embedding, comparison and galleries; health, readiness, metrics.

Every answer equals what the in-process :class:`~runtime.pipeline.FacePipeline` and
:class:`~runtime.gallery.Gallery` give for the same image: the routes call the same public pipeline
steps (``detect``, ``find_subject``, ``align``) and only the recognizer call is shared with other
requests (:mod:`.batcher`; a lone request is embedded in its own worker thread). Decoding and detection run in a pool of ``workers`` threads; gallery writes in
their own threads, outside the request's time budget once started (an acknowledged write is durable, a
started one is finished).
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, Query, Request
from starlette.responses import Response

from .. import __version__
from ..image_io import LoadedImage, load_image_scaled
from ..pipeline import Face, NoFaceError
from .batcher import MicroBatcher, QueueFull
from .config import ServeConfig
from .errors import ApiError, install_error_handlers
from .galleries import GalleryStore, check_gallery_name, check_person_name
from .limits import deadline, within_budget
from .metrics import ServeMetrics
from .uploads import Upload, image_pair, one_image, read_images

IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "string", "format": "binary", "description": "one file part per image"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
PAIR_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["a", "b"], "properties": {
        "a": {"type": "string", "format": "binary"}, "b": {"type": "string", "format": "binary"}}}}}}}


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False).encode("utf-8"), status_code=status,
                    media_type="application/json")


class Service:
    """The state the routes share: pipeline, gallery store, micro-batcher, thread pools and metrics."""

    def __init__(self, config: ServeConfig, pipeline, store: GalleryStore, metrics: ServeMetrics):
        self.config, self.pipeline, self.store, self.metrics = config, pipeline, store, metrics
        self.executor = ThreadPoolExecutor(config.workers, thread_name_prefix="facekit-detect")
        self.writer = ThreadPoolExecutor(2, thread_name_prefix="facekit-gallery")
        self.detecting = 0  # requests queued for or in the worker pool: faces that may join the next batch
        self.batcher = MicroBatcher(lambda crops: pipeline.embed_aligned(crops, color_order="BGR"),
                                    max_batch=config.max_batch, max_wait_s=config.batch_wait_ms / 1e3,
                                    max_queue=config.max_queue, on_batch=metrics.observe_batch,
                                    on_depth=metrics.queue_depth.set, more_coming=lambda: self.detecting > 0)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.batcher.close()
        self.writer.shutdown(wait=True)

    async def run(self, request: Request, fn: Callable, *args, feeds_batcher: bool = True) -> Any:
        """``fn(*args)`` in the worker pool, within the request's time budget (not started once it is spent);
        ``feeds_batcher``: its faces go to the recognizer next (so the batcher may wait for them)."""
        due = deadline(request.scope)

        def job():
            if time.monotonic() > due:
                raise TimeoutError("the request's time budget ran out before it was processed")
            return fn(*args)

        self.detecting += feeds_batcher  # on the event loop thread only
        try:
            return await within_budget(request.scope, asyncio.get_running_loop().run_in_executor(self.executor, job))
        finally:
            self.detecting -= feeds_batcher

    async def embed(self, request: Request, crops: np.ndarray, done: np.ndarray | None = None) -> np.ndarray:
        """Embeddings of aligned ``crops`` through the micro-batcher (``done``: already computed inline)."""
        if done is not None:
            return done
        try:
            fut = self.batcher.submit(crops, deadline(request.scope))
        except QueueFull as e:
            raise ApiError(503, str(e), "overloaded", {"Retry-After": "1"}) from None
        return await within_budget(request.scope, asyncio.wrap_future(fut))

    async def write(self, fn: Callable, *args) -> Any:
        """A gallery change, run to its end once started (durability over the time budget)."""
        return await asyncio.get_running_loop().run_in_executor(self.writer, fn, *args)

    # -------------------------------------------------------------------------- pipeline steps

    def decode(self, upload: Upload) -> LoadedImage:
        """The upload decoded as the pipeline decodes bytes (large JPEGs reduced; coordinates stay the file's)."""
        return load_image_scaled(upload.data, name=upload.label, max_pixels=self.config.max_pixels)

    def inline(self, crops: np.ndarray | None) -> np.ndarray | None:
        """The embeddings of ``crops`` computed here when no other request could share the recognizer call
        (the batcher is idle and no other request is being detected), else None (they go to the batcher)."""
        if crops is None or self.detecting > 1 or not self.batcher.idle():
            return None
        return self.batcher.run_inline(crops)

    def faces_and_crops(self, upload: Upload) -> tuple[list[Face], np.ndarray | None, np.ndarray | None]:
        """Every face of the image (``FacePipeline.detect``), their aligned crops, and their embeddings when
        computed inline (:meth:`inline`)."""
        img = self.decode(upload)
        faces = self.pipeline.detect(img)
        crops = np.stack([self.pipeline.align(img, f.landmarks) for f in faces]) if faces else None
        return faces, crops, self.inline(crops)

    def subject_and_crop(self, upload: Upload, required: bool, alone: bool = False) -> tuple[Face | None, Any]:
        """The subject face (``FacePipeline.find_subject``) and its crop, or (``alone``: the request's only
        image) its embedding when computed inline; :class:`NoFaceError` if ``required`` and there is none."""
        img = self.decode(upload)
        found = self.pipeline.find_subject(img)
        if found.face is None:
            if required:
                raise NoFaceError(f"{upload.label}: no face found")
            return None, None
        crop = self.pipeline.align(img, found.face.landmarks)[None]
        emb = self.inline(crop) if alone else None
        if emb is not None:
            found.face.embedding = emb[0]
        return found.face, crop

    async def subjects(self, request: Request, uploads: list[Upload], required: bool) -> list[Face | None]:
        """The embedded subject face of each upload (None where there is none and not ``required``)."""
        alone = len(uploads) == 1
        found = await asyncio.gather(*(self.run(request, self.subject_and_crop, u, required, alone)
                                       for u in uploads), return_exceptions=True)
        for item in found:  # the first image's error, whichever thread failed first
            if isinstance(item, BaseException):
                raise item
        waiting = [(face, crop) for face, crop in found if face is not None and face.embedding is None]
        if waiting:
            emb = await self.embed(request, np.concatenate([crop for _, crop in waiting]))
            for (face, _), e in zip(waiting, emb):
                face.embedding = e
        return [face for face, _ in found]


def create_app(service: Service, on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI application over ``service``; its lifespan calls ``on_ready()`` once started and closes
    the service at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if on_ready is not None:
            on_ready()
        yield
        service.close()

    assets = _swagger_assets()
    app = FastAPI(title="facekit", version=__version__, lifespan=lifespan, docs_url=None if assets else "/docs",
                  description="Face detection, embedding, comparison and galleries over HTTP. Errors are "
                              '`{"error": {"code", "message"}}`.')
    if assets:
        _offline_docs(app, assets)
    install_error_handlers(app)
    _health_routes(app, service)
    _face_routes(app, service)
    _gallery_routes(app, service)
    return app


def _swagger_assets() -> str | None:
    """The folder of Swagger UI's files from the ``swagger-ui-bundle`` package (the ``serve`` extra), so
    ``/docs`` works offline; None without it (then FastAPI's page loads them from a CDN)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    return str(swagger_ui_path)


def _offline_docs(app: FastAPI, assets: str) -> None:
    """``/docs``: Swagger UI served from this server's own copy of its files."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount("/docs/assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="facekit API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css", swagger_favicon_url="")


def _health_routes(app: FastAPI, s: Service) -> None:
    @app.get("/healthz", tags=["health"], summary="The process is alive")
    async def healthz():
        return json_response({"status": "ok"})

    @app.get("/readyz", tags=["health"], summary="Models loaded and galleries readable")
    async def readyz():
        problems = []
        providers = s.pipeline.providers
        if "recognizer" not in providers:
            problems.append("the recognizer is not loaded")
        if not os.access(s.store.folder, os.R_OK | os.W_OK | os.X_OK):
            problems.append(f"the galleries folder {s.store.folder} is not readable and writable")
        problems += [f"gallery {n!r} is unreadable: {why}" for n, why in s.store.broken.items()]
        if problems:
            raise ApiError(503, "; ".join(problems), "not_ready")
        return json_response({"ready": True, "models": providers, "galleries": len(s.store.names)})

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics")
    async def metrics():
        s.metrics.queue_depth.set(s.batcher.depth)
        return Response(s.metrics.render(), media_type=s.metrics.content_type)


async def _uploads(request: Request, max_images: int) -> list[Upload]:
    """The images of ``request`` (at most ``max_images``), read within the request's time budget."""
    return await within_budget(request.scope, read_images(request, max_images))


def _face_routes(app: FastAPI, s: Service) -> None:
    @app.post("/v1/detect", tags=["faces"], openapi_extra=IMAGE_BODY,
              summary="Faces of one image: box, score, 5 landmarks")
    async def detect(request: Request):
        upload = one_image(await _uploads(request, 1))
        faces = await s.run(request, lambda: s.pipeline.detect(s.decode(upload)), feeds_batcher=False)
        return json_response({"faces": [f.to_dict() for f in faces]})

    @app.post("/v1/embed", tags=["faces"], openapi_extra=IMAGE_BODY,
              summary="Faces of one image with their L2-normalised embeddings")
    async def embed(request: Request):
        upload = one_image(await _uploads(request, 1))
        faces, crops, done = await s.run(request, s.faces_and_crops, upload)
        if faces:
            for f, e in zip(faces, await s.embed(request, crops, done)):
                f.embedding = e
        return json_response({"faces": [f.to_dict(with_embedding=True) for f in faces]})

    @app.post("/v1/compare", tags=["faces"], openapi_extra=PAIR_BODY,
              summary="Similarity of the subject faces of two images, and the verdict")
    async def compare(request: Request):
        a, b = image_pair(await _uploads(request, 2))
        fa, fb = await s.subjects(request, [a, b], required=True)
        sim = float(np.dot(fa.embedding, fb.embedding))
        thr = s.pipeline.threshold
        return json_response({"similarity": sim, "same": None if thr is None else bool(sim >= thr),
                              "threshold": thr, "faces": {"a": fa.to_dict(), "b": fb.to_dict()}})


def _gallery_routes(app: FastAPI, s: Service) -> None:
    @app.get("/v1/galleries", tags=["galleries"], summary="Every gallery with its size")
    async def galleries():
        out = []
        for name in s.store.names:
            g = s.store.get(name)
            out.append({"name": name, "people": len(g), "embeddings": g.num_embeddings})
        return json_response({"galleries": out, "unreadable": s.store.broken})

    @app.get("/v1/galleries/{gallery}", tags=["galleries"], summary="People, embeddings and threshold")
    async def gallery(gallery: str):
        g = s.store.get(gallery)
        return json_response({"name": gallery, "people": g.names, "embeddings": g.num_embeddings, "dim": g.dim,
                              "threshold": s.store.threshold(g)})

    @app.get("/v1/galleries/{gallery}/people/{name}", tags=["galleries"], summary="One enrolled person")
    async def person(gallery: str, name: str):
        g = s.store.get(gallery)
        check_person_name(name)
        if name not in g:
            raise ApiError(404, f"{name!r} is not enrolled in gallery {gallery!r}", "person_not_found")
        return json_response({"gallery": gallery, "name": name, "embeddings": len(g.embeddings(name))})

    @app.put("/v1/galleries/{gallery}/people/{name}", tags=["galleries"], openapi_extra=IMAGE_BODY,
             summary="Enrol images of a person (answered once the gallery is on disk)")
    async def enroll(request: Request, gallery: str, name: str,
                     replace: bool = Query(False, description="replace the person's embeddings instead of adding")):
        check_gallery_name(gallery)
        check_person_name(name)
        uploads = await _uploads(request, s.config.max_images)
        faces = await s.subjects(request, uploads, required=True)
        vectors = np.stack([f.embedding for f in faces])
        return json_response(await s.write(s.store.enroll, gallery, name, vectors, replace))

    @app.delete("/v1/galleries/{gallery}/people/{name}", tags=["galleries"],
                summary="Forget a person (answered once the gallery is on disk)")
    async def remove(gallery: str, name: str):
        check_gallery_name(gallery)
        return json_response(await s.write(s.store.remove, gallery, name))

    @app.post("/v1/galleries/{gallery}/identify", tags=["galleries"], openapi_extra=IMAGE_BODY,
              summary="Who the subject face of an image is: top_k matches, unknown below the threshold")
    async def identify(request: Request, gallery: str,
                       top_k: int = Query(1, ge=1, le=s.config.max_top_k, description="matches to return")):
        g = s.store.get(gallery)
        upload = one_image(await _uploads(request, 1))
        (face,) = await s.subjects(request, [upload], required=False)
        if face is None:
            return json_response({"matches": [], "face": None, "threshold": s.store.threshold(g)})
        matches = g.identify(face.embedding, top_k=top_k, pipeline=s.pipeline)
        return json_response({"matches": [{"name": n, "similarity": sim} for n, sim in matches],
                              "face": face.to_dict(), "threshold": s.store.threshold(g)})
