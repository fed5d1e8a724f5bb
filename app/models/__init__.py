"""All ORM models, imported here so Alembic's metadata sees every table."""

from app.models.answer_evaluation import AnswerEvaluation
from app.models.base import Base
from app.models.blob import Blob, BlobChunk
from app.models.file import File
from app.models.inference_server import InferenceServer
from app.models.job import FineTuningJob, JobArtifact, JobCheckpoint, JobEvent, JobStatus  # noqa: F401
from app.models.project import ApiKey, Project
from app.models.registered_model import RegisteredModel
from app.models.webhook import WebhookDelivery, WebhookEndpoint
from app.models.worker import Worker

__all__ = [
    "AnswerEvaluation",
    "ApiKey",
    "Base",
    "Blob",
    "BlobChunk",
    "File",
    "FineTuningJob",
    "InferenceServer",
    "JobArtifact",
    "JobCheckpoint",
    "JobEvent",
    "Project",
    "RegisteredModel",
    "WebhookDelivery",
    "WebhookEndpoint",
    "Worker",
]
