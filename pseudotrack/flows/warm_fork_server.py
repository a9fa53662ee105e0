"""The warm worker's fork-server preparation: imported once, first, by its fork server and by nothing else.

Importing it gives this process's Prefect API clients one shared TLS context,
built now (`warm_child.share_api_tls_context`), so that no forked flow run parses
the CA bundle again. It is a module rather than a call because a fork server
runs only the imports it is given.
"""

from __future__ import annotations

from .warm_child import share_api_tls_context

SHARED_TLS_CONTEXT = share_api_tls_context()
