"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) and the one chat template.

This module owns:
  * training a byte-level BPE (GPT-2 style: every byte is a token, so any string encodes and
    ``decode(encode(s)) == s`` exactly; no normalizer, no prefix space);
  * the special tokens, always ids 0..6 in the order of ``SPECIAL_TOKENS``;
  * ``render_chat``: THE chat template. Every later stage (SFT, reward model, DPO, PPO, chat,
    serve, export) renders a conversation through it into ``(ids, mask)``;
  * saving a directory that ``transformers`` loads unchanged (``tokenizer.json`` plus
    ``tokenizer_config.json`` and ``special_tokens_map.json``, with a Jinja ``chat_template``
    that renders the same ids as ``render_chat``).

Policies (tested in tests/test_tokenizer.py):
  * **Special-token strings typed inside text are plain text.** ``encode("<|end|>")`` gives the
    byte-level tokens of the 7 characters, never the special id: we encode with the `tokenizers`
    flag ``encode_special_tokens=True``. Special ids enter a sequence only through ``add_bos`` /
    ``add_eos`` and ``render_chat``, so a user cannot forge a turn boundary. (The ``transformers``
    loaders follow the Hugging Face convention and *do* parse such strings; ids agree on all text
    that does not contain them.)
  * **Lone surrogates** (``"\\ud800"``: legal in a Python ``str``, not encodable as UTF-8) are
    replaced by U+FFFD before encoding, so the text round-trips with that one substitution.

It knows nothing about models, datasets on disk or training loops.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]  # ids 0..6
CHAT_ROLES = ("system", "user", "assistant")
TOKENIZER_FILE = "tokenizer.json"
BYTE_ALPHABET_SIZE = 256

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

