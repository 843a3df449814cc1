"""Dataset loaders: insightface .bin (data-only unpickling), CFP protocol and LFW pairs.txt parsing."""
from __future__ import annotations

import collections
import os
import pickle

import cv2
import numpy as np
import pytest

from evaluation.bin_format import load_bin_pickle
from evaluation.crops import aligned_crops
from evaluation.pairs import BinFormatError, DatasetError, lfw_images, load_bin, load_cfp, load_lfw
from conftest import need


def jpeg(seed: int, size: int = 112) -> tuple[bytes, np.ndarray]:
    img = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes(), cv2.imdecode(buf, cv2.IMREAD_COLOR)


def test_small_lfw_bin(facekit_data):
    path = need(facekit_data / "photos" / "small_lfw.bin")
    bins, flags = load_bin_pickle(path)
    assert len(bins) == 20 and len(flags) == 10
    assert all(isinstance(b, bytes) and b[:2] == b"\xff\xd8" for b in bins)  # JPEG
    ps = load_bin(path)
    assert len(ps) == 10 and ps.aligned
    assert ps.pairs[:3].tolist() == [[0, 1], [2, 3], [4, 5]]
    crops = aligned_crops(ps, progress=False)
    assert crops.crops.shape == (20, 112, 112, 3) and crops.crops.dtype == np.uint8
    assert crops.crops.std() > 10  # real pictures, not blank
    assert crops.counts() == {"prealigned": 20}


def test_prealigned_crops_are_rewarped_for_another_framing(tmp_path):
    """A .bin of 112×112 ArcFace crops benchmarked with a model framed like dlib's 150×150 chip: each crop's
    template points land where the similarity fit onto the model's template puts them (bright dots drawn
    there move with it), within a few pixels of dlib's points."""
    from runtime.geometry import ARCFACE_TEMPLATE_112, DLIB_CHIP_TEMPLATE_150, alignment_matrix, transform_points
    from runtime.preprocess import DLIB_CHIP_SPEC

    img = np.zeros((112, 112, 3), np.uint8)
    for x, y in ARCFACE_TEMPLATE_112:
        cv2.circle(img, (int(round(x)), int(round(y))), 2, (255, 255, 255), -1)
    ok, buf = cv2.imencode(".png", img)
    path = tmp_path / "dots.bin"
    path.write_bytes(pickle.dumps(([buf.tobytes()] * 2, [True])))
    crops = aligned_crops(load_bin(path), progress=False, spec=DLIB_CHIP_SPEC).crops
    assert crops.shape == (2, 150, 150, 3)
    moved = transform_points(ARCFACE_TEMPLATE_112, alignment_matrix(ARCFACE_TEMPLATE_112, (150, 150),
                                                                    DLIB_CHIP_TEMPLATE_150))
    assert np.abs(moved - DLIB_CHIP_TEMPLATE_150).max() < 6
    for x, y in moved:
        assert crops[0, int(round(y)), int(round(x))].min() > 100, (x, y)
    assert crops[0].max(axis=2).sum() < 0.05 * 255 * 150 * 150  # and little else is bright


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_generated_agedb_style_bin(tmp_path, protocol):
    """AgeDB-30 / CFP-FP .bin files are the same format: pickle of (list of JPEG bytes, list of bools)."""
    images = [jpeg(i) for i in range(8)]
    flags = [True, False, True, False]
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(pickle.dumps(([b for b, _ in images], flags), protocol=protocol))
    ps = load_bin(path)
    assert ps.name == "agedb_30" and ps.issame.tolist() == flags
    crops = aligned_crops(ps, progress=False)
    for k, (_, decoded) in enumerate(images):
        assert np.array_equal(crops.crops[k], decoded)


def test_numpy_uint8_buffers_are_read_without_numpy(tmp_path):
    """insightface writes its images as N×1 uint8 arrays; they come back as bytes, rebuilt by stand-ins."""
    raw, decoded = jpeg(11)
    arrays = [np.frombuffer(raw, np.uint8).reshape(-1, 1), np.frombuffer(raw, np.uint8)]
    path = tmp_path / "np.bin"
    path.write_bytes(pickle.dumps((arrays, [True]), protocol=2))
    bins, flags = load_bin_pickle(path)
    assert bins == [raw, raw] and flags == [True]


