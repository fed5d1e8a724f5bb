"""The training benchmark's models and data, built locally (no downloads), deterministic from their seeds.

Two shapes:

- "llama-1k": the tests' Llama architecture at 26.2M parameters with its 1,024-token byte-level BPE tokenizer
  (worker.training.tiny_model), trained on long-tailed plain text, every token in the loss;
- "qwen2-152k": a Qwen2 model with Qwen2-0.5B's vocabulary size (151,936), width and layer shape (hidden 896,
  14 heads, 2 KV heads, intermediate 4864, tied input and output embeddings) but 4 layers instead of 24, and a
  byte-level BPE tokenizer of exactly 151,936 tokens that transformers loads as a Qwen2Tokenizer; chats whose
  prompts are long and answers short, loss on the answers only. Word frequencies follow Zipf's law over the
  whole vocabulary, as natural text's do, so the labels reach rare ids across the output layer and not only a
  small corner of it.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import random
import string
from pathlib import Path
from typing import Any

# Qwen2-0.5B's vocabulary size: what transformers' Qwen2 configs and the tuneforge catalogue's Qwen models use.
QWEN2_VOCAB = 151_936
UNK_TOKEN = "<|endoftext|>"  # Qwen2Tokenizer's unknown token: present, so it adds none
SYSTEM_PROMPT_WORDS = 12
ZIPF_EXPONENT = 1.1


# ---------------------------------------------------------------- plain text (llama-1k)
def generate_texts(n: int, *, median_tokens: int, max_tokens: int, seed: int) -> list[str]:
    """Deterministic Markov-chain "English" with lognormal lengths (16..max_tokens words ~ tokens), long-tailed."""
    from worker.training.tiny_model import _WORDS

    rng = random.Random(seed)
    table = random.Random(1234)  # one fixed language for every split
    successors = {w: [table.choice(_WORDS) for _ in range(4)] for w in _WORDS}
    texts = []
    for _ in range(n):
        length = min(max_tokens, max(16, round(rng.lognormvariate(math.log(median_tokens), 1.0))))
        word = rng.choice(_WORDS)
        words = [word]
        for _ in range(length - 3):  # BOS + EOS; about one token per word
            word = rng.choice(successors[word]) if rng.random() < 0.9 else rng.choice(_WORDS)
            words.append(word)
        texts.append(" ".join(words))
    return texts


def write_texts(root: Path, *, n_train: int, n_valid: int, median_tokens: int, max_tokens: int) -> tuple[Path, Path]:
    train, valid = root / "train.jsonl", root / "valid.jsonl"
    for path, n, seed in ((train, n_train, 1), (valid, n_valid, 2)):
        texts = generate_texts(n, median_tokens=median_tokens, max_tokens=max_tokens, seed=seed)
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return train, valid


# ---------------------------------------------------------------- a 151,936-token vocabulary (qwen2-152k)
def vocabulary_words(vocab_size: int = QWEN2_VOCAB) -> list[str]:
    """The ordinary words, one token each (with their leading space), shortest first: a..z, aa..zz, aaa..zzz, then as
    many four-letter words as fill the vocabulary after the special tokens and the 256 byte-level symbols."""
    from worker.training.tiny_model import SPECIAL_TOKENS

    n_words = vocab_size - len(SPECIAL_TOKENS) - 1 - 256  # 1: Qwen2's <|endoftext|>, the unknown token
    every = ("".join(letters) for k in itertools.count(1) for letters in itertools.product(string.ascii_lowercase,
                                                                                           repeat=k))
    return list(itertools.islice(every, n_words))


def make_word_tokenizer(vocab_size: int = QWEN2_VOCAB) -> Any:
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens, in the form transformers' Qwen2Tokenizer loads
    (Qwen2's pre-tokenizer regex, byte-level symbols, vocabulary and merges): the tiny model's special tokens and
    chat template, Qwen2's <|endoftext|>, the 256 byte symbols, and one token per vocabulary word with its leading
    space, built by one merge each (" abc" = " ab" + "c"). A message's first word, which has no leading space, is
    spelled in byte symbols, as a real BPE spells a rare word."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from worker.training.tiny_model import BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, TURN_START

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, UNK_TOKEN,
                                                 *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    merges = []
    for word in vocabulary_words(vocab_size):
        merges.append(("\u0120" + word[:-1], word[-1]))  # \u0120 is the byte-level symbol of a space
        vocab["\u0120" + word] = len(vocab)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=None, continuing_subword_prefix="",
                              end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, unk_token=UNK_TOKEN, chat_template=CHAT_TEMPLATE,
                                   model_max_length=2048)
    fast.add_special_tokens({"additional_special_tokens": [TURN_START]})
    assert len(fast) == vocab_size, len(fast)
    return fast


def make_qwen2_model(path: Path, *, seed: int = 0, vocab_size: int = QWEN2_VOCAB, hidden: int = 896,
                     layers: int = 4, heads: int = 14, kv_heads: int = 2, intermediate: int = 4864) -> Path:
    """Build a Qwen2 causal LM (random weights, Qwen2's own initialisation) and its tokenizer into `path`."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_word_tokenizer(vocab_size)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=2048,
        rope_theta=1_000_000.0, tie_word_embeddings=True,  # as Qwen2-0.5B: one 151,936 x 896 matrix, used twice
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    saved_rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    torch.random.set_rng_state(saved_rng_state)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


class ZipfText:
    """Markov-chain text over a word list whose word frequencies follow Zipf's law: each word has four likely
    successors (drawn once, from the word's own seed, so every split speaks the same language), taken 90% of the
    time; otherwise the next word is a fresh Zipf draw."""

    def __init__(self, words: list[str], *, exponent: float = ZIPF_EXPONENT) -> None:
        self.words = words
        self.cumulative = list(itertools.accumulate(1.0 / (rank + 1) ** exponent for rank in range(len(words))))
        self._successors: dict[int, list[int]] = {}

    def draw(self, rng: random.Random) -> int:
        return bisect.bisect_left(self.cumulative, rng.random() * self.cumulative[-1])

    def successors(self, word: int) -> list[int]:
        if word not in self._successors:
            own = random.Random(1_000_003 * 1234 + word)
            self._successors[word] = [self.draw(own) for _ in range(4)]
        return self._successors[word]

    def sentence(self, rng: random.Random, n_words: int) -> str:
        word = self.draw(rng)
        out = [word]
        for _ in range(n_words - 1):
            word = rng.choice(self.successors(word)) if rng.random() < 0.9 else self.draw(rng)
            out.append(word)
        return " ".join(self.words[w] for w in out)


def generate_chats(n: int, *, prompt_words: int, answer_words: int, max_prompt_words: int, seed: int,
                   vocab_size: int = QWEN2_VOCAB) -> list[dict[str, Any]]:
    """Chat records: a fixed system prompt, a long user message (lognormal words, median `prompt_words`, sigma 0.5)
    and a short answer (median `answer_words`, sigma 0.5): the shape of retrieval, summarisation and extraction
    fine-tunes, where the loss covers a small share of the tokens."""
    text = ZipfText(vocabulary_words(vocab_size))
    system = text.sentence(random.Random(0), SYSTEM_PROMPT_WORDS)
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        n_prompt = min(max_prompt_words, max(16, round(rng.lognormvariate(math.log(prompt_words), 0.5))))
        n_answer = min(4 * answer_words, max(2, round(rng.lognormvariate(math.log(answer_words), 0.5))))
        records.append({"messages": [{"role": "system", "content": system},
                                     {"role": "user", "content": text.sentence(rng, n_prompt)},
                                     {"role": "assistant", "content": text.sentence(rng, n_answer)}]})
    return records


def write_chats(root: Path, *, n_train: int, n_valid: int, prompt_words: int, answer_words: int,
                max_prompt_words: int, vocab_size: int = QWEN2_VOCAB) -> tuple[Path, Path]:
    train, valid = root / "train.jsonl", root / "valid.jsonl"
    for path, n, seed in ((train, n_train, 1), (valid, n_valid, 2)):
        records = generate_chats(n, prompt_words=prompt_words, answer_words=answer_words,
                                 max_prompt_words=max_prompt_words, seed=seed, vocab_size=vocab_size)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return train, valid
