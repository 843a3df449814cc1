"""Teacher vectors for face morphs: more distillation inputs than the training photos alone give.

A morph blends two aligned faces of different people, ``λ·A + (1 − λ)·B``. The student sees the blend of
the two 112×112 training crops; the teacher (dlib, see ``teacher_dlib.py``) sees the same blend of the two
faces in its own 150×150 chip frame, so every morph comes with the teacher's answer for exactly that face
("consistent" distillation: Beyer et al., CVPR 2022, "A good teacher is patient and consistent"). Partners
are mostly the teacher's nearest other identities (morphs between look-alikes: where the student's errors
are), the rest at random. Morphs have no identity: they feed only the distillation loss.

    # one process per core; each shard is resumable (it continues from its last saved chunk)
    python -m recipes.mobilefacenet_distill.teacher_morphs --root work_data --photos $FACEKIT_DATA/celeba --distill work_data/celeba_distill \\
        --part celeba_wild_112:teacher_wild.npz:wild --part celeba_aligned_112:teacher_aligned.npz:aligned_89x109 \\
        --views 2 --out work_data/morphs --shard 0/2
    # then join the distillation set and the morphs into one list + teacher npz for a config
    python -m recipes.mobilefacenet_distill.teacher_morphs --merge --distill work_data/celeba_distill --out work_data/morphs \\
        --merged work_data/celeba_distill_morphs
    # more morphs later: another --seed into another --out, then merge the folders together
    python -m recipes.mobilefacenet_distill.teacher_morphs ... --seed 1 --out work_data/morphs_seed1 --shard 0/2
    python -m recipes.mobilefacenet_distill.teacher_morphs --merge --distill work_data/celeba_distill --out work_data/morphs \\
        --out work_data/morphs_seed1 --merged work_data/celeba_distill_morphs2

Output (``--out``): ``shard<k>/<n>.png`` crops and ``shard<k>.npz`` (``paths`` relative to ``--root``,
``emb`` the raw L2-normalised teacher vectors, ``parents`` the two crops, ``lam``, ``index`` in the plan).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from runtime.files import atomic_write, atomic_write_bytes
from runtime.preprocess import l2_normalize
from train.datasets import UNLABELLED  # morphs have no identity: distillation only
from train.dlib_models import face_chip, load_dlib

from .distill_set import CropFace, load_teacher, match_part, parse_part


def plan_morphs(teacher: np.ndarray, identities: np.ndarray, views: int, near: float = 2 / 3, k: int = 50,
                lam: tuple[float, float] = (0.25, 0.75), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``views`` morphs per face: (a, b) index pairs of different identities and blend weights λ for a.

    With probability ``near`` the partner is one of a's ``k`` nearest faces of another identity by teacher
    cosine (``teacher``: N×D, L2-normalised), otherwise any face of another identity.
    """
    rng = np.random.default_rng(seed)
    n = len(teacher)
    neighbours = np.empty((n, min(k, n - 1)), np.int64)
    for s in range(0, n, 2048):
        sim = teacher[s:s + 2048] @ teacher.T
        sim[identities[s:s + 2048, None] == identities[None, :]] = -np.inf
        neighbours[s:s + 2048] = np.argpartition(-sim, neighbours.shape[1] - 1, axis=1)[:, :neighbours.shape[1]]
    a = np.repeat(np.arange(n), views)
    b = neighbours[a, rng.integers(0, neighbours.shape[1], len(a))]
    far = rng.random(len(a)) >= near
    for i in np.flatnonzero(far):
        while True:
            j = int(rng.integers(0, n))
            if identities[j] != identities[a[i]]:
                b[i] = j
                break
    return np.stack([a, b], 1), rng.uniform(*lam, len(a)).astype(np.float32)


