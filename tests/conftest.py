"""Test-wide isolation: nothing a test does touches the user's ~/.prefect, ~/.cache or ./mlflow.db.

Set before Prefect or MLflow is imported by any test module (pytest imports conftest first).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

_HOME = Path(tempfile.mkdtemp(prefix="maskdiff-tests-"))
os.environ["PREFECT_HOME"] = str(_HOME / "prefect")
os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = (
    f"sqlite+aiosqlite:///{_HOME / 'prefect' / 'prefect.db'}"
)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_HOME / 'mlflow.db'}"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HOME"] = str(_HOME / "hf")
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"


def pytest_unconfigure(config: object) -> None:
    """Remove the session's stores (Prefect, MLflow, HF caches) once every test has finished."""
    shutil.rmtree(_HOME, ignore_errors=True)
