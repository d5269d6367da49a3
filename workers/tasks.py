"""The Celery task a model worker runs."""

from __future__ import annotations

from celery import Task

from pipeline import broker, runtime
from pipeline.settings import get_settings
from pipeline.states import Priority
from workers.inference import run_subtask
from workers.models import served


@broker.app.task(name=broker.PREDICT_TASK, bind=True)
def predict(self: Task[..., None], subtask_id: int, priority: str | None = None) -> None:
    message = broker.PredictMessage.model_validate({"subtask_id": subtask_id, "priority": priority})
    run_subtask(
        runtime.turn_engine(),
        get_settings(),
        message.subtask_id,
        self.request.hostname or "unknown",
        served(),
        Priority(message.priority or Priority.bulk),
    )