# The Jinja twin of render_chat, for transformers' apply_chat_template. `{% generation %}` marks the
# tokens render_chat masks with 1, so `return_assistant_tokens_mask=True` gives the same mask.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('message ' ~ loop.index0 ~ ': role must be system, user or assistant, got ' ~ message['role']) }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] ~ '<|end|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] ~ '<|end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def replace_lone_surrogates(text: str) -> str:
    """Replace code points U+D800..U+DFFF (not encodable as UTF-8) with U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", text)


class Tokenizer:
    """A byte-level BPE with tinygpt's special tokens and chat template."""

    def __init__(self, hf_tokenizer: _HFTokenizer):
        self._tok = hf_tokenizer
        for token_id, token in enumerate(SPECIAL_TOKENS):
            found = self._tok.token_to_id(token)
            if found != token_id:
                raise ValueError(
                    f"not a tinygpt tokenizer: special token {token!r} has id {found}, expected {token_id} "
                    f"(tinygpt tokenizers reserve ids 0..{len(SPECIAL_TOKENS) - 1} for {SPECIAL_TOKENS})"
                )
        # Special-token strings inside text are encoded as plain bytes (see module docstring).
        self._tok.encode_special_tokens = True
        self.vocab_size: int = self._tok.get_vocab_size()
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.system_id, self.user_id, self.assistant_id, self.end_id = 3, 4, 5, 6
        self.role_ids: dict[str, int] = {"system": self.system_id, "user": self.user_id, "assistant": self.assistant_id}
        self.special_ids: frozenset[int] = frozenset(range(len(SPECIAL_TOKENS)))

    # --- training, loading, saving ---------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 4096,
        min_frequency: int = 2,
        show_progress: bool = True,
    ) -> "Tokenizer":
        """Train on an iterable of documents. The vocabulary holds the 7 special tokens, the 256
        byte tokens, then merges up to ``vocab_size`` (fewer if the corpus runs out of pairs that
        occur ``min_frequency`` times)."""
        smallest = len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE
        if vocab_size < smallest:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: it must hold {len(SPECIAL_TOKENS)} special tokens "
                f"+ {BYTE_ALPHABET_SIZE} byte tokens = {smallest} at least"
            )
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
        tok = _HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )

        def checked(items: Iterable[str]) -> Iterable[str]:
            for i, text in enumerate(items):
                if not isinstance(text, str):
                    raise TypeError(f"training text {i}: expected str, got {type(text).__name__}")
                yield replace_lone_surrogates(text)

        tok.train_from_iterator(checked(texts), trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load a ``tokenizer.json`` file, or a directory (e.g. a checkpoint) holding one."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            where = f"directory {path} has no {TOKENIZER_FILE}" if path.is_dir() else f"{file} does not exist"
            raise FileNotFoundError(f"cannot load tokenizer: {where}")
        try:
            return cls(_HFTokenizer.from_file(str(file)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"cannot load tokenizer from {file}: {e}") from e

    @classmethod
    def from_str(cls, json_str: str) -> "Tokenizer":
        try:
            return cls(_HFTokenizer.from_str(json_str))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"not a tokenizer.json: {e}") from e

    def to_str(self) -> str:
        return self._tok.to_str()

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer: shards and checkpoints record it to catch mismatches."""
        return hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` and the ``transformers`` files into directory ``path``
        (a path ending in ``.json`` writes just that file)."""
        path = Path(path)
        if path.suffix == ".json":
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, self.to_str())
            return
        path.mkdir(parents=True, exist_ok=True)
        _write_atomic(path / TOKENIZER_FILE, self.to_str())
        special_map = {
            "bos_token": "<|bos|>",
            "eos_token": "<|eos|>",
            "pad_token": "<|pad|>",
            "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_map,
            "clean_up_tokenization_spaces": False,  # keep decode(encode(s)) == s in transformers too
            "model_max_length": 1_000_000_000,
            "chat_template": CHAT_TEMPLATE,
        }
        _write_atomic(path / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")
        _write_atomic(path / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")

    # --- encoding and decoding -------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # lone surrogate: not representable in UTF-8
            ids = self._tok.encode(replace_lone_surrogates(text), add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """Encode many texts at once; `tokenizers` spreads the batch over its Rust thread pool."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_batch: item {i} is {type(text).__name__}, expected str")
        try:
            encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        except TypeError:
            encodings = self._tok.encode_batch([replace_lone_surrogates(t) for t in texts], add_special_tokens=False)
        head = [self.bos_id] if add_bos else []
        tail = [self.eos_id] if add_eos else []
        return [head + e.ids + tail for e in encodings]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: token id(s) {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"

    # --- the chat template -----------------------------------------------------------------------

    def render_chat(
        self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Render a conversation into ``(ids, mask)``, the one template every stage uses::

            <|bos|> <|role|> content <|end|> <|role|> content <|end|> ... [<|assistant|>]

        ``mask`` is 1 exactly on assistant content tokens and the ``<|end|>`` closing them (what
        SFT learns to produce, including when to stop), 0 elsewhere. ``add_generation_prompt``
        appends ``<|assistant|>`` (mask 0) so a sampler continues with the assistant's turn.
        """
        validate_messages(messages)
        ids: list[int] = [self.bos_id]
        mask: list[int] = [0]
        for message in messages:
            is_assistant = message["role"] == "assistant"
            content = self.encode(message["content"]) + [self.end_id]
            ids += [self.role_ids[message["role"]]] + content
            mask += [0] + [int(is_assistant)] * len(content)
        if add_generation_prompt:
            ids.append(self.assistant_id)
            mask.append(0)
        return ids, mask


def validate_messages(messages: Any) -> None:
    """Check a conversation: a list of ``{"role": system|user|assistant, "content": str}``.
    Errors say which message index and which field is wrong."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(f"message {i}: expected a dict with 'role' and 'content', got {type(message).__name__}")
        if "role" not in message:
            raise ValueError(f"message {i}: missing field 'role' (one of {', '.join(CHAT_ROLES)})")
        if message["role"] not in CHAT_ROLES:
            raise ValueError(f"message {i}: field 'role' must be one of {', '.join(CHAT_ROLES)}, got {message['role']!r}")
        if "content" not in message:
            raise ValueError(f"message {i}: missing field 'content' (a string)")
        if not isinstance(message["content"], str):
            raise TypeError(f"message {i}: field 'content' must be a string, got {type(message['content']).__name__}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
