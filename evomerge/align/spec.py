"""The ``align:`` settings of a merge recipe (validated when the recipe is read; carried out by
:mod:`evomerge.align.recipe_step`)."""

from __future__ import annotations

from typing import Union

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

ALIGN_METHODS = ("rebasin", "c2m3", "activations")


class AlignSpec(BaseModel):
    """The ``align:`` step of a recipe: ``method``, ``reference`` (a model as written in the
    recipe, or a 0-based index into its distinct models, base first), ``data`` (activations
    only: one task or a list) and ``seed``."""

    model_config = ConfigDict(extra="forbid")

    method: str = "rebasin"
    reference: Union[int, str, None] = None
    data: Union[str, list[str], None] = None
    seed: int = 0

    @field_validator("method")
    @classmethod
    def _method(cls, v):
        if v not in ALIGN_METHODS:
            raise ValueError(f"unknown method {v!r}; use one of {', '.join(ALIGN_METHODS)}")
        return v

    @model_validator(mode="after")
    def _data(self):
        if self.method == "activations" and not self.data:
            raise ValueError("method activations needs 'data': a task (zoo:NAME or a task folder) or a list of "
                             "them, whose items the models are run on")
        if self.method != "activations" and self.data is not None:
            raise ValueError(f"'data' is read by method activations only (not {self.method}); remove it")
        return self

    @property
    def tasks(self) -> list[str]:
        """``data`` as a list."""
        return [] if self.data is None else [self.data] if isinstance(self.data, str) else list(self.data)
