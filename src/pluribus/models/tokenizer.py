"""The embedded world's character-level tokenizer, built with `tokenizers` and saved as a standard HF one.

One token per printable ASCII character plus the chat specials. Saved with `save_pretrained`, it
reloads through `AutoTokenizer` (as `PreTrainedTokenizerFast`) with a chat template, EOS and PAD.
Pair it with a Llama config: for `model_type` qwen2, transformers 5.x loads `Qwen2Tokenizer`,
which rebuilds the pre-tokenizer and changes the ids of a custom vocabulary.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIALS = [PAD, BOS, EOS, UNK, USER, ASSISTANT, SYSTEM]
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # includes space and newline

# Roles become marker tokens; the assistant turn ends with EOS, the only stop token generation needs.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}<|eos|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer():
    """A `PreTrainedTokenizerFast` over CHARS + SPECIALS, with chat template, EOS and PAD set."""
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    # BPE with no merges splits any text into single characters; unknown characters map to UNK.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.add_special_tokens(SPECIALS)
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  unk_token=UNK, additional_special_tokens=[USER, ASSISTANT, SYSTEM],
                                  padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    return tok
