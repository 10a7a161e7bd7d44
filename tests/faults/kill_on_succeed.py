"""``slimserve worker`` that dies by SIGKILL at the moment it would mark its job succeeded.

The job's artifacts are already written to the store then, and no row points at them yet: the
fault RELIABILITY.md calls "SIGKILL after the artifact is written but before the job is marked
done". Run as ``python -m tests.faults.kill_on_succeed`` with the service's environment.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def _die(*_args: Any, **_kwargs: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    """Patch ``JobStore.succeed`` to kill this process, then run the normal worker command."""
    from service import cli
    from service.jobs import store

    store.JobStore.succeed = _die  # type: ignore[method-assign]
    return cli.main(["worker"])


if __name__ == "__main__":
    sys.exit(main())
