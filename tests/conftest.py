"""Settings for every test process (and the servers and CLIs they start, which inherit the environment)."""

import os

# MLflow's usage telemetry cannot reach its collector offline; when it gives up it unsets an environment
# variable from a background thread, which races with code reading os.environ (a KeyError in a test).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Prefect's servers (the test harness's, ours) try to send usage telemetry, which cannot leave this machine: it
# only fills the logs with "database is locked" races on their sqlite file.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
