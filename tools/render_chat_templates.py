#!/usr/bin/env python3
"""Renders the chat-template fixtures with Hugging Face transformers' own `apply_chat_template`
and writes what it produced to tests/fixtures/templates/expected.json.

Studio renders chat templates with minijinja (inference/src/llm/template.rs); the Rust test
tests/tests/templates.rs renders the same cases and compares byte for byte. CI never runs this
script; rerun it after adding a fixture or a case, and review the diff of expected.json.

    python tools/render_chat_templates.py            # needs transformers (and its jinja2)

Each case renders a conversation through a real tokenizer object (a tiny word-level tokenizer
carrying the model's bos/eos strings from tokens.json), so the template sees exactly what
`tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` gives it.
`strftime_now` is pinned to FIXED_DATE (midnight) so date-bearing templates are reproducible;
the Rust side uses `ChatTemplate::with_date` with the same date.
"""

import datetime as _datetime
import json
import sys
from pathlib import Path

import jinja2
import transformers
import transformers.utils.chat_template_utils as chat_template_utils
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "templates"
FIXED_DATE = (2024, 7, 26)


class _FixedDateTime(_datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(*FIXED_DATE)


# transformers' strftime_now calls `datetime.now()` through this module's global.
chat_template_utils.datetime = _FixedDateTime

SYSTEM = "You are a concise assistant."
CONVERSATIONS = {
    "system_chat": (
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Hello! Who are you?"},
            {"role": "assistant", "content": "  I am a small model.  "},
            {"role": "user", "content": "Tell me a joke about Rust."},
        ],
        True,
    ),
    "chat_no_system": (
        [
            {"role": "user", "content": "Hello! Who are you?"},
            {"role": "assistant", "content": "I am a small model."},
            {"role": "user", "content": "Tell me a joke about Rust."},
        ],
        True,
    ),
    "single_user_no_generation_prompt": ([{"role": "user", "content": "Hi"}], False),
    "ends_with_assistant": (
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ],
        False,
    ),
    "two_users_in_a_row": (
        [
            {"role": "user", "content": "First."},
            {"role": "user", "content": "Second."},
        ],
        True,
    ),
    "unicode_and_escapes": (
        [
            {"role": "system", "content": "Réponds en français 🙂"},
            {"role": "user", "content": 'Ça va? "quotes" \\ backslash\nnew line\ttab <b>&amp;</b>'},
        ],
        True,
    ),
}

# Conversations with tools, for the templates that have a tool section (their `tools` list,
# an assistant's tool call and the tool's result), rendered with `apply_chat_template(…,
# tools=TOOLS)`. Mistral's template wants 9-character alphanumeric call ids.
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city, e.g. Zürich"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]
TOOL_CONVERSATIONS = {
    "tools_offered": (
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is the weather in Paris?"},
        ],
        True,
    ),
    "tool_call_and_result": (
        [
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "abc123def",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "abc123def", "content": "18 degrees, sunny"},
        ],
        True,
    ),
    "two_calls_json_result": (
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Weather in Paris and Oslo?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "abc123def",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    },
                    {
                        "id": "xyz789ghi",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": {"city": "Oslo", "unit": "celsius"},
                        },
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "abc123def", "content": '{"temp": 18, "sky": "sunny"}'},
            {"role": "tool", "tool_call_id": "xyz789ghi", "content": "4 degrees, rain"},
        ],
        True,
    ),
}

# Phi-4-mini's template reads the tools from the system message (`message['tools']`, a JSON
# text) and never renders `tool_calls`. Its model card puts `json.dumps` of the functions there,
# under the prompt "You are a helpful assistant with some tools." when there is no system
# message, and the model writes its calls as `<|tool_call|>[…]<|/tool_call|>`. Studio maps an
# OpenAI conversation the same way (ChatTemplate::adapt_tool_messages); this is that mapping,
# done in Python, so transformers renders what the model card describes.
PHI4_DEFAULT_SYSTEM = "You are a helpful assistant with some tools."


