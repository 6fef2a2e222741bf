"""Job functions that probe the job runner's edges (``registry``): its environment, its output, and
processes that misbehave on the result channel or outlive the job.

Served in-process as ``tests.support.runner_jobs:registry`` beside ``demo_jobs``. Jobs that leave a
process behind write its pid to ``<directory>/<tag>.pid`` so the test can find it and end it.
"""

from __future__ import annotations

import os

from bastion.jobs import JobRegistry

registry = JobRegistry()


@registry.job
def environment() -> dict[str, str]:
    """The job process's whole environment."""
    return dict(os.environ)
