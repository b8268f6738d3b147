"""Chains, groups and chords, kept by the broker: which step waits for which, and when.

A workflow is a list of steps; each step is a list of tasks (one for a call, several for a
group). The tasks of step k+1 wait (status WAITING) until every task of step k has
succeeded; then each receives step k's result as its first positional argument (a group's
results as a list, in call order). A chain is steps of one task each (or groups), a group is
one step, a chord is a group step followed by its callback.

The broker counts finished members in the same commit as each member's final result, by task
id (a member that ran twice after a node loss has still one final result, and is counted
once), so a step is released exactly once; nothing polls. If a member ends other than with
success, every task of the later steps ends FAILED, naming it, and none of them runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flowrra import protocol
from flowrra.broker.records import TaskRecord
from flowrra.broker.repository import TaskRepository
from flowrra.errors import AdminError
from flowrra.protocol import ErrorInfo, TaskStatus

KINDS = ("chain", "group", "chord")
MAX_WORKFLOW_TASKS = protocol.MAX_ITEMS_PER_MESSAGE


def validate(declared: object) -> tuple[str, str, list[list[protocol.Submission]]]:
    """``(id, kind, steps)`` of a workflow from the wire (AdminError if bad)."""
    if not isinstance(declared, dict):
        raise AdminError("invalid workflow: it must be a map")
    workflow_id, kind, steps = declared.get("id"), declared.get("kind"), declared.get("steps")
    if not isinstance(workflow_id, str) or not 0 < len(workflow_id) <= protocol.MAX_TASK_ID_CHARS:
        raise AdminError("invalid workflow: bad id")
    if kind not in KINDS:
        raise AdminError(f"invalid workflow: kind must be one of {', '.join(KINDS)}")
    if (
        not isinstance(steps, list)
        or not steps
        or not all(isinstance(s, list) and s for s in steps)
    ):
        raise AdminError("invalid workflow: steps must be non-empty lists of tasks")
    if sum(len(step) for step in steps) > MAX_WORKFLOW_TASKS:
        raise AdminError(f"invalid workflow: more than {MAX_WORKFLOW_TASKS} tasks")
    parsed: list[list[protocol.Submission]] = []
    seen: set[str] = set()
    for step in steps:
        valid, rejected = protocol.split_submit(step)
        if rejected:
            task_id, reason = rejected[0]
            raise AdminError(f"invalid workflow: task {task_id!r}: {reason}")
        for sub in valid:
            if sub.task_id in seen:
                raise AdminError(f"invalid workflow: task id {sub.task_id!r} appears twice")
            seen.add(sub.task_id)
        parsed.append(valid)
    return workflow_id, kind, parsed


class Workflows:
    """Workflow state by id (in the store), and the hand-off from one step to the next."""

    def __init__(self, repo: TaskRepository) -> None:
        self.repo = repo
        # Workflows changed since the last flush (decoded once, written once per batch of
        # results: a 1,000-member chord is not re-encoded for every member).
        self._open: dict[str, dict[str, Any]] = {}

    def get(self, workflow_id: str) -> dict[str, Any] | None:
        return self._open.get(workflow_id) or self.repo.get_workflow(workflow_id)

    def flush(self) -> None:
        """Write the workflows changed since the last flush (before the tick's commit)."""
        for workflow in self._open.values():
            self.repo.save_workflow(workflow)
        self._open.clear()

    def discard(self) -> None:
        """Forget unwritten changes (the tick was rolled back)."""
        self._open.clear()

    def create(
        self,
        workflow_id: str,
        kind: str,
        steps: list[list[protocol.Submission]],
        add: Callable[[TaskRecord], None],
        new_record: Callable[[protocol.Submission], TaskRecord],
    ) -> dict[str, Any]:
        """Store a workflow and its tasks: the first step's are queued (or scheduled), the
        others WAITING. The same workflow again returns what is stored (idempotent)."""
        existing = self.repo.get_workflow(workflow_id)
        if existing is not None:
            return existing
        for step in steps:
            for sub in step:
                stored = self.repo.get(sub.task_id)
                if stored is not None and not stored.is_call_of(sub):
                    raise AdminError(f"task id {sub.task_id!r} is already used by another call")
                if stored is not None:
                    raise AdminError(f"task id {sub.task_id!r} already belongs to a task")
        workflow: dict[str, Any] = {
            "id": workflow_id,
            "kind": kind,
            "steps": [[sub.task_id for sub in step] for step in steps],
            "finished": {},  # task id -> final status, counted once per id
            "succeeded": [0] * len(steps),  # successes counted per step
            "failed": None,  # the id of the member that ended the workflow early
        }
        for index, step in enumerate(steps):
            for sub in step:
                record = new_record(sub)
                record.workflow_id, record.step = workflow_id, index
                if index == 0:
                    add(record)
                else:
                    record.status = TaskStatus.WAITING
                    self.repo.add(record, queued=False)
        self.repo.save_workflow(workflow)
        return workflow

    def finished(
        self,
        record: TaskRecord,
        release: Callable[[TaskRecord], None],
        fail: Callable[[TaskRecord, ErrorInfo], None],
    ) -> None:
        """A member reached its final status: count it, and release or fail what follows."""
        assert record.workflow_id is not None
        workflow = self.get(record.workflow_id)
        if workflow is None or record.task_id in workflow["finished"]:
            return  # counted already (or its workflow is gone)
        self._open[workflow["id"]] = workflow  # written by the next flush
        workflow["finished"][record.task_id] = record.status.value
        steps: list[list[str]] = workflow["steps"]
        if record.status is not TaskStatus.SUCCESS:
            later = [task_id for step in steps[record.step + 1 :] for task_id in step]
            if workflow["failed"] is None and later:
                workflow["failed"] = record.task_id
                error = ErrorInfo(
                    "WorkflowError",
                    f"an earlier step of workflow {workflow['id']} did not succeed: task "
                    f"{record.task_id} ended {record.status.value}",
                    None,
                )
                for task_id in later:
                    waiting = self.repo.get(task_id)
                    if waiting is not None and waiting.status is TaskStatus.WAITING:
                        fail(waiting, error)
            return
        workflow["succeeded"][record.step] += 1
        step = steps[record.step]
        if workflow["failed"] is not None or record.step + 1 >= len(steps):
            return
        if workflow["succeeded"][record.step] < len(step):
            return  # the step is not complete yet
        results = []
        for task_id in step:
            member = record if task_id == record.task_id else self.repo.get(task_id)
            results.append(b"\xc0" if member is None or member.result is None else member.result)
        handed_on = results[0] if len(step) == 1 else protocol.pack_packed_list(results)
        for task_id in steps[record.step + 1]:
            waiting = self.repo.get(task_id)
            if waiting is None or waiting.status is not TaskStatus.WAITING:
                continue
            waiting.payload = protocol.prepend_arg(waiting.payload, handed_on)
            self.repo.save_payload(waiting)
            release(waiting)

    def links(self, record: TaskRecord) -> dict[str, Any] | None:
        """A member's place in its workflow: the workflow, its parents and its children."""
        if record.workflow_id is None:
            return None
        workflow = self.get(record.workflow_id)
        if workflow is None:
            return None
        steps = workflow["steps"]
        return {
            "workflow": workflow["id"],
            "kind": workflow["kind"],
            "step": record.step,
            "parents": steps[record.step - 1] if record.step > 0 else [],
            "children": steps[record.step + 1] if record.step + 1 < len(steps) else [],
        }
