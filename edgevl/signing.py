"""Signed bundles: Ed25519 signatures over the manifest, and the device's trust policy.

The manifest pins every file of a bundle by sha256, so one signature over its exact bytes
covers the whole bundle. ``sign`` writes it detached, to ``manifest.json.sig`` beside the
manifest (a manifest cannot list its own signature); several signatures may sit there at once,
so a bundle signed with an old and a new key loads on devices trusting either (key rotation).

A device trusts a set of public keys: ``edgevl.load(..., trust=[...])`` / ``edgevl verify
--trust``, or device-wide the ``EDGEVL_TRUST`` environment variable (public key files or
folders of them, separated by ``:``). Under a policy, an unsigned bundle, a bundle signed only
by unknown keys, or one whose manifest changed after signing is refused with BundleError.

Keys: a private key is PKCS#8 PEM, written owner-only (0600); keep it on the build machine. A
public key is SubjectPublicKeyInfo PEM. A key's id is the first 16 hex digits of the sha256 of
its 32 raw bytes. Signatures come from `cryptography` (a device without it refuses bundles
under a policy, naming the package, rather than loading them unchecked).
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from edgevl.errors import BundleError, ConfigError

SIGNATURE_FILE = "manifest.json.sig"
SIGNATURE_FORMAT = "edgevl-signature"
ENV = "EDGEVL_TRUST"
DOMAIN = b"edgevl-bundle-manifest-v1\n"      # what is signed: DOMAIN + the manifest's bytes
MAX_SIGNATURE_BYTES = 1 << 20
MAX_KEY_BYTES = 64 << 10


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:
        raise ConfigError("bundle signatures need the cryptography package, which is not installed; "
                          "install it with `pip install edgevl[sign]`") from e
    return serialization, ed25519


def _raw(public_key) -> bytes:
    serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key) -> str:
    return hashlib.sha256(_raw(public_key)).hexdigest()[:16]


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    public_key: object
    source: str                 # where it came from, for messages: a file path or "trust[2]"


@dataclass(frozen=True)
class Signer:
    """Who signed a bundle. ``verified``: checked against a trusted key; otherwise only read."""
    key_id: str
    signer: str
    signed_at: str
    verified: bool
    key_source: str = ""

    def describe(self) -> str:
        who = f"key {self.key_id}" + (f" ({self.signer})" if self.signer else "")
        if self.verified:
            return f"{who}, signed {self.signed_at}, verified against trusted key {self.key_source}"
        return f"{who}, signed {self.signed_at}, not checked (pass --trust PUBKEY to verify)"


# -- keys ------------------------------------------------------------------------------------------
def _write_private(path: Path, data: bytes) -> None:
    """Owner-only from the first byte (never world-readable, even briefly), then renamed."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def keygen(private_path: str | Path, public_path: str | Path | None = None, force: bool = False) -> tuple[Path, Path, str]:
    """A new Ed25519 key pair: (private key file, public key file, key id)."""
    serialization, ed25519 = _crypto()
    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else private_path.with_name(private_path.stem + ".pub")
    for p in (private_path, public_path):
        if p.exists() and not force:
            raise ConfigError(f"{p} already exists; choose another path or pass --force to replace the key")
    key = ed25519.Ed25519PrivateKey.generate()
    _write_private(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    pub = key.public_key()
    tmp = public_path.with_name(f".{public_path.name}.tmp.{os.getpid()}")
    tmp.write_bytes(pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    os.replace(tmp, public_path)
    return private_path, public_path, key_id(pub)


def _read_key_file(path: Path) -> bytes:
    if not path.is_file():
        raise ConfigError(f"key file {path} does not exist (make a key pair with `edgevl keygen`)")
    if path.stat().st_size > MAX_KEY_BYTES:
        raise ConfigError(f"{path} is {path.stat().st_size} bytes, too big to be a key file")
    return path.read_bytes()


def load_private_key(path: str | Path):
    serialization, ed25519 = _crypto()
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(_read_key_file(path), password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not an unencrypted PEM private key ({e}); make one with `edgevl keygen`") from e
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path} is a {type(key).__name__}, not an Ed25519 key; make one with `edgevl keygen`")
    return key


def load_public_key(source, name: str = "") -> TrustedKey:
    """A public key from a PEM file path, PEM text/bytes, or a cryptography Ed25519 public key."""
    serialization, ed25519 = _crypto()
    if isinstance(source, ed25519.Ed25519PublicKey):
        return TrustedKey(key_id(source), source, name or "key object")
    if isinstance(source, (bytes, str)) and "-----BEGIN" in (source if isinstance(source, str) else source.decode("latin-1")):
        data, where = source.encode() if isinstance(source, str) else source, name or "PEM text"
    else:
        where = str(source)
        data = _read_key_file(Path(source))
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where} is not a PEM public key ({e}); use the .pub file `edgevl keygen` wrote") from e
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"{where} is a {type(key).__name__}, not an Ed25519 public key")
    return TrustedKey(key_id(key), key, where)


# -- the policy ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrustPolicy:
    """Bundles must carry a valid signature by one of ``keys`` (several: rotation)."""
    keys: tuple[TrustedKey, ...]
    origin: str                 # "trust=" or "EDGEVL_TRUST", for messages

    def by_id(self) -> dict[str, TrustedKey]:
        return {k.key_id: k for k in self.keys}


