"""A chat template that renders the project's prompt string, so that a server applying chat templates to
embedding requests (`vllm serve EXPORT --runner pooling`) feeds the model what it was trained on.

A request's messages map onto the published format (`mme5.published.render`): the system message is the
instruction; the user message's text parts are the text and an image part makes it an image side. The
template writes the family's image token where the placeholder would be (the Qwen-VL families: VLM2Vec's bare
`<|image_pad|>`; LLaVA: `<image>`), which the server expands as the processor does. Mllama is not served by
current vLLM, so its exports carry no template (`mme5.export.CHAT_TEMPLATE_FAMILIES`).
"""

from __future__ import annotations

# Jinja, as transformers and vLLM render it (trim_blocks: newlines are written as expressions). The text of a
# side is stripped and joined with one space to the instruction; an instruction-bearing or image side ends
# in "\n" (the pooled token), a bare text does not.
_TEMPLATE = r"""{%- set ns = namespace(instruction='', texts=[], image=false) -%}
{%- for message in messages -%}
{%- set parts = message['content'] if message['content'] is not string
    else [{'type': 'text', 'text': message['content']}] -%}
{%- for part in parts -%}
{%- if part['type'] == 'text' and message['role'] == 'system' -%}
{%- set ns.instruction = (ns.instruction ~ ' ' ~ part['text']) | trim -%}
{%- elif part['type'] == 'text' -%}
{%- set ns.texts = ns.texts + [part['text'] | trim] -%}
{%- elif part['type'] in ['image', 'image_url'] -%}
{%- set ns.image = true -%}
{%- endif -%}
{%- endfor -%}
{%- endfor -%}
{%- set body = ([ns.instruction] + ns.texts) | select | join(' ') -%}
{%- if ns.image -%}{{ 'IMAGE_TOKEN' ~ '\n' }}{%- endif -%}
{{- body -}}
{%- if ns.instruction or ns.image -%}{{ '\n' }}{%- endif -%}"""


def chat_template(image_token: str) -> str:
    """The template for a family whose image token is `image_token`."""
    return _TEMPLATE.replace("IMAGE_TOKEN", image_token)
