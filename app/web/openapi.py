"""The OpenAPI schema of the app, completed: how to authenticate (bearer token, session cookie,
`x-api-key` for the CompreFace-compatible /api/v1) and the error answers every API operation
may give, so that generated clients know both."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer",
               "description": "a token of web.token_hashes (or $FACEMOE_WEB_TOKEN)"},
    "session": {"type": "apiKey", "in": "cookie", "name": "facemoe_session",
                "description": "the login of the pages; changes also need the X-CSRF-Token header"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
               "description": "a key of web.api_keys (CompreFace-compatible /api/v1 only)"},
}
ERRORS = {
    "400": "a bad value or image (one-line message)",
    "401": "no or wrong credentials",
    "403": "not allowed (a read-only key, a missing CSRF token, a cross-site request)",
    "404": "no such event, identity, template, cluster or face",
}
_DETAIL = {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}
_MESSAGE = {"type": "object", "required": ["message", "code"],
            "properties": {"message": {"type": "string"}, "code": {"type": "integer",
                                                                   "description": "28: no face"}}}


def install(app: FastAPI) -> None:
    """Make `app.openapi()` return the completed schema (built once)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version,
                               description=app.description, routes=app.routes)
            complete(spec)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def complete(spec: dict[str, Any]) -> None:
    components = spec.setdefault("components", {})
    components["securitySchemes"] = SCHEMES
    schemas = components.setdefault("schemas", {})
    schemas["Error"], schemas["CompreFaceError"] = _DETAIL, _MESSAGE
    for path, ops in spec.get("paths", {}).items():
        if not path.startswith("/api/"):
            continue
        v1 = path.startswith("/api/v1/")
        ref = {"$ref": "#/components/schemas/" + ("CompreFaceError" if v1 else "Error")}
        for op in ops.values():
            op["security"] = ([{"apiKey": []}] if v1 else []) + [{"bearer": []}, {"session": []}]
            responses = op.setdefault("responses", {})
            for status, what in ERRORS.items():
                responses.setdefault(status, {"description": what,
                                              "content": {"application/json": {"schema": ref}}})
