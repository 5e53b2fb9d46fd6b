"""Request and response models: the native API and the Hugging Face Inference API shape."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, model_validator

from packer.runtime.tasks.qa import QAOptions

NonEmpty = Annotated[str, Field(min_length=1)]
QA_DEFAULTS = QAOptions()  # the one home of the QA defaults (packer/tasks/qa.py), shared with evaluation


class QAItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: NonEmpty
    context: NonEmpty


class QAOptionsIn(BaseModel):
    """Strict types: `top_k: true`, `"2"` or `2.0` are refused with the field named, not coerced."""

    top_k: StrictInt = Field(QA_DEFAULTS.top_k, ge=1, le=20)
    max_answer_len: StrictInt = Field(QA_DEFAULTS.max_answer_len, ge=1, le=512, description="tokens")
    max_seq_len: StrictInt | None = Field(
        None,
        ge=16,
        le=4096,
        description="tokens per window; default min(384, what the model's positions allow)",
    )
    doc_stride: StrictInt | None = Field(
        None,
        ge=0,
        le=4096,
        description="tokens shared by consecutive windows; default min(128, max_seq_len / 3)",
    )
    handle_impossible_answer: StrictBool = QA_DEFAULTS.handle_impossible_answer
    null_threshold: StrictFloat | StrictInt = Field(QA_DEFAULTS.null_threshold, allow_inf_nan=False)
    align_to_words: StrictBool = Field(
        QA_DEFAULTS.align_to_words, description="widen answers to whole words of the context"
    )


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
    return_all_scores: StrictBool = False
    max_seq_len: StrictInt | None = Field(
        None, ge=8, le=4096, description="tokens; default: what the model's positions allow (512 for BERT)"
    )

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
    state: str = Field(description="ready | failed")
    reason: str | None = Field(None, description="why a failed model is not served")
    task: str | None = None
    variant: str | None = None
    backend: str | None = None
    device: str | None = None
    providers: list[str] | None = Field(
        None,
        description="what really runs it: ONNX Runtime's providers as the session reports, or torch's device",
    )
    dtype: str | None = None
    params: int | None = None
    max_seq_len: int | None = Field(None, description="the default window length for this model")
    max_window: int | None = Field(None, description="the longest window its positions allow")
    batch_invariant: bool | None = Field(
        None, description="a window's answer does not depend on what shares its batch"
    )
    labels: list[str] | None = None


class ModelInfo(ModelOut):
    source: dict | None = None
    packer_version: str | None = None
    files: dict[str, str] | None = Field(None, description="sha256 of every file of the artifact")
    arch: str | None = None
    max_position_embeddings: int | None = None


class ModelsResponse(BaseModel):
    models: list[ModelOut]


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
