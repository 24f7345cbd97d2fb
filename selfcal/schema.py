"""The base of every typed params section and artifact record."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator


class Strict(BaseModel):
    """Unknown keys are errors: a misspelt key silently ignored is a wrong experiment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: object) -> object:
        # No path, name or id may hold a NUL byte: the OS refuses it with a ValueError deep in a stage.
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("contains a NUL byte")
        return value
