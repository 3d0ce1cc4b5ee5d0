"""The bearer-token pieces the index and the embedding services share (services.http_common), and
the embedding service's token settings: where the token comes from, when it is asked for, what the
answers and the OpenAPI document say, and the Serve configs' embed args."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fastapi import Depends, FastAPI
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.testclient import TestClient
from pydantic import SecretStr

from services.http_common import (
    EMBED_TOKEN_ENV,
    INDEX_TOKEN_ENV,
    add_error_handlers,
    bearer,
    check_token,
    resolve_token,
    token_sources,
)

REPO = Path(__file__).resolve().parents[2]


def test_token_resolution_order(monkeypatch):
    monkeypatch.delenv(EMBED_TOKEN_ENV, raising=False)
    monkeypatch.delenv(INDEX_TOKEN_ENV, raising=False)
    envs = (EMBED_TOKEN_ENV, INDEX_TOKEN_ENV)
    assert resolve_token(None, *envs) is None
    monkeypatch.setenv(INDEX_TOKEN_ENV, "index-token")
    assert resolve_token(None, *envs) == "index-token"  # one Secret for the RayService's two apps
    monkeypatch.setenv(EMBED_TOKEN_ENV, "")
    assert resolve_token(None, *envs) == "index-token"  # empty counts as unset
    monkeypatch.setenv(EMBED_TOKEN_ENV, "embed-token")
    assert resolve_token(None, *envs) == "embed-token"
    assert resolve_token(SecretStr("configured"), *envs) == "configured"
    assert resolve_token(SecretStr(""), *envs) == "embed-token"
    assert token_sources(INDEX_TOKEN_ENV) == "auth_token or $WHETSTONE_INDEX_TOKEN"
    assert token_sources(*envs) == "auth_token or $WHETSTONE_EMBED_TOKEN (else $WHETSTONE_INDEX_TOKEN)"


@pytest.mark.parametrize("expected", ["secret", None])
def test_answers_carry_a_code_and_name_the_token_variables(expected):
    sources = token_sources(EMBED_TOKEN_ENV, INDEX_TOKEN_ENV)
    app = FastAPI()
    add_error_handlers(app)

    async def guard(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        check_token(credentials, expected, "embedding", sources)

    @app.post("/", dependencies=[Depends(guard)])
    async def route() -> dict:
        return {"ok": True}

    with TestClient(app) as client:
        missing = client.post("/")
        wrong = client.post("/", headers={"Authorization": "Bearer nope"})
        right = client.post("/", headers={"Authorization": "Bearer secret"})
    if expected is None:  # nothing configured: refused whatever is sent, and the answer says what to set
        for answer in (missing, wrong, right):
            assert answer.status_code == 403 and answer.json()["code"] == "forbidden"
            assert "no auth token is configured" in answer.json()["detail"]
            assert "$WHETSTONE_EMBED_TOKEN" in answer.json()["detail"]
        return
    assert (missing.status_code, missing.json()["code"]) == (401, "unauthorized")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert (wrong.status_code, wrong.json()["code"]) == (403, "forbidden")
    for answer in (missing, wrong):
        assert "$WHETSTONE_EMBED_TOKEN (else $WHETSTONE_INDEX_TOKEN)" in answer.json()["detail"], answer.text
        assert "nope" not in answer.text
    assert right.status_code == 200 and right.json() == {"ok": True}


def test_embed_asks_for_the_token_when_one_is_configured_unless_told_otherwise():
    from services.http_common import token_required

    assert token_required("t", None) and not token_required(None, None)  # default: whenever configured
    assert token_required(None, True) and token_required("t", True)  # fail closed: 403 without a token
    assert not token_required("t", False) and not token_required(None, False)


def test_embed_openapi_lists_the_bearer_scheme_only_where_asked_for():
    from services.embed.app import _NOTES, app
    from services.http_common import openapi_document

    guarded = openapi_document(app, {"embed": True}, _NOTES)
    assert guarded["paths"]["/"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "WHETSTONE_EMBED_TOKEN" in guarded["paths"]["/"]["post"]["description"]
    assert "HTTPBearer" in guarded["components"]["securitySchemes"]
    open_ = openapi_document(app, {"embed": False}, _NOTES)
    assert "security" not in open_["paths"]["/"]["post"]
    assert all("security" not in doc["paths"]["/healthz"]["get"] for doc in (guarded, open_))


def test_embed_args_of_the_serve_configs_validate_and_keep_the_token_value():
    from services.embed.app import EmbedServiceArgs, wire_args

    found = {}
    for name in ("serve_config.yaml", "serve_config.local.yaml"):
        config = yaml.safe_load((REPO / "services" / "index" / name).read_text())
        (embed,) = [app for app in config["applications"] if app["name"] == "whetstone-embed"]
        assert embed["import_path"] == "services.embed.app:build_app" and embed["route_prefix"] == "/embed"
        found[name] = EmbedServiceArgs.model_validate(embed["args"])
    assert found["serve_config.yaml"].protect_embed is True  # the RayService: fail closed without the Secret
    assert found["serve_config.local.yaml"].protect_embed is None
    args = EmbedServiceArgs(model_uri="m", auth_token="s3cret")
    assert "s3cret" not in repr(args) and wire_args(args)["auth_token"] == "s3cret"
    assert EmbedServiceArgs.model_validate(wire_args(args)).auth_token.get_secret_value() == "s3cret"
    assert wire_args(EmbedServiceArgs(model_uri="m"))["auth_token"] is None
