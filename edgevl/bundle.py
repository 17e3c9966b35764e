"""The bundle: a directory of ONNX parts (and compiled artefacts) plus a versioned manifest.

A bundle is the one thing the compile side hands to a device. It is written atomically
(everything goes to a temporary sibling directory that is renamed into place at the end), and
it is validated before any runner sees it: schema version, every listed file present, every
file's sha256. No torch, no onnx here: the runtime reads bundles.

Manifest (``manifest.json``), schema version 1::

    format, schema_version, edgevl_version, created
    model:        name, family, architecture, source
    precision:    fp32 | fp16 | int8 | int8-wo | int4-wo | ...
    target:       onnxruntime | openvino | tensorrt (what it was built for; any runner may try)
    parts:        {vision|embed|decoder: {onnx, inputs, outputs, dynamic_axes, artifacts}}
    decoder:      n_layers, n_kv_heads, head_dim, hidden_dim, vocab_size, max_position
    preprocess:   the image preprocessing spec (see edgevl.preprocess)
    tokenizer:    file and special token ids
    prompt:       template, image_block, image_token_id, image_seq_len
    generation:   defaults (max_new_tokens, stop ids, ...)
    quantization: recipe and provenance, or null
    provenance:   tool versions, checkpoint, times
    reports:      {name: file} (parity.json, accuracy.json, ...)
    files:        {relative path: {sha256, bytes}} for every other file of the bundle
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from edgevl.containment import BundleFiles, check_manifest_paths
from edgevl.errors import BundleError
from edgevl.manifest_schema import MAX_MANIFEST_BYTES, validate_manifest
from edgevl.signing import Signer, check_signature, policy_from

FORMAT = "edgevl-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PART_NAMES = ("vision", "embed", "decoder")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    """A bundle on disk. ``manifest`` is the parsed manifest.json. Every path a runner, the
    tokenizer or a report reader opens comes from ``file`` / ``part_file``, i.e. from the
    containment resolver (edgevl.containment). ``load_bundle`` makes bundles whose files were
    all checked; a Bundle built directly (the compile side, on its own output) still refuses
    paths that leave its directory."""

    path: Path
    manifest: dict
    files: BundleFiles | None = field(default=None, repr=False)
    signer: Signer | None = None        # who signed it (verified under a trust policy)
    verified: bool = False              # every listed file's sha256 checked at load

    def __post_init__(self):
        if self.files is None:
            self.files = BundleFiles(self.path, self.manifest.get("files", {}), require_listed=False)

    @property
    def parts(self) -> dict:
        return self.manifest["parts"]

    @property
    def precision(self) -> str:
        return self.manifest.get("precision", "fp32")

    def file(self, rel: str, field_name: str) -> Path:
        """The checked real path of a file the manifest names in ``field_name``."""
        return self.files.resolve(rel, field_name)

    def part_file(self, part: str, backend: str | None = None) -> Path:
        """The file a backend should load for ``part``: its compiled artefact, else the ONNX."""
        if part not in self.parts:
            raise BundleError(f"{self.path}: bundle has no part {part!r}; it has {sorted(self.parts)}")
        spec = self.parts[part]
        artefact = spec.get("artifacts", {}).get(backend) if backend else None
        if artefact:
            return self.file(artefact, f"parts.{part}.artifacts.{backend}")
        return self.file(spec["onnx"], f"parts.{part}.onnx")

    def prefill_file(self, part: str, backend: str | None) -> Path | None:
        """A second graph of ``part`` that ``backend`` runs prompts (T > 1) with, or None: the
        composite ``int4`` recipe may prefill with an int8 graph what its 4-bit graph decodes
        (exporters/quantize/composite.py). Same inputs, outputs and KV cache as the part."""
        rel = self.parts.get(part, {}).get("prefill", {}).get(backend) if backend else None
        return self.file(rel, f"parts.{part}.prefill.{backend}") if rel else None

    def kv_dtype(self, backend: str | None) -> str:
        """The KV cache's element type for ``backend``: ``parts.decoder.kv_cache[backend]`` (int8
        for an ONNX Runtime-lowered decoder with a quantized cache; it covers the decoder's
        artefact and its prefill graph, which share the cache), else the decoder's ``kv_dtype``."""
        per_backend = self.parts.get("decoder", {}).get("kv_cache", {})
        return per_backend.get(backend) or self.manifest.get("decoder", {}).get("kv_dtype", "float32")

    def report(self, name: str) -> dict | None:
        rel = self.manifest.get("reports", {}).get(name)
        if not rel:
            return None
        path = self.file(rel, f"reports.{name}")
        try:
            return json.loads(path.read_text())
        except (ValueError, RecursionError) as e:
            raise BundleError(f"{path}: report {name!r} is not valid JSON ({e}); rebuild the bundle") from e

    def __getitem__(self, key: str):
        return self.manifest[key]


