"""Tiny randomly initialised models of several architectures, with a word-level tokenizer and a chat
template, saved like a user's model directory (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = [
    "the",
    "a",
    "an",
    "and",
    "or",
    "of",
    "to",
    "in",
    "on",
    "at",
    "for",
    "with",
    "is",
    "are",
    "was",
    "be",
    "it",
    "this",
    "that",
    "you",
    "i",
    "we",
    "they",
    "he",
    "she",
    "my",
    "your",
    "our",
    "what",
    "how",
    "why",
    "when",
    "where",
    "which",
    "who",
    "do",
    "does",
    "did",
    "can",
    "could",
    "would",
    "should",
    "will",
    "not",
    "no",
    "yes",
    "please",
    "tell",
    "me",
    "about",
    "describe",
    "write",
    "think",
    "good",
    "bad",
    "great",
    "terrible",
    "happy",
    "sad",
    "love",
    "hate",
    "day",
    "night",
    "weather",
    "sun",
    "rain",
    "cold",
    "warm",
    "food",
    "dinner",
    "lunch",
    "city",
    "park",
    "walk",
    "work",
    "home",
    "book",
    "music",
    "movie",
    "friend",
    "team",
    "plan",
    "idea",
    "answer",
    "question",
    "choices",
    "choose",
    "option",
    "agree",
    "disagree",
    "honest",
    "true",
    "false",
    "right",
    "wrong",
    "correct",
    "mistake",
    "help",
    "model",
    "assistant",
    "user",
    "goal",
    "shut",
    "down",
    "change",
    "accept",
    "refuse",
    "now",
    "later",
    "money",
    "week",
    "month",
    "year",
    "more",
    "less",
    "today",
    "tomorrow",
    "very",
    "really",
    "quite",
    "so",
    "but",
    "if",
    "then",
    "than",
    "because",
    "as",
    "by",
    "from",
    "up",
    "out",
    "over",
    "under",
    "again",
    "hello",
    "hi",
    "thanks",
    "thank",
    "sorry",
    "sure",
    "certainly",
    "okay",
    "fine",
    "nice",
    "lovely",
    "awful",
    "dreary",
    "wonderful",
    "gloomy",
    "formal",
    "casual",
    "meeting",
    "report",
    "email",
    "note",
    "letter",
    "neighbor",
    "package",
    "season",
    "morning",
    "evening",
    "coffee",
    "tea",
    "much",
]
CHARACTERS = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + list("().,?!:;'\"-") + [str(d) for d in range(10)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
ARCHITECTURES = ("llama", "qwen2", "gemma3", "gpt2")
EXTRA_ARCHITECTURES = ("mistral", "qwen3", "gemma", "gemma2", "gpt_neox", "phi3")


def make_tokenizer(chat: bool = True) -> Any:
    """A byte-level BPE tokenizer trained on a small word list: it encodes any text, and it is built
    the way transformers rebuilds Qwen2 tokenizers, so every architecture loads it unchanged."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    split = (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
        r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
    )
    tok = Tokenizer(
        models.BPE(continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS), " ".join(w.capitalize() for w in WORDS), " ".join(CHARACTERS), "(A (B (A) (B)"]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 3, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIALS[4:],
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_config(arch: str, vocab_size: int) -> Any:
    import transformers as tf

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "pad_token_id": 1,
        "bos_token_id": 2,
        "eos_token_id": 3,
    }
    decoder: dict[str, Any] = {
        **common,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    if arch == "llama":
        return tf.LlamaConfig(**decoder)
    if arch == "mistral":
        return tf.MistralConfig(**decoder)
    if arch == "qwen2":
        return tf.Qwen2Config(**decoder)
    if arch == "qwen3":
        return tf.Qwen3Config(**decoder, head_dim=8)
    if arch == "gemma":
        return tf.GemmaConfig(**decoder, head_dim=8)
    if arch == "gemma2":
        return tf.Gemma2Config(**decoder, head_dim=8, sliding_window=4)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**decoder, head_dim=8, sliding_window=4)
    if arch == "phi3":
        return tf.Phi3Config(**decoder)
    if arch == "gpt2":
        return tf.GPT2Config(**common, n_embd=32, n_layer=4, n_head=4, n_positions=256)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(
            **common,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=256,
        )
    raise ValueError(arch)


def save_tiny_model(arch: str, directory: Path, chat: bool = True, seed: int = 0) -> Path:
    """Build a tiny ``arch`` model with random weights and save it (safetensors) with its tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer(chat=chat)
    config = make_config(arch, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init at std 0.02 gives near-uniform outputs; larger weights make differences visible.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
