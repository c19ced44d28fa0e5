"""Process settings for CLI-started flows: quiet libraries, a patient ephemeral server."""

from __future__ import annotations

import logging
import os


def prepare_runtime(verbose: bool = False) -> None:
    """Call before importing prefect/dspy in a command."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # On 2 busy cores Prefect's ephemeral server can take longer than its 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_ROOT_LEVEL", "WARNING")
        os.environ.setdefault("LITELLM_LOG", "ERROR")
    for name in ("dspy", "optuna", "httpx", "LiteLLM", "litellm"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
