"""How much of the token two steps ahead do the tiny target's features reveal, on text a probe saw and on text
it did not? (Why drafts for this target need to memorise its corpus; see the README's results.)

A DFlash / DSpark draft predicts x_{a+1} from the target's features up to position a-1 and the token x_a (the
target has not run on x_a yet when the draft is asked). This fits the simplest such predictor, a linear map of
the concatenated features at a-1 plus an embedding of x_a, on the answers of some training conversations, and
reports its top-1 accuracy on those conversations and on others from the same corpus.

    python examples/tiny_target/feature_probe.py [--conversations 1200] [--steps 1500]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
TARGET = REPO / "spectool" / "assets" / "tiny-qwen3"
DATA = REPO / "examples" / "data" / "regen_train.jsonl"
LAYERS = (1, 2, 4, 6, 7)  # the shipped DSpark draft's feature layers


def token_ids(rendered) -> list[int]:
    """apply_chat_template gives a list of ids or, in recent transformers, an encoding holding them."""
    return list(rendered if isinstance(rendered, list) else rendered["input_ids"])


def samples(model, tokenizer, conversations):
    """(features at a-1 [n, 5H], x_a [n], x_{a+1} [n]) over the assistant answer of each conversation."""
    features, current, following = [], [], []
    for conversation in conversations:
        prompt = token_ids(tokenizer.apply_chat_template(conversation["messages"][:-1], add_generation_prompt=True))
        ids = torch.tensor([token_ids(tokenizer.apply_chat_template(conversation["messages"]))[:256]])
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states
        stacked = torch.cat([hidden[layer + 1][0] for layer in LAYERS], dim=-1)
        for a in range(len(prompt), ids.shape[1] - 1):
            features.append(stacked[a - 1])
            current.append(ids[0, a])
            following.append(ids[0, a + 1])
    return torch.stack(features), torch.stack(current), torch.stack(following)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=1500)
    options = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(TARGET)
    model = AutoModelForCausalLM.from_pretrained(TARGET, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    random.Random(0).shuffle(rows)
    split = int(options.conversations * 0.9)
    seen = samples(model, tokenizer, rows[:split])
    unseen = samples(model, tokenizer, rows[split : options.conversations])
    vocab, width = model.config.vocab_size, model.config.hidden_size
    linear = torch.nn.Linear(seen[0].shape[1], vocab)
    embed = torch.nn.Embedding(vocab, width)
    out = torch.nn.Linear(width, vocab, bias=False)
    parameters = [*linear.parameters(), *embed.parameters(), *out.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=3e-3)

    def logits(features, current):
        return linear(features) + out(embed(current))

    for _ in range(options.steps):
        pick = torch.randint(0, len(seen[2]), (1024,))
        loss = F.cross_entropy(logits(seen[0][pick], seen[1][pick]), seen[2][pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for name, (features, current, following) in (("seen", seen), ("unseen", unseen)):
            accuracy = (logits(features, current).argmax(-1) == following).float().mean()
            print(f"{name} conversations: {len(following)} positions, top-1 accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
