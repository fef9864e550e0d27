"""The Python API in a few lines: load a model, build a ChatML prompt, and
show the model's five most likely next tokens.

    python examples/next_token.py tiny-hermes "What is MLX?"
"""

import sys

import mlx.core as mx

import mlx_hermes

path = sys.argv[1] if len(sys.argv) > 1 else "tiny-hermes"
question = sys.argv[2] if len(sys.argv) > 2 else "What is the capital of France?"

model, tokenizer = mlx_hermes.load(path)
ids = tokenizer.apply_chat_template([{"role": "user", "content": question}])
logits = model(mx.array([ids]))[0, -1]  # [vocab]
probs = mx.softmax(logits, axis=-1)
for token in mx.argsort(-probs)[:5].tolist():
    print(f"{probs[token].item():6.3f}  {tokenizer.decode([token])!r}")
