"""Tiny random-weight GPT-2 and BERT models with a word-level tokenizer, saved to disk (no downloads)."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "the cat sat on a mat and the dog ran to the park while birds sang in tall green trees "
    "a small model reads text one token at a time then writes what it saw into memory"
).split()


def corpus_lines(n_documents: int = 40, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences over WORDS (documents of 5 to 24 words)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 24))) for _ in range(n_documents)]


def word_tokenizer(special: str):
    """A PreTrainedTokenizerFast over WORDS: 'bert' wraps in [CLS] ... [SEP], 'gpt2' adds nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: index for index, token in enumerate(specials + sorted(set(WORDS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if special == "bert":
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]")


def _saved(model, tokenizer, directory: Path) -> Path:
    """``model`` and ``tokenizer`` saved with ``save_pretrained`` into ``directory``."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def save_tiny_gpt2(directory: Path, *, n_layer: int = 3, seed: int = 0) -> Path:
    """A 3-block GPT-2 (d = 32) with random weights and the word-level tokenizer, in ``directory``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tokenizer = word_tokenizer("gpt2")
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=n_layer,
        n_head=2,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return _saved(GPT2LMHeadModel(config).eval(), tokenizer, directory)


def save_tiny_bert(directory: Path, *, n_layer: int = 2, seed: int = 0) -> Path:
    """A 2-block BERT (d = 32) with random weights and a [CLS]/[SEP] word-level tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = word_tokenizer("bert")
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=n_layer,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return _saved(BertModel(config).eval(), tokenizer, directory)


def save_tiny_models(root: Path, n_documents: int = 40) -> dict:
    """A corpus file and a tiny GPT-2 and BERT saved under ``root``: {'gpt2', 'bert', 'corpus', 'root'}."""
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(corpus_lines(n_documents)) + "\n")
    return {"gpt2": save_tiny_gpt2(root / "gpt2"), "bert": save_tiny_bert(root / "bert"), "corpus": corpus,
            "root": root}
