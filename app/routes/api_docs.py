"""`/api`: the JSON API's reference, read from the app's own OpenAPI schema and rendered on the
server. Swagger UI and ReDoc need a CDN and inline script (and so exist only in debug mode); this
page works offline under the strict Content-Security-Policy."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from fastapi import APIRouter, Request

from app.render import render

router = APIRouter()

REF = "#/components/schemas/"


@dataclass
class ApiField:
    name: str
    type: str  # as shown: "integer", "array of LatentOut", "string | null"
    refs: list[str]  # the schemas it names, linked on the page
    required: bool
    description: str = ""
    default: str | None = None


@dataclass
class Endpoint:
    method: str
    path: str
    summary: str
    description: str
    parameters: list[ApiField]
    body: ApiField | None
    responses: list[tuple[str, str, list[str]]]  # (status, description, schemas)


@dataclass
class Schema:
    name: str
    description: str
    fields: list[ApiField] = field(default_factory=list)


def type_of(schema: dict) -> tuple[str, list[str]]:
    """A JSON schema as a short type name, and the named schemas in it."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix(REF)
        return name, [name]
    if options := schema.get("anyOf") or schema.get("oneOf"):
        parts = [type_of(option) for option in options]
        return " | ".join(name for name, _ in parts), [ref for _, refs in parts for ref in refs]
    if "enum" in schema:
        return " | ".join(json.dumps(value) for value in schema["enum"]), []
    if "const" in schema:
        return json.dumps(schema["const"]), []
    kind = schema.get("type", "any")
    if kind == "array":
        name, refs = type_of(schema.get("items", {}))
        return f"array of {name}", refs
    if kind == "object" and "additionalProperties" in schema and isinstance(schema["additionalProperties"], dict):
        name, refs = type_of(schema["additionalProperties"])
        return f"object of {name}", refs
    return kind, []


def field_of(name: str, schema: dict, required: bool, description: str = "") -> ApiField:
    shown, refs = type_of(schema)
    default = json.dumps(schema["default"]) if "default" in schema else None
    return ApiField(name, shown, refs, required, description or schema.get("description", ""), default)


def endpoints(spec: dict) -> list[Endpoint]:
    found = []
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            parameters = [field_of(f"{p['name']} ({p['in']})", p.get("schema", {}), p.get("required", False),
                               p.get("description", "")) for p in op.get("parameters", [])]
            body = None
            if content := op.get("requestBody", {}).get("content", {}).get("application/json"):
                body = field_of("JSON body", content.get("schema", {}), op["requestBody"].get("required", False))
            responses = []
            for status, response in op.get("responses", {}).items():
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                responses.append((status, response.get("description", ""), type_of(schema)[1] if schema else []))
            found.append(Endpoint(method.upper(), path, op.get("summary", ""), op.get("description", ""),
                                  parameters, body, sorted(responses)))
    return found


def schemas(spec: dict) -> list[Schema]:
    found = []
    for name, schema in sorted(spec.get("components", {}).get("schemas", {}).items()):
        required = set(schema.get("required", []))
        fields = [field_of(key, value, key in required) for key, value in schema.get("properties", {}).items()]
        found.append(Schema(name, schema.get("description", ""), fields))
    return found


@router.get("/api", include_in_schema=False)
def read_api_docs(request: Request):
    spec = request.app.openapi()
    return render(request, "api.html", info=spec["info"], endpoints=endpoints(spec), schemas=schemas(spec))
