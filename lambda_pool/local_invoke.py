"""``lambda-pool invoke``: run a built function folder the way Lambda runs it, without Docker.

``sam local invoke`` needs Docker. This runs the folder ``sam build`` wrote (say
``.aws-sam/build/PsycopgFunction``) in the real ``awslambdaric`` runtime client through
:class:`lambda_pool.testing.runtime.LocalLambda`, with the layout of a Lambda execution
environment:

* an interpreter of the function's runtime (``python3.12`` for ``Runtime: python3.12``)
  in an empty virtual environment made for the run, so nothing installed on the build
  machine can stand in for a package the function failed to bundle;
* ``sys.path``: the function folder (``/var/task``), then the ``--layer`` folders
  (``/opt/python``), then a stand-in for the runtime's own packages (awslambdaric and
  its requirements, and boto3 as every Lambda Python runtime has it), linked from the
  environment lambda-pool is installed in. Those are pure Python or fall back to it,
  which is what lets an interpreter of another version import them;
* the handler, timeout and memory from the ``template.yaml`` next to the folder (the
  one ``sam build`` writes), or from the options.

The function talks to ``--database-url`` (``LAMBDA_POOL_AUTH=static``: the password is
in the URL) or to an embedded PostgreSQL started for the run. Each result is printed as
one JSON line on stdout; the function's own output goes to stderr. The exit status is 1
when an invocation failed, 2 for a mistake in the command (no traceback for either).
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from lambda_pool.exc import LambdaPoolError

__all__ = [
    "FunctionSpec",
    "InvokeError",
    "LambdaRuntime",
    "link_distributions",
    "main",
    "read_function_spec",
]

# What every Lambda Python runtime provides besides the standard library.
RUNTIME_DISTRIBUTIONS = ("awslambdaric", "boto3")
_RUNTIME_PATTERN = re.compile(r"^python(\d+\.\d+)$")
_CURRENT_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


class InvokeError(LambdaPoolError):
    """The command cannot run the function as asked (a user mistake, not a function error)."""


@dataclass(frozen=True)
class FunctionSpec:
    """What Lambda needs to know to run one built function folder."""

    folder: Path
    handler: str
    runtime: str
    timeout_s: float = 3.0
    memory_mb: int = 128

    @property
    def python_version(self) -> str:
        """``3.12`` for ``python3.12``."""
        match = _RUNTIME_PATTERN.match(self.runtime)
        if match is None:
            raise InvokeError(f"runtime {self.runtime!r} is not a Python runtime (python3.X)")
        return match.group(1)


# --------------------------------------------------------------------------- the template


def _load_template(path: Path) -> dict[str, Any]:
    """The template as plain data; CloudFormation tags become ``{"Fn::X": ...}``."""
    text = path.read_text()
    if path.suffix == ".json":
        loaded = json.loads(text)
    else:
        try:
            # PyYAML ships no type hints: kept as Any.
            yaml: Any = importlib.import_module("yaml")
        except ImportError:
            raise InvokeError(
                f"reading {path} needs PyYAML (pip install 'lambda-pool[testing]'), "
                "or pass --handler and --runtime"
            ) from None

        def _tag(loader: Any, suffix: str, node: Any) -> dict[str, Any]:
            value: Any
            if isinstance(node, yaml.ScalarNode):
                value = loader.construct_scalar(node)
            elif isinstance(node, yaml.SequenceNode):
                value = loader.construct_sequence(node, deep=True)
            else:
                value = loader.construct_mapping(node, deep=True)
            return {"Ref" if suffix == "Ref" else f"Fn::{suffix}": value}

        # A SafeLoader that reads CloudFormation's short forms (!Ref, !Sub, ...).
        loader: Any = type("TemplateLoader", (yaml.SafeLoader,), {})
        loader.add_multi_constructor("!", _tag)
        try:
            loaded = yaml.load(text, Loader=loader)
        except yaml.YAMLError as exc:
            raise InvokeError(f"{path} is not a readable template: {exc}") from None
    if not isinstance(loaded, dict):
        raise InvokeError(f"{path} is not a CloudFormation/SAM template")
    return loaded


def _plain(value: Any, parameters: dict[str, Any]) -> Any:
    """A property value with ``Ref`` to a parameter replaced by its default."""
    if isinstance(value, dict) and set(value) == {"Ref"}:
        spec = parameters.get(str(value["Ref"]))
        return spec.get("Default") if isinstance(spec, dict) else None
    return value


def read_function_spec(
    folder: str | os.PathLike[str],
    *,
    handler: str | None = None,
    runtime: str | None = None,
    timeout_s: float | None = None,
) -> FunctionSpec:
    """Handler, runtime, timeout and memory of a built function folder.

    Read from the ``template.yaml`` (or ``.json``) in the folder's parent (``sam build``
    names each folder after the function's logical id), the function's properties first,
    then ``Globals.Function``; a parameter reference counts as the parameter's default.
    The arguments, when given, win.
    """
    path = Path(folder).resolve()
    if not path.is_dir():
        raise InvokeError(f"{folder} is not a folder (expected e.g. .aws-sam/build/MyFunction)")
    properties: dict[str, Any] = {}
    template_path = next(
        (p for p in (path.parent / "template.yaml", path.parent / "template.json") if p.exists()),
        None,
    )
    if template_path is not None:
        template = _load_template(template_path)
        parameters = template.get("Parameters") or {}
        resource = (template.get("Resources") or {}).get(path.name) or {}
        defaults = ((template.get("Globals") or {}).get("Function")) or {}
        merged = {**defaults, **(resource.get("Properties") or {})}
        properties = {k: _plain(v, parameters) for k, v in merged.items()}
    chosen_handler = handler or properties.get("Handler")
    chosen_runtime = runtime or properties.get("Runtime")
    if not chosen_handler or not chosen_runtime:
        where = f"function {path.name} in {template_path}" if template_path else "no template"
        raise InvokeError(
            f"no handler or runtime for {path} ({where}): pass --handler module.function "
            "and --runtime python3.X"
        )
    handler_text = str(chosen_handler)
    module = handler_text.rpartition(".")[0]
    if not module:
        raise InvokeError(f"handler {handler_text!r} must be 'module.function'")
    module_path = path / Path(*module.split("."))
    if not (module_path.with_suffix(".py").exists() or (module_path / "__init__.py").exists()):
        raise InvokeError(f"handler module {module!r} is not in {path}")
    chosen_timeout = timeout_s if timeout_s is not None else properties.get("Timeout") or 3
    memory = properties.get("MemorySize") or 128
    return FunctionSpec(
        folder=path,
        handler=handler_text,
        runtime=str(chosen_runtime),
        timeout_s=float(chosen_timeout),
        memory_mb=int(memory),
    )


# --------------------------------------------------------------------------- the runtime


def _requirement_names(distribution: metadata.Distribution) -> list[str]:
    """Names of a distribution's unconditional requirements (no extras)."""
    names = []
    for requirement in distribution.requires or []:
        if "extra ==" in requirement.replace('"', "'").replace("extra==", "extra =="):
            continue
        match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
        if match:
            names.append(match.group(1))
    return names


