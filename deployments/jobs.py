"""Jobs deployment: the durable job store, the job runner and webhook delivery
(``pipeline.service.runner``), over the fetch, ASR, diarization and accounting handles.

One replica: jobs are claimed with leases, so a restarted replica resumes them.
"""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import adopt_serve_logging, replica_info
from deployments.handles import HandleAudio, HandleMeter, HandleRecognizer, HandleSpeakers
from pipeline.core.settings import Settings
from pipeline.service.jobs import open_job_store
from pipeline.service.job_request import JobRequest
from pipeline.service.runner import JobRunner
from pipeline.transcription.flow import TranscriptionFlow


@serve.deployment(
    name="Jobs",
    num_replicas=1,
    max_ongoing_requests=1000,
    ray_actor_options={"num_cpus": 0.05},
)
class JobsDeployment:
    def __init__(self, settings: Settings, fetch: DeploymentHandle, asr: DeploymentHandle,
                 diarization: DeploymentHandle, accounting: DeploymentHandle) -> None:
        adopt_serve_logging()
        self._settings = settings
        retry = settings.retry_after_s
        flow = TranscriptionFlow(HandleRecognizer(asr, retry), HandleSpeakers(diarization, retry))
        self._runner = JobRunner(
            settings, open_job_store(settings), HandleAudio(fetch, retry), flow,
            meter_for=lambda key_id: HandleMeter(accounting, key_id, retry),
            on_lease_lost=lambda job_id, when: accounting.job_lease_lost.remote(when),
        )

    async def check_health(self) -> None:
        # Also starts the runner's loops, on the replica's event loop.
        self._runner.check_health()

    async def __del__(self) -> None:
        # Serve's graceful shutdown of this replica (an upgrade, a downscale): the jobs it cannot
        # finish in time go to another replica now, not when their leases run out.
        await self._runner.stop(self._settings.jobs_drain_s)

    async def submit(self, request: JobRequest) -> dict:
        return await self._runner.submit(request)

    async def result(self, job_id: str, key_id: str) -> dict:
        return await self._runner.result(job_id, key_id)

    async def get(self, job_id: str, key_id: str) -> dict:
        return await self._runner.get(job_id, key_id)

    def describe(self) -> dict:
        return replica_info(self._settings)
