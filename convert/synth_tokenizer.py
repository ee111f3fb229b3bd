"""A small working Qwen-style tokenizer and chat template for synthetic checkpoints.

Byte-level BPE (NFC normaliser, ByteLevel pre-tokenizer and decoder) trained at synth time on a
built-in English + code corpus, plus Qwen's 26 added tokens in the real order. The added tokens sit at
``special_base .. special_base + 25`` (the real model: 248044..248069; a tiny vocab: its last 26 ids),
so ``<|endoftext|>``, ``<|im_start|>``, ``<think>``... keep the ids a runtime expects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fmoe.fsutil import atomic_output, write_json_atomic

# (content, special) in the real model's id order; "special" ones are dropped by skip_special_tokens.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
N_ADDED = len(ADDED_TOKENS)
MAX_TRAINED_VOCAB = 4096  # enough merges to look like a tokenizer; the corpus supports fewer anyway

CORPUS = r'''
The quick brown fox jumps over the lazy dog. A language model predicts the next token from the
tokens before it. Mixture-of-experts models route each token to a few experts out of many, so only a
small part of the weights is used for any one token. The experts can stay on the disk and be read
when the router picks them; the dense weights stay in memory.
Hello! How are you today? I am fine, thank you. What is the capital of France? The capital of France
is Paris. Water boils at 100 degrees Celsius at sea level. There are seven days in a week and twelve
months in a year. Please write a short poem about the sea. The sea is wide, the sea is deep, the
waves roll in while sailors sleep.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 4096 3.14159 2.71828 1e-6 -1 +1 50%.
Question: If a train travels 60 kilometres in one hour, how far does it travel in three hours?
Answer: It travels 180 kilometres, because 60 times 3 is 180.
Let me think step by step. First, read the question carefully. Then, find the facts we need.
Finally, check the answer. The weather is sunny with a light breeze and a high of 24 degrees.
Once upon a time there was a small town by a river. The people of the town grew apples and
pears, and every autumn they held a market in the square. Children ran between the stalls and
the smell of fresh bread filled the air.

def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from empty stack")
        return self.items.pop()


import json
import os

with open(os.path.join("data", "config.json")) as f:
    config = json.load(f)
print(f"hidden size: {config['hidden_size']}, layers: {config['num_hidden_layers']}")

function add(a, b) {
  return a + b;
}
const items = [1, 2, 3].map((x) => x * 2);
console.log(`result: ${items.join(", ")}`);

for (int i = 0; i < n; ++i) {
    sum += x[i] * y[i];
}
SELECT name, count(*) FROM users WHERE age > 18 GROUP BY name ORDER BY name;
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
$ pip install numpy && python -m pytest -q
Olá, ¿qué tal? Grüße aus München. Café, naïve, résumé. 你好，世界。こんにちは。
'''

CHAT_TEMPLATE = r"""{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part is mapping and part.type == 'text' -%}{{- part.text -}}
            {%- elif part is string -%}{{- part -}}{%- endif -%}
        {%- endfor -%}
    {%- elif content is not none -%}
        {{- content -}}
    {%- endif -%}
{%- endmacro -%}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages and messages[0].role == 'system' %}
        {{- render_content(messages[0].content) + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou have access to the following functions:\n\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' }}{{- tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n' }}
    {{- '<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n' }}
    {{- '</parameter>\n</function>\n</tool_call><|im_end|>\n' }}
{%- elif messages and messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + render_content(messages[0].content) + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = render_content(message.content) %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}
            {{- '<|im_start|>system\n' + content + '<|im_end|>\n' }}
        {%- endif %}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\n' }}
        {%- if loop.index0 > ns.last_user and reasoning %}
            {{- '<think>\n' + reasoning + '\n</think>\n\n' }}
        {%- endif %}
        {{- content }}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- set call = tool_call.function if tool_call.function is defined else tool_call %}
                {%- if loop.first and content %}{{- '\n\n' }}{%- elif not loop.first %}{{- '\n' }}{%- endif %}
                {{- '<tool_call>\n<function=' + call.name + '>\n' }}
                {%- if call.arguments is mapping %}
                    {%- for name, value in call.arguments.items() %}
                        {{- '<parameter=' + name + '>\n' }}
                        {{- value if value is string else value | tojson }}
                        {{- '\n</parameter>\n' }}
                    {%- endfor %}
                {%- elif call.arguments %}
                    {{- call.arguments }}{{- '\n' }}
                {%- endif %}
                {{- '</function>\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- else %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}
"""


@dataclass(frozen=True)
class TokenizerIds:
    """Where the added tokens landed."""

    special_base: int

    def id(self, content: str) -> int:
        return self.special_base + [c for c, _ in ADDED_TOKENS].index(content)

    @property
    def endoftext(self) -> int:
        return self.id("<|endoftext|>")

    @property
    def im_end(self) -> int:
        return self.id("<|im_end|>")


def special_base_for(vocab_size: int, eos_token_id: int | None) -> int:
    """The first added-token id: the preset's ``eos_token_id`` (``<|endoftext|>``) when it has one,
    else the last 26 ids of the vocabulary."""
    base = eos_token_id if eos_token_id is not None else vocab_size - N_ADDED
    if base < 256 + 1 or base + N_ADDED > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} cannot hold the byte alphabet and {N_ADDED} added tokens")
    return base


def build_tokenizer_json(special_base: int) -> str:
    """Train the BPE on the built-in corpus and attach the added tokens at ``special_base``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(special_base, MAX_TRAINED_VOCAB),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.strip().split("\n\n"), trainer=trainer)
    data = json.loads(tok.to_str())
    # The tokenizers library renumbers added tokens to follow the model's vocabulary; putting them
    # in the BPE vocab at their ids first (a sparse vocab) makes it keep them where the model has them.
    vocab = data["model"]["vocab"]
    added = []
    for i, (content, special) in enumerate(ADDED_TOKENS):
        vocab[content] = special_base + i
        added.append(
            {"id": special_base + i, "content": content, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": special}
        )  # fmt: skip
    data["added_tokens"] = added
    return json.dumps(data, ensure_ascii=False, indent=1)


def tokenizer_config(ids: TokenizerIds, max_length: int) -> dict:
    decoder = {
        str(ids.special_base + i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False, "special": s}
        for i, (c, s) in enumerate(ADDED_TOKENS)
    }  # fmt: skip
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def generation_config(ids: TokenizerIds) -> dict:
    return {
        "do_sample": True,
        "eos_token_id": [ids.im_end, ids.endoftext],
        "pad_token_id": ids.endoftext,
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
    }


def write_tokenizer_files(out: Path, *, vocab_size: int, eos_token_id: int | None, max_length: int) -> TokenizerIds:
    """Write tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config.json."""
    ids = TokenizerIds(special_base_for(vocab_size, eos_token_id))
    with atomic_output(out / "tokenizer.json", "w") as f:
        f.write(build_tokenizer_json(ids.special_base))
    write_json_atomic(out / "tokenizer_config.json", tokenizer_config(ids, max_length))
    with atomic_output(out / "chat_template.jinja", "w") as f:
        f.write(CHAT_TEMPLATE)
    write_json_atomic(out / "generation_config.json", generation_config(ids))
    return ids