def tools_in_system_message(source):
    return "message['tools']" in source or "message.tools" in source


def phi4_messages(messages, tools):
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls:
            listed = [
                {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in calls
            ]
            m["content"] += "<|tool_call|>" + json.dumps(listed, ensure_ascii=False) + "<|/tool_call|>"
        m.pop("tool_call_id", None)
        out.append(m)
    if out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": PHI4_DEFAULT_SYSTEM})
    out[0]["tools"] = json.dumps([t["function"] for t in tools])
    return out


# Gemma 4's template takes tool results as `tool_responses` on the message that made the calls
# (`{"name", "response"}`, the response an object or a value) and has no branch for
# `role: "tool"` messages. Studio moves each tool result onto the calling message that way
# (ChatTemplate::adapt_tool_messages); this is that mapping, done in Python.
def reads_tool_responses(source):
    return "tool_responses" in source


def gemma4_messages(messages):
    out = []
    for m in messages:
        last = out[-1] if out else None
        if m["role"] == "tool" and last is not None and last.get("tool_calls"):
            calls = last["tool_calls"]
            answered = len(last.get("tool_responses", []))
            call = next((c for c in calls if c.get("id") == m.get("tool_call_id")), None)
            if call is None and answered < len(calls):
                call = calls[answered]
            name = call["function"]["name"] if call else "unknown"
            try:
                response = json.loads(m["content"])
                if not isinstance(response, dict):
                    response = m["content"]
            except ValueError:
                response = m["content"]
            last.setdefault("tool_responses", []).append({"name": name, "response": response})
            continue
        out.append(dict(m))
    return out


# Small templates exercising what the model templates reach only with tools or dates.
INLINE_TEMPLATES = {
    "tojson": (
        "{{ {'name': 'get_weather', 'parameters': {'type': 'object', 'properties': "
        "{'location': {'type': 'string', 'description': 'Ville, e.g. Zürich'}}, "
        "'required': ['location']}, 'n': 3, 'f': 2.5, 'big': 1e20, 'small': 0.00001, "
        "'t': true, 'z': none, 'empty': [], 'obj': {}, 's': 'tab\\t \"q\" \\\\ <&>'} "
        "| tojson(sort_keys=true) }}\n"
        "{{ [1, [2, {'b': 'x', 'a': 'é'}], []] | tojson(indent=4, sort_keys=true) }}\n"
        "{{ messages | tojson(indent=2, sort_keys=true) }}\n"
        "{{ 'é' | tojson(ensure_ascii=true) }}|{{ [1, 2] | tojson(separators=[',', ':']) }}"
    ),
    "strftime_now": (
        "{{ strftime_now('%d %b %Y') }}|{{ strftime_now('%A %B %-d %Y %H:%M:%S') }}"
        "|{{ strftime_now('%Y-%m-%d %a %j %y %I %p %e') }}"
    ),
    "whitespace_control": (
        "{% for m in messages %}\n"
        "    {% if m.role == 'user' %}\n"
        "  U: {{ m.content }}\n"
        "    {% else %}\n"
        "  X: {{- m.content -}}  \n"
        "    {%- endif %}\n"
        "{# comment #}\n"
        "{% endfor %}\n"
        "{%- if add_generation_prompt %}A:{% endif %}\n"
    ),
    "python_methods": (
        "{% for m in messages %}{{ m.content.strip().upper() }}|{{ m.role.startswith('us') }}|"
        "{{ m.content.split(' ') | length }}|{{ m.content.replace('o', '0') | trim }}|"
        "{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %};{% endfor %}"
        "{{ 'x' if tools is none else 'y' }}{{ documents is none }}{{ bos_token is defined }}"
        "{{ nothing is defined }}[{{ nothing }}]"
    ),
    "printing_values": (
        "{{ true }} {{ false }} {{ none }} {{ 3 }} {{ 2.5 }} {{ 1e20 }} {{ 10 / 4 }} {{ 7 // 2 }} "
        "{{ [1, 'a', \"it's\", none, true, 2.0, 'tab\\there'] }} {{ {'k': 'v'} }} "
        "{{ messages[0] | length }} {{ (messages | map(attribute='role') | list) }}"
    ),
    "generation_tags": (
        "{% for m in messages %}{% if m.role == 'assistant' %}\n"
        "  {%- generation -%}\n  A: {{ m.content }}\n  {% endgeneration %}\n"
        "{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
    ),
    "namespace_and_slicing": (
        "{% set ns = namespace(n=0, last='') %}{% for m in messages[1:] %}"
        "{% set ns.n = ns.n + 1 %}{% set ns.last = m.content[:5] %}{% endfor %}"
        "{{ ns.n }} {{ ns.last }} {{ messages[-1].role }} {{ (messages | selectattr('role', "
        "'equalto', 'user') | list | length) }}"
    ),
}

# Fixtures rendered a second time with Windows line endings: jinja2 normalises them to "\n".
CRLF_VARIANTS = ["tinyllama-chat.jinja", "gemma-2-instruct.jinja"]


def tokenizer_for(source, bos, eos):
    vocab = {"<unk>": 0}
    for token in (bos, eos):
        if token is not None:
            vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, chat_template=source
    )


