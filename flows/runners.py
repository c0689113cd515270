"""The task runners that map the data stages' shards: ``runtime.task_runner``.

``thread`` and ``process`` are Prefect's pools on this machine; ``dask`` is ``prefect-dask``'s
``DaskTaskRunner`` (the optional extra ``dask``), on a local cluster started for the flow run
or on an existing scheduler (``runtime.dask_address``). See docs/dask.md.
"""

from __future__ import annotations

from typing import Any

from prefect.context import FlowRunContext
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from maskdiff.config import ConfigError, RuntimeConfig

# Set in every worker of a local cluster: one tokenizer thread per single-threaded worker.
DASK_WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}


def task_runner(runtime: RuntimeConfig) -> TaskRunner:
    """The task runner named by ``runtime.task_runner``: threads or processes on this machine,
    or Dask (:func:`dask_runner`)."""
    if runtime.task_runner == "dask":
        return dask_runner(runtime)
    if runtime.task_runner == "process":
        return ProcessPoolTaskRunner(max_workers=runtime.max_workers)
    return ThreadPoolTaskRunner(max_workers=runtime.max_workers)


def dask_runner(runtime: RuntimeConfig) -> TaskRunner:
    """``DaskTaskRunner`` on the scheduler at ``runtime.dask_address``, or (empty) on a
    :func:`local_cluster` of ``max_workers`` single-threaded worker processes, started at the
    first mapped task and stopped with the flow run. A missing extra is a :class:`ConfigError`.
    """
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise ConfigError(
            "runtime.task_runner=dask needs the optional extra 'dask': "
            f"pip install -e '.[dask]' ({exc})"
        ) from exc
    if runtime.dask_address:
        return DaskTaskRunner(address=runtime.dask_address)
    cluster = {"n_workers": runtime.max_workers, "threads_per_worker": 1, "processes": True}
    return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs=cluster)


def local_cluster(**kwargs: Any) -> Any:
    """A ``distributed.LocalCluster`` whose workers report to the flow run's Prefect API.

    Worker processes inherit this process's environment, not its Prefect settings: without
    ``PREFECT_API_URL`` (a run on a temporary server) each worker would start a temporary server
    of its own. So the URL the flow run talks to goes into the workers' environment, with
    :data:`DASK_WORKER_ENV`. The dashboard takes a free port (two runs on one machine). The
    workers' statistical profiler is off: sampling every stack each 10 ms takes the GIL from the
    pure-Python part of tokenization (packing ids into one array).
    """
    import dask
    from distributed import LocalCluster

    env = {**DASK_WORKER_ENV, **kwargs.pop("env", {})}
    context = FlowRunContext.get()
    if context is not None and context.client is not None:
        env.setdefault("PREFECT_API_URL", str(context.client.api_url).rstrip("/"))
    kwargs.setdefault("dashboard_address", ":0")
    with dask.config.set({"distributed.worker.profile.enabled": False}):  # read by the nannies
        return LocalCluster(env=env, **kwargs)
