"""steplog: log training metrics without ever blocking the training loop.

from steplog import Experiment
exp = Experiment("mnist")              # STEPLOG_URL names the service
with exp.start_logging(display_name="lr=1e-3") as run:
    for step in range(1000):
        run.log("loss", loss, step=step)
"""

from steplog.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ServiceError,
    SteplogError,
    UnavailableError,
)
from steplog.experiment import Experiment
from steplog.run import Run

__all__ = [
    "AlreadyExistsError",
    "Experiment",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "Run",
    "ServiceError",
    "SteplogError",
    "UnavailableError",
]
