"""Replicas that never use pandas or pyarrow do not load them.

Ray Serve imports both in every replica when they are installed, for encoders Hark's replicas
never use (``ray.serve._private.utils``: a DataFrame JSON encoder; Ray's serialization context:
Arrow serializers for Ray Data), and Hark installs them (``ray[data]`` brings them; only ``hark
batch`` uses them, in its driver). In a replica started with ``without_pandas`` as its Ray worker
setup hook, ``import pandas`` and ``import pyarrow`` fail and Serve goes on without those
encoders. ``bench/bench_memory.py --minutes 120 --streams 0``, before and after (2-core machine,
one run each): RSS 301-304 -> 206-219 MB in each of the four replicas (PSS 176-193 -> 138-152
MB), the whole app's PSS 2015 -> 1833 MB, and the ingress's peak with a 2 h upload 378 -> 299 MB.

Ray runs a worker's setup hook before the replica's class is loaded, but takes one per *actor*
only through the environment variable that ``ray.init(runtime_env={"worker_process_setup_hook":
...})`` sets for a whole job (``runtime_env`` ignores that key on an actor); ``lean`` sets it in a
deployment's ``ray_actor_options``. Should a Ray release rename it, the replicas load pandas again
and nothing else changes, and ``tests/test_api.py::test_small_replicas_run_without_pandas``
fails.

Only the deployments whose imports Hark controls: ASR engines (transformers, vLLM) and
diarization backends (pyannote) may import pandas.
"""

from __future__ import annotations

import sys
from typing import Any

# ray._private.ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR (a private name of Ray's).
_SETUP_HOOK_VAR = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
LEAN_DEPLOYMENTS = ("Ingress", "AudioFetch", "Accounting", "Jobs")
_UNUSED = ("pandas", "pyarrow")


def without_pandas() -> None:
    """Ray worker setup hook: ``import pandas`` and ``import pyarrow`` raise ModuleNotFoundError
    in this process from now on (one already imported stays)."""
    for name in _UNUSED:
        sys.modules.setdefault(name, None)


def lean(actor_options: dict[str, Any]) -> dict[str, Any]:
    """``actor_options`` (a deployment's ``ray_actor_options``) with ``without_pandas`` as the
    worker setup hook; a hook already set there wins."""
    runtime_env = dict(actor_options.get("runtime_env") or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    env_vars.setdefault(_SETUP_HOOK_VAR, f"{__name__}.{without_pandas.__name__}")
    return {**actor_options, "runtime_env": {**runtime_env, "env_vars": env_vars}}
