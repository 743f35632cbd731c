"""What a credential provider hands the engine: the ``Credentials`` value and the provider protocol.

``docs/ARCHITECTURE.md`` ("Credentials ↔ engine") fixes this contract: the engine asks
``provider.get()`` for every new connection, calls ``provider.refresh()`` once after an
authentication failure, and compares ``Credentials.expires_at`` with ``provider.clock()``
at checkout to retire connections whose credentials have expired.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["CredentialProvider", "Credentials", "mask_connect_args"]


def mask_connect_args(connect_args: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``connect_args`` with the values of secret-bearing keywords replaced by ``***``
    (every name :func:`lambda_pool.conninfo.is_secret_key` calls secret: password,
    sslpassword, passwd, token, secret, ...)."""
    from lambda_pool.conninfo import mask_params

    return mask_params(connect_args)


@dataclasses.dataclass(frozen=True, repr=False)
class Credentials:
    """One set of credentials for opening a connection.

    ``expires_at`` is wall-clock epoch seconds in the issuing provider's ``clock``,
    *already minus the provider's safety margin*: once ``provider.clock()`` has passed it,
    a connection opened with these credentials is retired at its next checkout.
    ``None`` means the credentials never expire on a timer (static passwords, secrets).
    ``connect_args`` are driver keywords the provider requires (IAM: ``sslmode``).
    ``repr()``/``str()`` never show the password.
    """

    user: str
    password: str | None
    expires_at: float | None = None
    connect_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # A read-only view: a Credentials object is shared between threads and cached,
        # so nobody may change the driver keywords another connection will use.
        object.__setattr__(self, "connect_args", types.MappingProxyType(dict(self.connect_args)))

    def __repr__(self) -> str:
        password = "None" if self.password is None else "'***'"
        args = mask_connect_args(self.connect_args)
        return (
            f"Credentials(user={self.user!r}, password={password}, "
            f"expires_at={self.expires_at!r}, connect_args={args!r})"
        )

    __str__ = __repr__

    def expired(self, now: float) -> bool:
        """True once ``now`` (from the provider's clock) has reached ``expires_at``."""
        return self.expires_at is not None and now >= self.expires_at


@runtime_checkable
class CredentialProvider(Protocol):
    """Anything the engine can ask for credentials.

    ``get()`` returns cached credentials while they are valid and must be safe to call
    from several threads; ``refresh()`` forgets the cache so the next ``get()`` fetches
    anew (called after an authentication failure, and after a SnapStart restore);
    ``clock`` returns wall-clock epoch seconds and is the clock ``expires_at`` is in.
    """

    clock: Callable[[], float]

    def get(self) -> Credentials: ...

    def refresh(self) -> None: ...
