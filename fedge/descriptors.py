"""How many file descriptors a process needs for its connections, checked before it starts work.

A process that runs out of descriptors mid-round does not fail cleanly: the server's accept loop fails and
retries in a tight loop (logging each time), uploads are answered 500 and the round waits for its timeout.
So every process that holds a connection per client checks at start that its limit covers them: it raises
its soft ``RLIMIT_NOFILE`` up to the hard limit when that is enough, and otherwise stops with one line
that says how many it needs.
"""

from __future__ import annotations

import resource

from fedge.console import UserError

BASE = 256  # a process's own: libraries, logs, the store, pipes to workers, listening sockets, the broker
CONNECTIONS_PER_WORKER = 1024  # the most client connections one worker keeps open (functions.Context)


def needed_for(connections: int) -> int:
    """Descriptors for ``connections`` open at once (one each: a TLS connection is one socket)."""
    return BASE + connections


def ensure(needed: int, what: str) -> int:
    """Make the soft limit at least ``needed`` (raising it to the hard limit); returns the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise UserError(
            f"{what} needs {needed} open files, but this process may open {soft} (hard limit {hard}): "
            f"raise the limit, e.g. `ulimit -n {needed}`"
        )
    raised = hard if hard != resource.RLIM_INFINITY else needed
    resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    return raised
