"""The official openai client against `studio serve` on loopback: tool calling (a required
call, the tool's result sent back, a streamed call), JSON schema (raw and through the SDK's
Pydantic `parse` helper) and embeddings, as in OpenAI's docs. A manual check (CI runs none of
it): with a tiny random-weight model the replies are noise, but every call must succeed and
every tool call and JSON reply must parse.

    cargo run -p studio-tests --example write_tiny_chat_model -- /tmp/m qwen2 \
        tests/fixtures/templates/qwen2.5-instruct.jinja
    studio serve --model /tmp/m --port 8765 \
        --embedding-model tests/fixtures/sentence_embeddings/minilm-mean &
    pip install openai pydantic && python tools/openai_client_examples.py
"""
import json
from typing import Literal

from openai import OpenAI
from pydantic import BaseModel, Field

client = OpenAI(base_url="http://127.0.0.1:8765/v1", api_key="unused")
model = client.models.list().data[0].id
print("models:", [m.id for m in client.models.list().data])

# Tool calling (OpenAI's get_weather example).
tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get current temperature for a given location.",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string", "description": "City and country e.g. Bogotá, Colombia", "maxLength": 20}},
            "required": ["location"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}]
messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
completion = client.chat.completions.create(model=model, messages=messages, tools=tools,
                                            tool_choice="required", seed=1, max_tokens=200)
msg = completion.choices[0].message
print("finish_reason:", completion.choices[0].finish_reason)
print("tool_calls:", [(c.id, c.function.name, c.function.arguments) for c in msg.tool_calls])
call = msg.tool_calls[0]
args = json.loads(call.function.arguments)
messages.append(msg)
messages.append({"role": "tool", "tool_call_id": call.id, "content": "14 degrees, light rain"})
final = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=8, seed=1)
print("after the tool result:", final.choices[0].finish_reason, repr(final.choices[0].message.content))

# Streamed tool call: the SDK's stream of argument deltas.
stream = client.chat.completions.create(model=model, messages=messages[:1], tools=tools,
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                        stream=True, seed=2, max_tokens=200)
name, arguments = None, ""
for chunk in stream:
    for d in chunk.choices[0].delta.tool_calls or []:
        name = d.function.name or name
        arguments += d.function.arguments or ""
print("streamed call:", name, arguments, json.loads(arguments))

# Structured output: a JSON schema, raw.
schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "rain": {"type": "boolean"}},
          "required": ["city", "rain"], "additionalProperties": False}
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather as JSON"}],
                                   response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}},
                                   seed=3, max_tokens=200)
print("json_schema reply:", r.choices[0].message.content, json.loads(r.choices[0].message.content))

# Structured output through the SDK's Pydantic helper.
class Event(BaseModel):
    name: str = Field(max_length=10)
    day: Literal["monday", "friday"]
    guests: int

parsed = client.chat.completions.parse(model=model, messages=[{"role": "user", "content": "Plan an event"}],
                                       response_format=Event, seed=4, max_tokens=200)
print("parsed:", repr(parsed.choices[0].message.parsed))

# Embeddings (the SDK asks for base64 and decodes it).
e = client.embeddings.create(model="minilm-mean", input=["The cat sat on the mat.", "big old house"])
print("embeddings:", len(e.data), "x", len(e.data[0].embedding), "first values", [round(v, 4) for v in e.data[0].embedding[:4]], "usage", e.usage)
