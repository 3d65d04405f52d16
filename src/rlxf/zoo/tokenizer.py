"""The embedded model's tokenizer: one token per character, plus chat special tokens.

Built with the ``tokenizers`` library as a BPE model with no merges, so it is a standard
``tokenizer.json`` that ``transformers.AutoTokenizer`` loads; unknown characters map to ``<unk>``.
Plain encoding prepends ``<bos>`` (as Llama's tokenizer does).
The chat template renders ``<bos><|user|>…<|assistant|>…<eos>``; generation prompts end with
``<|assistant|>``.
"""

from __future__ import annotations

import string

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>")
CHARACTERS = string.digits + string.ascii_letters + " \n" + "+-*/=.,:;?!()[]{}<>#'\"_%&@$^|~`\\"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer():
    """Return the character-level ``PreTrainedTokenizerFast`` (deterministic vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    # like Llama: plain encoding starts with <bos>; chat templates write it themselves
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        padding_side="right", model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