def link_distributions(names: Sequence[str], into: Path, *, required: Sequence[str] = ()) -> None:
    """Link installed distributions and their requirements' top-level files into ``into``.

    ``into`` then works as a ``sys.path`` entry holding just those packages. A name in
    ``required`` that is not installed raises :class:`InvokeError`; others are skipped.
    """
    into.mkdir(parents=True, exist_ok=True)
    pending, seen = list(names), set()
    while pending:
        name = pending.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if name in required:
                raise InvokeError(
                    f"{name} is not installed: pip install 'lambda-pool[testing]'"
                ) from None
            continue
        root = Path(str(distribution.locate_file("")))
        for entry in {Path(str(f)).parts[0] for f in distribution.files or []}:
            if entry in ("..", "__pycache__") or entry.endswith(".pth"):
                continue
            target, link = root / entry, into / entry
            if target.exists() and not link.exists():
                link.symlink_to(target)
        pending.extend(_requirement_names(distribution))


def _version_of(python: str) -> str | None:
    try:
        done = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def find_python(version: str, explicit: str | None = None) -> str:
    """A working interpreter of Python ``version`` (``3.12``); ``explicit`` is checked only."""
    if explicit is not None:
        found = _version_of(explicit)
        if found != version:
            raise InvokeError(
                f"--python {explicit} is {'Python ' + found if found else 'not runnable'}, "
                f"the function's runtime is python{version}"
            )
        return explicit
    candidates = []
    if version == _CURRENT_VERSION:
        candidates.append(sys.executable)
    candidates.append(shutil.which(f"python{version}") or "")
    home = Path.home()
    candidates += sorted(glob.glob(str(home / f".pyenv/versions/{version}.*/bin/python{version}")))
    candidates += [f"/usr/local/bin/python{version}", f"/usr/bin/python{version}"]
    for candidate in candidates:
        if candidate and _version_of(candidate) == version:
            return candidate
    raise InvokeError(
        f"no Python {version} found (the function's runtime): install it, put python{version} "
        "on PATH, or pass --python PATH"
    )


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lambda-pool" / "runtimes"