def blend(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """``λ·x + (1 − λ)·y`` of two uint8 images, rounded back to uint8."""
    return np.clip(np.rint(lam * x.astype(np.float32) + (1 - lam) * y.astype(np.float32)), 0, 255).astype(np.uint8)


def _faces(root: Path, parts: list[str]) -> list[CropFace]:
    """The crops with a teacher face, over every ``ALIGNED:TEACHER:PREFIX`` part."""
    faces = []
    for part in parts:
        aligned, teacher_npz, prefix = parse_part(part)
        faces += [c for c in match_part(root, aligned, load_teacher(root / teacher_npz), prefix) if c.row >= 0]
    return faces


def _chip(dlib, predictor, photo: Path, box) -> np.ndarray:
    """dlib's chip of the face in ``box`` of ``photo``, made as ``teacher_dlib.py`` made it."""
    import cv2

    img = cv2.imread(str(photo), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"cannot read {photo}")
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return face_chip(dlib, predictor, np.ascontiguousarray(img[:, :, ::-1]), dlib.rectangle(x1, y1, x2, y2))


def _save(path: Path, **arrays) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def generate(args) -> int:
    import cv2
    from tqdm import tqdm

    k, n_shards = args.shard
    faces = _faces(args.root, args.part)
    with np.load(str(args.distill) + "_teacher.npz") as f:
        centred = dict(zip(map(str, f["paths"]), f["emb"]))
    pairs, lams = plan_morphs(np.stack([centred[c.crop] for c in faces]), np.array([c.identity for c in faces]),
                              args.views, seed=args.seed)
    mine = np.arange(k, len(pairs), n_shards)
    args.out.mkdir(parents=True, exist_ok=True)
    out_npz = args.out / f"shard{k}.npz"
    done = {"index": [], "paths": [], "emb": [], "parents": [], "lam": []}
    if out_npz.exists():
        with np.load(out_npz) as f:
            done = {key: list(f[key]) for key in done}
        if not np.array_equal(done["index"], mine[:len(done["index"])]):
            sys.exit(f"teacher_morphs: {out_npz} was made with other --views/--seed/--shard or other data; "
                     f"use a new --out or delete it")
    todo = mine[len(done["paths"]):]
    dlib, _, predictor, embedder = load_dlib()
    need = np.unique(pairs[todo].ravel())
    chips, crops = {}, {}
    for i in tqdm(need, desc=f"chips (shard {k})", unit="face"):
        c = faces[i]
        chips[i] = _chip(dlib, predictor, args.photos / c.source, c.box)
        crops[i] = cv2.imread(str(args.root / c.crop), cv2.IMREAD_COLOR)
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"morphs (shard {k})", unit="morph")
    for s in range(0, len(todo), args.chunk):
        chunk = todo[s:s + args.chunk]
        morph_chips = [blend(chips[a], chips[b], lams[m]) for m, (a, b) in zip(chunk, pairs[chunk])]
        vecs = np.asarray([np.asarray(v) for v in embedder.compute_face_descriptor(morph_chips)], np.float32)
        for m, vec in zip(chunk, vecs):
            a, b = pairs[m]
            rel = f"{args.out_rel}/shard{k}/{m:06d}.png"
            atomic_write_bytes(args.root / rel, cv2.imencode(".png", blend(crops[a], crops[b], lams[m]))[1].tobytes())
            done["index"].append(m)
            done["paths"].append(rel)
            done["emb"].append(vec / max(float(np.linalg.norm(vec)), 1e-12))
            done["parents"].append(np.array([faces[a].crop, faces[b].crop]))
            done["lam"].append(lams[m])
        _save(out_npz, **{key: np.array(v) for key, v in done.items()})
        bar.update(len(chunk))
    bar.close()
    print(f"morphs: shard {k}/{n_shards}: {len(done['paths'])} teacher vectors -> {out_npz}")
    return 0


