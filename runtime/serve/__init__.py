"""facekit as a web service: ``python -m runtime serve --galleries DIR`` (FastAPI on uvicorn).

Modules: :mod:`.config` (options and limits, the command line; imports no web framework),
:mod:`.server` (start-up and graceful shutdown), :mod:`.app` (the routes), :mod:`.batcher` (micro-batching
of aligned crops across requests), :mod:`.galleries` (gallery store and folder lock), :mod:`.limits`
(upload size, API key, concurrency, time budget), :mod:`.uploads` (images out of requests),
:mod:`.errors` (JSON errors), :mod:`.metrics` (Prometheus), :mod:`.ready` (the ready line, and waiting
for it).

Nothing here is imported by ``import runtime``; the web framework loads only when a server starts
(``pip install 'facekit[serve]'``).
"""
