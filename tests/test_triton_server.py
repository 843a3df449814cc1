"""A real Triton server (the bundled ``tritonserver`` binary, on 127.0.0.1, free ports) over an exported
repository's Python-backend models: ``face_pipeline``, and ``recognizer`` / ``detector`` run by the runtime's
own ONNX backend (the CPU route). Results through Triton equal the in-process pipeline's; concurrent clients
get correct answers; Triton's statistics show the dynamic batcher merging requests; ``triton://`` URLs work
as a runtime backend; a missing model, a missing version and a stopped server give one clear error each.

One server per module (started once, stopped in the fixture's finalizer, also when a test fails).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import cosine, need
from threads import run_threads

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] (the triton extra) is not installed")

from export.triton_repository import ServingOptions, plan_repository, write_repository  # noqa: E402
from export.triton_server import (LocalTritonServer, TritonServerMissing, executed_batches,  # noqa: E402
                                  find_tritonserver)
from runtime.backends.base import ModelLoadError, load_model  # noqa: E402
from runtime.detector import DEFAULT_DETECTOR  # noqa: E402
from runtime.pipeline import DEFAULT_RECOGNIZER, FacePipeline  # noqa: E402
from runtime.ports import free_port  # noqa: E402
from runtime.preprocess import to_model_input  # noqa: E402

#: one-face portraits: every face_pipeline request sends the recognizer batches of exactly one crop
PORTRAITS = ("obama.jpg", "obama2.jpg", "biden.jpg", "paul_rudd.jpg")
MIN_COS = 0.99999
CLIENT_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def photos(facekit_data) -> dict[str, Path]:
    return {name: need(facekit_data / "photos" / name) for name in PORTRAITS}


@pytest.fixture(scope="module")
def server(tmp_path_factory, photos):
    try:
        install = find_tritonserver()
    except TritonServerMissing as e:
        pytest.skip(str(e))
    opts = ServingOptions(max_batch=16, queue_delay_us=5000, instances=1, pipeline_instances=2)
    repo = write_repository(tmp_path_factory.mktemp("triton") / "repo",
                            plan_repository(DEFAULT_RECOGNIZER, DEFAULT_DETECTOR, opts=opts, backend="python"))
    srv = LocalTritonServer(repo, install, startup_timeout=240)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def pipe() -> FacePipeline:
    """The in-process reference on the engine the repository's models run (ONNX Runtime, f32); ``auto``
    would pick OpenVINO bf16 on a CPU with native bf16."""
    return FacePipeline(backend="onnxruntime")


@pytest.fixture(scope="module")
def expected(pipe, photos) -> dict[str, list]:
    """In-process faces of each portrait (flip test on, as in face_pipeline)."""
    out = {name: pipe.embed(str(path)) for name, path in photos.items()}
    assert all(len(faces) == 1 for faces in out.values()), {k: len(v) for k, v in out.items()}
    return out


def _infer_image(client, path: Path) -> dict[str, np.ndarray]:
    data = np.frombuffer(path.read_bytes(), np.uint8)
    inp = grpcclient.InferInput("image", [len(data)], "UINT8")
    inp.set_data_from_numpy(data)
    result = client.infer("face_pipeline", [inp], client_timeout=CLIENT_TIMEOUT_S)
    return {n: result.as_numpy(n) for n in ("boxes", "scores", "landmarks", "embeddings")}


def test_face_pipeline_in_triton_equals_the_in_process_pipeline(server, photos, expected):
    client = grpcclient.InferenceServerClient(server.grpc_address)
    try:
        out = _infer_image(client, photos["obama.jpg"])
        face = expected["obama.jpg"][0]
        assert out["boxes"].shape == (1, 4) and out["embeddings"].shape == (1, 128)
        np.testing.assert_allclose(out["boxes"][0], face.box, atol=1e-3)
        np.testing.assert_allclose(out["landmarks"][0], face.landmarks, atol=1e-3)
        assert abs(float(out["scores"][0]) - face.score) < 1e-5
        assert cosine(out["embeddings"][0], face.embedding) >= MIN_COS
        # a faceless image gives empty outputs, a broken one an error for that request only
        blank = np.full((200, 200, 3), 255, np.uint8)
        import cv2

        png = np.frombuffer(cv2.imencode(".png", blank)[1].tobytes(), np.uint8)
        inp = grpcclient.InferInput("image", [len(png)], "UINT8")
        inp.set_data_from_numpy(png)
        empty = client.infer("face_pipeline", [inp], client_timeout=CLIENT_TIMEOUT_S)
        assert empty.as_numpy("embeddings").shape == (0, 128) and empty.as_numpy("boxes").shape == (0, 4)
        junk = grpcclient.InferInput("image", [16], "UINT8")
        junk.set_data_from_numpy(np.arange(16, dtype=np.uint8))
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException, match="ImageError: "):
            client.infer("face_pipeline", [junk], client_timeout=CLIENT_TIMEOUT_S)
    finally:
        client.close()


def test_concurrent_clients_get_correct_answers_and_requests_are_batched(server, photos, expected, pipe):
    """8 clients at once: face_pipeline answers each correctly; single-crop requests straight to the
    recognizer come back right, and the statistics show executions of batches > 1 (every request was 1)."""
    before = executed_batches(server.grpc_address, "recognizer")
    crops = {name: _crop(pipe, photos[name]) for name in PORTRAITS}
    reference = {n: pipe.recognizer.run(to_model_input(c[None], pipe.spec, "BGR"))[0][0] for n, c in crops.items()}
    failures: list[str] = []

    def client_thread(k: int) -> None:
        client = grpcclient.InferenceServerClient(server.grpc_address)
        backend = load_model(server.url("recognizer"))
        try:
            for i in range(4):
                name = PORTRAITS[(k + i) % len(PORTRAITS)]
                if k % 2 == 0:
                    out = _infer_image(client, photos[name])
                    got, want = out["embeddings"][0], expected[name][0].embedding
                else:
                    got = backend.run(to_model_input(crops[name][None], pipe.spec, "BGR"))[0][0]
                    want = reference[name]
                if cosine(got, want) < MIN_COS:
                    failures.append(f"client {k} request {i} ({name}): cos {cosine(got, want):.6f}")
        except Exception as e:  # reported below: an exception in a thread would otherwise vanish
            failures.append(f"client {k}: {type(e).__name__}: {e}")
        finally:
            client.close()
            backend.close()

    run_threads(client_thread, 8, timeout=300)  # fails when a client hangs
    assert not failures, failures
    after = executed_batches(server.grpc_address, "recognizer")
    formed = {b: after.get(b, 0) - before.get(b, 0) for b in after if after.get(b, 0) > before.get(b, 0)}
    assert max(formed) > 1, f"the dynamic batcher formed no batch > 1: {formed}"
    requests = 4 * 4 + 4 * 4 * 2  # 4 clients × 4 single crops, 4 clients × 4 images × (face + mirror) via BLS
    assert sum(formed.values()) < requests
    assert executed_batches(server.grpc_address, "face_pipeline")


def _bgr(path: Path) -> np.ndarray:
    import cv2

    return cv2.imread(str(path))


def _crop(pipe: FacePipeline, path: Path) -> np.ndarray:
    img = _bgr(path)
    return pipe.spec.warp(img, pipe.detector.detect(img)[0].landmarks)


def test_triton_url_is_a_runtime_backend(server, photos, pipe):
    url = server.url("recognizer")
    remote = FacePipeline(recognizer=url, detector=pipe.detector)  # only the recognizer differs from `pipe`
    assert remote.recognizer.device.startswith("Triton 2.") and "(model recognizer, version 1)" in remote.recognizer.device
    assert f"at {server.grpc_address}" in remote.recognizer.device
    assert remote.recognizer.input_shape == ["batch", 3, 150, 150] and remote.recognizer.max_batch == 16
    assert remote.recognizer.fixed_batch is None and remote.recognizer.output_names == ["embedding"]
    assert remote.metadata == pipe.metadata and remote.threshold == pipe.threshold
    a = remote.compare(photos["obama.jpg"], photos["obama2.jpg"])
    b = pipe.compare(photos["obama.jpg"], photos["obama2.jpg"])
    assert a.same == b.same and abs(a.similarity - b.similarity) <= 1e-5
    c = remote.compare(photos["obama.jpg"], photos["biden.jpg"])
    assert c.same is False and abs(c.similarity - pipe.compare(photos["obama.jpg"], photos["biden.jpg"]).similarity) <= 1e-5
    # 20 crops with a max_batch_size of 16: the backend splits them (16 + 4), Triton answers each piece
    crops = np.stack([_crop(pipe, photos[n]) for n in PORTRAITS] * 5)
    np.testing.assert_allclose(remote.embed_aligned(crops), pipe.embed_aligned(crops), atol=1e-5)


def test_detector_served_by_triton_too(server, photos, expected):
    remote = FacePipeline(recognizer=server.url("recognizer"), detector=server.url("detector"))
    faces = remote.embed(str(photos["obama2.jpg"]))
    want = expected["obama2.jpg"][0]
    assert len(faces) == 1 and np.allclose(faces[0].box, want.box, atol=1e-3)
    assert cosine(faces[0].embedding, want.embedding) >= MIN_COS


def test_missing_model_and_version_give_one_clear_error(server):
    with pytest.raises(ModelLoadError, match=r"triton://.*/nosuch: the server at .* has no model 'nosuch' \(it has "):
        load_model(server.url("nosuch"))
    with pytest.raises(ModelLoadError, match=r"recognizer/7: model 'recognizer' is not ready \(version 7; version 1: READY"):
        load_model(server.url("recognizer") + "/7")
    with pytest.raises(ModelLoadError, match="expected triton://HOST:PORT/MODEL"):
        load_model("triton://127.0.0.1/recognizer")
    with pytest.raises(ModelLoadError, match="cannot load this kind of file"):
        load_model(server.url("recognizer"), backend="onnxruntime")


def test_stopped_server_gives_one_clear_error(server, photos):
    """Runs last: it stops the module's server."""
    remote = FacePipeline(recognizer=server.url("recognizer"))
    url = server.url("recognizer")
    server.stop()
    with pytest.raises(RuntimeError, match=f"{url}: inference failed"):
        remote.compare(photos["obama.jpg"], photos["obama2.jpg"])
    with pytest.raises(ModelLoadError, match=f"^{url}: no Triton server answers at {server.grpc_address} "):
        FacePipeline(recognizer=url)
    nobody = f"triton://127.0.0.1:{free_port()}/recognizer"
    with pytest.raises(ModelLoadError, match="no Triton server answers"):
        load_model(nobody)
