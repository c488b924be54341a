"""Terminal chat: commands, streaming, the SFT template, dropping old turns; and (slow) a tiny model
SFT-trained on three-turn chats (remember a word, answer one of the world's sums, recall the word)
answering held-out conversations through the chat."""

import io
import json
from pathlib import Path

import pytest
import torch

from tinygpt.chat import ChatConfig, load_session, main
from tinygpt.checkpoint import save_checkpoint
from tinygpt.eval.tasks import complete
from tinygpt.generate import SamplingConfig
from tinygpt.model import GPT, ModelConfig
from tinygpt.stages import sft
from tinygpt.stages.sft import SFTConfig
from tinygpt.tokenizer import Tokenizer
from tinygpt.world.tasks import FAMILIES, TaskItem, grade

WORDS = ["apple", "ball", "cat", "dog", "egg", "fish", "hat", "sun"]
QUESTIONS = [FAMILIES["arithmetic"].item(i) for i in range(len(WORDS))]  # world instructions: sums, a word problem


def memory_chat(word: str, item: TaskItem) -> list[dict]:
    """Three turns: remember a word, answer a world instruction, recall the word."""
    return [{"role": "user", "content": f"My word is {word}."}, {"role": "assistant", "content": "OK."},
            {"role": "user", "content": item.instruction}, {"role": "assistant", "content": item.answer},
            {"role": "user", "content": "What is my word?"}, {"role": "assistant", "content": word}]


def held_out(i: int) -> tuple[str, TaskItem]:
    """A word and a question never seen in one conversation in training (each was seen with others)."""
    return WORDS[i], QUESTIONS[(i + 3) % len(WORDS)]


def make_checkpoint(root: Path, block_size: int = 48, d_model: int = 32) -> tuple[Path, list[dict]]:
    held = {(w, q.index) for w, q in map(held_out, range(len(WORDS)))}
    chats = [{"messages": memory_chat(w, q)} for w in WORDS for q in QUESTIONS if (w, q.index) not in held]
    tok = Tokenizer.train([m["content"] for c in chats for m in c["messages"]], vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, d_model=d_model)
    save_checkpoint(root / "init", model=GPT(cfg), model_config=cfg, tokenizer_json=tok.to_str(), meta={"stage": "init"})
    return root / "init", chats


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("chat"))[0]


def run_terminal(ckpt: Path, lines: list[str], **kw) -> tuple[str, dict]:
    out = io.StringIO()
    cfg = ChatConfig(checkpoint=str(ckpt), device="cpu", temperature=0.0, max_new_tokens=6, **kw)
    result = main(cfg, stdin=io.StringIO("".join(line + "\n" for line in lines)), stdout=out)
    return out.getvalue(), result


def test_commands_and_eof(ckpt):
    text, result = run_terminal(ckpt, ["/help", "hello", "/temp 0.5", "/temp hot", "/system Be brief.",
                                       "/system", "/reset", "/nope"])  # then EOF
    assert "/reset" in text and "/exit" in text  # help text
    assert text.count("bot> ") == 1 and result["turns"] == 1
    assert "[temperature 0.5]" in text and "[/temp needs a number" in text
    assert "[system prompt set: 'Be brief.'" in text and "[system prompt removed" in text
    assert "[conversation reset]" in text and "[unknown command /nope]" in text


def test_exit_stops_before_later_lines(ckpt):
    text, result = run_terminal(ckpt, ["hi", "/exit", "never read"])
    assert result["turns"] == 1 and text.count("bot> ") == 1


def test_stream_is_the_greedy_reply_in_the_sft_template(ckpt):
    session = load_session(str(ckpt), device="cpu", system="Be kind.",
                           sampling=SamplingConfig(temperature=0.0, max_new_tokens=8))
    pieces = list(session.send("My word is cat."))
    reply = "".join(pieces)
    expected = complete(session.model, session.tokenizer,
                        [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "My word is cat."}]],
                        max_new_tokens=8)[0]
    assert reply == expected
    assert session.history == [{"role": "user", "content": "My word is cat."}, {"role": "assistant", "content": reply}]
    assert session.messages()[0] == {"role": "system", "content": "Be kind."}


