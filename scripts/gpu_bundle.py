"""Write the GPU bundle (``make gpu-bundle``): what the GPU machine lacks to run ``scripts/gpu_reproduce.sh``.

    python scripts/gpu_bundle.py [--out gpu-bundle] [--python-version 3.12] [--scale small] [--unpin NAME]

The machine's image (``scripts/gpu_image_packages.txt``) has torch, pandas, matplotlib, tokenizers and
pyarrow but not papermill, nbclient, nbformat, ipykernel, jupyter_client, ipywidgets or datasets, and has
no network. ``--out`` gets:

- ``wheels/``: those packages and every package they need that the image lacks, as binary wheels for
  ``--python-version`` on manylinux x86_64 (pip resolves the whole set against the image's known versions,
  then downloads only the missing ones, one version each);
- ``cache-<scale>.tar.xz``: the scale's BPE tokenizer and the token shards of the corpora its experiments
  read (``cptlab corpora --scale``), built in ``build/gpu-cache-<scale>`` (kept, so a second bundle is quick);
- ``MANIFEST.txt``: every file with its size, and the total.

The whole must stay under 64 MiB (what one device command may carry); the script fails above it. pip's
download folder is ``--out``'s own: nothing is installed anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE_LIST = REPO / "scripts" / "gpu_image_packages.txt"
NEEDED = ("papermill", "nbclient", "nbformat", "ipykernel", "jupyter_client", "ipywidgets", "datasets")
# Pure-Python packages the image lacks whose own needs it has (torch): carried as they are, since resolving
# them against the image's CUDA torch sends pip's resolver backtracking for minutes
AS_IS = (("schedulefree", "1.4.1"),)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64",
             "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64",
             "manylinux1_x86_64")
LIMIT_BYTES = 64 * 2**20


def canonical(name: str) -> str:
    """A package name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = IMAGE_LIST) -> dict[str, str | None]:
    """The image's packages: canonical name -> the version seen there (None where not known)."""
    packages: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[canonical(name)] = version or None
    return packages


def pip_target_args(python_version: str) -> list[str]:
    """pip's options for binary wheels of CPython ``python_version`` on manylinux x86_64."""
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    return args + [a for p in PLATFORMS for a in ("--platform", p)]


def resolve(python_version: str, image: dict[str, str | None], work: Path,
            unpin: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(name, version) of every package that ``NEEDED`` pulls in and the image lacks, resolved by pip
    against the image's known versions but ``unpin``'s (no download of the wheels themselves)."""
    constraints = work / "image-constraints.txt"
    unpinned = {canonical(n) for n in unpin}
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in image.items() if v and n not in unpinned))
    report = work / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                    *pip_target_args(python_version), "--target", str(work / "target"), "--report",
                    str(report), "-c", str(constraints), *NEEDED], check=True)
    installs = json.loads(report.read_text())["install"]
    picked = [(i["metadata"]["name"], i["metadata"]["version"]) for i in installs]
    return sorted((n, v) for n, v in picked if canonical(n) not in image)


def download(pins: list[tuple[str, str]], python_version: str, wheels: Path) -> None:
    """The wheels of ``pins`` (and nothing else) into ``wheels``, emptied first."""
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                    *pip_target_args(python_version), "-d", str(wheels), *(f"{n}=={v}" for n, v in pins)],
                   check=True)


def build_cache(scale: str, cache: Path) -> None:
    """The scale's tokenizer and shards in the cache folder ``cache`` (``cptlab corpora --scale``)."""
    env = dict(os.environ, CPTLAB_CACHE=str(cache), PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "cptlab", "corpora", "--scale", scale], check=True, env=env,
                   cwd=REPO)


def pack_cache(cache: Path, out: Path) -> Path:
    """``cache``'s tokenizers and shards (no lock files, no unfinished builds) as an xz tarball."""
    files = sorted(cache.glob("tokenizers/*.json"))
    for meta in sorted(cache.glob("shards/*/*/meta.json")):
        files += [meta.parent / "train.bin", meta.parent / "val.bin", meta]
    with tarfile.open(out, "w:xz") as tar:
        for path in files:
            tar.add(path, arcname=str(path.relative_to(cache)))
    return out


def write_manifest(out: Path) -> int:
    """``out``/MANIFEST.txt (each file and its size, then the total); returns the total in bytes."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "MANIFEST.txt")
    total = sum(p.stat().st_size for p in files)
    lines = [f"{p.stat().st_size:>12,}  {p.relative_to(out)}" for p in files]
    lines.append(f"{total:>12,}  in all ({total / 2**20:.1f} MiB of the {LIMIT_BYTES // 2**20} MiB a device "
                 "command carries)")
    (out / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "gpu-bundle"), help="the bundle's folder")
    parser.add_argument("--python-version", default="3.12", help="the GPU image's Python (3.12.3)")
    parser.add_argument("--scale", default="small", help="whose tokenizer and shards to carry")
    parser.add_argument("--unpin", action="append", default=[],
                        help="resolve without the image's version of this package (a rehearsal bundle for "
                        "another Python: numpy 2.5.2 has no wheel for 3.11)")
    parser.add_argument("--cache", help="where the scale's cache is built, kept between bundles (default: "
                        "build/gpu-cache-SCALE)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        pins = resolve(args.python_version, image_packages(), Path(work), tuple(args.unpin)) + list(AS_IS)
    print(f"[gpu-bundle] {len(pins)} packages the image lacks: {', '.join(f'{n} {v}' for n, v in pins)}")
    download(pins, args.python_version, out / "wheels")
    cache = Path(args.cache or REPO / "build" / f"gpu-cache-{args.scale}")
    build_cache(args.scale, cache)
    for old in out.glob("cache-*.tar.xz"):
        old.unlink()
    tar = pack_cache(cache, out / f"cache-{args.scale}.tar.xz")
    total = write_manifest(out)
    print(f"[gpu-bundle] {out}: {len(pins)} wheels and {tar.name}, {total / 2**20:.1f} MiB in all")
    if total > LIMIT_BYTES:
        sys.exit(f"[gpu-bundle] {total / 2**20:.1f} MiB: over the {LIMIT_BYTES // 2**20} MiB a device "
                 "command carries")


if __name__ == "__main__":
    main()