def _expand(entry) -> list:
    """A folder stands for every *.pub / *.pem file in it."""
    if isinstance(entry, (str, Path)) and Path(entry).is_dir():
        found = sorted(p for p in Path(entry).iterdir() if p.suffix in (".pub", ".pem") and p.is_file())
        if not found:
            raise ConfigError(f"trusted key folder {entry} holds no .pub or .pem public keys")
        return found
    return [entry]


def policy_from(trust=None, environ=None) -> TrustPolicy | None:
    """The policy for a load: ``trust`` (keys, key files or folders) when given, else the
    device-wide ``EDGEVL_TRUST``, else None (no signature required; hashes still checked)."""
    environ = os.environ if environ is None else environ
    if trust is None:
        value = environ.get(ENV, "").strip()
        if not value:
            return None
        entries, origin = [e for e in value.split(os.pathsep) if e.strip()], f"{ENV}={value}"
    else:
        entries = [trust] if isinstance(trust, (str, Path, bytes)) else list(trust)
        origin = "trust="
    keys = [load_public_key(k) for e in entries for k in _expand(e)]
    if not keys:
        # an empty list must not silently mean "trust everything"
        raise ConfigError(f"the trust policy ({origin}) names no public keys; give at least one .pub file")
    return TrustPolicy(tuple(keys), origin)


# -- signing and checking -------------------------------------------------------------------------
def _read_signatures(bundle_dir: Path) -> list[dict]:
    path = bundle_dir / SIGNATURE_FILE
    if not path.is_file():
        return []
    if path.stat().st_size > MAX_SIGNATURE_BYTES:
        raise BundleError(f"{path} is larger than {MAX_SIGNATURE_BYTES} bytes; it is not an edgevl signature file")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise BundleError(f"{path}: not valid JSON ({e}); sign the bundle again with `edgevl sign`") from e
    sigs = data.get("signatures") if isinstance(data, dict) and data.get("format") == SIGNATURE_FORMAT else None
    if not isinstance(sigs, list) or not all(isinstance(s, dict) for s in sigs):
        raise BundleError(f"{path} is not an edgevl signature file; sign the bundle again with `edgevl sign`")
    return sigs


def sign_bundle(bundle_dir: str | Path, private_key_path: str | Path, signer: str = "") -> Signer:
    """Add (or replace) this key's signature over the bundle's manifest.json."""
    from edgevl.bundle import MANIFEST, load_bundle

    bundle_dir = Path(bundle_dir)
    key = load_private_key(private_key_path)
    load_bundle(bundle_dir, trust=False)           # never sign a bundle that does not verify
    manifest = (bundle_dir / MANIFEST).read_bytes()
    kid = key_id(key.public_key())
    entry = {"algorithm": "ed25519", "key_id": kid, "signer": signer or Path(private_key_path).stem,
             "signed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
             "signature": base64.b64encode(key.sign(DOMAIN + manifest)).decode()}
    others = [s for s in _read_signatures(bundle_dir) if s.get("key_id") != kid]
    data = {"format": SIGNATURE_FORMAT, "version": 1, "signatures": others + [entry]}
    tmp = bundle_dir / f".{SIGNATURE_FILE}.tmp.{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, bundle_dir / SIGNATURE_FILE)
    return Signer(kid, entry["signer"], entry["signed_at"], verified=False)


def check_signature(bundle_dir: Path, manifest_bytes: bytes, policy: TrustPolicy | None) -> Signer | None:
    """The signer of ``manifest_bytes`` (the bytes the caller will parse). With a policy, a
    valid signature by a trusted key or BundleError; without one, the first signer as read."""
    sigs = _read_signatures(bundle_dir)
    if policy is None:
        s = sigs[0] if sigs else None
        return Signer(str(s.get("key_id")), str(s.get("signer", "")), str(s.get("signed_at", "?")), False) if s else None
    if not sigs:
        raise BundleError(f"{bundle_dir} is not signed, and the trust policy ({policy.origin}) requires a signature "
                          f"by one of the trusted keys {[k.key_id for k in policy.keys]}; sign it on the build machine "
                          f"with `edgevl sign {bundle_dir.name} --key KEY`")
    _, ed25519 = _crypto()
    from cryptography.exceptions import InvalidSignature

    trusted = policy.by_id()
    for s in sigs:
        key = trusted.get(s.get("key_id"))
        if key is None:
            continue
        try:
            key.public_key.verify(base64.b64decode(str(s.get("signature", "")), validate=True), DOMAIN + manifest_bytes)
        except (InvalidSignature, ValueError) as e:
            raise BundleError(f"{bundle_dir}: the signature by trusted key {key.key_id} does not match manifest.json: "
                              "the manifest was changed after signing (or the signature damaged); do not run this "
                              "bundle, fetch it again from the build machine") from e
        return Signer(key.key_id, str(s.get("signer", "")), str(s.get("signed_at", "?")), True, key.source)
    raise BundleError(f"{bundle_dir} is signed by unknown key(s) {[str(s.get('key_id')) for s in sigs]}, none of them "
                      f"trusted by the policy ({policy.origin}: {[k.key_id for k in policy.keys]}); add the signer's "
                      "public key to the trusted keys, or sign the bundle with a trusted key")