def test_history_outgrowing_the_context_drops_oldest_turns_and_says_so(ckpt):
    notices: list[str] = []
    session = load_session(str(ckpt), device="cpu", system="Be kind.",
                           sampling=SamplingConfig(temperature=0.0, max_new_tokens=6), notify=notices.append)
    for w in WORDS[:5]:
        session.reply(f"My word is {w}.")
        assert session.prompt_tokens + 6 <= session.model.cfg.block_size
    assert session.dropped_turns > 0 and session.dropped_turns % 2 == 0  # whole exchanges
    assert notices and "dropped the oldest" in notices[0]
    assert session.messages()[0]["role"] == "system"  # the system prompt is kept
    assert session.history[0]["role"] == "user"
    with pytest.raises(ValueError, match="shorter"):
        session.send("Say " + "cat " * 60)
    assert session.history[-1]["role"] == "assistant"  # the refused message left no trace


def test_temperature_is_validated(ckpt):
    session = load_session(str(ckpt), device="cpu")
    with pytest.raises(ValueError):
        session.set_temperature(-1.0)


@pytest.mark.slow
def test_sft_trained_tiny_model_keeps_context_over_three_turns(tmp_path):
    """~10 s of CPU: a 2-layer d32 model learns to recall the first turn's word in the third turn,
    on word pairs it never saw together in training."""
    init, chats = make_checkpoint(tmp_path, block_size=64)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and immune to a busy machine
    try:
        _train_memory_task(init, tmp_path)
    finally:
        torch.set_num_threads(threads)
    session = load_session(str(tmp_path / "sft"), device="cpu", sampling=SamplingConfig(temperature=0.0, max_new_tokens=8))
    correct = 0
    for i in range(len(WORDS)):
        word, question = held_out(i)
        session.reset()
        replies = [session.reply(f"My word is {word}."), session.reply(question.instruction),
                   session.reply("What is my word?")]
        # the world's grader judges the instruction's answer, as it judges every task answer
        correct += replies[0] == "OK." and grade(question, replies[1]) == 1.0 and replies[2] == word
    assert correct >= 7, correct
    # and through the terminal loop (a conversation seen in training)
    question = QUESTIONS[0]
    text, _ = run_terminal(tmp_path / "sft", ["My word is sun.", question.instruction, "What is my word?"])
    assert text.count("bot> ") == 3 and "bot> OK.\n" in text and f"bot> {question.answer}\n" in text
    assert "bot> sun\n" in text


def _train_memory_task(init: Path, tmp_path: Path) -> None:
    sft.main(SFTConfig(init=str(init), data=str(tmp_path / "train.jsonl"), out=str(tmp_path / "sft"), batch_size=16,
                       max_steps=1200, lr=5e-3, min_lr=5e-4, warmup_steps=20, eval_every=10**6, log_every=100,
                       save_every=10**6, device="cpu", dtype="float32", progress=False, seed=0))


def test_model_text_cannot_drive_the_terminal_and_slashes_can_be_sent(ckpt, monkeypatch):
    """A \\r in the model's text once erased the prompt line: control characters are shown escaped."""
    from tinygpt import chat

    assert chat.terminal_safe("a\rb\x1b[2Jc\n\td\x7f") == "a\\x0db\\x1b[2Jc\n\td\\x7f"
    sent = []

    def send(self, text):
        sent.append(text)
        yield from ["ok\r", "\x1b[31mred"]
    monkeypatch.setattr(chat.ChatSession, "send", send)
    text, result = run_terminal(ckpt, ["//etc is a folder", "/temp nan", "plain"])
    assert sent == ["/etc is a folder", "plain"] and result["turns"] == 2
    assert "ok\\x0d\\x1b[31mred" in text and "\r" not in text and "\x1b" not in text
    assert "[/temp needs a number" in text  # NaN is not a temperature