def _installed_runtime_packages(version: str) -> Path:
    """The runtime's packages for another Python version, installed once into a cache.

    awslambdaric has a compiled part (``runtime_client``), so the copy of this
    environment cannot serve another version: the same releases are installed for it
    with pip (binary wheels for this machine), which needs the package index once.
    """
    awslambdaric = _installed_version("awslambdaric")
    if awslambdaric is None:
        raise InvokeError("awslambdaric is not installed: pip install 'lambda-pool[testing]'")
    pins = [f"awslambdaric=={awslambdaric}"]
    boto3 = _installed_version("boto3")
    pins.append(f"boto3=={boto3}" if boto3 else "boto3")
    machine = platform.machine().lower()
    arch = "aarch64" if machine in ("arm64", "aarch64") else "x86_64"
    key = f"python{version}-{arch}-" + "-".join(p.replace("==", "") for p in pins)
    target = _cache_root() / key
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "--no-compile", "--target", str(staging), "--only-binary=:all:",
        "--implementation", "cp", "--python-version", version,
        "--platform", f"manylinux2014_{arch}", "--platform", f"manylinux_2_28_{arch}",
        *pins,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        detail = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise InvokeError(
            f"could not install {' '.join(pins)} for Python {version} (the runtime's "
            f"packages; needs the package index once): {detail}"
        )
    try:
        staging.rename(target)
    except OSError:  # another run finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


class LambdaRuntime:
    """A stand-in for a Lambda Python runtime: its interpreter and its own packages.

    Use as a context manager; the virtual environment lives in a temporary folder
    removed on exit. :meth:`search_path` is the ``PYTHONPATH`` of a function.
    """

    def __init__(self, version: str, *, python: str | None = None) -> None:
        self.version = version
        self._explicit_python = python
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self.python = ""
        self.packages = Path()

    def __enter__(self) -> LambdaRuntime:
        base = find_python(self.version, self._explicit_python)
        self._workdir = tempfile.TemporaryDirectory(prefix="lambda-pool-runtime-")
        root = Path(self._workdir.name)
        try:
            # An empty environment: only what search_path() names can be imported.
            subprocess.run(
                [base, "-m", "venv", "--without-pip", str(root / "venv")],
                check=True,
                capture_output=True,
                timeout=120,
            )
            self.python = str(root / "venv" / "bin" / "python")
            if self.version == _CURRENT_VERSION:
                self.packages = root / "runtime"
                link_distributions(RUNTIME_DISTRIBUTIONS, self.packages, required=("awslambdaric",))
            else:
                self.packages = _installed_runtime_packages(self.version)
        except (OSError, subprocess.SubprocessError) as exc:
            self.__exit__()
            raise InvokeError(
                f"could not make a Python {self.version} environment: {exc}"
            ) from None
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def search_path(self, folder: Path, layers: Sequence[Path] = ()) -> str:
        """``PYTHONPATH`` in Lambda's order: function, layers, runtime packages."""
        return os.pathsep.join([str(folder), *(str(p) for p in layers), str(self.packages)])


# --------------------------------------------------------------------------- the command


@contextlib.contextmanager
def _database(url: str | None, say: IO[str]) -> Iterator[str]:
    if url:
        yield url
        return
    from lambda_pool.testing.postgres import EmbeddedPostgres

    print("lambda-pool invoke: starting an embedded PostgreSQL ...", file=say)
    try:
        server = EmbeddedPostgres(ssl=False).start()
    except Exception as exc:
        raise InvokeError(
            f"could not start an embedded PostgreSQL ({exc}); pass --database-url"
        ) from None
    try:
        yield server.dsn
    finally:
        server.stop()


