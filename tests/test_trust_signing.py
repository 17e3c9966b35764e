"""Signed bundles: sign then verify; every kind of tampering, a wrong key and an unsigned bundle
under a policy are refused; two trusted keys (rotation); `edgevl info` says who signed."""

from __future__ import annotations

import json
import os
import stat

import pytest

import edgevl
from edgevl.bundle import load_bundle
from edgevl.cli.main import main as cli
from edgevl.errors import BundleError, ConfigError
from edgevl.signing import ENV, SIGNATURE_FILE, keygen, policy_from, sign_bundle

from bundle_edits import copy_bundle, manifest, write_manifest


@pytest.fixture
def keys(tmp_path):
    """Three key pairs: {name: (private key file, public key file, key id)}."""
    (tmp_path / "keys").mkdir()
    return {name: keygen(tmp_path / "keys" / f"{name}.key") for name in ("old", "new", "stranger")}


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    return copy_bundle(tiny_bundle, tmp_path / "b")


def test_keygen_writes_an_owner_only_private_key(keys):
    private, public, kid = keys["old"]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and public.suffix == ".pub"
    assert policy_from([public]).keys[0].key_id == kid and len(kid) == 16
    with pytest.raises(ConfigError, match="already exists"):
        keygen(private)


def test_sign_then_verify_with_cli_and_load(bundle, keys, capsys):
    private, public, kid = keys["old"]
    assert cli(["sign", str(bundle), "--key", str(private), "--signer", "ci@build"]) == 0
    assert cli(["verify", str(bundle), "--trust", str(public)]) == 0
    assert f"signed by key {kid} (ci@build)" in capsys.readouterr().out
    with edgevl.load(bundle, trust=[public], verbose=False) as vlm:
        assert vlm.bundle.signer.verified and vlm.bundle.signer.key_id == kid
        assert vlm.generate(None, "what color is the circle?", max_new_tokens=2).tokens
    assert cli(["info", str(bundle)]) == 0                   # no policy: the signer is shown, marked unchecked
    assert "not checked" in capsys.readouterr().out


def test_info_shows_verified_signer(bundle, keys, capsys):
    private, public, kid = keys["old"]
    sign_bundle(bundle, private, signer="release")
    assert cli(["info", str(bundle), "--trust", str(public)]) == 0
    out = capsys.readouterr().out
    assert f"signed by   key {kid} (release)" in out and f"verified against trusted key {public}" in out


@pytest.mark.parametrize("target", ["decoder.onnx", "tokenizer.json", "parity.json", "vision.onnx"])
def test_a_changed_byte_in_any_file_is_refused(bundle, keys, target):
    private, public, _ = keys["old"]
    sign_bundle(bundle, private)
    data = bytearray((bundle / target).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / target).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{target} does not match its sha256"):
        load_bundle(bundle, trust=[public])
    with pytest.raises(BundleError, match=f"{target} does not match its sha256"):
        load_bundle(bundle, verify=False, trust=[public])      # a policy always checks the hashes


def test_a_changed_manifest_is_refused_even_with_recomputed_hashes(bundle, keys):
    private, public, _ = keys["old"]
    sign_bundle(bundle, private)
    data = manifest(bundle)
    data["generation"]["max_new_tokens"] = 33                 # a harmless-looking edit
    write_manifest(bundle, data)
    with pytest.raises(BundleError, match="does not match manifest.json: the manifest was changed after signing"):
        load_bundle(bundle, trust=[public])
    load_bundle(bundle)                                       # hashes alone cannot tell: that is the point


def test_wrong_key_and_damaged_signature_are_refused(bundle, keys):
    sign_bundle(bundle, keys["stranger"][0])
    with pytest.raises(BundleError, match=f"signed by unknown key.*{keys['stranger'][2]}.*none of them trusted"):
        load_bundle(bundle, trust=[keys["old"][1]])
    sig = json.loads((bundle / SIGNATURE_FILE).read_text())
    sig["signatures"][0]["key_id"] = keys["old"][2]          # claims the trusted key, signature is the stranger's
    (bundle / SIGNATURE_FILE).write_text(json.dumps(sig))
    with pytest.raises(BundleError, match="does not match manifest.json"):
        load_bundle(bundle, trust=[keys["old"][1]])
    (bundle / SIGNATURE_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON.*sign the bundle again"):
        load_bundle(bundle, trust=[keys["old"][1]])


def test_unsigned_bundle_under_a_device_policy_is_refused(bundle, keys, monkeypatch, capsys):
    monkeypatch.setenv(ENV, str(keys["old"][1]))
    with pytest.raises(BundleError, match=f"is not signed, and the trust policy \\({ENV}=.*requires a signature"):
        edgevl.load(bundle, verbose=False)
    assert cli(["run", str(bundle), "--image", "none.png", "--prompt", "hi"]) == 2
    assert "is not signed" in capsys.readouterr().err
    sign_bundle(bundle, keys["old"][0])                       # signing ignores the device policy it satisfies next
    assert load_bundle(bundle).signer.verified
    monkeypatch.setenv(ENV, str(keys["old"][1].parent / "missing.pub"))
    with pytest.raises(ConfigError, match="missing.pub does not exist"):     # a broken policy fails closed
        load_bundle(bundle)


def test_two_trusted_keys_allow_rotation(bundle, keys, monkeypatch):
    old, new = keys["old"], keys["new"]
    sign_bundle(bundle, old[0])
    both = [old[1], new[1]]
    assert load_bundle(bundle, trust=both).signer.key_id == old[2]
    sign_bundle(bundle, new[0])                               # during rotation: signed by both
    assert load_bundle(bundle, trust=[new[1]]).signer.key_id == new[2]
    assert load_bundle(bundle, trust=[old[1]]).signer.key_id == old[2]
    monkeypatch.setenv(ENV, str(keys["old"][1].parent))      # a folder of trusted keys, stranger's included
    assert load_bundle(bundle).signer.verified
    os.remove(keys["stranger"][1])
    os.remove(keys["old"][1])
    assert load_bundle(bundle).signer.key_id == new[2]       # the old key retired: the new signature still counts


def test_empty_trust_list_fails_closed(bundle):
    with pytest.raises(ConfigError, match="names no public keys"):
        load_bundle(bundle, trust=[])