def load_bundle(path: str | Path, verify: bool = True, trust=None) -> Bundle:
    """Read and validate a bundle, in this order: the manifest's bytes (read once, size-capped),
    their signature under the trust policy, the schema and its bounds, containment of every
    path the manifest names, and the sha256 of every listed file.

    ``trust``: public keys (files, folders, PEM, key objects) a signature must come from; None
    uses the device policy (``EDGEVL_TRUST``; none set: signatures are read, not required);
    False skips signatures (build tools signing their own output). Under a policy every file's
    hash is checked even with ``verify=False``: a signature vouches only for verified files."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle directory (build one with `edgevl export` or `edgevl build`)")
    if not manifest_path.is_file():
        raise BundleError(f"{path}: not a bundle, {MANIFEST} is missing "
                          "(an interrupted write never leaves one; rebuild it with `edgevl export`)")
    policy = None if trust is False else policy_from(trust)
    root = path.resolve()          # once: a models/current symlink switched mid-load changes nothing here
    with open(root / MANIFEST, "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{manifest_path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; it is not an edgevl "
                          "manifest (damaged or hostile), rebuild the bundle")
    signer = check_signature(root, raw, policy) if trust is not False else None
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise BundleError(f"{manifest_path}: not valid JSON ({e}); the bundle is damaged, rebuild it") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{manifest_path}: format is {got!r}, expected {FORMAT!r}")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise BundleError(
            f"{path}: bundle schema version {version} is newer than this runtime supports "
            f"({SCHEMA_VERSION}); upgrade edgevl on this device (pip install -U edgevl) or rebuild "
            f"the bundle with the edgevl version installed here")
    for key in ("parts", "files", "preprocess", "tokenizer", "prompt", "decoder"):
        if key not in manifest:
            raise BundleError(f"{manifest_path}: required field {key!r} is missing")
    try:
        validate_manifest(manifest)
    except BundleError as e:
        raise BundleError(f"{manifest_path}: {e}") from None
    files = BundleFiles(root, manifest["files"])
    for rel in manifest["files"]:
        files.resolve(rel, f"files[{rel!r}]")
    if verify or policy is not None:
        verify_files(root, manifest)
    check_manifest_paths(files, manifest)
    return Bundle(root, manifest, files, signer, verified=verify or policy is not None)


def verify_files(path: Path, manifest: dict) -> None:
    """Presence, size and sha256 of every listed file (their paths checked by the caller)."""
    for rel, meta in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise BundleError(f"{path}: file {rel} listed in the manifest is missing; "
                              "copy the whole bundle directory again or rebuild it")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise BundleError(f"{path}: file {rel} has {size} bytes, the manifest says {meta['bytes']} "
                              "(truncated or changed); copy the bundle again or rebuild it")
        digest = sha256_file(f)
        if digest != meta["sha256"]:
            raise BundleError(f"{path}: file {rel} does not match its sha256 in the manifest "
                              f"(expected {meta['sha256'][:12]}..., got {digest[:12]}...): it was changed "
                              "or corrupted; copy the bundle again or rebuild it")


class BundleWriter:
    """Builds a bundle in a temporary sibling directory; ``commit`` renames it into place.

    States: open (add files, set manifest fields) -> committed, or -> aborted. A crash at any
    point leaves the destination untouched (old bundle or nothing), never a half bundle.
    """

    def __init__(self, out: str | Path, force: bool = False):
        self.out = Path(out)
        if self.out.exists() and not force:
            raise BundleError(f"{self.out} already exists; choose another --out or pass --force to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp.", dir=self.out.parent))
        self.manifest: dict = {"format": FORMAT, "schema_version": SCHEMA_VERSION}
        self.state = "open"

    def file(self, rel: str) -> Path:
        """A path inside the bundle being written (parent folders created)."""
        self._check_open()
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, rel: str, data) -> Path:
        p = self.file(rel)
        p.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        return p

    def copy_in(self, src: str | Path, rel: str) -> Path:
        p = self.file(rel)
        shutil.copy2(src, p)
        return p

    def commit(self) -> Bundle:
        self._check_open()
        from edgevl import __version__

        self.manifest.setdefault("edgevl_version", __version__)
        self.manifest["files"] = {
            rel: {"sha256": sha256_file(self.tmp / rel), "bytes": (self.tmp / rel).stat().st_size}
            for rel in sorted(str(p.relative_to(self.tmp)) for p in self.tmp.rglob("*") if p.is_file())
            if rel != MANIFEST
        }
        os.chmod(self.tmp, 0o755)  # mkdtemp makes it private; a bundle is shared like any directory
        manifest_tmp = self.tmp / (MANIFEST + ".tmp")
        manifest_tmp.write_text(json.dumps(self.manifest, indent=2) + "\n")
        os.replace(manifest_tmp, self.tmp / MANIFEST)
        if self.out.exists():
            trash = self.out.with_name(f".{self.out.name}.old.{os.getpid()}")
            os.replace(self.out, trash)
            os.replace(self.tmp, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        self.state = "committed"
        return load_bundle(self.out)

    def abort(self) -> None:
        if self.state == "open":
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.state = "aborted"

    def _check_open(self) -> None:
        if self.state != "open":
            raise BundleError(f"bundle writer for {self.out} is {self.state}; start a new one")


@contextmanager
def writing_bundle(out: str | Path, force: bool = False) -> Iterator[BundleWriter]:
    """``with writing_bundle(out) as w: ...`` commits on success and aborts on any exception."""
    writer = BundleWriter(out, force=force)
    try:
        yield writer
        if writer.state == "open":
            writer.commit()
    except BaseException:
        writer.abort()
        raise


def describe(bundle: Bundle) -> str:
    """A readable summary of a bundle, for `edgevl info`."""
    m = bundle.manifest
    lines = [f"bundle {bundle.path}",
             f"  model       {m['model'].get('name')} ({m['model'].get('family')}, {m['model'].get('architecture')})",
             f"  precision   {m.get('precision')}   target {m.get('target')}",
             f"  schema      v{m['schema_version']}, edgevl {m.get('edgevl_version')}, created {m.get('created', '?')}"]
    for name, part in m["parts"].items():
        lines.append(f"  part {name:<8} {part['onnx']}" + (f"   {part['precision']}: {part['method']}"
                                                              if part.get("method") else ""))
        for kind in ("inputs", "outputs"):
            shown = [t for t in part.get(kind, []) if not t["name"].startswith(("past_key", "past_value", "present_"))]
            hidden = len(part.get(kind, [])) - len(shown)
            text = ", ".join(f"{t['name']} {t['dtype']}{list(t['shape'])}" for t in shown)
            if hidden:
                text += f", + {hidden} KV-cache tensors"
            lines.append(f"    {kind:<8} {text}")
        for backend, rel in part.get("artifacts", {}).items():
            lines.append(f"    {backend:<8} {rel}")
        for backend, rel in part.get("prefill", {}).items():
            lines.append(f"    {backend:<8} {rel} (prompts; {part.get('prefill_method', '?')})")
    d = m["decoder"]
    lines.append(f"  decoder     {d['n_layers']} layers, {d['n_kv_heads']} KV heads x {d['head_dim']}, "
                 f"vocab {d['vocab_size']}, max position {d['max_position']}")
    p = m["preprocess"]
    lines.append(f"  preprocess  {p['resize_mode']} to {p['size']} ({p['interpolation']}), mean {p['mean']}, std {p['std']}")
    lines.append(f"  prompt      {m['prompt']['template']!r}, {m['prompt']['image_seq_len']} image tokens")
    q = m.get("quantization")
    if q and "selection" in q:
        for part, sel in q["selection"].items():
            timings = ", ".join(f"{k} {c['median_ms']:.1f} ms" for k, c in sel["candidates"].items())
            lines.append(f"  chosen      {part}: {sel['chosen']} (measured on {sel['measured_on'].get('cpu')}: {timings})")
    elif q:
        lines.append(f"  quantized   {q.get('method')} {q.get('scheme', '')}, float layers: {len(q.get('float_nodes', []))}")
    for name, rel in m.get("reports", {}).items():
        lines.append(f"  report      {name}: {rel}")
    total = sum(f["bytes"] for f in m["files"].values())
    lines.append(f"  files       {len(m['files'])} ({total / 1e6:.1f} MB), "
                 + ("sha256 verified" if bundle.verified else "sha256 NOT verified"))
    lines.append(f"  signed by   {bundle.signer.describe()}" if bundle.signer else "  signed by   nobody (unsigned)")
    return "\n".join(lines)
