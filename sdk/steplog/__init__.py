"""steplog: log training metrics without ever blocking the training loop.

from steplog import Experiment
exp = Experiment("mnist")              # STEPLOG_URL names the service
with exp.start_logging(display_name="lr=1e-3") as run:
    for step in range(1000):
        run.log("loss", loss, step=step)
"""

from steplog._azure import AzureCompatibilityWarning
from steplog.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotApplicableError,
    NotFoundError,
    ServiceError,
    SteplogError,
    UnavailableError,
)
from steplog.experiment import Experiment, ViewType, Workspace
from steplog.run import Run

__all__ = [
    "AlreadyExistsError",
    "AzureCompatibilityWarning",
    "Experiment",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotApplicableError",
    "NotFoundError",
    "Run",
    "ServiceError",
    "SteplogError",
    "UnavailableError",
    "ViewType",
    "Workspace",
]