class _RunsCode:
    """Pickles to a call of ``os.mkdir(marker)``: loading it must not create the folder."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("payload_name", ["os.mkdir via __reduce__", "float numpy array", "object numpy array",
                                          "2-D uint8 array", "OrderedDict", "numpy int flag"])
def test_bin_naming_other_objects_is_refused(tmp_path, payload_name):
    marker = tmp_path / "pwned"
    raw, _ = jpeg(0)
    payload = {
        "os.mkdir via __reduce__": ([raw, _RunsCode(marker)], [True]),
        "float numpy array": ([np.zeros(8, np.float32), raw], [True]),
        "object numpy array": ([np.array([raw], dtype=object), raw], [True]),
        "2-D uint8 array": ([np.zeros((4, 4), np.uint8), raw], [True]),
        "OrderedDict": (collections.OrderedDict(a=raw), [True]),
        "numpy int flag": ([raw, raw], [np.int64(1)]),
    }[payload_name]
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(BinFormatError, match="refused") as err:
        load_bin(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_bin_structure_errors(tmp_path):
    raw, _ = jpeg(1)
    cases = {
        "truncated": pickle.dumps(([raw, raw], [True]))[:-40],
        "odd count": pickle.dumps(([raw, raw, raw], [True])),
        "not a pair": pickle.dumps([raw, raw]),
        "int flags": pickle.dumps(([raw, raw], [1])),
        "text": b"hello, this is not a pickle",
    }
    for name, data in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.bin"
        path.write_bytes(data)
        with pytest.raises(BinFormatError):
            load_bin(path)
    with pytest.raises(DatasetError, match="not found"):
        load_bin(tmp_path / "missing.bin")


def make_cfp_tree(root, n_ids=3, frontal=4, profile=2, splits=2):
    """A tiny CFP release: Data/Images/<id>/{frontal,profile}/NN.jpg, Protocol pair lists and Split files."""
    f_lines, p_lines = [], []
    for i in range(1, n_ids + 1):
        for kind, count, lines in (("frontal", frontal, f_lines), ("profile", profile, p_lines)):
            d = root / "Data" / "Images" / f"{i:03d}" / kind
            d.mkdir(parents=True, exist_ok=True)
            for j in range(1, count + 1):
                (d / f"{j:02d}.jpg").write_bytes(jpeg(i * 100 + j, 24)[0])
                lines.append(f"{len(lines) + 1} ../Data/Images/{i:03d}/{kind}/{j:02d}.jpg")
    (root / "Protocol").mkdir(parents=True, exist_ok=True)
    (root / "Protocol" / "Pair_list_F.txt").write_text("\n".join(f_lines) + "\n")
    (root / "Protocol" / "Pair_list_P.txt").write_text("\n".join(p_lines) + "\n")
    pairs = {"FP": {"same": ["1,1", "5,3"], "diff": ["1,3", "6,1"]},
             "FF": {"same": ["1,2", "9,10"], "diff": ["2,5", "12,1"]}}
    for proto, kinds in pairs.items():
        for s in range(1, splits + 1):
            d = root / "Protocol" / "Split" / proto / f"{s:02d}"
            d.mkdir(parents=True)
            for kind, lines in kinds.items():
                (d / f"{kind}.txt").write_text("\n".join(lines) + "\n")


def test_cfp_protocol_parsing(tmp_path):
    make_cfp_tree(tmp_path)
    fp = load_cfp(tmp_path, "FP")
    assert fp.name == "cfp-fp" and len(fp) == 8 and fp.notes["fold_sizes"] == [4, 4]
    assert fp.issame.tolist() == [True, True, False, False] * 2  # per split: same, then diff
    first = [(str(fp.images[a].relative_to(tmp_path)), str(fp.images[b].relative_to(tmp_path))) for a, b in fp.pairs[:4]]
    assert first == [("Data/Images/001/frontal/01.jpg", "Data/Images/001/profile/01.jpg"),
                     ("Data/Images/002/frontal/01.jpg", "Data/Images/002/profile/01.jpg"),
                     ("Data/Images/001/frontal/01.jpg", "Data/Images/002/profile/01.jpg"),
                     ("Data/Images/002/frontal/02.jpg", "Data/Images/001/profile/01.jpg")]
    assert [fp.identities[a] == fp.identities[b] for a, b in fp.pairs[:4]] == [True, True, False, False]
    ff = load_cfp(tmp_path, "FF")
    a, b = ff.pairs[1]
    assert (ff.images[a].name, ff.images[b].name) == ("01.jpg", "02.jpg") and ff.identities[a] == ff.identities[b] == "003"
    assert all("frontal" in str(p) for p in ff.images)


def test_cfp_errors(tmp_path):
    make_cfp_tree(tmp_path)
    (tmp_path / "Protocol" / "Split" / "FP" / "02" / "same.txt").write_text("1,99\n")
    with pytest.raises(DatasetError, match="same.txt:1"):
        load_cfp(tmp_path, "FP")
    with pytest.raises(DatasetError, match="Split/FP"):
        load_cfp(tmp_path / "nowhere", "FP")


def _lfw_tree(root, names=("Ann_A", "Bob_B", "Cid_C")) -> None:
    """Three JPEGs of each name in LFW's layout, ``root/images/<name>/<name>_<i:04d>.jpg``."""
    for n in names:
        (root / "images" / n).mkdir(parents=True)
        for i in (1, 2, 3):
            (root / "images" / n / f"{n}_{i:04d}.jpg").write_bytes(jpeg(i, 16)[0])


