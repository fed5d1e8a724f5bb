"""A tiny, deterministic Llama-architecture causal LM for tests and local smoke runs.

It is built from nothing (no hub download): a byte-level BPE tokenizer trained on a generated
English corpus, and randomly initialised weights. It knows nothing, which is the point: whatever it
learns in a test, the fine-tuning taught it.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<|begin_of_text|>"
# The end of a chat turn doubles as end-of-sequence, so generation stops after an answer.
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
TURN_START = "<|im_start|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, TURN_START]

# ChatML-style and prefix-stable: rendering messages[:i] with a generation prompt is a prefix of
# rendering messages[:i+1], which the data code relies on to find each assistant answer's tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message.get('tool_calls') %}{{ '\n' + (message['tool_calls'] | tojson) }}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORD_TEXT = (
    "the a an of to and in is was for on with as by at from it this that be are were have has had "
    "not but or which one all would there their what so up out if about who get can will make like "
    "time just know take people into year your good some could them see other than then now look only "
    "come its over think also back after use two how our work first well way even new want because any "
    "these give day most us model data train answer question code value number system user assistant "
    "tool message result text word line file test run step loss learn rate small large fast slow "
    "red blue green apple river stone cloud music city house water light paper window garden"
)
_WORDS = _WORD_TEXT.split()


def _corpus(seed: int, n_sentences: int = 3000) -> list[str]:
    """Generate English-like sentences covering words, digits, punctuation and chat markup."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"])
        lines.append(sentence)
    lines.append('user\nassistant\nsystem\ntool\n{"name": "x", "arguments": {}}')
    return lines


def make_tiny_tokenizer(*, seed: int = 0, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer locally and wrap it with special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # Byte-level: every byte is in the alphabet, so any UTF-8 text tokenizes, no unknown token.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def make_tiny_model(
    path: Path,
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    initializer_range: float = 0.1,
) -> Path:
    """Build a small Llama causal LM with its tokenizer into `path` (safetensors) and return the path.

    The defaults make the tests' tiny model (~0.2M parameters); the benchmark builds a ~25M one with
    hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1536.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(seed=seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=2048,
        # Larger than Llama's 0.02: with a random, frozen output head at 0.02 the logits are too flat
        # for a small adapter to ever make them peak, and the quality tests could not learn anything.
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Untied so every weight is an ordinary tensor in the safetensors file and in full fine-tunes.
        tie_word_embeddings=False,
    )
    # A private generator: building the model must not depend on, or disturb, the global RNG.
    saved_rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(saved_rng_state)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    """Command line: python -m worker.training.tiny_model PATH [--seed N] [--hidden 512 --layers 8 ...]."""
    parser = argparse.ArgumentParser(description="Build a tiny Llama model and tokenizer for tests.")
    parser.add_argument("path", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=128)
    args = parser.parse_args()
    print(make_tiny_model(args.path, seed=args.seed, hidden=args.hidden, layers=args.layers, heads=args.heads,
                          kv_heads=args.kv_heads, intermediate=args.intermediate))


if __name__ == "__main__":
    main()
