"""A small transformer language model for steering experiments: tokenizer, generated corpora, the network
with its KV cache, training, checkpoints, the LM as a pplalign ``Sequential`` program, rewards, twist heads."""
