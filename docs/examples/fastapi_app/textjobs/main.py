"""The text-jobs API: FastAPI endpoints that queue tasks with Flowrra's async API.

Run it with ``uvicorn textjobs.main:api``. The lifespan starts the Flowrra app in the server's
event loop (``async with``) and stops it at shutdown; the endpoints are ``async def`` and await
the app's methods. ``app.sync`` is not for them: it blocks, and inside the event loop it raises
``SyncCallInLoopError`` rather than stall every other request.
"""

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from flowrra import Flowrra, TaskResult
from pydantic import BaseModel, Field

from textjobs import tasks

# A status request may wait this long at most for its task to finish.
MAX_WAIT_S = 10.0


class Job(BaseModel):
    text: str = Field(min_length=1, max_length=100_000)


class Queued(BaseModel):
    task: str
    status_url: str


class JobState(BaseModel):
    task: str
    status: str
    result: dict[str, int] | None = None
    error: str | None = None

    @classmethod
    def of(cls, result: TaskResult) -> "JobState":
        return cls(
            task=result.task_id,
            status=result.status.value,
            result=result.result,
            error=result.error,
        )


def get_flowrra(request: Request) -> Flowrra:
    """The Flowrra app of the FastAPI app serving this request (a dependency)."""
    flowrra: Flowrra = request.app.state.flowrra
    return flowrra


FlowrraApp = Annotated[Flowrra, Depends(get_flowrra)]
router = APIRouter()


@router.post("/jobs", status_code=202)
async def submit_job(job: Job, flowrra: FlowrraApp, request: Request) -> Queued:
    """Queue a word count; answer at once with where to follow it."""
    task_id = await flowrra.submit(tasks.word_count, job.text)
    status_url = request.app.url_path_for("job_state", task_id=task_id)
    return Queued(task=task_id, status_url=str(status_url))


@router.get("/jobs/{task_id}", name="job_state")
async def job_state(
    task_id: str,
    flowrra: FlowrraApp,
    response: Response,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0,
) -> JobState:
    """A job's state (200 once complete, 202 before); ``?wait=5`` waits up to 5 seconds."""
    result = await flowrra.get_result(task_id)
    if result is None:
        raise HTTPException(status_code=404, detail=f"no task {task_id!r}")
    if not result.is_complete and wait > 0:
        with contextlib.suppress(TimeoutError):  # not finished in time: answer 202
            result = await flowrra.wait_for_result(task_id, timeout=wait)
    if not result.is_complete:
        response.status_code = 202
    return JobState.of(result)


def create_app(flowrra: Flowrra | None = None) -> FastAPI:
    """The API, using ``flowrra`` (by default the app of :mod:`textjobs.tasks`)."""
    chosen = flowrra or tasks.app

    @contextlib.asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        # Connects to the broker (embedded: starts the broker and a node) in the server's
        # event loop, where the endpoints run; at shutdown, waits briefly for the broker to
        # confirm what was submitted, then disconnects.
        async with chosen:
            yield

    api = FastAPI(title="text jobs", lifespan=lifespan)
    api.state.flowrra = chosen
    api.include_router(router)
    return api


api = create_app()
