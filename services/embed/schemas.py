"""Wire format of the embedding service, defined once (clients import it from here)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

APP_NAME = "whetstone-embed"
DEPLOYMENT_NAME = "EmbedService"
ROUTE_PREFIX = "/embed"


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(..., min_length=1, description="texts to embed")
    dim: int | None = Field(None, ge=1, description="Matryoshka truncation (then re-normalised)")
    kind: Literal["document", "query"] = Field(
        "document", description="which tower embeds the texts; differs only for an asymmetric model (one "
        "trained with encoder.query_tower=frozen), whose queries go through its query tower")


class EmbedResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str = Field(..., description="the model the vectors came from")
    index_version: int | None = Field(None, description="index version whose checkpoint is served")
    dim: int
    vectors: list[list[float]]
