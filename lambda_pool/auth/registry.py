"""A weak registry of every credential provider, so a SnapStart restore can drop their caches.

After a restore, cached tokens were signed before the snapshot (possibly days ago) and a
cached secret may have been rotated since.  ``lambda_pool.lifecycle`` calls
:func:`forget_all_cached_credentials` from its after-restore hook.  The registry holds
providers weakly: registering one never keeps it alive.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lambda_pool.auth.base import CredentialProvider

__all__ = ["forget_all_cached_credentials", "register_provider"]

_log = logging.getLogger("lambda_pool.auth")

_providers: weakref.WeakSet[CredentialProvider] = weakref.WeakSet()
# WeakSet is not safe against concurrent add + iterate; restore hooks may run while a
# handler thread is building a provider.
_lock = threading.Lock()


def register_provider(provider: CredentialProvider) -> None:
    """Remember ``provider`` (weakly) so :func:`forget_all_cached_credentials` reaches it."""
    with _lock:
        _providers.add(provider)


def forget_all_cached_credentials() -> int:
    """Call ``refresh()`` on every live provider; return how many were reached.

    Meant for SnapStart's after-restore hook: the next ``get()`` of each provider signs a
    new IAM token or re-reads its secret instead of reusing one from before the snapshot.
    """
    with _lock:
        providers = list(_providers)
    for provider in providers:
        provider.refresh()
    _log.debug("forgot cached credentials of %d provider(s)", len(providers))
    return len(providers)
