"""``python -m runtime index --ray`` on a real local Ray cluster (2 CPUs) gives the in-process indexer's
gallery and manifest."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.cli import main
from runtime.gallery import Gallery

ray = pytest.importorskip("ray", reason="the Ray indexer needs the 'ray' extra (ray[data])")
pytest.importorskip("ray.data", reason="the Ray indexer needs Ray Data (ray[data])")

from test_indexer import SHARD, assert_same_gallery, reference, tree  # noqa: E402,F401 - shared fixtures


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray cluster for the module, shut down also when a test fails."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own settings warn about themselves
def test_ray_indexer_gives_the_in_process_gallery(local_ray, tree, reference, tmp_path, capsys):
    out = tmp_path / "g.npz"
    rc = main(["index", str(tree), "--out", str(out), "--shard-size", str(SHARD), "--ray", "local", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out.splitlines()[-1])
    _, expected, manifest = reference
    assert summary["computed_shards"] == -(-len(manifest) // SHARD)
    assert_same_gallery(Gallery.load(out), expected)
    assert Path(summary["manifest"]).read_text().splitlines() == manifest
    assert local_ray.is_initialized()  # a session the indexer did not start is left running
