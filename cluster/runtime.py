"""Connecting to Ray: an embedded local instance by default, or an existing cluster.

The embedded instance binds its dashboard to 127.0.0.1 only. Inside a Ray job (``vitpipe
submit``), ``RAY_ADDRESS`` is set and the driver joins that cluster instead.

Joining a cluster, the driver hands its stage tasks the few settings they need to reach the
same storage (:data:`FORWARDED_ENV`: the S3 endpoint and region, DeepSpeed's accelerator) in the
job's ``runtime_env``: tasks on other nodes run in those nodes' environments, which need not have
them. Credentials are never forwarded; they come from each node (instance profile, IRSA, or the
environment of ``ray start``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from cluster.console import ConsoleCapture
from pipeline.config import RaySettings
from pipeline.errors import VitpipeError
from pipeline.redaction import secret_kind

__all__ = ["FORWARDED_ENV", "forwarded_env", "ray_runtime", "resolve_address", "quiet_train_cleaner"]

log = logging.getLogger(__name__)

_JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job manager for a job's driver

# Non-secret settings the stage tasks need wherever they run.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "DS_ACCELERATOR")


def forwarded_env() -> dict[str, str]:
    """The :data:`FORWARDED_ENV` variables set here; one that carries a credential (an endpoint URL
    with a password) is refused in one line naming it."""
    found = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    for name, value in found.items():
        kind = secret_kind(value)
        if kind:
            raise VitpipeError(f"{name}: the value looks like {kind}; it would be shown to anyone who can read "
                               "the Ray dashboard; give the cluster's nodes the credential instead")
    return found


def quiet_train_cleaner() -> None:
    """Worker setup hook (embedded Ray without a dashboard): silence the cleaner's state-API polling."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def resolve_address(settings: RaySettings, override: str | None = None) -> str | None:
    """The cluster to join, or None for an embedded local instance."""
    return override or settings.address or os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def ray_runtime(settings: RaySettings, address: str | None = None,
                console: ConsoleCapture | None = None) -> Iterator[str]:
    """Connect (or start) Ray for the duration of the block; yields a description of where.
    ``console`` (entered by the caller) filters Ray's forwarded worker lines once connected."""
    import ray

    if ray.is_initialized():  # already connected (e.g. an embedding application or a test)
        yield "existing Ray connection"
        return
    target = resolve_address(settings, address)
    kwargs = {"namespace": "vitpipe", "log_to_driver": True, "logging_level": logging.WARNING}
    try:
        if target:
            # Inside a Ray job the job's runtime_env already carries them (``vitpipe submit``), and
            # Ray refuses a driver runtime_env that repeats a job's variable.
            in_job = _JOB_CONFIG_VAR in os.environ
            ray.init(address=target, runtime_env=None if in_job else {"env_vars": forwarded_env()}, **kwargs)
            where = f"Ray cluster at {target}"
        else:
            # address="local" always starts a fresh instance; a bare ray.init() would silently
            # join any cluster `ray start` left running on this machine.
            extra = {}
            if not settings.include_dashboard:
                # Ray Train's PlacementGroupCleaner polls the state API, which lives in the
                # dashboard: without one it warns every second. Placement groups are still
                # removed when the trainer ends (and with the whole instance at shutdown).
                extra["runtime_env"] = {"worker_process_setup_hook": "cluster.runtime.quiet_train_cleaner"}
            ray.init(
                address="local",
                num_cpus=settings.num_cpus,
                num_gpus=settings.num_gpus,
                include_dashboard=settings.include_dashboard,
                dashboard_host="127.0.0.1",
                dashboard_port=settings.dashboard_port,
                **extra,
                **kwargs,
            )
            where = "embedded local Ray instance"
    except ConnectionError as err:
        raise VitpipeError(f"cannot connect to Ray at {target}: {str(err).splitlines()[0]}") from None
    if console is not None:
        console.attach_to_ray()
    log.info("connected to %s (%s CPUs)", where, ray.cluster_resources().get("CPU", 0))
    try:
        yield where
    finally:
        ray.shutdown()
