"""CurveZMQ key files for the verdict socket: `inspectd keys --out DIR --name NAME` writes
NAME.key (public, shareable) and NAME.key_secret (public + secret, mode 0600), and the loaders
the daemon uses, which refuse a secret key file that group or others can read.

Server: `zmq.curve.server_secret_key_file: DIR/server.key_secret`; clients allowed to subscribe:
copy each client's NAME.key (public only) into `zmq.curve.allowed_clients_dir`.

The daemon runs as its service user, not as root who usually runs `inspectd keys`: `--owner
inspectd` hands both files (the secret stays 0600) to that user, so the daemon can read them.
"""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path
from typing import Any

from inspectd.errors import ConfigError

__all__ = ["generate", "parse_owner", "load_secret_key_file", "load_public_key_file", "allowed_client_keys",
           "register"]


def _check_private(path: Path, what: str) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{what}: {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{what}: {path} is not a regular file")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{what}: {path} is accessible by group/others (mode {stat.S_IMODE(mode):04o}); "
                          f"a secret key must be private: chmod 600 {path}")


def _load(path: Path, what: str) -> tuple[bytes, bytes | None]:
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: {path}: not a ZeroMQ certificate ({exc})") from None
    if not public or len(public) != 40:
        raise ConfigError(f"{what}: {path}: no valid public key")
    return public, secret


def load_secret_key_file(path: str | os.PathLike, what: str = "secret key file") -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a `.key_secret` certificate; ConfigError when the file is not
    private (mode & 077), unreadable, or holds no secret key."""
    path = Path(path)
    _check_private(path, what)
    public, secret = _load(path, what)
    if not secret or len(secret) != 40:
        raise ConfigError(f"{what}: {path} holds no secret key (give the NAME.key_secret file)")
    return public, secret


def load_public_key_file(path: str | os.PathLike, what: str = "public key file") -> bytes:
    """The Z85 public key of a certificate (`.key` or `.key_secret`)."""
    return _load(Path(path), what)[0]


def allowed_client_keys(folder: str | os.PathLike, what: str = "allowed clients folder") -> list[bytes]:
    """Every client public key in `folder` (*.key files), as ZeroMQ's authenticator will read them.
    ConfigError when the folder is missing, holds none, or holds a secret key (it must not)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{what}: {folder} is not a folder")
    files = sorted(folder.glob("*.key"))
    if not files:
        raise ConfigError(f"{what}: {folder} holds no client public keys (*.key): nobody could subscribe")
    secrets = sorted(p.name for p in folder.iterdir() if p.name.endswith(".key_secret"))
    if secrets:
        raise ConfigError(f"{what}: {folder} holds secret keys ({', '.join(secrets)}): "
                          f"only clients' public NAME.key files belong there")
    return [load_public_key_file(p, what) for p in files]


def parse_owner(spec: str) -> tuple[int, int]:
    """`USER[:GROUP]` -> (uid, gid); the user's own group when none is given. ConfigError (one line)
    for an unknown user or group, or when changing owners needs root and we are not root."""
    import grp
    import pwd

    user, _, group = spec.partition(":")
    if not user:
        raise ConfigError(f"--owner: {spec!r}: expected USER or USER:GROUP")
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"--owner: no user {user!r} on this machine (create the service user first, "
                          f"e.g. with deploy/install.sh)") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"--owner: no group {group!r} on this machine") from None
    if os.geteuid() != 0 and (pw.pw_uid != os.geteuid() or gid not in os.getgroups() + [os.getegid()]):
        raise ConfigError(f"--owner {spec}: giving files to another user needs root (run with sudo)")
    return pw.pw_uid, gid


def generate(out: str | os.PathLike, name: str, force: bool = False,
             owner: tuple[int, int] | None = None) -> tuple[Path, Path]:
    """Write NAME.key (0644) and NAME.key_secret (0600) into `out`; returns (public, secret) paths.
    `owner` (uid, gid): both files are chowned to it, and a folder created here too (the service
    user must reach and read its secret key)."""
    import zmq
    import zmq.auth

    if not zmq.has("curve"):
        raise ConfigError("this libzmq has no CURVE support")
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ConfigError(f"--name: {name!r}: use letters, digits, - _ . only")
    out = Path(out)
    public_file, secret_file = out / f"{name}.key", out / f"{name}.key_secret"
    existing = [p for p in (public_file, secret_file) if p.exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]} exists (use --force to replace the key pair)")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        for p in existing:
            p.unlink()
        # The umask makes the secret file private from its creation, not after a chmod.
        old = os.umask(0o077)
        try:
            zmq.auth.create_certificates(str(out), name)
        finally:
            os.umask(old)
        os.chmod(secret_file, 0o600)
        os.chmod(public_file, 0o644)
        if owner is not None:
            for p in ([out] if created else []) + [public_file, secret_file]:
                os.chown(p, *owner)
            if created:
                os.chmod(out, 0o750)
    except OSError as exc:
        raise ConfigError(f"--out: {out}: {exc.strerror or exc}") from None
    return public_file, secret_file


def cmd_keys(args: argparse.Namespace) -> int:
    owner = parse_owner(args.owner) if args.owner else None  # before anything is written
    public_file, secret_file = generate(args.out, args.name, force=args.force, owner=owner)
    print(f"public key (share it; clients: copy into the daemon's allowed_clients_dir): {public_file}")
    print(f"secret key (mode 0600, keep it on this machine): {secret_file}"
          + (f", owned by {args.owner}" if args.owner else ""))
    return 0


def register(subparsers: Any) -> None:
    """Add `inspectd keys` (called by inspectd.cli)."""
    p = subparsers.add_parser("keys", help="generate a CurveZMQ key pair for the verdict socket",
                              description="Write NAME.key (public) and NAME.key_secret (secret, mode 0600) "
                                          "for zmq.curve.server_secret_key_file or a client allow-list.")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the key files (created if missing)")
    p.add_argument("--name", required=True, help="base name of the files, e.g. server or reject-gate-1")
    p.add_argument("--force", action="store_true", help="replace an existing key pair of that name")
    p.add_argument("--owner", metavar="USER[:GROUP]",
                   help="chown the key files to this user (the daemon's service user, e.g. inspectd), so the "
                        "daemon can read its secret key; needs root")
    p.set_defaults(func=cmd_keys)
