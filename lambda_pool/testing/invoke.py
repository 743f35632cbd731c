"""Invoke a Lambda handler in-process, cold (a fresh import, as in a new container) or warm.

A Lambda execution environment imports the handler module once (Init, the cold start)
and then calls the handler for invocation after invocation with the module state kept
(warm starts): engines, warm connections and caches built at import time or on the
first call survive.  :class:`LambdaInvoker` reproduces both in the test process, without
the cost of a subprocess, so a test can check what a user cares about: the rows a cold
invocation writes, and that warm ones reuse the connection.

* :meth:`LambdaInvoker.cold` forgets the module (and every module loaded from the same
  code folder), disposes every engine lambda-pool created (``lifecycle.dispose_all()``),
  empties the warm-engine caches, then imports the handler again and calls it;
* :meth:`LambdaInvoker.warm` calls the already-imported handler again.

Both build a fresh :class:`~lambda_pool.testing.context.LambdaContext` (new request id,
a remaining time counting down from ``remaining_ms``), pass the event through a JSON
round trip as Lambda does (a handler returning something JSON cannot encode fails here,
as it would in Lambda), return the result and let the handler's exception propagate.

For the real runtime client in a subprocess see :mod:`lambda_pool.testing.runtime`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import sys
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lambda_pool.testing.context import LambdaContext

__all__ = ["LambdaInvoker", "reset_lambda_pool_state"]


def reset_lambda_pool_state() -> None:
    """Make lambda-pool look freshly imported: what a new execution environment sees.

    Disposes every registered engine (closing their idle connections) and empties the
    warm-engine caches of :mod:`lambda_pool.warm` and, if it was imported,
    :mod:`lambda_pool.sqlalchemy`, so the next ``warm_engine()`` builds a new engine with
    new :class:`~lambda_pool.warm.WarmStats` instead of returning the old one; and, when
    Powertools Parameters is loaded, its value cache and default providers (secrets read
    by ``SecretsManagerCredentials`` are cached there).
    """
    from lambda_pool import lifecycle

    lifecycle.dispose_all()
    # The SQLAlchemy adapter is only touched when loaded: importing it imports SQLAlchemy.
    for name in ("lambda_pool.warm", "lambda_pool.sqlalchemy"):
        module = sys.modules.get(name)
        if module is not None:
            module.forget_cached_engines()
    # Secrets read through Powertools Parameters (SecretsManagerCredentials does) are
    # cached per process with their boto3 client: a new container has neither.
    parameters = sys.modules.get("aws_lambda_powertools.utilities.parameters")
    if parameters is not None:
        parameters.clear_caches()
        base = sys.modules.get("aws_lambda_powertools.utilities.parameters.base")
        providers = getattr(base, "DEFAULT_PROVIDERS", None)
        if isinstance(providers, dict):
            providers.clear()


class LambdaInvoker:
    """Calls one handler the way Lambda does, cold or warm, in the current process.

    ``target`` names the handler's module: a path to a ``.py`` file (its folder is put
    on ``sys.path`` as Lambda's ``LAMBDA_TASK_ROOT`` is, so sibling modules import; a
    relative path is resolved against ``root``, default the current directory) or a
    dotted module name importable from ``sys.path``.  ``"module:attr"`` or
    ``"file.py:attr"`` overrides ``attribute`` (default ``"handler"``).

    ``env`` and :meth:`setenv` / :meth:`delenv` change ``os.environ`` the way pytest's
    ``monkeypatch`` does; :meth:`close` undoes them, forgets the module and disposes the
    engines, so no connection outlives the test.  Also a context manager.
    """

    def __init__(
        self,
        target: str | os.PathLike[str],
        attribute: str = "handler",
        *,
        env: Mapping[str, str] | None = None,
        remaining_ms: int = 3000,
        function_name: str = "lambda-pool-test",
        root: str | os.PathLike[str] | None = None,
        json_roundtrip: bool = True,
    ) -> None:
        text = os.fspath(target)
        if ":" in text and not _looks_like_windows_drive(text):
            text, _, attribute = text.rpartition(":")
        if not attribute.isidentifier():
            raise ValueError(f"attribute must be a Python name, got {attribute!r}")
        self.attribute = attribute
        self.remaining_ms = remaining_ms
        self.function_name = function_name
        self.json_roundtrip = json_roundtrip
        self._file: Path | None = None
        self._code_dir: Path | None = None
        if text.endswith(".py") or os.sep in text or "/" in text:
            path = Path(text)
            if not path.is_absolute():
                path = Path(root if root is not None else os.getcwd()) / path
            path = path.resolve()
            if not path.is_file():
                raise FileNotFoundError(f"no handler file at {path}")
            self._file = path
            self._code_dir = path.parent
            self.module_name = path.stem
        else:
            self.module_name = text
        self._module: types.ModuleType | None = None
        self._handler: Callable[..., Any] | None = None
        self._saved_env: dict[str, str | None] = {}
        self._path_added = False
        self.cold_starts = 0
        self.invocations = 0
        self.last_context: LambdaContext | None = None
        for name, value in (env or {}).items():
            self.setenv(name, value)

    # ---------------------------------------------------------------- environment

    def setenv(self, name: str, value: str) -> None:
        """Set an environment variable until :meth:`close` (seen by the next cold start).

        Module-level code reads the environment at import, so a change reaches such code
        only through :meth:`cold`; code reading it per call sees it at once.
        """
        if not isinstance(value, str):
            raise TypeError(f"environment values are strings; {name}={value!r}")
        self._saved_env.setdefault(name, os.environ.get(name))
        os.environ[name] = value

    def delenv(self, name: str) -> None:
        """Remove an environment variable until :meth:`close` (no error if unset)."""
        self._saved_env.setdefault(name, os.environ.get(name))
        os.environ.pop(name, None)

    # ---------------------------------------------------------------- invoking

    @property
    def module(self) -> types.ModuleType:
        """The handler's module as last imported (raises before the first cold start)."""
        if self._module is None:
            raise RuntimeError("the handler is not imported yet: call cold() first")
        return self._module

    @property
    def handler(self) -> Callable[..., Any]:
        """The handler function as last imported."""
        if self._handler is None:
            raise RuntimeError("the handler is not imported yet: call cold() first")
        return self._handler

    def cold(self, event: Any = None, *, remaining_ms: int | None = None, **context: Any) -> Any:
        """A cold start: new module, no engines or warm connections left; then invoke.

        The import (Init) happens here, so an exception at module level propagates too.
        """
        self._forget_module()
        reset_lambda_pool_state()
        self._import()
        return self._call(event, remaining_ms, context)

    def warm(self, event: Any = None, *, remaining_ms: int | None = None, **context: Any) -> Any:
        """A warm start: the same module, engines and connections as the last invocation."""
        if self._handler is None:
            raise RuntimeError(
                "warm() needs a previous cold() (or invoke()): nothing is imported yet"
            )
        return self._call(event, remaining_ms, context)

    def invoke(self, event: Any = None, *, remaining_ms: int | None = None, **context: Any) -> Any:
        """Like Lambda: cold the first time, warm after that."""
        if self._handler is None:
            return self.cold(event, remaining_ms=remaining_ms, **context)
        return self.warm(event, remaining_ms=remaining_ms, **context)

    def context(self, remaining_ms: int | None = None, **attrs: Any) -> LambdaContext:
        """A fresh context for one invocation (new ``aws_request_id``)."""
        attrs.setdefault("function_name", self.function_name)
        ms = self.remaining_ms if remaining_ms is None else remaining_ms
        return LambdaContext(remaining_ms=ms, **attrs)

    def _call(self, event: Any, remaining_ms: int | None, attrs: dict[str, Any]) -> Any:
        handler = self.handler
        if self.json_roundtrip:
            # Lambda hands the handler a freshly decoded event each time: the test's
            # object is never shared with (or mutated by) the handler.
            event = json.loads(json.dumps(event))
        context = self.context(remaining_ms, **attrs)
        self.last_context = context
        self.invocations += 1
        result = handler(event, context)
        if self.json_roundtrip:
            # Lambda serialises the result; what it cannot encode is an error there.
            result = json.loads(json.dumps(result))
        return result

    # ---------------------------------------------------------------- importing

    def _import(self) -> None:
        if self._code_dir is not None and str(self._code_dir) not in sys.path:
            # Lambda runs with the code folder on sys.path: siblings import by name.
            sys.path.insert(0, str(self._code_dir))
            self._path_added = True
        if self._file is not None:
            spec = importlib.util.spec_from_file_location(self.module_name, self._file)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot import a module from {self._file}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[self.module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(self.module_name, None)
                raise
        else:
            module = importlib.import_module(self.module_name)
        handler = getattr(module, self.attribute, None)
        if not callable(handler):
            raise AttributeError(
                f"module {self.module_name!r} has no callable {self.attribute!r} "
                "(Lambda's handler setting would fail the same way)"
            )
        self._module = module
        self._handler = handler
        self.cold_starts += 1

    def _forget_module(self) -> None:
        """Drop the handler module and every module loaded from its code folder."""
        self._module = None
        self._handler = None
        sys.modules.pop(self.module_name, None)
        if self._code_dir is None:
            return
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if file and _is_within(Path(file), self._code_dir):
                sys.modules.pop(name, None)

    # ---------------------------------------------------------------- teardown

    def close(self) -> None:
        """Forget the module, dispose every engine, restore the environment and sys.path."""
        try:
            self._forget_module()
            reset_lambda_pool_state()
        finally:
            for name, value in reversed(list(self._saved_env.items())):
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            self._saved_env.clear()
            if self._path_added and self._code_dir is not None:
                with contextlib.suppress(ValueError):
                    sys.path.remove(str(self._code_dir))
                self._path_added = False

    def __enter__(self) -> LambdaInvoker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = str(self._file) if self._file is not None else self.module_name
        return f"LambdaInvoker({where}:{self.attribute}, cold_starts={self.cold_starts})"


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder)
    except (ValueError, OSError):
        return False
    return True


def _looks_like_windows_drive(text: str) -> bool:
    return len(text) >= 2 and text[1] == ":" and text[0].isalpha() and text.count(":") == 1
