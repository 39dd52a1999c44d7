"""A quick full-precision model for the QAT tests: the tiny Gemma3 after a short SFT on toy math."""

from __future__ import annotations

import pytest

from posttrain.data import write_jsonl
from posttrain.toy import tasks


def quick_sft(model_dir, out_dir, steps: int, seed: int = 0, lr: float = 3e-3, batch_size: int = 16):
    """A few dozen plain AdamW steps on toy math conversations (loss on model turns only)."""
    import torch

    from posttrain.chat import tokenize_conversation
    from posttrain.modeling import load_policy
    from posttrain.sequences import TokenSequence, pad_batch

    model, tok = load_policy(model_dir)
    rows = tasks.generate("math", 512, seed=seed, fmt="chat")
    seqs = [TokenSequence(*vars(tokenize_conversation(tok, r["messages"])).values()) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(seqs), (batch_size,), generator=g).tolist()
        batch = pad_batch([seqs[i] for i in idx], tok.pad_token_id)
        labels = batch["input_ids"].masked_fill(batch["loss_mask"] == 0, -100)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


@pytest.fixture(scope="session")
def full_precision_dir(tmp_path_factory, tiny_gemma3_dir):
    out = tmp_path_factory.mktemp("qat_full_precision")
    quick_sft(tiny_gemma3_dir, out, steps=30)
    return out


@pytest.fixture(scope="session")
def qat_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("qat_data")
    write_jsonl(d / "math_chat.jsonl", tasks.generate("math", 64, seed=1, fmt="chat"))
    write_jsonl(d / "chat_chat.jsonl", tasks.generate("chat", 64, seed=1, fmt="chat"))
    write_jsonl(d / "math_eval.jsonl", tasks.generate("math", 12, seed=2, split="eval", fmt="prompt"))
    return d