def test_lfw_pairs_parsing(tmp_path):
    _lfw_tree(tmp_path)
    lines = ["2\t2", "Ann_A\t1\t2", "Bob_B\t1\t3", "Ann_A\t1\tBob_B\t2", "Bob_B\t3\tCid_C\t1",
             "Cid_C\t2\t3", "Ann_A\t3\t2", "Cid_C\t1\tAnn_A\t3", "Bob_B\t1\tAnn_A\t1"]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    ps = load_lfw(tmp_path)
    assert len(ps) == 8 and ps.issame.tolist() == [True, True, False, False] * 2
    a, b = ps.pairs[2]
    assert (ps.images[a].name, ps.images[b].name) == ("Ann_A_0001.jpg", "Bob_B_0002.jpg")
    assert ps.identities[a] == "Ann_A" and ps.identities[b] == "Bob_B"
    assert len(ps.images) == len({str(p) for p in ps.images})  # each image listed once
    (tmp_path / "pairs.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DatasetError, match="expected 8 pair lines"):
        load_lfw(tmp_path)


def test_lfw_images_are_the_pair_lists_first_and_a_missing_folder_is_named(tmp_path):
    _lfw_tree(tmp_path)
    (tmp_path / "pairs.txt").write_text("1\t1\nAnn_A\t1\t3\nBob_B\t2\tAnn_A\t2\n")
    assert [os.path.basename(p) for p in lfw_images(tmp_path, 3)] == ["Ann_A_0001.jpg", "Ann_A_0003.jpg",
                                                                       "Bob_B_0002.jpg"]
    assert len(lfw_images(tmp_path, 100)) == 4
    with pytest.raises(DatasetError, match=r"LFW not found at \S*nowhere \(needs pairs.txt and images/\); "
                                           r"set \$FACEKIT_DATA to the folder holding lfw/ and cfp/"):
        lfw_images(tmp_path / "nowhere", 3)


def test_real_protocol_files(facekit_data):
    lfw = need(facekit_data / "lfw" / "pairs.txt").parent
    ps = load_lfw(lfw)
    assert len(ps) == 6000 and ps.issame[:300].all() and not ps.issame[300:600].any()
    cfp = need(facekit_data / "cfp" / "Protocol").parent
    fp = load_cfp(cfp, "FP")
    assert len(fp) == 7000 and fp.notes["fold_sizes"] == [700] * 10 and fp.issame.sum() == 3500


def test_unreadable_image_is_scored_and_counted(tmp_path):
    good = [jpeg(i)[0] for i in range(3)]
    path = tmp_path / "damaged.bin"
    path.write_bytes(pickle.dumps((good + [good[0][:50]], [True, False]), protocol=4))  # last JPEG truncated
    crops = aligned_crops(load_bin(path), progress=False)
    assert crops.counts() == {"prealigned": 3, "unreadable_black": 1} and crops.fallbacks == 1
    assert crops.crops[3].max() == 0
