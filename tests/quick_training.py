"""A quick full-precision model for the tests that need one better than random: the tiny Gemma3
after a short SFT on toy math (the distillation teacher, QAT's full-precision model)."""

from __future__ import annotations


def quick_sft(model_dir, out_dir, steps: int, seed: int = 0, lr: float = 3e-3, batch_size: int = 16, n_rows: int = 512):
    """A few dozen plain AdamW steps on toy math conversations (loss on model turns only)."""
    import torch

    from posttrain.chat import tokenize_conversation
    from posttrain.modeling import load_policy
    from posttrain.data import TokenSequence
    from posttrain.sequences import pad_batch
    from posttrain.toy import tasks

    model, tok = load_policy(model_dir)
    rows = tasks.generate("math", n_rows, seed=seed, fmt="chat")
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
    return float(loss.detach())


def write_toy_sets(directory, sets: dict[str, tuple]) -> None:
    """`{stem: (task, n, seed, split, format)}`: each a toy set written to directory/stem.jsonl."""
    from posttrain.data import write_jsonl
    from posttrain.toy import tasks

    for stem, (task, n, seed, split, fmt) in sets.items():
        write_jsonl(directory / f"{stem}.jsonl", tasks.generate(task, n, seed=seed, split=split, fmt=fmt))
