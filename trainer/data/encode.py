"""Turn units (records, text pieces) into token arrays: text, instruction pairs, chat conversations.

A text unit becomes its tokens (+ EOS at a document's end); every token is a target. An
instruction record becomes prompt + response + EOS with targets on the response; a conversation
becomes the tokenizer's chat template rendering with targets on the assistant turns selected by
``data.train_on``. Examples longer than ``data.seq_len`` follow ``data.truncation`` and are counted.

Text is tokenized in batches through the fast tokenizer's Rust ``encode_batch`` (its thread pool
uses every core); see ``cache.py`` for why not ``datasets.map``.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from lowbit.trainer.config import DataConfig
from lowbit.trainer.data.sources import Position, Unit
from lowbit.trainer.errors import UserError

logger = logging.getLogger("lowbit")

ROLES = ("system", "developer", "user", "assistant", "tool")
TEXT_BATCH_BYTES = 8 << 20
"""Text pieces per ``encode_batch`` call: enough for every core, little memory."""
RECORD_BATCH = 256


@dataclass
class Piece:
    """Tokens of one unit, in the order read."""

    tokens: np.ndarray
    """int64 token ids."""
    targets: np.ndarray | None
    """bool, True where the token is a label; None: every token is (text)."""
    position: Position
    """The unit it came from: where a resumed reader starts."""
    ends_document: bool = True
    skip: int = 0
    """Tokens of the unit dropped before these (a resumed stream's first piece)."""


@dataclass
class Counts:
    """What the encoder did to the examples it saw (printed, logged and stored with a cache)."""

    documents: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0

    def add(self, other: Counts) -> None:
        for name in ("documents", "examples", "truncated", "dropped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, int]:
        return {
            "documents": self.documents,
            "examples": self.examples,
            "truncated": self.truncated,
            "dropped": self.dropped,
        }


def detect_format(record: dict, cfg: DataConfig, fmt: str, where: str) -> str:
    """The data format for ``format: auto``, from the first record's fields."""
    if fmt != "auto":
        return fmt
    if cfg.messages_field in record:
        return "chat"
    if cfg.prompt_field in record and cfg.response_field in record:
        return "instruction"
    if cfg.text_field in record:
        return "text"
    raise UserError(
        f"{where}: records have fields {sorted(record)}, none of which is data.text_field "
        f"({cfg.text_field!r}), data.prompt_field+data.response_field or data.messages_field; "
        "set the matching data.*_field"
    )


def _field(unit: Unit, name: str, key: str) -> object:
    if name not in unit.record:
        raise UserError(
            f"{unit.where}: the record has no field {name!r} (data.{key}); its fields: {sorted(unit.record)}"
        )
    return unit.record[name]


def _string(unit: Unit, name: str, key: str) -> str:
    value = _field(unit, name, key)
    if not isinstance(value, str):
        raise UserError(
            f"{unit.where}: field {name!r} (data.{key}) must be a string, got {type(value).__name__}"
        )
    return value


def _as_ids(output) -> list[int]:
    """``apply_chat_template`` returns a list or, in newer transformers, an encoding dict."""
    return list(output["input_ids"] if isinstance(output, dict) or hasattr(output, "keys") else output)


def check_messages(messages: object, where: str) -> list[dict]:
    """A conversation as the chat template expects it, or an error naming what is wrong.

    Content given as text parts (``[{"type": "text", "text": ...}]``) is joined into one string:
    text-only chat templates render ``content`` as a string.
    """
    if not isinstance(messages, list) or not messages:
        shown = str(messages)[:60]
        raise UserError(
            f'{where}: messages must be a non-empty list of {{"role": ..., "content": ...}} objects, got '
            f"{type(messages).__name__} {shown!r}"
        )
    checked = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise UserError(
                f"{where}: message {number} is a {type(message).__name__}, not an object with role and content"
            )
        role = message.get("role")
        if role not in ROLES:
            close = difflib.get_close_matches(str(role), ROLES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(
                f"{where}: message {number} has role {role!r}{hint}; known roles: {', '.join(ROLES)}"
            )
        content = message.get("content")
        if isinstance(content, list):
            parts = [
                p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content
            ]
            if any(not isinstance(text, str) for text in parts):
                raise UserError(
                    f'{where}: message {number}\'s content parts must be {{"type": "text", "text": "..."}} objects'
                )
            content = "".join(parts)  # type: ignore[arg-type]
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            raise UserError(f"{where}: message {number} ({role}) has no content")
        if content is not None and not isinstance(content, str):
            raise UserError(
                f"{where}: message {number}'s content must be a string or a list of text parts, got {type(content).__name__}"
            )
        checked.append({**message, "content": content} if content is not None else dict(message))
    return checked


def chat_example(tokenizer, messages: list[dict], train_on: str, where: str) -> tuple[list[int], np.ndarray]:
    """(tokens, targets) of a conversation rendered by the tokenizer's chat template.

    An assistant turn's tokens are those its render adds to the render of the history before it
    with ``add_generation_prompt`` (the exact prefix the model sees before answering); the
    template must render every history as a prefix of the whole conversation.
    """
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistants and train_on != "all":
        raise UserError(f"{where}: the conversation has no assistant message to learn from")

    def render(history: list[dict], **options) -> list[int]:
        try:
            return _as_ids(tokenizer.apply_chat_template(history, tokenize=True, **options))
        except Exception as error:  # the template's own checks (raise_exception), jinja errors
            raise UserError(
                f"{where}: the tokenizer's chat template refused the conversation: {error}"
            ) from None

    full = render(messages)
    targets = np.zeros(len(full), dtype=bool)
    if train_on == "all":
        targets[:] = True
        return full, targets
    for turn in assistants if train_on == "all_assistant" else assistants[-1:]:
        # An assistant-first conversation: what the template puts before any message (a default system prompt).
        prefix = render(messages[:turn], add_generation_prompt=True)
        upto = render(messages[: turn + 1])
        if upto[: len(prefix)] != prefix or full[: len(upto)] != upto:
            raise UserError(
                f"{where}: the tokenizer's chat template does not render the conversation up to assistant "
                f"message {turn + 1} as a prefix of the whole (it rewrites earlier turns); train on one turn "
                "with data.train_on=last_assistant"
            )
        targets[len(prefix) : len(upto)] = True
    return full, targets


def plain_backend(tokenizer):
    """The fast tokenizer's Rust backend without the truncation/padding a ``tokenizer.json`` may
    carry (transformers' ``__call__`` resets those per call; a direct ``encode_batch`` would not)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain


CUT_PROBES = (("Hello world.\n", "The end."), ("In 1790,\n", "Congress met."), ("x = 1;\n", "y = 2;"))


def cut_is_clean(tokenizer) -> bool:
    """Whether tokenizing text in pieces cut at ``x\ny`` newlines gives the whole text's tokens."""
    encoder = Encoder(tokenizer, None, "text")  # type: ignore[arg-type]
    for before, after in CUT_PROBES:
        whole, first, second = encoder.encode_texts([before + after, before, after])
        if whole != first + second:
            return False
    return True


def warn_unclean_cuts(tokenizer) -> None:
    if not cut_is_clean(tokenizer):
        logger.warning(
            "this tokenizer marks the start of a text (e.g. SentencePiece's '▁'): .txt files are tokenized in "
            "line-aligned pieces of ~1 MiB, so the first token of each piece may differ from whole-file "
            "tokenization (about one token in 250,000)"
        )


@dataclass
class Encoder:
    """Units → pieces for one source. ``fmt`` is fixed by the first unit it sees (``auto``)."""

    tokenizer: object
    cfg: DataConfig
    fmt: str = "auto"
    counts: Counts = field(default_factory=Counts)

    def __post_init__(self) -> None:
        self.eos = self.tokenizer.eos_token_id  # type: ignore[attr-defined]
        self.backend = plain_backend(self.tokenizer)
        self.checked_cuts = False

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None:
            return [
                encoding.ids for encoding in self.backend.encode_batch_fast(texts, add_special_tokens=False)
            ]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]  # type: ignore[operator]

    def pieces(self, units: Iterable[Unit]) -> Iterator[Piece]:
        """Pieces in unit order; a dropped example yields nothing (it is counted)."""
        batch: list[Unit] = []
        size = 0
        for unit in units:
            if self.fmt == "auto":
                self.fmt = detect_format(unit.record, self.cfg, self.cfg.format, unit.where)
            batch.append(unit)
            size += len(_string(unit, self.cfg.text_field, "text_field")) if self.fmt == "text" else 1
            if size >= (TEXT_BATCH_BYTES if self.fmt == "text" else RECORD_BATCH):
                yield from self._batch(batch)
                batch, size = [], 0
        if batch:
            yield from self._batch(batch)

    def _batch(self, units: list[Unit]) -> Iterator[Piece]:
        if self.fmt == "text":
            if not self.checked_cuts and any(not u.ends_document or u.position.offset for u in units):
                self.checked_cuts = True
                warn_unclean_cuts(self.tokenizer)
            texts = [_string(unit, self.cfg.text_field, "text_field") for unit in units]
            for unit, ids in zip(units, self.encode_texts(texts)):
                self.counts.documents += unit.ends_document
                tokens = np.asarray([*ids, self.eos] if unit.ends_document else ids, dtype=np.int64)
                yield Piece(tokens, None, unit.position, unit.ends_document)
            return
        for unit, (tokens, targets) in zip(units, self._examples(units)):
            fitted = self._fit(tokens, targets, unit.where)
            if fitted is not None:
                yield Piece(*fitted, unit.position)

    def _examples(self, units: list[Unit]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        cfg = self.cfg
        if self.fmt == "chat":
            for unit in units:
                messages = check_messages(_field(unit, cfg.messages_field, "messages_field"), unit.where)
                tokens, targets = chat_example(self.tokenizer, messages, cfg.train_on, unit.where)
                yield np.asarray(tokens, dtype=np.int64), targets
            return
        if self.fmt != "instruction":
            raise UserError(
                f"data.format: unknown format {self.fmt!r}; choose text, instruction, chat or auto"
            )
        prompts = self.tokenizer(
            [_string(u, cfg.prompt_field, "prompt_field") for u in units], add_special_tokens=True
        )  # type: ignore[operator]
        responses = self.encode_texts([_string(u, cfg.response_field, "response_field") for u in units])
        for prompt, response in zip(prompts["input_ids"], responses):
            tokens = np.asarray([*prompt, *response, self.eos], dtype=np.int64)
            targets = np.zeros(len(tokens), dtype=bool)
            targets[0 if cfg.train_on == "all" else len(prompt) :] = True
            yield tokens, targets

    def _fit(
        self, tokens: np.ndarray, targets: np.ndarray, where: str
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Apply the truncation policy to one example; None means drop it (counted)."""
        self.counts.documents += 1
        self.counts.examples += 1
        seq_len = self.cfg.seq_len
        if len(tokens) <= seq_len:
            return tokens, targets
        if self.cfg.truncation == "error":
            raise UserError(
                f"{where}: the example is {len(tokens)} tokens, longer than data.seq_len={seq_len}; set data.truncation to "
                "truncate or drop, or raise data.seq_len"
            )
        if self.cfg.truncation == "truncate" and targets[1:seq_len].any():
            self.counts.truncated += 1
            return tokens[:seq_len], targets[:seq_len]
        self.counts.examples -= 1
        self.counts.dropped += 1  # drop, or truncated to nothing left to learn from
        return None
