# ruff: noqa: F841 -- the guide's code as written: late import, unused "as e"
"""Every task of the user guide (``tasks-guide.rst``), as written, in one app module.

Tests run them on the embedded default (this module's ``app``) and through real
``flowrra-broker`` and ``flowrra-node --app tests.apps.guide:app`` processes.

Where the guide leaves a name undefined (``SpecificError``, ``urgent_task``, ...) it is
defined here. The libraries the examples use (httpx, aiosmtplib, pandas) are the real ones,
from the ``test`` extra; the tests point them at real local servers on 127.0.0.1
(``tests/integration/servers.py``). Deviations from the guide's text are marked ``DEVIATION``.
"""

import os
import time
from email.message import EmailMessage

import aiosmtplib
import httpx

# ----------------------------------------------------------------------- Defining Tasks
from flowrra import Flowrra

app = Flowrra.from_urls()


@app.task()
async def my_task(arg1: str, arg2: int):
    """Your task description."""
    # Task logic here
    return {"result": "success"}


# ----------------------------------------------------------------------- Async Tasks


@app.task()
async def fetch_api_data(url: str):
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
        return response.json()


# ----------------------------------------------------------------------- Sync Tasks


@app.task(cpu_bound=True)
def process_large_file(file_path: str):
    # CPU-intensive operation
    with open(file_path) as f:
        data = f.read()
        # Process data
    return len(data)


# ----------------------------------------------------------------------- Task Configuration


# fmt: off
@app.task(
    name="custom_task_name",      # Custom task identifier
    max_retries=3,                 # Number of retry attempts
    retry_delay=5.0,               # Initial retry delay in seconds
    priority=10,                   # Higher = executed first
    cpu_bound=False,               # Set to True for CPU-intensive tasks
    timeout=30.0                   # Task timeout in seconds
)
async def configured_task():
    pass
# fmt: on


# ----------------------------------------------------------------------- Retry Configuration


@app.task(max_retries=5, retry_delay=2.0)
async def may_fail():
    # Will retry with delays: 2s, 4s, 8s, 16s, 32s
    raise Exception("Temporary failure")


# DEVIATION: the same task with retry_delay=0.1 instead of 2.0 (62 s of backoff is too long
# for a test), recording when each attempt starts so the test can measure the backoff.
@app.task(max_retries=5, retry_delay=0.1)
async def may_fail_quick(attempt_log: str):
    with open(attempt_log, "a") as f:
        f.write(f"{time.time()!r}\n")
    # Will retry with delays: 0.1s, 0.2s, 0.4s, 0.8s, 1.6s
    raise Exception("Temporary failure")


# Fails at once, for the error branch of "Wait for Task Completion".
@app.task(max_retries=0)
async def fails_at_once():
    raise Exception("Temporary failure")


# ----------------------------------------------------------------------- Error Handling


class SpecificError(Exception):
    """The guide's placeholder for an error worth retrying."""


@app.task(max_retries=3)
async def risky_operation():
    try:
        # Risky code
        pass
    except SpecificError as e:
        # Handle specific errors
        raise  # Re-raise to trigger retry
    except Exception as e:
        # Log and return error state
        return {"error": str(e)}


# DEVIATION: the same structure with the risky code filled in, so both branches run
# (retry_delay shortened so three retries take 0.35 s).
@app.task(max_retries=3, retry_delay=0.05)
async def risky_operation_with(failure: str | None):
    try:
        # Risky code
        if failure == "specific":
            raise SpecificError("the dependency is flaky")
        if failure == "other":
            raise ValueError("the input is bad")
    except SpecificError as e:
        # Handle specific errors
        raise  # Re-raise to trigger retry
    except Exception as e:
        # Log and return error state
        return {"error": str(e)}
    return {"ok": True}


# ----------------------------------------------------------------------- Task Priority
# The guide submits these three without defining them.


@app.task()
async def urgent_task():
    return {"task": "urgent", "at": time.time()}


@app.task()
async def normal_task():
    return {"task": "normal", "at": time.time()}


@app.task()
async def background_task():
    return {"task": "background", "at": time.time()}


# ----------------------------------------------------------------------- Email Sending Task
# The guide's imports (os, EmailMessage, aiosmtplib) are at the top of this module.


@app.task(max_retries=3, retry_delay=10.0)
async def send_email(to: str, subject: str, body: str):
    """Send email with retry logic."""
    message = EmailMessage()
    message["From"] = "noreply@example.com"
    message["To"] = to
    message["Subject"] = subject
    message.set_content(body)
    # Entering the block connects to the server; leaving it says QUIT.
    async with aiosmtplib.SMTP(
        hostname=os.environ.get("SMTP_HOST", "localhost"),
        port=int(os.environ.get("SMTP_PORT", "25")),
    ) as smtp:
        await smtp.send_message(message)
        return {"sent": True, "to": to}


# ----------------------------------------------------------------------- Data Processing Task


# fmt: off
@app.task(cpu_bound=True, timeout=300.0)
def process_csv(file_path: str):
    """Process large CSV file."""
    import pandas as pd
    df = pd.read_csv(file_path)
    # Process data
    return {"rows_processed": len(df)}
# fmt: on
