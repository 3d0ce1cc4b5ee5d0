"""Wire format of the reward model service: what ``POST /score``, ``POST /reload`` and
``GET /healthz`` take and answer (the handle method ``score_batch`` answers the same dict).

The app, deployment and route names come from the client, ``whetstone.online.reward_client``,
which the library ships and which must not import the services; they are re-exported here.
Static limits (types, at least one pair, one response per prompt, text length) are checked here,
so FastAPI answers 422 naming the field; the deployment's own limit (``max_items``) answers 413.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from whetstone.index.wire import Text
from whetstone.online.reward_client import APP_NAME, DEPLOYMENT_NAME, ROUTE_PREFIX

__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "ROUTE_PREFIX", "HealthResponse", "ReloadRequest", "ReloadResponse",
           "ScoreRequest", "ScoreResponse"]

Version = str  # a reward model's version: given at deploy/reload, else "rm-" + 8 hex of its files' hash


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreRequest(_Wire):
    """Pairs to score: ``responses[i]`` answers ``prompts[i]``. Strict: a number is not a text."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompts: list[Text] = Field(..., min_length=1, description="the prompts (hh-rlhf dialogue or plain text)")
    responses: list[Text] = Field(..., min_length=1, description="one response per prompt, same order")

    @field_validator("responses")
    @classmethod
    def _one_per_prompt(cls, responses: list[str], info: ValidationInfo) -> list[str]:
        prompts = info.data.get("prompts")  # absent when the prompts themselves were invalid
        if prompts is not None and len(prompts) != len(responses):
            raise ValueError(f"got {len(responses)} for {len(prompts)} prompts: give one response per prompt")
        return responses


class ScoreResponse(_Wire):
    scores: list[float] = Field(..., description="one reward per pair, in request order")
    version: Version = Field(..., description="the reward model version that scored every pair of this request")
    model_uri: str = Field(..., description="where that version was loaded from")


class ReloadRequest(_Wire):
    model_config = ConfigDict(extra="forbid", strict=True)
    model_uri: str = Field(..., min_length=1, max_length=2048,
                           description="folder or s3:// URI of a reward model (the job's mode=reward_model saves one)")
    version: Version | None = Field(None, min_length=1, max_length=128,
                                    description="its version; default: a short hash of the model's files")


class ReloadResponse(_Wire):
    version: Version
    model_uri: str
    previous_version: Version
    load_s: float = Field(..., description="seconds spent loading the new model (the previous one served meanwhile)")


class HealthResponse(_Wire):
    status: str
    version: Version
    model_uri: str
