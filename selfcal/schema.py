"""The base of every typed params section and artifact record."""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel, ConfigDict, field_validator, model_validator


def _admits_bool(annotation: object) -> bool:
    """Whether a field's type takes true/false: ``bool`` itself, or a union or Annotated holding it."""
    if annotation is bool or annotation is typing.Any or annotation is object:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return any(isinstance(a, bool) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return any(_admits_bool(a) for a in typing.get_args(annotation))
    return False


class Strict(BaseModel):
    """Unknown keys are errors: a misspelt key silently ignored is a wrong experiment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_as_number(cls, data: object) -> object:
        # pydantic's lax mode reads YAML's true as 1 and false as 0: `n_samples: true` would be one sequence.
        # (A model validator: pydantic allows no field "before" validator on a discriminator such as `kind`.)
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                if isinstance(value, bool) and field is not None and not _admits_bool(field.annotation):
                    raise ValueError(f"{key}: {str(value).lower()} is a yes/no, not a number or a name")
        return data

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: object) -> object:
        # No path, name or id may hold a NUL byte: the OS refuses it with a ValueError deep in a stage.
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("contains a NUL byte")
        return value
