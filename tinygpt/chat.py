"""Terminal chat with a checkpoint: multi-turn, streamed token by token, in the SFT template.

    tinygpt chat runs/x/sft            # any checkpoint; a LoRA one holds its merged weights

Each turn renders the whole history with ``render_chat(add_generation_prompt=True)`` (the template
SFT trained on) and streams the reply through :func:`tinygpt.generate.stream`, stopping at
``<|end|>`` or EOS. When the history no longer fits the context (prompt + ``max_new_tokens`` >
block_size), the oldest user/assistant exchanges are dropped (the system prompt is kept) and the
user is told. With ``--watermark-key`` every reply carries the watermark of :mod:`tinygpt.watermark`.
Commands: ``/help``, ``/reset``, ``/system TEXT``, ``/temp X``, ``/exit`` (or EOF).

:class:`ChatSession` is the engine (tests and the web server can drive it without a terminal);
:func:`main` is the terminal loop. It knows nothing about training.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, TextIO

import torch

from tinygpt import quantize, runtime
from tinygpt.checkpoint import load_model, load_tokenizer
from tinygpt.config import opt
from tinygpt.generate import LogitsProcessor, SamplingConfig, stream
from tinygpt.model import GPT
from tinygpt.tokenizer import Tokenizer
from tinygpt.watermark import DEFAULT_DELTA, DEFAULT_GAMMA, watermark_processor

HELP = """commands:
  /help          this text
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt (/system alone removes it); the conversation restarts
  /temp X        sampling temperature (0 = greedy)
  //text         send a message that begins with /
  /exit          quit (Ctrl-D too)"""


@dataclass
class ChatConfig:
    checkpoint: str = opt("", "checkpoint to chat with (a run directory, e.g. runs/x/sft, or a checkpoint directory)",
                          required=True)
    system: str = opt("", "system prompt (empty: none)")
    temperature: float = opt(0.7, "sampling temperature (0 = greedy)")
    top_k: int = opt(0, "keep only the k most likely tokens (0 = off)")
    top_p: float = opt(0.9, "nucleus sampling threshold (1 = off)")
    repetition_penalty: float = opt(1.0, "CTRL repetition penalty (1 = off)")
    max_new_tokens: int = opt(128, "longest reply in tokens")
    seed: int | None = opt(None, "sampling seed (None: different replies every run)")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    watermark_key: str = opt("", "secret key: watermark every reply (green list seeded by the previous token); '' = off")
    watermark_gamma: float = opt(DEFAULT_GAMMA, "watermark: share of the vocabulary on each green list")
    watermark_delta: float = opt(DEFAULT_DELTA, "watermark: bias added to green logits")
    quantize: str = opt("none", quantize.HELP)


class ChatSession:
    """A conversation with a model: ``send(text)`` yields the reply's text pieces as they are sampled."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, system: str = "", sampling: SamplingConfig | None = None,
                 notify: Callable[[str], None] | None = None, logits_processors: Sequence[LogitsProcessor] = ()):
        self.model, self.tokenizer = model, tokenizer
        self.logits_processors = list(logits_processors)  # e.g. the watermark
        self.system = system
        self.sampling = sampling or SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=128)
        self.notify = notify or (lambda message: None)
        self.history: list[dict[str, str]] = []
        self.dropped_turns = 0  # messages dropped from the front so far (reset by reset())
        self.prompt_tokens = 0  # tokens of the last prompt sent to the model (context in use)

    # --- state ---

    def reset(self) -> None:
        self.history = []
        self.dropped_turns = 0

    def set_system(self, text: str) -> None:
        self.system = text
        self.reset()

    def set_temperature(self, value: float) -> None:
        self.sampling = replace(self.sampling, temperature=value)  # validated by SamplingConfig

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    # --- one turn ---

    def _fit(self) -> tuple[list[int], int]:
        """Prompt ids and the reply budget; drops the oldest exchanges while the prompt leaves too little room."""
        block, want = self.model.cfg.block_size, self.sampling.max_new_tokens
        dropped = 0
        while True:
            ids, _ = self.tokenizer.render_chat(self.messages(), add_generation_prompt=True)
            if len(ids) + want <= block or len(self.history) <= 1:
                break
            # drop the oldest message and anything up to the next user turn (one whole exchange)
            cut = 1
            while cut < len(self.history) - 1 and self.history[cut]["role"] != "user":
                cut += 1
            dropped += cut
            self.history = self.history[cut:]
        if dropped:
            self.dropped_turns += dropped
            self.notify(f"[the conversation outgrew the {block}-token context: dropped the oldest {dropped} "
                        f"message(s)]")
        self.prompt_tokens = len(ids)
        return ids, min(want, block - len(ids))  # >= 1: send() refused messages that cannot fit

    def send(self, user_text: str) -> Iterator[str]:
        """Add a user turn and return an iterator over the reply's text pieces as they are sampled; the
        reply joins the history when the iterator is exhausted. The history is fitted to the context
        here, at once (so a notice about dropped turns comes before the reply)."""
        alone, _ = self.tokenizer.render_chat(self.messages()[:1 if self.system else 0]
                                              + [{"role": "user", "content": user_text}], add_generation_prompt=True)
        if len(alone) >= self.model.cfg.block_size:  # refused before touching the history
            raise ValueError(f"this message alone takes {len(alone)} of the model's {self.model.cfg.block_size} "
                             "tokens; send a shorter one")
        self.history.append({"role": "user", "content": user_text})
        prompt, budget = self._fit()
        return self._stream(prompt, budget)

    def _stream(self, prompt: list[int], budget: int) -> Iterator[str]:
        cfg = replace(self.sampling, max_new_tokens=budget)
        tok = self.tokenizer
        new_ids: list[int] = []
        shown = ""
        for token in stream(self.model, prompt, cfg, eos_id=tok.eos_id, stop_sequences=[[tok.end_id]],
                            logits_processors=self.logits_processors):
            new_ids.append(token)
            text = tok.decode(new_ids, skip_special=True)
            if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
                continue
            if len(text) > len(shown):
                yield text[len(shown):]
                shown = text
        reply = tok.decode(new_ids, skip_special=True)
        if len(reply) > len(shown):
            yield reply[len(shown):]
        self.history.append({"role": "assistant", "content": reply})

    def reply(self, user_text: str) -> str:
        """The whole reply at once."""
        return "".join(self.send(user_text))


