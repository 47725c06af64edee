"""The Snakemake executor: hands jobs to the warm pool and reports their results."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shlex
import sys
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING

from snakemake.common.tbdstring import TBDString
from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface
from snakemake_interface_storage_plugins.registry import StoragePluginRegistry

from snakemake_executor_plugin_vastai.cloud_credentials import (
    GOOGLE_CREDENTIALS_VARIABLE,
    forwarded_credentials,
    google_credentials_command,
)
from snakemake_executor_plugin_vastai.job_files import job_files
from snakemake_executor_plugin_vastai.pool_logging import forward_logs
from snakemake_executor_plugin_vastai.resources import (
    job_subject,
    requirements_from_resources,
    runtime_minutes,
    validate_settings,
)
from snakemake_executor_plugin_vastai.settings import ExecutorSettings
from snakemake_executor_plugin_vastai.summary import format_summary
from vastai_pool.costs import RunCosts, run_costs
from vastai_pool.credentials import resolve_api_key, resolve_api_url
from vastai_pool.errors import ConfigError, NoMatchingOffer, PoolError
from vastai_pool.pool import JobSpec, JobState, Pool, PoolConfig
from vastai_pool.store import default_db_path

if TYPE_CHECKING:
    from vastai_pool.sandbox import Sandbox

logger = logging.getLogger(__name__)

# Pool.status reads memory, not the network, so status checks may be
# frequent; a finished job then frees its warm instance sooner.
MAX_SECONDS_BETWEEN_STATUS_CHECKS = 1

# Seconds each sandbox instance takes to boot: long enough to pass through
# the created and loading states, short enough for a first try.
SANDBOX_BOOT_SECONDS = 1.0


class Executor(RemoteExecutor):
    """Runs each job, or each group job, on an instance of the warm pool."""

    def __post_init__(self) -> None:
        try:
            self._set_up()
        except BaseException:
            # RemoteExecutor started its status thread before calling us, and
            # Snakemake never calls ``shutdown`` on an executor that failed to
            # build, so the thread is stopped here.
            with self.lock:
                self.wait = False
            raise

    def _set_up(self) -> None:
        self.settings: ExecutorSettings = self.workflow.executor_settings
        validate_settings(self.settings)
        self._check_planned_jobs()
        # Snakemake has changed into the working directory before it builds
        # the executor; ``workdir:`` in the Snakefile is applied by then.
        self.workdir = Path.cwd()
        self.state_dir = self.workdir / ".snakemake" / "vastai"
        self._sandbox: Sandbox | None = None
        self._pool: Pool | None = None
        self._source_archive: tuple[Path, str] | None = None
        self._cancelled = False
        self._shut_down = False
        self._forward_google_credentials = False

        self.next_seconds_between_status_checks = min(
            self.workflow.remote_execution_settings.seconds_between_status_checks,
            MAX_SECONDS_BETWEEN_STATUS_CHECKS,
        )
        self._stop_log_forwarding = forward_logs(
            self.logger, verbose=self.workflow.output_settings.verbose
        )

        try:
            config = self._pool_config()
            self._pool = Pool(config)
            run_id = self._pool.open()
        except PoolError as exc:
            self._stop_sandbox()
            self._stop_log_forwarding()
            raise WorkflowError(f"Opening the Vast.ai pool failed: {exc}") from exc
        except BaseException:
            self._stop_sandbox()
            self._stop_log_forwarding()
            raise

        logger.info(
            "Vast.ai pool run %s at %s, pool database %s",
            run_id,
            config.api_url,
            config.db_path,
        )

    def _check_planned_jobs(self) -> None:
        """Raise for an invalid resource of any job the run will submit.

        A bad value in a downstream rule must fail the run before an upstream
        job rents an instance, not once the upstream outputs exist.
        """
        for job in self.workflow.dag.needrun_jobs():
            if job.is_local:
                continue
            try:
                # Evaluated on the side: the job's own cached resources are
                # left alone, so values that depend on inputs that do not
                # exist yet are evaluated again when the job runs.
                resources = job.rule.expand_resources(
                    job.wildcards_dict,
                    job.input,
                    job.attempt,
                    skip_evaluation={"tmpdir"},
                )
            except Exception as exc:
                logger.debug(
                    "Resources of job %s (rule %s) are checked at submission: %s",
                    job.jobid,
                    job.rule.name,
                    exc,
                )
                continue
            known = {
                name: value
                for name, value in resources.items()
                if not isinstance(value, TBDString)
            }
            requirements_from_resources(
                known, job.threads, job.rule.name, self.settings
            )
            runtime_minutes(known, job.rule.name)

    # Configuration -----------------------------------------------------------

    def _pool_config(self) -> PoolConfig:
        settings = self.settings
        if settings.sandbox:
            sandbox = self._start_sandbox()
            api_url, api_key = sandbox.url, sandbox.api_key
            db_path = self.state_dir / "pool.sqlite"
            key_dir = self.state_dir
        else:
            api_url = resolve_api_url(settings.api_url)
            if any(arg.startswith("--vastai-api-key") for arg in sys.argv):
                # Snakemake (9.27) writes its whole command line to
                # .snakemake/log/, where the plugin cannot redact it.
                logger.warning(
                    "--vastai-api-key on the command line ends up in "
                    ".snakemake/log/ and in the shell history; set VAST_API_KEY "
                    "or SNAKEMAKE_VASTAI_API_KEY instead, and delete those logs "
                    "if they are shared."
                )
            try:
                api_key = resolve_api_key(settings.api_key)
            except ConfigError as exc:
                raise WorkflowError(str(exc)) from exc
            db_path = settings.pool_db or default_db_path()
            key_dir = db_path.parent
        return PoolConfig(
            api_url=api_url,
            api_key=api_key,
            db_path=db_path,
            workdir=self.workdir,
            logs_dir=self.state_dir / "logs",
            key_dir=key_dir,
            idle_timeout=settings.idle_timeout,
            linger=settings.linger,
            max_instances=settings.max_instances,
            budget=settings.budget,
            keep_instances=settings.keep_instances,
            boot_timeout=float(settings.boot_timeout),
            job_env=self._job_env(api_key),
            packages=storage_plugin_requirements(),
        )

    def _start_sandbox(self) -> Sandbox:
        from vastai_pool.sandbox import Sandbox

        if self.settings.api_url or self.settings.api_key:
            logger.warning(
                "--vastai-sandbox is set, so --vastai-api-url and --vastai-api-key "
                "are ignored."
            )
        # The instances' directories go to a temporary directory that
        # ``stop`` removes; only the pool database and key stay in state_dir.
        sandbox = Sandbox(boot_seconds=SANDBOX_BOOT_SECONDS)
        sandbox.start()
        self._sandbox = sandbox
        logger.info("Started a sandbox marketplace at %s", sandbox.url)
        return sandbox

    def _job_env(self, api_key: str) -> dict[str, str]:
        env = dict(self.envvars())
        if not self.settings.no_forward_credentials:
            credentials = forwarded_credentials(os.environ, Path.home())
            self._forward_google_credentials = (
                GOOGLE_CREDENTIALS_VARIABLE in credentials
            )
            env = {**credentials, **env}
        for name in [name for name, value in env.items() if value == api_key]:
            # Instances run on other people's hosts; the account key stays local.
            logger.warning(
                "Not passing %s to jobs because it contains the Vast.ai API key.", name
            )
            del env[name]
        return env

    # Job command -------------------------------------------------------------

    def get_job_exec_prefix(self, job: JobExecutorInterface) -> str:
        if self._forward_google_credentials:
            return google_credentials_command()
        return ""

    def additional_general_args(self) -> str:
        # The job runs where the pool unpacked the sources on the instance.
        # Snakemake passes ``--directory <local workdir>`` when the API was
        # given a workdir; the last ``--directory`` wins.
        # The interface's docstring documents a list, but format_job_exec joins
        # the result as one string (snakemake-interface-executor-plugins 9.4).
        return "--directory ."

    # Jobs --------------------------------------------------------------------

    def run_job(self, job: JobExecutorInterface) -> None:
        spec = self._job_spec(job)
        pool = self._open_pool()
        try:
            pool.check_market(spec.requirements)
        except NoMatchingOffer as exc:
            message = _no_offer_message(exc, _subject(job), spec.requirements.gpu_names)
            raise WorkflowError(message) from exc
        except PoolError as exc:
            raise WorkflowError(
                f"Searching Vast.ai offers for {_subject(job)} failed: {exc}"
            ) from exc
        try:
            handle = pool.submit(spec)
        except PoolError as exc:
            raise WorkflowError(
                f"Submitting {_subject(job)} to the Vast.ai pool failed: {exc}"
            ) from exc
        self.report_job_submission(SubmittedJobInfo(job, external_jobid=handle))

    def _job_spec(self, job: JobExecutorInterface) -> JobSpec:
        resources = dict(job.resources.items())
        if job.is_group():
            rule, group = ", ".join(sorted(job.rules)), job.groupid
            # A group's jobid is a UUID; the pool records an integer job id.
            job_id = min(member.jobid for member in job.jobs)
        else:
            rule, group, job_id = job.rule.name, None, job.jobid
        requirements = requirements_from_resources(
            resources, job.threads, rule, self.settings, group=group
        )
        files = job_files(job, self.workdir, _subject(job))
        archive, checksum = self._sources()
        return JobSpec(
            # The pool names log files after ``rule``, so a group goes by its id.
            rule=rule if group is None else f"group_{group}",
            job_id=job_id,
            attempt=job.attempt,
            requirements=requirements,
            command=self.format_job_exec(job),
            inputs=files.inputs,
            outputs=files.outputs,
            logs=files.logs,
            source_archive=archive,
            source_checksum=checksum,
            runtime_minutes=runtime_minutes(resources, rule, group=group),
        )

    def _sources(self) -> tuple[Path, str]:
        """Write the source archive once per run; return its path and sha256."""
        if self._source_archive is None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            path = self.state_dir / "workflow-sources.tar.xz"
            partial = path.with_name("workflow-sources-partial.tar.xz")
            self.workflow.write_source_archive(partial)
            with partial.open("rb") as archive:
                checksum = hashlib.file_digest(archive, "sha256").hexdigest()
            partial.replace(path)
            self._source_archive = (path, checksum)
            logger.debug("Wrote source archive %s (sha256 %s)", path, checksum)
        return self._source_archive

    async def check_active_jobs(
        self, active_jobs: list[SubmittedJobInfo]
    ) -> AsyncGenerator[SubmittedJobInfo, None]:
        # Pool.status reads the pool's own state without network calls, so
        # the status rate limiter of the interface is not needed here.
        if not active_jobs:
            return
        pool = self._open_pool()
        for job_info in active_jobs:
            status = pool.status(job_info.external_jobid)
            if status.state in (JobState.QUEUED, JobState.RUNNING):
                yield job_info
            elif status.state is JobState.SUCCEEDED:
                self.report_job_success(job_info)
            else:
                message = status.message or "the job failed on its instance"
                if status.instance_id and str(status.instance_id) not in message:
                    message += f" (Vast.ai instance {status.instance_id})"
                aux_logs = [str(status.log_path)] if status.log_path else []
                # Snakemake appends its own sentence right after the message.
                ending = "" if message.endswith(".") else "."
                self.report_job_error(
                    job_info, msg=f"{message}{ending} ", aux_logs=aux_logs
                )

    def cancel_jobs(self, active_jobs: list[SubmittedJobInfo]) -> None:
        self._cancelled = True
        handles = [job.external_jobid for job in active_jobs if job.external_jobid]
        if handles and self._pool is not None:
            try:
                self._pool.cancel(handles)
            except PoolError as exc:
                logger.error("Cancelling %d Vast.ai jobs failed: %s", len(handles), exc)

    def _open_pool(self) -> Pool:
        if self._pool is None or self._shut_down:
            raise WorkflowError("The Vast.ai pool is closed; no job can be submitted.")
        return self._pool

    # Shutdown ----------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop status checks, close the pool, then stop the sandbox.

        Each step runs even when an earlier one raised, so that a failed step
        does not skip destroying the instances. The errors are raised together
        at the end, unless the run was cancelled.
        """
        if self._shut_down:
            return
        self._shut_down = True
        errors: list[BaseException] = []
        for step in (super().shutdown, self._close_pool, self._stop_sandbox):
            try:
                step()
            except Exception as exc:
                logger.error("Vast.ai shutdown step failed: %s", exc)
                errors.append(exc)
        self._stop_log_forwarding()
        # When Snakemake cancels the run it is already handling an error,
        # which a second exception would hide; the log above has these.
        if errors and not self._cancelled:
            raise WorkflowError("Shutting down the Vast.ai executor failed.", *errors)

    def _close_pool(self) -> None:
        if self._pool is None:
            return
        try:
            summary = self._pool.close(interrupted=self._cancelled)
        except PoolError as exc:
            raise WorkflowError(
                f"Closing the Vast.ai pool failed: {exc}. Run "
                f"`{self._pool_command('ls')}` to see what is still rented and "
                f"`{self._pool_command('gc')}` to destroy it."
            ) from exc
        logger.info("%s", format_summary(summary, self._run_costs()))
        if summary.instances_alive:
            logger.warning(
                "%d Vast.ai instances are still alive and billing (kept or "
                "lingering); `%s` lists them and `%s` destroys them.",
                summary.instances_alive,
                self._pool_command("ls"),
                self._pool_command("gc --kept"),
            )

    def _pool_command(self, subcommand: str) -> str:
        """Return the ``vastai-pool`` command line that reaches this run's pool."""
        assert self._pool is not None
        config = self._pool.config
        words = [f"vastai-pool {subcommand}", "--db", shlex.quote(str(config.db_path))]
        if config.api_url != resolve_api_url(None):
            words += ["--api-url", shlex.quote(config.api_url)]
        return " ".join(words)

    def _run_costs(self) -> RunCosts | None:
        """Return the closed run's costs, or None when the database cannot
        be read (the summary then shows the pool's own totals)."""
        assert self._pool is not None
        try:
            return run_costs(self._pool.store, self._pool.run_id)
        except PoolError as exc:
            logger.warning("Could not compute the costs of the Vast.ai run: %s", exc)
            return None

    def _stop_sandbox(self) -> None:
        if self._sandbox is not None:
            sandbox, self._sandbox = self._sandbox, None
            sandbox.stop()


def _subject(job: JobExecutorInterface) -> str:
    if job.is_group():
        return job_subject(", ".join(sorted(job.rules)), job.groupid)
    return job_subject(job.rule.name)


def _no_offer_message(
    exc: NoMatchingOffer, subject: str, gpu_names: tuple[str, ...]
) -> str:
    message = f"No Vast.ai offer for {subject}: {str(exc).rstrip('.')}."
    if exc.query not in message:
        message += f" Offer query: {exc.query}."
    if gpu_names:
        models = ", ".join(gpu_names)
        message += (
            f" Check the GPU model ({models}) against the market: Vast.ai names "
            "models like RTX_4090, H100_SXM or A100_PCIE."
        )
    return message


def storage_plugin_requirements() -> tuple[str, ...]:
    """Return ``name==version`` of every storage plugin installed here.

    Jobs read and write storage through these plugins on the instance, so
    the pool installs them there once, at the local versions; Snakemake
    itself would pip-install them in front of every job instead.
    """
    registry = StoragePluginRegistry()
    requirements = []
    for plugin in sorted(registry.get_registered_plugins()):
        package = registry.get_plugin_package_name(plugin)
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        requirements.append(f"{package}=={version}")
    return tuple(requirements)
