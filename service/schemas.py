"""Request and response models: the native API and the Hugging Face Inference API shape."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

NonEmpty = Annotated[str, Field(min_length=1)]


class QAItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: NonEmpty
    context: NonEmpty


class QAOptionsIn(BaseModel):
    top_k: int = Field(1, ge=1, le=20)
    max_answer_len: int = Field(30, ge=1, le=512, description="tokens")
    max_seq_len: int = Field(384, ge=16, le=4096, description="tokens per window")
    doc_stride: int = Field(128, ge=0, le=4096, description="tokens shared by consecutive windows")
    handle_impossible_answer: bool = True
    null_threshold: float = Field(0.0, allow_inf_nan=False)
    align_to_words: bool = Field(True, description="widen answers to whole words of the context")


class QARequest(QAOptionsIn):
    """One `{question, context}` or `{items: [...]}`, plus options."""

    model_config = ConfigDict(extra="forbid")
    question: NonEmpty | None = None
    context: NonEmpty | None = None
    items: list[QAItem] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_shape(self) -> QARequest:
        single = self.question is not None or self.context is not None
        if single and self.items is not None:
            raise ValueError("send either question/context or items, not both")
        if not single and self.items is None:
            raise ValueError("send question and context, or items")
        if single and (self.question is None or self.context is None):
            raise ValueError("question and context are both required")
        return self

    def all_items(self) -> list[QAItem]:
        return (
            self.items if self.items is not None else [QAItem(question=self.question, context=self.context)]
        )


class QAAnswer(BaseModel):
    answer: str
    score: float
    start: int = Field(description="character offset into the context")
    end: int = Field(description="character offset into the context (exclusive)")


class QAResultOut(BaseModel):
    answers: list[QAAnswer]
    is_impossible: bool
    null_score_diff: float


class QAResponse(BaseModel):
    model: str
    results: list[QAResultOut]


class ClassifyItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: NonEmpty
    text_pair: NonEmpty | None = None


class ClassifyRequest(BaseModel):
    """One `{text, text_pair?}` or `{items: [...]}`."""

    model_config = ConfigDict(extra="forbid")
    text: NonEmpty | None = None
    text_pair: NonEmpty | None = None
    items: list[ClassifyItem] | None = Field(None, min_length=1)
    return_all_scores: bool = False
    max_seq_len: int = Field(512, ge=8, le=4096)

    @model_validator(mode="after")
    def _one_shape(self) -> ClassifyRequest:
        if self.items is not None and (self.text is not None or self.text_pair is not None):
            raise ValueError("send either text or items, not both")
        if self.items is None and self.text is None:
            raise ValueError("send text, or items")
        return self

    def all_items(self) -> list[ClassifyItem]:
        return (
            self.items if self.items is not None else [ClassifyItem(text=self.text, text_pair=self.text_pair)]
        )


class ClassifyResultOut(BaseModel):
    label: str
    score: float
    scores: dict[str, float] | None = None


class ClassifyResponse(BaseModel):
    model: str
    results: list[ClassifyResultOut]


class HFRequest(BaseModel):
    """Hugging Face Inference API: inputs is {question, context}, a text, or a list of either."""

    inputs: dict[str, Any] | str | list[Any]
    parameters: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)


class ModelOut(BaseModel):
    name: str
    task: str
    variant: str
    backend: str
    device: str
    dtype: str
    params: int
    batch_invariant: bool = Field(description="a window's answer does not depend on what shares its batch")
    labels: list[str] | None = None


class ModelsResponse(BaseModel):
    models: list[ModelOut]


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
