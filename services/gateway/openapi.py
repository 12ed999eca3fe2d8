"""JSON Schemas of the ``saev.v1`` messages, generated from their descriptors, for ``/openapi.json``.

The HTTP API speaks the protobuf JSON mapping of the same messages the gRPC API uses (field names as in the
.proto, bytes as base64, enums by name, 64-bit integers as numbers or strings), so both protocols share one
contract and the OpenAPI document cannot drift from it.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

INT32 = {"type": "integer", "minimum": -(1 << 31), "maximum": (1 << 31) - 1}
UINT32 = {"type": "integer", "minimum": 0, "maximum": (1 << 32) - 1}
INT64 = {"oneOf": [{"type": "integer", "minimum": -(1 << 63), "maximum": (1 << 63) - 1},
                   {"type": "string", "pattern": "^-?[0-9]{1,19}$"}]}
UINT64 = {"oneOf": [{"type": "integer", "minimum": 0, "maximum": (1 << 64) - 1},
                    {"type": "string", "pattern": "^[0-9]{1,20}$"}]}
T = FieldDescriptor
SCALARS: dict[int, dict[str, Any]] = {
    T.TYPE_DOUBLE: {"type": "number"}, T.TYPE_FLOAT: {"type": "number"},
    T.TYPE_INT32: INT32, T.TYPE_SINT32: INT32, T.TYPE_SFIXED32: INT32,
    T.TYPE_UINT32: UINT32, T.TYPE_FIXED32: UINT32,
    T.TYPE_INT64: INT64, T.TYPE_SINT64: INT64, T.TYPE_SFIXED64: INT64,
    T.TYPE_UINT64: UINT64, T.TYPE_FIXED64: UINT64,
    T.TYPE_BOOL: {"type": "boolean"}, T.TYPE_STRING: {"type": "string"},
    T.TYPE_BYTES: {"type": "string", "format": "byte", "contentEncoding": "base64"},
}


def schema_name(descriptor: Descriptor) -> str:
    return descriptor.full_name


def ref(descriptor: Descriptor) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{schema_name(descriptor)}"}


def message_schemas(*descriptors: Descriptor) -> dict[str, dict[str, Any]]:
    """Schemas of the given messages and every message they reference, keyed by full name."""
    out: dict[str, dict[str, Any]] = {}
    todo = list(descriptors)
    while todo:
        d = todo.pop()
        if schema_name(d) in out:
            continue
        props: dict[str, Any] = {}
        for f in d.fields:
            if f.type == T.TYPE_MESSAGE:
                item: dict[str, Any] = ref(f.message_type)
                todo.append(f.message_type)
            elif f.type == T.TYPE_ENUM:
                item = {"type": "string", "enum": [v.name for v in f.enum_type.values]}
            else:
                item = dict(SCALARS[f.type])
            if f.is_repeated:
                item = {"type": "array", "items": item}
            props[f.name] = item
        doc = {"type": "object", "properties": props, "additionalProperties": False}
        oneofs = [o for o in d.oneofs if not o.name.startswith("_")]  # synthetic oneofs of `optional` excluded
        if oneofs:
            doc["description"] = "; ".join(
                f"at most one of {', '.join(f.name for f in o.fields)}" for o in oneofs)
        out[schema_name(d)] = doc
    return out