def render(source, bos, eos, messages, add_generation_prompt, tools=None):
    tokenizer = tokenizer_for(source, bos, eos)
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return {"expected": text}
    except jinja2.exceptions.TemplateError as e:
        return {"error": str(e)}


def main():
    tokens = json.loads((FIXTURES / "tokens.json").read_text(encoding="utf-8"))
    cases = []
    for name, info in tokens["templates"].items():
        # newline="" keeps the file's bytes (and line endings) as they are
        with open(FIXTURES / name, encoding="utf-8", newline="") as f:
            source = f.read()
        variants = [("lf", source)]
        if name in CRLF_VARIANTS:
            variants.append(("crlf", source.replace("\n", "\r\n")))
        for line_endings, text in variants:
            for conversation, (messages, gen) in CONVERSATIONS.items():
                case = {
                    "template": name,
                    "line_endings": line_endings,
                    "conversation": conversation,
                    "add_generation_prompt": gen,
                    "messages": messages,
                }
                case.update(render(text, info["bos_token"], info["eos_token"], messages, gen))
                cases.append(case)
            if "tools" not in text or line_endings != "lf":
                continue
            for conversation, (messages, gen) in TOOL_CONVERSATIONS.items():
                case = {
                    "template": name,
                    "line_endings": line_endings,
                    "conversation": conversation,
                    "add_generation_prompt": gen,
                    "messages": messages,
                    "tools": TOOLS,
                }
                if reads_tool_responses(text):
                    rendered = render(
                        text, info["bos_token"], info["eos_token"], gemma4_messages(messages), gen, TOOLS
                    )
                elif tools_in_system_message(text):
                    rendered = render(
                        text, info["bos_token"], info["eos_token"], phi4_messages(messages, TOOLS), gen
                    )
                else:
                    rendered = render(text, info["bos_token"], info["eos_token"], messages, gen, TOOLS)
                case.update(rendered)
                cases.append(case)
    for name, source in INLINE_TEMPLATES.items():
        messages, gen = CONVERSATIONS["system_chat"]
        case = {
            "inline": name,
            "source": source,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "conversation": "system_chat",
            "add_generation_prompt": gen,
            "messages": messages,
        }
        case.update(render(source, "<s>", "</s>", messages, gen))
        cases.append(case)

    out = {
        "generated_by": "tools/render_chat_templates.py",
        "transformers": transformers.__version__,
        "jinja2": jinja2.__version__,
        "fixed_date": "%04d-%02d-%02d" % FIXED_DATE,
        "cases": cases,
    }
    path = FIXTURES / "expected.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    errors = sum("error" in c for c in cases)
    print(f"wrote {path.relative_to(ROOT)}: {len(cases)} cases ({errors} expected errors)")


if __name__ == "__main__":
    sys.exit(main())
