"""Signing and verifying an output directory.

The signed blob is ``manifest.json`` (it holds the sha256 of every output and of
every file in the tree). The signature is ECDSA P-256 over SHA-256, DER, base64:
the cosign blob format, so ``cosign verify-blob --key KEY.pub --signature
manifest.json.sig manifest.json`` accepts it too.
"""

from __future__ import annotations

import base64
import hashlib
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from rootfs import cpio, kata, pack
from rootfs.fetch import sha256_file
from rootfs.manifest import MANIFEST, Manifest
from rootfs.steps import BuildError

SIGNATURE = MANIFEST + ".sig"
PUBLIC_KEY = "signing-key.pub.pem"


class VerifyError(BuildError):
    """The output directory does not match its manifest or signature (exit 1)."""


class UnusableInput(VerifyError):
    """Nothing to verify against: no manifest, an unreadable key (exit 2)."""


def _load_private(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BuildError(f"sign: cannot read private key {path}: {exc} (expected an "
                         "unencrypted PEM EC P-256 key: openssl ecparam -genkey -name "
                         "prime256v1 -noout | openssl pkcs8 -topk8 -nocrypt)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise BuildError(f"sign: {path} is not an EC P-256 private key")
    return key


def sign(out: Path, key_path: Path) -> Path:
    blob = _read_manifest_bytes(out)
    key = _load_private(key_path)
    sig = key.sign(blob, ec.ECDSA(hashes.SHA256()))
    (out / SIGNATURE).write_text(base64.b64encode(sig).decode() + "\n")
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    (out / PUBLIC_KEY).write_bytes(pub)
    return out / SIGNATURE


def _read_manifest_bytes(out: Path) -> bytes:
    try:
        return (out / MANIFEST).read_bytes()
    except OSError as exc:
        raise UnusableInput(f"{out / MANIFEST}: {exc.strerror}; is {out} an output of "
                            "`guestinit-build image`?") from None


def check_signature(out: Path, pub_path: Path) -> None:
    blob = _read_manifest_bytes(out)
    try:
        pub = serialization.load_pem_public_key(pub_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise UnusableInput(f"verify: cannot read public key {pub_path}: {exc}") from None
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise UnusableInput(f"verify: {pub_path} is not an EC public key")
    try:
        sig = base64.b64decode((out / SIGNATURE).read_text().strip(), validate=True)
    except (OSError, ValueError) as exc:
        raise VerifyError(f"verify: {out / SIGNATURE} unreadable ({exc}); run "
                          "`guestinit-build sign --key KEY.pem OUT`") from None
    try:
        pub.verify(sig, blob, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise VerifyError(f"verify: signature {out / SIGNATURE} does not match {MANIFEST} "
                          f"under key {pub_path}: the manifest or the signature was changed"
                          ) from None


def _check_initramfs(out: Path, man: dict[str, Any]) -> str:
    path = out / "initramfs.img"
    if not path.is_file():
        raise VerifyError(f"verify: output initramfs.img is missing from {out}")
    # files that ship in a Kata extension image ("image") are not in the base's initramfs
    files = {r["path"]: r for r in man["files"] if "image" not in r}
    seen = 0
    try:
        for e in cpio.read(pack.decompress(path)):
            row = files.get("/" + e.path)
            if row is None:
                raise VerifyError(f"verify: initramfs holds /{e.path}, not in {MANIFEST}")
            if stat.S_ISREG(e.mode) and hashlib.sha256(e.data).hexdigest() != row["sha256"]:
                raise VerifyError(f"verify: initramfs file /{e.path} was modified (sha256 "
                                  f"differs from {MANIFEST})")
            seen += 1
    except (ValueError, BuildError) as exc:
        if isinstance(exc, VerifyError):
            raise
        raise VerifyError(f"verify: initramfs.img is corrupt: {exc}") from None
    if seen != len(files):
        raise VerifyError(f"verify: initramfs has {seen} entries, {MANIFEST} lists {len(files)}")
    return f"{seen} initramfs entries match {MANIFEST}"


def _check_disk(out: Path, disk: str, root_hash: str) -> str:
    """A Kata disk's p1 against its p2 with exactly the fields of its root hash file."""
    try:
        params = kata.parse_verity_params((out / root_hash).read_text().strip())
    except (OSError, kata.VerityParamsError) as exc:
        raise VerifyError(f"verify: {root_hash}: {exc}") from None
    if params is None:
        raise VerifyError(f"verify: {root_hash} is empty")
    try:
        kata.verify_disk(out / disk, params)
    except BuildError as exc:
        raise VerifyError(f"verify: {exc}") from None
    return f"{disk} p1 matches its p2 hash tree with {root_hash}"


def verify(out: Path, pub_path: Path | None, allow_unsigned: bool = False) -> list[str]:
    """Check outputs (the SBOM among them), initramfs contents, verity and signature;
    returns what was checked. An unsigned image fails unless ``allow_unsigned``."""
    _read_manifest_bytes(out)  # a clear error when there is no manifest
    man = Manifest.read(out).data
    done = []
    if "initramfs.img" in man["outputs"]:
        # first, so that a changed file inside the archive is named, not just the archive
        done.append(_check_initramfs(out, man))
    for name, want in sorted(man["outputs"].items()):
        path = out / name
        if not path.is_file():
            raise VerifyError(f"verify: output {name} is missing from {out}")
        if sha256_file(path) != want["sha256"]:
            raise VerifyError(f"verify: output {name} was modified (sha256 differs from "
                              f"{MANIFEST})")
    done.append(f"{len(man['outputs'])} outputs match {MANIFEST}")
    if man.get("roothash"):
        recorded = (out / "roothash.txt").read_text().strip()
        if recorded != man["roothash"]:
            raise VerifyError(f"verify: roothash.txt ({recorded}) differs from {MANIFEST}")
        pack.verity_verify(out, man["roothash"])
        done.append("rootfs.erofs matches the dm-verity root hash")
    if kata.ROOT_HASH in man["outputs"]:
        done.append(_check_disk(out, kata.DISK, kata.ROOT_HASH))
    for name in sorted(man["outputs"]):
        if name.startswith("extension-") and name.endswith(".img"):
            done.append(_check_disk(out, name, f"root_hash_{name.removesuffix('.img')}.txt"))
    if not (out / SIGNATURE).exists():
        if not allow_unsigned:
            raise VerifyError(f"verify: {out / SIGNATURE} is missing: the image is not signed; "
                              f"sign it (`guestinit-build sign --key KEY.pem {out}`) or pass "
                              "--allow-unsigned to check integrity only")
        return [*done, "WARNING: not signed (--allow-unsigned): the outputs match the "
                       "manifest, but nothing proves who built them"]
    if pub_path is None:
        pub_path = out / PUBLIC_KEY
        done.append(f"warning: no --key given; checked against {PUBLIC_KEY} shipped with the "
                    "image (integrity only, not authenticity)")
    check_signature(out, pub_path)
    done.append(f"signature valid for key {pub_path}")
    return done