def merge(args) -> int:
    """Distillation set + every morph shard → one list file and teacher npz (morphs centred on the set's mean).

    Every morph's parents must be crops of the ``--distill`` set: the morphs are re-centred on that set's mean,
    so shards planned on another set would be silently mis-centred.
    """
    with np.load(str(args.distill) + "_teacher.npz") as f:
        base = {key: f[key] for key in ("paths", "emb", "emb_flip", "center")}
    lines = Path(str(args.distill) + ".txt").read_text().splitlines()
    known = set(map(str, base["paths"]))
    paths, emb = [], []
    shards = [shard for out in args.out for shard in sorted(out.glob("shard*.npz"))]
    for shard in shards:
        with np.load(shard) as f:
            strangers = set(map(str, f["parents"].ravel())) - known
            if strangers:
                sys.exit(f"teacher_morphs: {shard} blends crops that are not in {args.distill}_teacher.npz "
                         f"(e.g. {sorted(strangers)[0]}); it was planned on another distillation set")
            paths += list(map(str, f["paths"]))
            emb.append(f["emb"])
    if not paths:
        sys.exit(f"teacher_morphs: no shard*.npz under {', '.join(map(str, args.out))}; generate the morphs first")
    if len(set(paths)) != len(paths):
        sys.exit("teacher_morphs: the same morph path is in two shards; give each --out folder once")
    emb = np.concatenate(emb) - base["center"]  # the set's centring (recipes/mobilefacenet_distill/distill_set.py), not the morphs' own
    emb = l2_normalize(emb)
    merged = Path(args.merged)
    text = "\n".join(lines + [f"{p} {UNLABELLED}" for p in paths]) + "\n"
    atomic_write_bytes(merged.with_name(merged.name + ".txt"), text.encode())
    all_emb = np.concatenate([base["emb"], emb]).astype(np.float32)
    all_flip = np.concatenate([base["emb_flip"], emb]).astype(np.float32)
    _save(merged.with_name(merged.name + "_teacher.npz"), paths=np.array(list(map(str, base["paths"])) + paths),
          emb=all_emb, emb_flip=all_flip, center=base["center"])
    print(f"merged: {len(lines)} crops + {len(paths)} morphs from {len(shards)} shards -> {merged}.txt")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("work_data"), help="folder of the aligned crops and teacher files")
    ap.add_argument("--photos", type=Path, help="folder the teacher npz paths are relative to (the dataset root)")
    ap.add_argument("--distill", type=Path, required=True, help="distill_set.py output stem (centred teacher, list)")
    ap.add_argument("--part", action="append", default=[], help="ALIGNED_DIR:TEACHER_NPZ:SOURCE_PREFIX, as distill_set.py")
    ap.add_argument("--views", type=int, default=2, help="morphs per face")
    ap.add_argument("--out", type=Path, action="append", required=True,
                    help="morph folder, under --root (--merge: repeat it to join several folders)")
    ap.add_argument("--shard", default="0/1", help="K/N: make the K-th of N interleaved shares (one process per core)")
    ap.add_argument("--chunk", type=int, default=256, help="morphs per saved chunk")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merge", action="store_true", help="join --distill and the shards under --out into --merged")
    ap.add_argument("--merged", type=Path, help="output stem of --merge")
    args = ap.parse_args(argv)
    if args.merge:
        if not args.merged:
            ap.error("--merge needs --merged")
        return merge(args)
    if len(args.out) != 1:
        ap.error("generating morphs writes one --out folder")
    args.out = args.out[0]
    if not args.photos or not args.part:
        ap.error("generating morphs needs --photos and at least one --part")
    shard = args.shard
    try:
        args.shard = tuple(int(v) for v in shard.split("/"))
        if len(args.shard) != 2 or not 0 <= args.shard[0] < args.shard[1]:
            raise ValueError
    except ValueError:
        ap.error(f"--shard must be K/N with 0 <= K < N, got {shard!r}")
    try:
        args.out_rel = args.out.resolve().relative_to(args.root.resolve()).as_posix()
    except ValueError:
        ap.error(f"--out {args.out} must lie under --root {args.root} (the list paths are relative to it)")
    return generate(args)


if __name__ == "__main__":
    raise SystemExit(main())
