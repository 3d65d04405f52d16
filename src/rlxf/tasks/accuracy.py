"""Generation-based evaluation on built-in tasks (greedy accuracy on held-out problems)."""

from __future__ import annotations

import torch

from rlxf.tasks import get_task


@torch.no_grad()
def task_accuracy(model, tokenizer, task_name: str, *, n: int = 200, max_new_tokens: int = 64,
                  batch_size: int = 64, seed: int = 0) -> float:
    """Greedy accuracy of ``model`` on the first ``n`` eval problems of a built-in task (verifier-checked).

    seed: draws the eval problems (a run passes its ``--eval-seed``, so the set does not follow ``--seed``).

    Prompts are left-padded for batched generation; the completion is judged by the task's verifier.
    """
    task = get_task(task_name)
    problems = task.problems("eval", n, seed=seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    pad_id = tokenizer.pad_token_id
    for start in range(0, n, batch_size):
        chunk = problems[start:start + batch_size]
        encoded = [tokenizer(p.prompt)["input_ids"] for p in chunk]
        width = max(map(len, encoded))
        ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, seq in enumerate(encoded):
            ids[i, width - len(seq):] = torch.tensor(seq)
            attention[i, width - len(seq):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                             eos_token_id=tokenizer.eos_token_id)
        for problem, seq in zip(chunk, out[:, width:]):
            correct += task.verify(tokenizer.decode(seq, skip_special_tokens=True), problem.answer)
    model.train(was_training)
    return correct / max(1, n)
