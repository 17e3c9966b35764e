"""Safe install on a device: copy, verify, smoke-test, then switch the active version atomically.

A models directory holds one folder per model name::

    DIR/NAME/versions/<id>/      complete, verified bundles (<id>: the manifest's sha256, 16 digits)
    DIR/NAME/current  -> versions/<id>     the active version: load DIR/NAME/current
    DIR/NAME/previous -> versions/<id>     the one before, for `edgevl rollback`
    DIR/NAME/.incoming-<id>-<pid>/         a copy in progress (removed by the next install)

``install`` copies the listed files (and only those) into an incoming folder, fsyncs them,
verifies the copy (every sha256, the signature under the trust policy, containment), runs a
smoke generation on this device's backend, renames the folder into ``versions/`` and only then
switches ``current`` with one atomic rename of a symlink. A kill or a full disk at any moment
leaves ``current`` on a complete, verified version: the old one until the switch, the new one
after. One install or rollback at a time per model (an flock on ``DIR/NAME/.lock``).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevl.bundle import MANIFEST, Bundle, load_bundle
from edgevl.errors import BundleError, ConfigError, EdgeVLError
from edgevl.signing import SIGNATURE_FILE

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CHUNK = 1 << 20


@dataclass
class Installed:
    name: str
    version: str
    path: Path                   # DIR/NAME/current (what to load)
    previous: str | None         # the version now kept for rollback
    changed: bool                # False: this version was already active


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _point(link: Path, target: str) -> None:
    """Make ``link`` a symlink to ``target`` with one atomic rename (never absent, never half)."""
    tmp = link.with_name(f".{link.name}.tmp.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def _version_of(link: Path) -> str | None:
    return Path(os.readlink(link)).name if link.is_symlink() else None


@contextmanager
def _locked(model_dir: Path):
    model_dir.mkdir(parents=True, exist_ok=True)
    with open(model_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise ConfigError(f"another install or rollback of {model_dir.name} is running; wait for it") from e
        yield


def _model_dir(into: str | Path, name: str) -> Path:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"model name {name!r} is not usable as a folder name; use letters, digits, '.', '_' or '-' "
                          "(pass --name)")
    return Path(into) / name


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while block := fin.read(CHUNK):
            fout.write(block)
        fout.flush()
        os.fsync(fout.fileno())


def _copy_bundle(src: Bundle, manifest_bytes: bytes, dst: Path) -> None:
    """The listed files, the exact manifest bytes that were read, and the signature file."""
    dst.mkdir(parents=True)
    for rel in src.manifest["files"]:
        _copy_file(src.file(rel, f"files[{rel!r}]"), dst / rel)
    if (src.path / SIGNATURE_FILE).is_file():
        _copy_file(src.path / SIGNATURE_FILE, dst / SIGNATURE_FILE)
    with open(dst / MANIFEST, "xb") as f:          # last: a copy without a manifest is never a bundle
        f.write(manifest_bytes)
        f.flush()
        os.fsync(f.fileno())
    for folder in {(dst / rel).parent for rel in src.manifest["files"]} | {dst}:
        _fsync_dir(folder)


def smoke_test(bundle: Bundle, backend: str | None = None) -> dict:
    """Load the bundle on this device's backend and generate a few tokens about a grey image;
    every intermediate (image embeddings, first logits) must be finite. Raises BundleError."""
    from edgevl.api import VLM, choose_backend

    backend = backend or choose_backend(bundle)[0]
    try:
        vlm = VLM(bundle, backend)
    except EdgeVLError as e:
        raise BundleError(f"smoke test: the bundle does not load on {backend}: {e}") from e
    try:
        h, w = bundle.manifest["preprocess"]["size"]
        image = np.full((h, w, 3), 128, np.uint8)
        embeds = vlm.encode_images(image)
        if not np.isfinite(embeds).all():
            raise BundleError(f"smoke test on {backend}: the vision part returned non-finite image embeddings")
        engine = vlm.engine
        ids = engine.encode_prompt("describe the image", n_images=1)
        cache = engine.new_cache(slots=1, capacity=len(ids) + 8)
        logits = engine.prefill(cache, 0, engine.merge(ids, embeds), ids)
        if not np.isfinite(logits).all():
            raise BundleError(f"smoke test on {backend}: the decoder returned non-finite logits")
        result = vlm.generate(image, "describe the image", max_new_tokens=4)
        if not result.tokens:
            raise BundleError(f"smoke test on {backend}: generation returned no tokens")
        return {"backend": backend, "text": result.text, "tokens": result.tokens}
    except BundleError:
        raise
    except Exception as e:       # anything a backend raises on this device fails the smoke test
        raise BundleError(f"smoke test on {backend} failed: {type(e).__name__}: {e}") from e
    finally:
        vlm.close()


def _clean_incoming(model_dir: Path, log) -> None:
    for stale in model_dir.glob(".incoming-*"):
        log(f"install: removing {stale.name}, left by an interrupted install")
        shutil.rmtree(stale, ignore_errors=True)


def install(bundle: str | Path, into: str | Path, name: str | None = None, trust=None, backend: str | None = None,
            smoke: bool = True, log=print) -> Installed:
    """Install ``bundle`` as the active version of ``name`` in the models directory ``into``."""
    src = load_bundle(bundle, verify=False, trust=False)    # schema + containment; hashes/signature on the copy
    # the bytes copied are re-verified in the copy (a manifest changed since the load above fails there)
    manifest_bytes = (src.path / MANIFEST).read_bytes()
    name = name or str(src.manifest.get("model", {}).get("name", ""))
    model_dir = _model_dir(into, name)
    version = hashlib.sha256(manifest_bytes).hexdigest()[:16]
    with _locked(model_dir):
        _clean_incoming(model_dir, log)
        versions, current, previous = model_dir / "versions", model_dir / "current", model_dir / "previous"
        versions.mkdir(exist_ok=True)
        final = versions / version
        active = _version_of(current)
        if final.is_dir():
            try:
                load_bundle(final, trust=trust)
            except BundleError as e:
                log(f"install: the kept copy of version {version} does not verify ({e}); copying it again")
                shutil.rmtree(final)
        if not final.is_dir():
            needed = sum(m["bytes"] for m in src.manifest["files"].values()) + len(manifest_bytes)
            free = shutil.disk_usage(versions).free
            if needed > free:
                raise BundleError(f"not enough disk space in {versions}: the bundle needs {needed / 1e6:.1f} MB, "
                                  f"{free / 1e6:.1f} MB are free; remove old models. The active version is unchanged")
            incoming = model_dir / f".incoming-{version}-{os.getpid()}"
            try:
                log(f"install: copying {len(src.manifest['files'])} files ({needed / 1e6:.1f} MB) to {incoming}")
                _copy_bundle(src, manifest_bytes, incoming)
                log("install: verifying the copy (sha256 of every file, signature, containment)")
                copy = load_bundle(incoming, trust=trust)
                if smoke:
                    log("install: smoke test on this device")
                    result = smoke_test(copy, backend)
                    log(f"install: smoke test passed on {result['backend']}: {result['text']!r}")
                os.rename(incoming, final)
                _fsync_dir(versions)
            except OSError as e:
                shutil.rmtree(incoming, ignore_errors=True)
                full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
                raise BundleError(f"could not copy the bundle into {model_dir}: {e}"
                                  + ("; the disk is full, free some space" if full else "")
                                  + f". The active version ({active or 'none'}) is unchanged") from e
            except BaseException:
                shutil.rmtree(incoming, ignore_errors=True)
                raise
        elif smoke and active != version:
            smoke_test(load_bundle(final, trust=trust), backend)
        if active == version:
            log(f"install: version {version} of {name} is already active")
            return Installed(name, version, current, _version_of(previous), False)
        if active is not None:
            _point(previous, f"versions/{active}")
        _point(current, f"versions/{version}")
        log(f"install: {name} version {version} is active" + (f" (previous: {active})" if active else ""))
        _prune(versions, keep={version, active})
        return Installed(name, version, current, active, True)


def _prune(versions: Path, keep: set) -> None:
    for old in versions.iterdir():
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


def rollback(into: str | Path, name: str, trust=None, log=print) -> Installed:
    """Make the previous version active again (the current one becomes the previous)."""
    model_dir = _model_dir(into, name)
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: no model {name!r} is installed in {into}")
    with _locked(model_dir):
        current, previous = model_dir / "current", model_dir / "previous"
        old, active = _version_of(previous), _version_of(current)
        if old is None or not (model_dir / "versions" / old).is_dir():
            raise BundleError(f"{model_dir}: there is no previous version to roll back to")
        load_bundle(model_dir / "versions" / old, trust=trust)    # still intact, still trusted
        if active is not None:
            _point(previous, f"versions/{active}")
        _point(current, f"versions/{old}")
        log(f"rollback: {name} version {old} is active (previous: {active})")
        return Installed(name, old, current, active, True)


def installed_versions(into: str | Path, name: str) -> dict:
    """{"current": id or None, "previous": id or None, "versions": [ids on disk]}."""
    model_dir = _model_dir(into, name)
    versions = sorted(p.name for p in (model_dir / "versions").iterdir()) if (model_dir / "versions").is_dir() else []
    return {"current": _version_of(model_dir / "current"), "previous": _version_of(model_dir / "previous"),
            "versions": versions}