def load_session(checkpoint: str, *, device: str = "auto", system: str = "", sampling: SamplingConfig | None = None,
                 notify: Callable[[str], None] | None = None, watermark_key: str = "",
                 watermark_gamma: float = DEFAULT_GAMMA, watermark_delta: float = DEFAULT_DELTA,
                 quantize_mode: str = "none") -> ChatSession:
    """A ChatSession on a checkpoint; a non-empty ``watermark_key`` watermarks its replies;
    ``quantize_mode="int8"``: int8 weights (see tinygpt.quantize)."""
    dev = runtime.resolve_device(device)
    model, _ = load_model(checkpoint, device=dev)
    model = quantize.apply(model.eval(), quantize_mode)
    tokenizer = load_tokenizer(checkpoint)
    procs = [watermark_processor(watermark_key, watermark_gamma, watermark_delta,
                                 vocab_size=model.cfg.vocab_size)] if watermark_key else []
    return ChatSession(model, tokenizer, system=system, sampling=sampling, notify=notify, logits_processors=procs)


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0, 9), *range(11, 32), 127]}  # all but \t and \n


def terminal_safe(text: str) -> str:
    """Model text as it may be shown on a terminal: control characters (a ``\\r`` that would erase the
    line, escape sequences) written out as ``\\xNN``; newlines and tabs kept."""
    return text.translate(_CONTROL)


def main(cfg: ChatConfig, stdin: TextIO | None = None, stdout: TextIO | None = None) -> dict[str, Any]:
    """The terminal loop; returns counts (turns, dropped messages) when the user leaves."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if not cfg.checkpoint:
        raise ValueError("give a checkpoint: tinygpt chat runs/x/sft")

    def say(text: str) -> None:
        stdout.write(text + "\n")
        stdout.flush()

    sampling = SamplingConfig(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                              repetition_penalty=cfg.repetition_penalty, max_new_tokens=cfg.max_new_tokens,
                              seed=cfg.seed)
    session = load_session(cfg.checkpoint, device=cfg.device, system=cfg.system, sampling=sampling, notify=say,
                           watermark_key=cfg.watermark_key, watermark_gamma=cfg.watermark_gamma,
                           watermark_delta=cfg.watermark_delta, quantize_mode=cfg.quantize)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    say(f"tinygpt chat: {cfg.checkpoint} ({session.model.num_params() / 1e6:.2f}M params, "
        f"{session.model.cfg.block_size}-token context). /help for commands, /exit to quit.")
    turns = 0
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # EOF
            say("")
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.startswith("//"):
            text = text[1:]  # "//x" sends "/x": a message may start with a slash
        elif text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command == "/exit":
                break
            if command == "/help":
                say(HELP)
            elif command == "/reset":
                session.reset()
                say("[conversation reset]")
            elif command == "/system":
                session.set_system(arg.strip())
                say(f"[system prompt set: {arg.strip()!r}; conversation reset]" if arg.strip()
                    else "[system prompt removed; conversation reset]")
            elif command == "/temp":
                try:
                    session.set_temperature(float(arg))
                    say(f"[temperature {session.sampling.temperature}]")
                except ValueError:
                    say(f"[/temp needs a number >= 0, got {arg!r}]")
            else:
                say(f"[unknown command {command}]\n{HELP}")
            continue
        try:
            pieces = session.send(text)
        except ValueError as e:
            say(f"[{e}]")
            continue
        stdout.write("bot> ")
        stdout.flush()
        for piece in pieces:
            stdout.write(terminal_safe(piece))
            stdout.flush()
        say("")
        turns += 1
    return {"turns": turns, "dropped_messages": session.dropped_turns}