def _read_event(source: str | None) -> Any:
    if source is None:
        return {}
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise InvokeError(f"cannot read the event {source}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvokeError(f"the event {source} is not JSON: {exc}") from None


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InvokeError(f"--env takes NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def function_environment(spec: FunctionSpec, database_url: str) -> dict[str, str]:
    """The variables a local run sets (``template.yaml`` values need CloudFormation)."""
    return {
        "LAMBDA_POOL_DATABASE_URL": database_url,
        "LAMBDA_POOL_AUTH": "static",
        # Lambda sends SIGTERM at shutdown only with an extension registered.
        "LAMBDA_POOL_REGISTER_EXTENSION": "1",
        # No X-Ray daemon here.
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_SERVICE_NAME": spec.folder.name,
        "POWERTOOLS_METRICS_NAMESPACE": "LambdaPoolLocal",
    }


def run(
    folder: str,
    *,
    event: str | None = None,
    times: int = 1,
    database_url: str | None = None,
    handler: str | None = None,
    runtime: str | None = None,
    python: str | None = None,
    layers: Sequence[str] = (),
    env: Sequence[str] = (),
    timeout_s: float | None = None,
    out: IO[str] = sys.stdout,
    err: IO[str] = sys.stderr,
) -> int:
    """The command: 0 when every invocation succeeded, 1 when one failed."""
    from lambda_pool.testing.runtime import LocalLambda, RuntimeInitError

    if times < 1:
        raise InvokeError("--times must be 1 or more")
    spec = read_function_spec(folder, handler=handler, runtime=runtime, timeout_s=timeout_s)
    payload = _read_event(event)
    extra_env = _parse_env(env)
    layer_paths = [Path(p).resolve() for p in layers]
    for layer in layer_paths:
        if not layer.is_dir():
            raise InvokeError(f"--layer {layer} is not a folder")
    failed = False
    with (
        LambdaRuntime(spec.python_version, python=python) as runtime_env,
        _database(database_url, err) as url,
    ):
        variables = {
            **function_environment(spec, url),
            "PYTHONPATH": runtime_env.search_path(spec.folder, layer_paths),
            **extra_env,
        }
        with LocalLambda(
            spec.handler,
            spec.folder,
            env=variables,
            function_name=spec.folder.name,
            memory_mb=spec.memory_mb,
            timeout_s=spec.timeout_s,
            python=runtime_env.python,
            execution_env=f"AWS_Lambda_{spec.runtime}",
        ) as function:
            try:
                for _ in range(times):
                    result = function.invoke(payload)
                    if result.ok:
                        print(json.dumps(result.payload), file=out, flush=True)
                    else:
                        failed = True
                        error = {
                            "errorType": result.error_type,
                            "errorMessage": result.error_message,
                            "stackTrace": result.stack_trace or [],
                        }
                        print(json.dumps(error), file=out, flush=True)
                    kind = "cold" if result.cold else "warm"
                    print(
                        f"lambda-pool invoke: {kind} invocation {result.request_id} "
                        f"{'ok' if result.ok else 'failed'} in {result.duration_ms:.1f} ms",
                        file=err,
                    )
            except RuntimeInitError as exc:
                failed = True
                error = {"errorType": exc.error_type, "errorMessage": exc.error_message}
                print(json.dumps(error), file=out, flush=True)
            finally:
                function.shutdown(grace=2.0)
                logs = function.logs()
                if logs.strip():
                    print("--- function output ---", file=err)
                    print(logs.rstrip(), file=err)
    return 1 if failed else 0


def main(args: Any) -> int:
    """Entry point of ``lambda-pool invoke`` (``args`` from :mod:`lambda_pool.cli`)."""
    try:
        return run(
            args.folder,
            event=args.event,
            times=args.times,
            database_url=args.database_url,
            handler=args.handler,
            runtime=args.runtime,
            python=args.python,
            layers=args.layer or (),
            env=args.env or (),
            timeout_s=args.timeout,
        )
    except InvokeError as exc:
        print(f"lambda-pool invoke: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the context managers above have stopped everything
        print("lambda-pool invoke: interrupted", file=sys.stderr)
        return 130


def add_arguments(parser: Any) -> None:
    """The options of ``lambda-pool invoke`` (an ``argparse`` sub-parser)."""
    parser.add_argument("folder", help="a built function folder, e.g. .aws-sam/build/MyFunction")
    parser.add_argument("--event", help="JSON file of the event ('-': stdin; default {})")
    parser.add_argument(
        "--times", type=int, default=1, help="invocations in the one environment (default 1)"
    )
    parser.add_argument(
        "--database-url",
        help="postgresql://USER:PASSWORD@HOST:PORT/DB (default: an embedded PostgreSQL)",
    )
    parser.add_argument("--handler", help="module.function (default: from template.yaml)")
    parser.add_argument("--runtime", help="python3.X (default: from template.yaml)")
    parser.add_argument("--python", help="interpreter of the runtime's version (default: found)")
    parser.add_argument(
        "--layer", action="append", help="a layer's python/ folder, as /opt/python (repeatable)"
    )
    parser.add_argument(
        "--env", action="append", metavar="NAME=VALUE", help="a variable for the function"
    )
    parser.add_argument(
        "--timeout", type=float, help="seconds per invocation (default: from template.yaml)"
    )
